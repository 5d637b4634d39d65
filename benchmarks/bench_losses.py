"""Time the TFD losses at the paper's sizes and compare them with one teacher forward.

    python benchmarks/bench_losses.py                  # CPU (and the table for RESULTS.md)
    python benchmarks/bench_losses.py --device cuda    # GPU
    python benchmarks/bench_losses.py --tiny           # a few seconds: the CI smoke test

ImageNet-64 (the paper's recipe): 70 groups × (N, P, M) = (4, 4, 4) at the pooled dims of the five paper layers
of the ADM UNet (enc:6, enc:11, bottleneck, dec:7, dec:12; pool 4). SDXL: 8 groups × (4, 4), the
positives reused as anchors, at 81,920 and 327,680 dims. Every loss time is forward + backward.
The teacher is the ADM ImageNet-64 UNet2DModel (openai consistency-models layout, random weights),
timed for one float32 no-grad forward at the batch one training step feeds it (70 × 12 = 840).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tfd_utils import FeatureExtractor, anchor_margin_loss, drifting_loss  # noqa: E402

PAPER_LAYERS = ["enc:6", "enc:11", "bottleneck", "dec:7", "dec:12"]
# (resolution level, level of the selector) in the ADM layout: enc:6 = 32x32_block1, enc:11 =
# 16x16_block2, bottleneck = 8x8_block2, dec:7 = 16x16_block0, dec:12 = 32x32_block0
LAYER_LEVEL = {"enc:6": 1, "enc:11": 2, "bottleneck": 3, "dec:7": 2, "dec:12": 1}
IMAGENET_RADII = [0.02, 0.05, 0.1, 0.2]
SDXL_RADII = [0.02, 0.05, 0.2]


def adm_config(tiny=False):
    """The openai consistency-models ImageNet-64 UNet2DModel config (tiny: same layout, narrow), as
    benchmarks/real_arch.py defines it."""
    from real_arch import ADM_IMAGENET64

    if not tiny:
        return ADM_IMAGENET64
    return dict(ADM_IMAGENET64, sample_size=32, block_out_channels=(16, 32, 48, 64), attention_head_dim=16,
                norm_num_groups=8)


def pooled_dims(config, pool=4):
    """Pooled feature dims of the paper layers from the layout: channels × (res / pool)²."""
    res, chans = config["sample_size"], config["block_out_channels"]
    return {sel: chans[lvl] * max((res >> lvl) // pool, 1) ** 2 for sel, lvl in LAYER_LEVEL.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, repeats, warmup=1):
    """Median seconds per call: wall clock on GPU; on CPU this process's CPU time, which other
    jobs on a shared machine inflate far less than the wall clock."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        sync(device)
        times.append(clock() - start)
    return statistics.median(times)


def loss_step(kind, groups, dim, device, radii, num_gen=4, num_pos=4):
    """A closure running one loss forward + backward on fresh-looking random features."""
    g = torch.Generator(device=device).manual_seed(0)
    gen = torch.randn(groups, num_gen, dim, device=device, generator=g).requires_grad_(True)
    pos = torch.randn(groups, num_pos, dim, device=device, generator=g)

    def run():
        gen.grad = None
        if kind == "anchor":
            loss = anchor_margin_loss(gen, pos)
        else:
            loss = drifting_loss(gen, pos, radii, kernel=kind)
        loss.mean().backward()

    return run


