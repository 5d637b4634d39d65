#!/usr/bin/env python
# ImageNet-64 FID (EDM's protocol): N one-step samples (labels i mod classes, uint8 via clamp((x+1)·127.5)),
# written as PNGs, then FID against NVlabs EDM's reference statistics (imagenet-64x64.npz) with the
# StyleGAN3 Inception network and EDM's preprocessing (the network's own resize).
#
#   accelerate launch examples/evaluate_imagenet64.py --model tfd-imagenet64 \
#       --ref imagenet-64x64.npz --output_dir eval/tfd-imagenet64
#
# Sample i uses noise seed (--seed + i) and label i mod classes, so the images do not depend on the
# number of processes, and a killed run resumes: PNGs already written are skipped.

import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_utils  # noqa: E402
import tfd_fid  # noqa: E402
import tfd_training  # noqa: E402
import tfd_utils  # noqa: E402
import train_tfd_imagenet64  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FID of a one-step ImageNet-64 student (or a multi-step teacher).")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="Saved student: a ConsistencyModelPipeline folder/repo (unet + "
                        "CMStochasticIterativeScheduler). "
                        "With --teacher: a UNet2DModel folder/repo (or a pipeline with unet/).")
    g.add_argument("--edm_pickle", default=None,
                   help="An NVlabs EDM network pickle ({'ema': net}) instead of --model (student or, with --teacher, "
                        "teacher).")
    g.add_argument("--edm_repo", default=None, help="Path to an NVlabs/edm checkout, so --edm_pickle unpickles.")
    g.add_argument("--teacher", action="store_true",
                   help="Sample with the deterministic EDM Heun sampler (--num_steps) instead of one step.")
    g.add_argument("--num_steps", type=int, default=18, help="Heun steps of --teacher (2·steps − 1 evaluations).")
    g.add_argument("--precond", default="cm", choices=tfd_utils.PRECONDS,
                   help="Noise conditioning of a diffusers --teacher UNet: cm = 250·ln σ, edm = ln(σ)/4.")
    g.add_argument("--sigma_min", type=float, default=0.002, help="σ_min (a student pipeline's scheduler overrides).")
    g.add_argument("--sigma_max", type=float, default=80.0, help="σ_max (a student pipeline's scheduler overrides).")
    g.add_argument("--sigma_data", type=float, default=0.5, help="σ_data (a student pipeline's scheduler overrides).")
    g.add_argument("--num_classes", type=int, default=None,
                   help="Classes to cycle through (default: the network's number of class labels).")
    g = p.add_argument_group("sampling")
    g.add_argument("--num_samples", type=int, default=50_000, help="Samples (the paper: 50,000).")
    g.add_argument("--batch_size", type=int, default=250, help="Per-process batch of sampling and Inception.")
    g.add_argument("--seed", type=int, default=0, help="Sample i uses noise seed seed + i.")
    g.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"),
                   help="Autocast the generator (the Inception network always runs in float32).")
    g = p.add_argument_group("FID")
    g.add_argument("--ref", required=True,
                   help="Reference statistics npz (mu, sigma): NVlabs EDM's imagenet-64x64.npz for the paper's table.")
    g.add_argument("--fid_mode", default="legacy_tensorflow", choices=tfd_fid.MODES,
                   help="Inception preprocessing: legacy_tensorflow = EDM's (matches imagenet-64x64.npz); clean = "
                        "clean-fid's.")
    g.add_argument("--output_dir", required=True,
                   help="Images go to OUTPUT_DIR/images (index-named PNGs, reused when present; the settings "
                        "they were made with in settings.json must match); results to OUTPUT_DIR/fid.json.")
    g.add_argument("--skip_fid", action="store_true", help="Only generate the images.")
    args = p.parse_args(argv)
    if (args.model is None) == (args.edm_pickle is None):
        p.error("Give exactly one of --model (diffusers) or --edm_pickle (NVlabs EDM).")
    if args.num_samples < 2 or args.batch_size < 1 or args.num_steps < 1:
        p.error("--num_samples must be >= 2, --batch_size and --num_steps >= 1.")
    return args


def load_generator(args, device):
    """(generate(noise, labels) → x in [−1, 1], num_classes, channels, resolution)."""
    if args.edm_pickle:
        net = train_tfd_imagenet64.load_edm_pickle(args.edm_pickle, args.edm_repo)
        net = net.to(device).eval().requires_grad_(False)
        label_dim = int(net.label_dim or 0)

        def generate(noise, labels):
            onehot = torch.nn.functional.one_hot(labels, label_dim).float() if label_dim else None

            def denoise(x, s):  # EDM's own call: net(x, σ, one-hot)
                return net(x, torch.full((x.shape[0],), float(s), device=x.device), onehot).float()

            if args.teacher:  # EDM's own call (float16 inside a use_fp16 network on a GPU, as EDM's fid.py)
                return eval_utils.edm_heun_sample(denoise, noise, args.num_steps, args.sigma_min, args.sigma_max)
            return tfd_utils.edm_net_one_step(net, noise, labels, args.sigma_max, label_dim)  # the training function

        return generate, label_dim, net.img_channels, net.img_resolution

    unet, sched = load_diffusers(args.model, args.teacher)
    unet = unet.to(device).eval().requires_grad_(False)
    if sched is not None:  # the student pipeline's own σ's
        args.sigma_min, args.sigma_max, args.sigma_data = (
            sched.config[k] for k in ("sigma_min", "sigma_max", "sigma_data"))
    if args.teacher:
        def generate(noise, labels):
            def denoise(x, s):
                return tfd_utils.edm_denoise(unet, x, s, labels, args.precond, args.sigma_data)
            return eval_utils.edm_heun_sample(denoise, noise, args.num_steps, args.sigma_min, args.sigma_max)
    else:
        def generate(noise, labels):  # the exact step ConsistencyModelPipeline runs with one step
            return tfd_utils.edm_one_step(unet, noise, labels, args.sigma_max, args.sigma_min, "cm", args.sigma_data)
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return generate, train_tfd_imagenet64.num_class_labels(unet), unet.config.in_channels, size


