"""The demo's metric network: a small CNN digit classifier, trained once on the train split.

    python examples/digits/classifier.py --data_dir outputs/digits/data --output_dir outputs/digits/classifier

Its 64-d penultimate features are the space of the primary metric (a Fréchet distance, like FID
but for 16×16 digits); its predictions give class accuracy (agreement with the requested label).
Saved as model.pt (state dict + accuracies), written atomically; a rerun reuses it.
"""

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from prepare_data import load_split  # noqa: E402
from tfd_training import atomic_write  # noqa: E402

FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """16×16×1 → 64-d features (`features`) → 10 logits."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # 8×8
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),  # 4×4
        )
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x):
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) if x.shape[-1] != 16 else x
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


def random_shift(x, generator, max_shift=1):
    """Translate each image by up to max_shift pixels (zero-padded with the background, −1)."""
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator)
    h, w = x.shape[-2:]
    for i, (dy, dx) in enumerate(offs.tolist()):
        out[i] = pad[i, :, dy:dy + h, dx:dx + w]
    return out


@torch.no_grad()
def accuracy(model, x, y, batch_size=500):
    model.eval()
    pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return (pred == y).float().mean().item()


def train_classifier(x_train, y_train, epochs=15, batch_size=64, lr=2e-3, seed=0, progress=True):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in tqdm(range(epochs), desc="classifier", disable=not progress):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(random_shift(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def load_classifier(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitClassifier()
    model.load_state_dict(ckpt.pop("state_dict"))
    return model.eval().requires_grad_(False), ckpt


def get_classifier(data_dir, output_dir, epochs=15, seed=0, progress=True):
    """The trained classifier (trained and saved on the first call) and its saved info."""
    path = os.path.join(output_dir, "model.pt")
    if os.path.isfile(path):
        return load_classifier(path)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"No data at {data_dir}: run examples/digits/prepare_data.py first.")
    x_train, y_train = load_split(data_dir, "train")
    x_test, y_test = load_split(data_dir, "test")
    model = train_classifier(x_train, y_train, epochs, seed=seed, progress=progress)
    info = {"train_accuracy": accuracy(model, x_train, y_train), "test_accuracy": accuracy(model, x_test, y_test)}
    os.makedirs(output_dir, exist_ok=True)
    atomic_write(path, lambda p: torch.save({"state_dict": model.state_dict(), **info}, p))
    return load_classifier(path)


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the digits classifier of the demo's metrics.")
    p.add_argument("--data_dir", default="outputs/digits/data", help="Folder written by prepare_data.py.")
    p.add_argument("--output_dir", default="outputs/digits/classifier", help="Where model.pt is saved.")
    p.add_argument("--epochs", type=int, default=15, help="Training epochs over the train split.")
    p.add_argument("--seed", type=int, default=0, help="Seed of initialisation and batches.")
    args = p.parse_args(argv)
    _, info = get_classifier(args.data_dir, args.output_dir, args.epochs, args.seed)
    print(f"Classifier: train accuracy {info['train_accuracy']:.3f}, held-out accuracy {info['test_accuracy']:.3f}")


if __name__ == "__main__":
    main()