def teacher_forward_time(device, repeats, tiny, cpu_batch):
    from diffusers import UNet2DModel

    config = adm_config(tiny)
    torch.manual_seed(0)
    unet = UNet2DModel(**config).to(device).eval().requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    dims = pooled_dims(config)
    with torch.no_grad(), FeatureExtractor(unet, PAPER_LAYERS, pool_size=4) as fx:
        res = config["sample_size"]
        x = torch.randn(1, 3, res, res, device=device)
        label = torch.zeros(1, dtype=torch.long, device=device)
        feats = fx(lambda s: unet(s, torch.full((1,), 10.0, device=device), class_labels=label), x)
    measured = {k: v.shape[1] for k, v in feats.items()}
    assert measured == dims, f"layout dims {dims} != measured {measured}"
    full_batch = 70 * 12
    batch = full_batch if device.type == "cuda" and not tiny else cpu_batch
    x = torch.randn(batch, 3, res, res, device=device)
    t = torch.full((batch,), 10.0, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def fwd():
        with torch.no_grad():
            unet(x, t, class_labels=labels)

    seconds = time_fn(fwd, device, max(1, repeats // 2), warmup=1)
    return seconds * full_batch / batch, batch, full_batch, params, dims


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device to time on: cpu, cuda, cuda:1, ...")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per row (the median is shown)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and model: runs in seconds (CI smoke test)")
    parser.add_argument("--teacher_batch", type=int, default=2,
                        help="batch for the teacher forward on CPU, scaled linearly to 840 (the GPU uses 840)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads mostly spin-wait)")
    parser.add_argument("--skip_teacher", action="store_true", help="time only the losses")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; run with --device cpu.")
    repeats = 1 if args.tiny else args.repeats
    imagenet_groups, sdxl_groups = (2, 2) if args.tiny else (70, 8)
    sdxl_dims = [1280, 5120] if args.tiny else [81920, 327680]
    dims = pooled_dims(adm_config(args.tiny))

    rows = []  # (setting, dims, kernel, seconds)

    def bench(setting, dim_label, kind, groups, dim, radii):
        sec = time_fn(loss_step(kind, groups, dim, device, radii), device, repeats)
        rows.append((setting, dim_label, kind, sec))
        return sec

    totals = {"drifting": 0.0, "meanshift": 0.0, "anchor": 0.0}
    for sel in PAPER_LAYERS:
        for kind in totals:
            totals[kind] += bench(f"ImageNet {imagenet_groups}×(4,4,4)", f"{sel}: {dims[sel]:,}", kind,
                                  imagenet_groups, dims[sel], IMAGENET_RADII)
    for kind, sec in totals.items():
        rows.append((f"ImageNet {imagenet_groups}×(4,4,4)", "all 5 layers", kind, sec))
    for dim in sdxl_dims:
        for kind in totals:
            bench(f"SDXL {sdxl_groups}×(4,4)", f"{dim:,}", kind, sdxl_groups, dim, SDXL_RADII)

    clock = "wall clock" if device.type == "cuda" else "process CPU time"
    print(f"\nDevice: {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}, "
          f"median {clock} of {repeats}; every loss time is forward + backward.\n")
    print("| setting | layer: dim | loss | ms |")
    print("|---|---|---|---|")
    for setting, dim_label, kind, sec in rows:
        print(f"| {setting} | {dim_label} | {kind} | {sec * 1e3:.2f} |")

    if not args.skip_teacher:
        cpu_batch = 1 if args.tiny else args.teacher_batch
        sec, batch, full, params, _ = teacher_forward_time(device, repeats, args.tiny, cpu_batch)
        step = totals["drifting"] + totals["anchor"]
        how = "measured" if batch == full else f"measured at batch {batch}, scaled linearly ×{full / batch:g}"
        print(f"\nTeacher: ADM ImageNet-64 UNet2DModel{' (tiny, 32 px)' if args.tiny else ''}, {params / 1e6:.1f}M "
              f"params, float32 no-grad forward at batch {full}: {sec:.3f} s ({how}).\n")
        print("| per training step (5 layers) | ms | fraction of one teacher forward at batch 840 |")
        print("|---|---|---|")
        print(f"| drifting + anchor losses, fwd+bwd | {step * 1e3:.2f} | {step / sec:.2e} |")
        ms_step = totals["meanshift"] + totals["anchor"]
        print(f"| meanshift + anchor losses, fwd+bwd | {ms_step * 1e3:.2f} | {ms_step / sec:.2e} |")


if __name__ == "__main__":
    main()
