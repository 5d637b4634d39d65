"""Train the demo's teacher: a small class-conditional EDM UNet on the 16×16 digits (CPU, minutes).

    python examples/digits/train_teacher.py --data_dir outputs/digits/data --output_dir outputs/digits/teacher

EDM loss (Karras et al. 2022): log σ ~ N(−1.2, 1.2²), weight (σ² + σd²)/(σ σd)², σd = 0.5, the
preconditioning of `tfd_utils.edm_denoise` with c_noise = 250·ln σ (`--precond cm`, what
diffusers' ConsistencyModelPipeline feeds the UNet). Saved as a ConsistencyModelPipeline
(unet/ + scheduler/), the EMA weights; the completion marker is written last, and a rerun
with a finished teacher in --output_dir returns at once.
"""

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from prepare_data import load_split  # noqa: E402
from tfd_training import write_json  # noqa: E402
from tfd_utils import edm_denoise  # noqa: E402

COMPLETE = "teacher_complete.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a small class-conditional EDM teacher on the digits.")
    p.add_argument("--data_dir", default="outputs/digits/data", help="Folder written by prepare_data.py.")
    p.add_argument("--output_dir", default="outputs/digits/teacher", help="Where the teacher pipeline is saved.")
    p.add_argument("--max_train_steps", type=int, default=600, help="Optimiser steps.")
    p.add_argument("--batch_size", type=int, default=64, help="Images per step.")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate after warm-up.")
    p.add_argument("--lr_warmup_steps", type=int, default=100, help="Linear learning-rate warm-up steps.")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    p.add_argument("--ema_max_decay", type=float, default=0.995, help="EMA decay cap; decay = min(cap, (1+t)/(10+t)).")
    p.add_argument("--channels", default="16,32,32", help="block_out_channels of the UNet (comma separated).")
    p.add_argument("--P_mean", type=float, default=-1.2, help="Mean of log σ in the EDM loss.")
    p.add_argument("--P_std", type=float, default=1.2, help="Std of log σ in the EDM loss.")
    p.add_argument("--sigma_data", type=float, default=0.5, help="σ_data of the EDM preconditioning.")
    p.add_argument("--high_sigma_fraction", type=float, default=0.0,
                   help="Fraction of samples with log σ uniform in [--high_sigma_min, --high_sigma_max] instead of "
                        "the log-normal.")
    p.add_argument("--high_sigma_min", type=float, default=1.0, help="Lower end of the high-σ draws.")
    p.add_argument("--high_sigma_max", type=float, default=80.0, help="Upper end of the high-σ draws (σ_max).")
    p.add_argument("--seed", type=int, default=0, help="Seed of initialisation, batches and noise.")
    p.add_argument("--log_every", type=int, default=100, help="Steps between loss lines in the log.")
    p.add_argument("--overwrite", action="store_true", help="Retrain even if a finished teacher exists.")
    return p.parse_args(argv)


def teacher_config(resolution, channels, num_classes=10):
    """The UNet2DModel config of the digits teacher (EDM-style: scale-shift norm, attention at the lowest res)."""
    n = len(channels)
    return dict(
        sample_size=resolution, in_channels=1, out_channels=1, block_out_channels=tuple(channels),
        layers_per_block=1, down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1), attention_head_dim=min(32, channels[-1]),
        norm_num_groups=min(16, min(channels)), num_class_embeds=num_classes, resnet_time_scale_shift="scale_shift",
    )


def edm_loss(unet, x, labels, generator, P_mean=-1.2, P_std=1.2, sigma_data=0.5, high_sigma_fraction=0.0,
             high_sigma_range=(1.0, 80.0)):
    """EDM training loss: weighted ‖D(x + σn; σ) − x‖² with log σ ~ N(P_mean, P_std²).

    With high_sigma_fraction > 0, that fraction of the samples instead draws log σ uniformly in
    high_sigma_range: EDM's log-normal almost never reaches σ = 80 (4.6 std above its mean), where
    the one-step student starts.
    """
    rnd = torch.randn(x.shape[0], generator=generator)
    sigma = (P_mean + P_std * rnd).exp()
    if high_sigma_fraction > 0:
        lo, hi = (math.log(s) for s in high_sigma_range)
        pick = torch.rand(x.shape[0], generator=generator) < high_sigma_fraction
        sigma = torch.where(pick, (lo + (hi - lo) * torch.rand(x.shape[0], generator=generator)).exp(), sigma)
    noise = torch.randn(x.shape, generator=generator)
    denoised = edm_denoise(unet, x + sigma.view(-1, 1, 1, 1) * noise, sigma, labels, "cm", sigma_data)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return (weight.view(-1, 1, 1, 1) * (denoised - x) ** 2).mean()


# Settings that define the teacher: a finished teacher trained with others is retrained.
IDENTITY = ("data_dir", "max_train_steps", "batch_size", "learning_rate", "lr_warmup_steps", "max_grad_norm",
            "ema_max_decay", "channels", "P_mean", "P_std", "sigma_data", "high_sigma_fraction", "high_sigma_min",
            "high_sigma_max", "seed")


def is_finished(output_dir, args):
    path = os.path.join(output_dir, COMPLETE)
    if not os.path.exists(path):
        return False
    saved = json.load(open(path)).get("config", {})
    return all(saved.get(k) == getattr(args, k) for k in IDENTITY)


def save_teacher(unet, output_dir, info):
    """A ConsistencyModelPipeline folder (unet/ + scheduler/), then the completion marker."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    scheduler = CMStochasticIterativeScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, clip_denoised=False)
    ConsistencyModelPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp)
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    write_json(os.path.join(output_dir, COMPLETE), info)


def main(argv=None):
    args = parse_args(argv)
    args.data_dir = os.path.abspath(args.data_dir)
    if is_finished(args.output_dir, args) and not args.overwrite:
        print(f"Teacher already trained: {args.output_dir} (pass --overwrite to retrain).")
        return args.output_dir
    if not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"No data at {args.data_dir}: run examples/digits/prepare_data.py first.")
    from diffusers import UNet2DModel

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_split(args.data_dir, "train")
    channels = [int(c) for c in args.channels.split(",")]
    unet = UNet2DModel(**teacher_config(images.shape[-1], channels))
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.Adam(unet.parameters(), lr=args.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(args.lr_warmup_steps, 1)))
    print(f"Teacher: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, "
          f"{len(images)} training digits, {args.max_train_steps} steps of {args.batch_size}.")

    start, running = time.time(), None
    bar = tqdm(range(args.max_train_steps), desc="teacher", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(images), (args.batch_size,), generator=gen)
        loss = edm_loss(unet, images[idx], labels[idx], gen, args.P_mean, args.P_std, args.sigma_data,
                        args.high_sigma_fraction, (args.high_sigma_min, args.high_sigma_max))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
        opt.step()
        sched.step()
        decay = min(args.ema_max_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_train_steps:
            bar.write(f"step {step + 1}: loss {running:.4f} ({time.time() - start:.0f} s)")
    info = {"steps": args.max_train_steps, "seconds": round(time.time() - start, 1), "final_loss": running,
            "config": vars(args)}
    save_teacher(ema, args.output_dir, info)
    print(f"Saved the EMA teacher to {args.output_dir} ({info['seconds']} s).")
    return args.output_dir


if __name__ == "__main__":
    main()