def load_diffusers(path, teacher):
    """(UNet2DModel, CMStochasticIterativeScheduler or None) from a pipeline folder, or a bare UNet (--teacher)."""
    from diffusers import CMStochasticIterativeScheduler, UNet2DModel

    if os.path.isdir(path) and not teacher and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path} is not a saved pipeline (no model_index.json): --model takes the "
                                "ConsistencyModelPipeline folder train_tfd_imagenet64.py writes (or pass --teacher).")
    if not teacher:
        # clip_denoised does not matter here: clamping to uint8 clips the same way
        sched = CMStochasticIterativeScheduler.from_pretrained(path, subfolder="scheduler")
        return UNet2DModel.from_pretrained(path, subfolder="unet"), sched
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return UNet2DModel.from_pretrained(path, subfolder="unet"), None
    try:
        return UNet2DModel.from_pretrained(path), None
    except (OSError, EnvironmentError):
        return UNet2DModel.from_pretrained(path, subfolder="unet"), None


def image_path(image_dir, i):
    return os.path.join(image_dir, f"{i:06d}.png")


def noise_for(indices, shape, seed):
    """Per-sample noise: sample i is torch.randn under seed + i, whatever the batch or process."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in indices])


def generate_missing(args, state, image_dir):
    """Write every PNG of this process's range that is not there yet; returns how many were written."""
    generate, num_classes, channels, res = load_generator(args, state.device)
    num_classes = args.num_classes or num_classes
    todo = [i for i in eval_utils.shard(args.num_samples, state.process_index, state.num_processes)
            if not os.path.isfile(image_path(image_dir, i))]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    batches = [todo[s:s + args.batch_size] for s in range(0, len(todo), args.batch_size)]
    from tqdm.auto import tqdm

    for idx in tqdm(batches, desc=f"sampling (rank {state.process_index})", disable=not batches):
        noise = noise_for(idx, (channels, res, res), args.seed).to(state.device)
        labels = (torch.tensor(idx) % num_classes).to(state.device) if num_classes else None
        with torch.no_grad(), torch.autocast(state.device.type, dtype=dtype, enabled=dtype is not None):
            images = tfd_training.to_uint8(generate(noise, labels)).numpy()
        for i, a in zip(idx, images):
            tfd_training.save_png(image_path(image_dir, i), Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a))
    return len(todo)


def shard_features(args, state, image_dir):
    """Inception features of this process's images, read back from the PNGs (what is stored is what counts)."""
    idx = list(eval_utils.shard(args.num_samples, state.process_index, state.num_processes))
    feats = [np.zeros((0, tfd_fid.FEATURE_DIM), np.float32)]
    for s in range(0, len(idx), args.batch_size):
        images = [tfd_fid.load_image(image_path(image_dir, i)) for i in idx[s:s + args.batch_size]]
        feats.append(tfd_fid.inception_features(images, args.batch_size, state.device, args.fid_mode))
    return np.concatenate(feats)


def gather_features(feats, state, num_samples):
    """All processes' features in index order (each range padded to the same length for the gather)."""
    if state.num_processes == 1:
        return feats
    from accelerate.utils import gather

    per = -(-num_samples // state.num_processes)
    padded = torch.zeros(per, feats.shape[1], device=state.device)
    padded[:len(feats)] = torch.from_numpy(feats).to(state.device)
    return gather(padded).cpu().numpy()[:num_samples]


def main(args):
    from accelerate import PartialState

    # cpu=True where there is no GPU: lets `accelerate launch --cpu` / torchrun shard over CPU processes
    state = PartialState(cpu=not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") == "1")
    reference = None if args.skip_fid else tfd_fid.load_reference_stats(args.ref)  # fail before sampling
    image_dir = os.path.join(args.output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    keys = ("model", "edm_pickle", "teacher", "num_steps", "precond", "sigma_min", "sigma_max", "sigma_data",
            "num_classes", "seed", "mixed_precision")
    if state.is_main_process:
        eval_utils.check_run_settings(os.path.join(args.output_dir, "settings.json"),
                                      {k: getattr(args, k) for k in keys})
    state.wait_for_everyone()
    t0 = time.time()
    written = eval_utils.total_over_processes(generate_missing(args, state, image_dir), state)
    if args.skip_fid:
        return None
    feats = gather_features(shard_features(args, state, image_dir), state, args.num_samples)
    if not state.is_main_process:
        return None
    fid = tfd_fid.fid_from_features(feats, *reference)
    what = args.edm_pickle or args.model
    result = {
        "fid": fid, "num_samples": args.num_samples, "model": what, "teacher": args.teacher,
        "num_steps": args.num_steps if args.teacher else 1, "ref": os.path.abspath(args.ref),
        "fid_mode": args.fid_mode, "inception": tfd_fid.inception_path(), "seed": args.seed,
        "images": os.path.abspath(image_dir), "generated_now": written, "num_processes": state.num_processes,
        "seconds": round(time.time() - t0, 1),
    }
    tfd_training.write_json(os.path.join(args.output_dir, "fid.json"), result)
    n = args.num_samples
    steps = f"{result['num_steps']}-step" if args.teacher else "one-step"
    print(f"FID-{f'{n // 1000}k' if n % 1000 == 0 else n} {fid:.4f} ({steps} {what}, {n} samples, "
          f"ref {os.path.basename(args.ref)}, {args.fid_mode})")
    return result


if __name__ == "__main__":
    main(parse_args())
