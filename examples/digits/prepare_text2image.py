"""The text-to-image demo's data: the digits with captions, as a `datasets` folder on disk.

    python examples/digits/prepare_text2image.py --output_dir outputs/digits/data_t2i

Writes a DatasetDict ("train", "test"; the same images and split as prepare_data.py) with columns
"image" (PIL, mode L, 16×16), "text" (one caption per image) and "label" (0–9); a third split, "distill",
is "train" plus one row per held-out prompt without an image (what train_tfd_sdxl.py / train_tfd_sd3.py
distil on: real positives where a caption matches, teacher samples for the rest). Two prompt files:
- prompts_train.txt: every caption of the data set (TRAIN_TEMPLATES × 10 digits); each one matches
  about 14 training images (the paper's prompt-matched real positives);
- prompts_heldout.txt: HELDOUT_TEMPLATES × 10 digits, captions no image carries (their positives
  must come from teacher samples).
`caption_digit` maps any of these captions (and similar ones) back to its digit, for evaluation.
"""

import argparse
import os
import re
import shutil
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prepare_data import digits_uint8  # noqa: E402

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {word}: the digit's name ("seven"); {num}: its numeral ("7").
TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {num}",
    "a drawing of the number {word}",
    "a handwritten digit {num}",
    "the number {word}",
    "an image of the digit {word}",
    "a sketch of a {num}",
    "a small {word}",
    "{word}",
    "a grayscale {num}",
)
# No image carries these. Some recombine training words, some bring words the teacher never saw
# ("picture", "numeral", "photo", "scan"): the digit is the only word they share with the data.
HELDOUT_TEMPLATES = (
    "a picture of the numeral {word}",
    "the handwritten number {num}",
    "a sketch of the digit {word}",
    "a photo of a {num}",
    "a scan of the number {word}",
)

PROMPT_FILES = {"train": "prompts_train.txt", "heldout": "prompts_heldout.txt"}


def caption(template, digit):
    return template.format(word=WORDS[digit], num=str(digit))


def prompts(templates):
    """Every (template, digit) caption, digit-major within each template: labels are i mod 10."""
    return [caption(t, d) for t in templates for d in range(10)]


def caption_digit(text):
    """The digit a caption names (its one digit word or numeral); ValueError if none or several."""
    found = set()
    for tok in re.findall(r"[a-z]+|\d", str(text).lower()):
        if tok in WORDS:
            found.add(WORDS.index(tok))
        elif tok.isdigit():
            found.add(int(tok))
    if len(found) != 1:
        raise ValueError(f"Caption {text!r} names {'no digit' if not found else f'several digits {sorted(found)}'}.")
    return found.pop()


def assign_captions(labels, seed):
    """One training template per image: within each class, a seeded shuffle dealt round-robin."""
    rng = np.random.default_rng(seed)
    out = [None] * len(labels)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        for k, i in enumerate(rng.permutation(idx)):
            out[i] = caption(TRAIN_TEMPLATES[k % len(TRAIN_TEMPLATES)], c)
    return out


def build_dataset(resolution=16, num_test=400, seed=0):
    import datasets
    from PIL import Image
    from sklearn.model_selection import train_test_split

    images, labels = digits_uint8(resolution)
    # The same call as prepare_data.build_dataset: the same train/test rows.
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=num_test, stratify=labels, random_state=seed
    )
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(num_classes=10)})

    def split(idx, split_seed):
        texts = assign_captions(labels[idx], split_seed)
        rows = {"image": [Image.fromarray(images[i], mode="L") for i in idx], "text": texts,
                "label": labels[idx].tolist()}
        return datasets.Dataset.from_dict(rows, features=features)

    train = split(idx_train, seed)
    held = prompts(HELDOUT_TEMPLATES)
    no_images = datasets.Dataset.from_dict({"image": [None] * len(held), "text": held,
                                            "label": [caption_digit(t) for t in held]}, features=features)
    return datasets.DatasetDict({"train": train, "test": split(idx_test, seed + 1),
                                 "distill": datasets.concatenate_datasets([train, no_images])})


def save(dd, output_dir):
    """The data set and both prompt files into a temporary folder, then one rename."""
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(tmp)
    for key, templates in (("train", TRAIN_TEMPLATES), ("heldout", HELDOUT_TEMPLATES)):
        with open(os.path.join(tmp, PROMPT_FILES[key]), "w") as f:
            f.write("\n".join(prompts(templates)) + "\n")
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)


def read_prompts(data_dir, key):
    """The prompts of prompts_train.txt ("train") or prompts_heldout.txt ("heldout")."""
    with open(os.path.join(data_dir, PROMPT_FILES[key])) as f:
        return [line.strip() for line in f if line.strip()]


def load_split_text(data_dir, split):
    """(uint8 images [N, R, R], captions [N], labels int64 [N]) of one split."""
    import datasets

    ds = datasets.load_from_disk(data_dir)[split]
    x = np.stack([np.asarray(im, dtype=np.uint8) for im in ds["image"]])
    return x, list(ds["text"]), np.asarray(ds["label"], dtype=np.int64)


def main(argv=None):
    p = argparse.ArgumentParser(description="Save the captioned digits (16×16) and prompt files as a datasets folder.")
    p.add_argument("--output_dir", default="outputs/digits/data_t2i", help="Where the DatasetDict is saved.")
    p.add_argument("--resolution", type=int, default=16, help="Side of the saved images (bilinear from 8×8).")
    p.add_argument("--num_test", type=int, default=400, help="Held-out images (stratified by class).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the train/test split and of the caption draw.")
    args = p.parse_args(argv)
    dd = build_dataset(args.resolution, args.num_test, args.seed)
    save(dd, args.output_dir)
    n_caps = len(set(dd["train"]["text"]))
    print(f"Saved {len(dd['train'])} train / {len(dd['test'])} test captioned digits ({args.resolution}×"
          f"{args.resolution}, {n_caps} distinct training captions, {len(HELDOUT_TEMPLATES) * 10} held-out prompts) "
          f"to {args.output_dir}")


if __name__ == "__main__":
    main()
