"""The demo's data: scikit-learn's bundled 8×8 digits as a 16×16 `datasets` folder on disk.

    python examples/digits/prepare_data.py --output_dir outputs/digits/data

Writes a DatasetDict ("train", "test") with columns "image" (PIL, mode L, 16×16) and "label"
(0–9), via `save_to_disk`: `train_tfd_imagenet64.py --dataset_name outputs/digits/data` reads it.
The test split is stratified and seeded; it is the held-out reference of every metric.
"""

import argparse
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Save sklearn's digits, upscaled to 16×16, as a datasets folder.")
    p.add_argument("--output_dir", default="outputs/digits/data", help="Where the DatasetDict is saved.")
    p.add_argument("--resolution", type=int, default=16, help="Side of the saved images (bilinear from 8×8).")
    p.add_argument("--num_test", type=int, default=400, help="Held-out images (stratified by class).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the train/test split.")
    return p.parse_args(argv)


def digits_uint8(resolution=16):
    """All 1,797 digits as uint8 [N, R, R] (0 = background) and their labels [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0 * 2 - 1  # [-1, 1]
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    return x, d.target.astype(np.int64)


def build_dataset(resolution=16, num_test=400, seed=0):
    import datasets
    from PIL import Image
    from sklearn.model_selection import train_test_split

    images, labels = digits_uint8(resolution)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=num_test, stratify=labels, random_state=seed
    )
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})

    def split(idx):
        rows = {"image": [Image.fromarray(images[i], mode="L") for i in idx], "label": labels[idx].tolist()}
        return datasets.Dataset.from_dict(rows, features=features)

    return datasets.DatasetDict({"train": split(idx_train), "test": split(idx_test)})


def save_dataset(dd, output_dir):
    """save_to_disk into a temporary folder, then rename: a killed run leaves no half data set."""
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(tmp)
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)


def load_split(data_dir, split):
    """(images float32 [N, 1, R, R] in [−1, 1], labels int64 [N]) of one split of the saved folder."""
    import datasets

    ds = datasets.load_from_disk(data_dir)[split].with_format("numpy")
    x = np.stack([np.asarray(im, dtype=np.uint8) for im in ds["image"]])
    x = torch.from_numpy(x).float()[:, None] / 127.5 - 1
    return x, torch.as_tensor(np.asarray(ds["label"]), dtype=torch.long)


def main(argv=None):
    args = parse_args(argv)
    dd = build_dataset(args.resolution, args.num_test, args.seed)
    save_dataset(dd, args.output_dir)
    print(f"Saved {len(dd['train'])} train / {len(dd['test'])} test digits ({args.resolution}×{args.resolution}) "
          f"to {args.output_dir}")


if __name__ == "__main__":
    main()
