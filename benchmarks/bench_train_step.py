#!/usr/bin/env python
# Cost of one TFD training step: time split, memory, the floor of bare network passes, the early
# stop, and a DMD2-shaped reference step built from the same networks.
#
#   python benchmarks/bench_train_step.py --device cuda                  # the full-size table (GPU)
#   python benchmarks/bench_train_step.py --device cuda --find_max_batch # + largest batch that fits
#   python benchmarks/bench_train_step.py --tiny --config all            # seconds on a CPU (CI)
#   python benchmarks/bench_train_step.py --device cuda --config sd3     # SD3.5-medium-sized rows
#   ... --teacher_checkpointing on,off                                    # both settings of that flag
#
# The TFD step is the loop body of train_tfd_imagenet64.py / train_tfd_sdxl.py / train_tfd_sd3.py, imported from them:
# their batch function, `train_step`, the backward and tfd_training.clip_and_step, with the settings
# their own argument parsers give, under the same Accelerator (autocast, GradScaler, clipping). The
# networks are built from the real configs with random weights; the data are random tensors in the
# scripts' formats (uint8 images through LabelledImages; SDXL positives and text embeddings through
# a PositiveCache on disk).
#
# Time split (CUDA events on GPU; on a CPU the process's CPU time with --threads 1, which a machine
# shared with other jobs does not inflate as it does wall time; markers are hooks on the student, a
# FeatureExtractor subclass and tensor hooks, so the step itself is unchanged):
#   student   = one-step generator forward + its backward (after the gradient reaches its output)
#   teacher_gen = teacher feature pass on the generated samples: forward + backward to the input
#   teacher_ref = teacher feature pass on positives (+ anchors), no grad
#   losses    = tfd_loss forward + its backward (down to the pooled features)
#   pool      = feature pooling, timed apart on the captured feature maps (it runs inside the
#               teacher passes; reported next to the losses for the "losses + pooling" target)
#   optim     = log accumulation, clipping, the finiteness check, optimiser + LR step, zero_grad
#   data      = the rest (batch sampling, host->device copies, noise)
# floor  = the same network passes bare: student forward+backward through the teacher's full
#          forward on the N generated samples, the teacher's full forward on P+M samples under
#          no-grad, and the optimiser step; no hooks, no losses, no data.
# DMD2   = generator forward+backward, two teacher forwards (CFG), one fake-score forward,
#          the generator update, then five fake-score updates (forward+backward+optimiser) on
#          the detached samples. A lower bound of DMD2 (no GAN head, no extra generator forwards).

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from real_arch import SD35_MEDIUM  # noqa: E402  (the published config)

import tfd_text2image  # noqa: E402
import tfd_training  # noqa: E402
import tfd_utils  # noqa: E402

# openai consistency-models ImageNet-64 ADM UNet, as diffusers' UNet2DModel (openai/diffusers-cd_imagenet64_l2).
ADM_IMAGENET64 = dict(
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=3, num_class_embeds=1000,
    block_out_channels=(192, 384, 576, 768), attention_head_dim=64, norm_num_groups=32,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    resnet_time_scale_shift="scale_shift", upsample_type="resnet", downsample_type="resnet", norm_eps=1e-5,
)
# The same layout at a third of the width (64 px), for CPU measurements that need many passes.
ADM_REDUCED = dict(ADM_IMAGENET64, block_out_channels=(64, 128, 192, 256))
# The same layout at toy width (the 16 encoder units that enc:6/enc:11/bottleneck need stay).
ADM_TINY = dict(ADM_IMAGENET64, sample_size=16, num_class_embeds=10, block_out_channels=(8, 16, 16, 16),
                attention_head_dim=8, norm_num_groups=8)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the values that differ from diffusers' defaults).
SDXL_BASE = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
# SDXL-shaped, small enough for a CPU: same block types and layer names, narrower and shallower.
SDXL_REDUCED = dict(SDXL_BASE, block_out_channels=(64, 128, 256), transformer_layers_per_block=(1, 1, 2),
                    attention_head_dim=(1, 2, 4), cross_attention_dim=2048)
SDXL_TINY = dict(SDXL_BASE, block_out_channels=(16, 32, 32), layers_per_block=1, transformer_layers_per_block=1,
                 attention_head_dim=(2, 4, 4), norm_num_groups=8, cross_attention_dim=64, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32)
SDXL_POOLED_DIM = {"full": 1280, "reduced": 1280, "tiny": 32}
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# The same traits at toy width (3 blocks, the first two dual-attention; token grids up to 8x8).
SD35_TINY = dict(SD35_MEDIUM, sample_size=8, num_layers=3, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=80, pos_embed_max_size=8,
                 dual_attention_layers=(0, 1))
SD3_TEXT_TOKENS = {"full": 77 + 256, "tiny": 77 + 8}  # CLIP tokens + T5 tokens (zeros without T5)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPLIT = ("student", "teacher_gen", "teacher_ref", "losses", "pool", "optim", "data")
# Full fine-tunes use the 8-bit AdamW a real run would (the memory column depends on it); without
# bitsandbytes installed (it is optional) the row says it measured plain AdamW instead.
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
FULL_OPTIMIZER = "8-bit AdamW" if HAVE_BNB else "AdamW: no bitsandbytes"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark of the TFD training step.")
    p.add_argument("--config", default="all", choices=("imagenet64", "sdxl", "sd3", "all"),
                   help="Which networks to time (all: ImageNet-64 and SDXL; sd3: the SD3.5-medium-sized rows).")
    p.add_argument("--tiny", action="store_true",
                   help="Toy-width networks of the same layouts at 16 px / 16x16 latents: seconds on a CPU (CI).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu.")
    p.add_argument("--repeats", type=int, default=None, help="Timed steps per measurement (median; default 5 GPU, 2 CPU).")
    p.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 2 GPU, 1 CPU; 0 with --tiny).")
    p.add_argument("--teacher_dtype", default=None,
                   help="ImageNet-64 rows: dtype(s) of the teacher feature pass, comma-separated (fp32, bf16, fp16; "
                        "default fp32,bf16 on a GPU, fp32 on a CPU). The student autocast follows the script: bf16 on "
                        "a GPU, none on a CPU.")
    p.add_argument("--imagenet_unet", default=None, choices=("full", "reduced", "tiny"),
                   help="ImageNet-64 UNet: the real ADM config (default), the same layout at 1/3 width (reduced) or a "
                        "toy one (--tiny).")
    p.add_argument("--imagenet_batch", default=None,
                   help="ImageNet-64 batch per GPU as GROUPSxN,P,M (default 10x4,4,4; on a CPU 1x2,2,2; tiny 2x2,2,2).")
    p.add_argument("--sdxl_prompts", default=None,
                   help="SDXL (and SD3) prompts per GPU, comma-separated rows (default 1,2; tiny 1).")
    p.add_argument("--sdxl_batch", default=None, help="SDXL (and SD3) N,P per prompt (default 4,4; tiny 2,2).")
    p.add_argument("--sdxl_modes", default="full,lora",
                   help="SDXL (and SD3) rows: full (gradient checkpointing + 8-bit AdamW) and/or lora.")
    p.add_argument("--sdxl_precision", default=None,
                   help="SDXL (and SD3) rows: fp16, bf16 and/or fp32 (mixed precision of the student and dtype of the "
                        "teacher; default bf16 on a GPU, fp32 on a CPU, whose bf16 kernels are not representative).")
    p.add_argument("--sdxl_unet", default=None, choices=("full", "reduced", "tiny"),
                   help="SDXL UNet: the real SDXL base config (default on GPU), an SDXL-shaped reduced one (default "
                        "on CPU) or a toy one (--tiny).")
    p.add_argument("--sdxl_resolution", type=int, default=None,
                   help="SDXL resolution in pixels (latents are 1/8; default 1024, reduced 256, tiny 128).")
    p.add_argument("--sd3_transformer", default=None, choices=("full", "tiny"),
                   help="SD3 rows: the SD3.5-medium transformer (default; its published config) or a toy one "
                        "of the same traits (--tiny).")
    p.add_argument("--sd3_resolution", type=int, default=None,
                   help="SD3 resolution in pixels (latents are 1/8; default 1024, tiny 64).")
    p.add_argument("--lora_rank", type=int, default=None, help="LoRA rank (default 64; tiny 4).")
    p.add_argument("--teacher_checkpointing", default=None,
                   help="on and/or off, comma-separated: rows with --teacher_checkpointing / --no-teacher_checkpointing "
                        "(the generated samples' teacher pass recomputed in backward). Default: the scripts' default "
                        "(on with --gradient_checkpointing: the text-to-image rows; off: ImageNet-64).")
    p.add_argument("--measure", default="step,nostop,floor,dmd2",
                   help="What to time per row, in this order: step (TFD, early stop), nostop (TFD, teacher run to the "
                        "end), floor, dmd2.")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default 1 on a CPU: times are then this process's CPU time).")
    p.add_argument("--compile", action="store_true", help="torch.compile the student and teacher (module.compile()).")
    p.add_argument("--channels_last", action="store_true", help="Networks and inputs in channels-last memory format.")
    p.add_argument("--find_max_batch", action="store_true",
                   help="GPU only: also find the most groups (classes/prompts) per GPU whose TFD step fits.")
    p.add_argument("--max_groups", type=int, default=64, help="Upper limit of the --find_max_batch search.")
    p.add_argument("--output_json", default=None, help="Write every measurement to this JSON file.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random weights and data.")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible: use --device cpu.")
    cpu = args.device.type == "cpu"
    args.repeats = args.repeats or (1 if args.tiny else 2 if cpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 1 if cpu else 2)
    args.teacher_dtype = [d.strip() for d in (args.teacher_dtype or ("fp32" if cpu else "fp32,bf16")).split(",")
                          if d.strip()]
    args.sdxl_modes = [m.strip() for m in args.sdxl_modes.split(",") if m.strip()]
    args.sdxl_precision = [d.strip() for d in (args.sdxl_precision or ("fp32" if cpu else "bf16")).split(",")
                           if d.strip()]
    args.measure = [m.strip() for m in args.measure.split(",") if m.strip()]
    for name, values, valid in (("--teacher_dtype", args.teacher_dtype, DTYPES), ("--sdxl_modes", args.sdxl_modes,
                                ("full", "lora")), ("--sdxl_precision", args.sdxl_precision, ("fp16", "bf16", "fp32")),
                                ("--measure", args.measure, ("step", "nostop", "floor", "dmd2"))):
        bad = [v for v in values if v not in valid]
        if bad:
            raise ValueError(f"{name}: unknown {bad}; choose from {list(valid)}.")
    if cpu and "fp16" in args.sdxl_precision:
        raise ValueError("--sdxl_precision fp16 needs a GPU (fp16 autocast on a CPU is not a training setting).")
    imagenet_batch = args.imagenet_batch or ("2x2,2,2" if args.tiny else "1x2,2,2" if cpu else "10x4,4,4")
    try:
        g, rest = imagenet_batch.lower().split("x")
        args.imagenet_batch = (int(g), *[int(v) for v in rest.split(",")])
        assert len(args.imagenet_batch) == 4
    except (ValueError, AssertionError):
        raise ValueError(f"--imagenet_batch {imagenet_batch!r}: write GROUPSxN,P,M, e.g. 10x4,4,4.") from None
    args.sdxl_prompts = [int(v) for v in (args.sdxl_prompts or ("1" if args.tiny else "1,2")).split(",")]
    args.sdxl_batch = tuple(int(v) for v in (args.sdxl_batch or ("2,2" if args.tiny else "4,4")).split(","))
    args.threads = args.threads or (1 if cpu else torch.get_num_threads())
    torch.set_num_threads(args.threads)
    args.imagenet_unet = args.imagenet_unet or ("tiny" if args.tiny else "full")
    args.sdxl_unet = args.sdxl_unet or ("tiny" if args.tiny else "reduced" if cpu else "full")
    args.sdxl_resolution = args.sdxl_resolution or {"full": 1024, "reduced": 256, "tiny": 128}[args.sdxl_unet]
    args.sd3_transformer = args.sd3_transformer or ("tiny" if args.tiny else "full")
    args.sd3_resolution = args.sd3_resolution or {"full": 1024, "tiny": 64}[args.sd3_transformer]
    args.lora_rank = args.lora_rank or (4 if args.tiny else 64)
    ckpt = [v.strip() for v in (args.teacher_checkpointing or "").split(",") if v.strip()]
    if any(v not in ("on", "off") for v in ckpt):
        raise ValueError(f"--teacher_checkpointing {args.teacher_checkpointing!r}: write on, off or on,off.")
    args.teacher_checkpointing = ckpt or [None]
    if args.find_max_batch and cpu:
        print("--find_max_batch: skipped on a CPU (it searches for the CUDA out-of-memory limit).")
        args.find_max_batch = False
    return args


# ----------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------


def cpu_clock():
    """Process CPU time (all threads): on a shared machine it counts only this process's work."""
    return time.process_time()


class Marks:
    """Named time points of one step: CUDA events on a GPU, process CPU time on a CPU. Usable from
    autograd hooks (they record on the backward's stream without a host sync)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.t = {}

    def __call__(self, name):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.t[name] = ev
        else:
            self.t[name] = cpu_clock()

    def once(self, name):
        """Marks `name` only the first time in this step."""
        if name not in self.t:
            self(name)

    def ms(self, a, b):
        if self.cuda:
            return self.t[a].elapsed_time(self.t[b])
        return (self.t[b] - self.t[a]) * 1e3


def no_mark(name):
    pass


no_mark.once = no_mark


class TimedExtractor(tfd_utils.FeatureExtractor):
    """FeatureExtractor that marks the end of each teacher pass and, in backward, the end of the
    losses' backward: the FIRST pooled feature whose backward node runs. Autograd runs ready nodes
    latest-created first, so every loss node (created after the teacher pass) runs before it, and
    the shallower layers' pooling nodes run only inside the teacher's backward. A teacher pass
    recomputed in backward (--teacher_checkpointing) marks nothing again."""

    mark = staticmethod(no_mark)

    def __call__(self, fn, sample):
        feats = super().__call__(fn, sample)
        if torch.is_grad_enabled() and sample.requires_grad:
            self.mark.once("teacher_gen_fwd")
            for f in feats.values():
                if f.requires_grad:
                    f.register_hook(lambda g: self.mark.once("loss_bwd"))
        else:
            self.mark("teacher_ref")
        return feats


class TimedLoss(tfd_utils.TFDLoss):
    """The scripts' TFDLoss with a mark when the loss is computed, its extractor a TimedExtractor."""

    mark = staticmethod(no_mark)

    def __init__(self, teacher, args, **kw):
        base = tfd_utils.TFDLoss.from_args(teacher, args, **kw)
        self.__dict__.update(base.__dict__)
        fx = base.extractor
        self.extractor = TimedExtractor(fx.model, fx.selectors, fx.pool_size, fx.stop_early)

    def set_mark(self, mark, stop_early=True):
        self.mark = self.extractor.mark = mark
        self.extractor.stop_early = stop_early

    def __call__(self, *a, **kw):
        out = super().__call__(*a, **kw)
        self.mark("loss_fwd")
        return out


def mark_student(student, row):
    """Forward hook on the student: marks the end of its forward and, in backward, when the gradient
    reaches its output."""
    def hook(module, args, output):
        row.mark("student_fwd")
        out = output[0] if isinstance(output, (tuple, list)) else output
        if out.requires_grad:
            out.register_hook(lambda g: row.mark("gen_grad"))

    student.register_forward_hook(hook)


def split_of(m):
    """The time split (ms) of one marked step."""
    return {
        "total": m.ms("start", "optim"),
        "data": m.ms("start", "student_start"),
        "student": m.ms("student_start", "student_fwd") + m.ms("gen_grad", "backward"),
        "teacher_gen": m.ms("student_fwd", "teacher_gen_fwd") + m.ms("loss_bwd", "gen_grad"),
        "teacher_ref": m.ms("teacher_gen_fwd", "teacher_ref"),
        "losses": m.ms("teacher_ref", "loss_fwd") + m.ms("loss_fwd", "loss_bwd"),
        "optim": m.ms("backward", "optim"),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step_fn, device, warmup, repeats, marked=False):
    """Median wall time (ms) of step_fn over `repeats` runs after `warmup`; with marked=True also
    the median of each split entry (step_fn(mark) is given a Marks)."""
    for _ in range(warmup):
        step_fn(Marks(device) if marked else no_mark)
    sync(device)
    totals, splits = [], []
    for _ in range(repeats):
        marks = Marks(device) if marked else no_mark
        clock = time.perf_counter if device.type == "cuda" else cpu_clock
        sync(device)
        t0 = clock()
        step_fn(marks)
        sync(device)
        totals.append((clock() - t0) * 1e3)
        if marked:
            splits.append(split_of(marks))
    out = {"ms": statistics.median(totals), "ms_all": totals}
    if marked:
        out["split"] = {k: statistics.median(s[k] for s in splits) for k in splits[0]}
    return out


def _proc_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated (weights included), or on a CPU the peak
    RSS above the RSS at `base` (Linux VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, device, base_rss=None):
        self.device, self.base_rss = device, base_rss

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.ok = True
            except OSError:
                self.ok = False
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_status("VmHWM")
            self.bytes = hwm - (self.base_rss or 0) if self.ok and hwm is not None else None
        return False


def free_memory():
    """Frees what the last row held: CUDA cache, and on Linux the heap glibc keeps (so the next
    row's CPU peak-RSS delta starts from a true baseline)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# ----------------------------------------------------------------------------------------------
# Rows: the networks, optimiser and Accelerator of one configuration; their batches.
# ----------------------------------------------------------------------------------------------


def make_accelerator(device, mixed_precision):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # one Accelerator per row (rows differ in mixed precision)
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def teacher_ckpt_flags(setting):
    """--teacher_checkpointing on/off as the scripts' flag; None: the script's default."""
    return [] if setting is None else ["--teacher_checkpointing" if setting == "on" else "--no-teacher_checkpointing"]


def teacher_ckpt_name(setting):
    return "" if setting is None else f", teacher ckpt {setting}"


def prepare_networks(args, *models):
    for m in models:
        if args.channels_last:
            m.to(memory_format=torch.channels_last)
        if args.compile:
            m.compile()


class ImageNet64Row:
    """train_tfd_imagenet64.py's student, teacher, loss and optimiser on the ADM ImageNet-64 UNet; the
    step is the script's own (class_batch, train_step, the backward, clip_and_step)."""

    kind = "imagenet64"
    mark = staticmethod(no_mark)

    def __init__(self, args, teacher_dtype, teacher_ckpt=None):
        import train_tfd_imagenet64 as script
        from diffusers import UNet2DModel

        self.script, self.args, self.device = script, args, args.device
        g, n, p, m = args.imagenet_batch
        self.targs = ta = script.parse_args([
            "--pretrained_model_name_or_path", "bench", "--dataset_name", "bench", "--classes_per_batch", str(g),
            "--num_generated", str(n), "--num_positives", str(p), "--num_anchors", str(m),
            "--teacher_dtype", teacher_dtype, "--mixed_precision", "bf16" if self.device.type == "cuda" else "no",
            *teacher_ckpt_flags(teacher_ckpt)])
        self.config = {"full": ADM_IMAGENET64, "reduced": ADM_REDUCED, "tiny": ADM_TINY}[args.imagenet_unet]
        size = {"full": "", "reduced": " (1/3 width)", "tiny": " (tiny)"}[args.imagenet_unet]
        self.name = f"ImageNet-64 ADM{size}, teacher {teacher_dtype}{teacher_ckpt_name(teacher_ckpt)}"
        self.accelerator = make_accelerator(self.device, ta.mixed_precision)
        torch.manual_seed(args.seed)
        with torch.device(self.device):
            teacher = UNet2DModel(**self.config)
        self.num_params = count_params(teacher)
        # As in the script: a trainable float32 copy; the teacher frozen in --teacher_dtype.
        student = copy.deepcopy(teacher).to(self.device).float().train().requires_grad_(True)
        teacher.to(self.device).eval().requires_grad_(False).to(DTYPES[ta.teacher_dtype])
        prepare_networks(args, student, teacher)
        self.teacher = teacher
        self.loss_fn = TimedLoss(teacher, ta, checkpoint_teacher=ta.teacher_checkpointing)
        self.params = [q for q in student.parameters() if q.requires_grad]
        optimizer = tfd_training.make_optimizer(self.params, ta)
        lr_scheduler = tfd_training.make_lr_scheduler(optimizer, ta, 1)
        self.student, self.optimizer, self.lr_scheduler = self.accelerator.prepare(student, optimizer, lr_scheduler)
        mark_student(self.accelerator.unwrap_model(self.student), self)
        self.channels, self.resolution = self.config["in_channels"], self.config["sample_size"]
        self.set_groups(g)

    def set_groups(self, groups):
        """Batch-dependent state: random uint8 images through LabelledImages and the class sampler."""
        import numpy as np
        from PIL import Image

        ta = self.targs
        ta.classes_per_batch = groups
        per_class = ta.num_positives + ta.num_anchors
        num_classes = min(self.config["num_class_embeds"], max(groups, 1))
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        rng = np.random.default_rng(self.args.seed)
        images = rng.integers(0, 256, (len(labels), self.resolution, self.resolution, 3), dtype=np.uint8)
        fetch = lambda idx: [Image.fromarray(images[i]) for i in idx]  # noqa: E731
        self.data = self.script.LabelledImages(labels, fetch, self.channels, self.resolution, progress=False)
        self.sampler = self.script.ClassGroupedSampler(labels, range(num_classes), groups, per_class, self.args.seed)
        self.groups = groups
        self.images_per_step = groups * ta.num_generated
        self.step_count = 0

    def tfd_step(self, mark, stop_early=True):
        """train_tfd_imagenet64.py's loop body (gradient_accumulation_steps = 1), with time marks."""
        ta, acc, script = self.targs, self.accelerator, self.script
        self.mark = mark
        self.loss_fn.set_mark(mark, stop_early)
        self.step_count += 1
        mark("start")
        _, gen = tfd_training.step_generators(ta.seed, self.step_count)
        batch = script.class_batch(self.sampler, self.data, ta, (self.channels, self.resolution, self.resolution), gen,
                                   self.device)
        mark("student_start")
        with acc.accumulate(self.student):
            loss, logs = script.train_step(ta, acc, self.student, self.teacher, self.loss_fn, batch,
                                           self.config["num_class_embeds"], gen)
            acc.backward(loss)
            mark("backward")
            optimizer_update(self, logs, loss, ta.max_grad_norm)
        mark("optim")
        return loss

    # Bare network calls for the floor and the DMD2 reference.
    def bare_inputs(self, n):
        labels = torch.randint(self.config["num_class_embeds"], (n,), device=self.device)
        x = torch.randn(n, self.channels, self.resolution, self.resolution, device=self.device)
        return x, labels

    def bare_student(self, model, x, labels):
        t = torch.full((x.shape[0],), 250.0 * math.log(self.targs.sigma_max), device=self.device)
        return model(x, t, class_labels=labels, return_dict=False)[0].float()

    def bare_teacher(self, x, labels, t=None):
        t = torch.full((x.shape[0],), 250.0 * math.log(0.05), device=self.device) if t is None else t
        with torch.autocast(self.device.type, enabled=False):
            return self.teacher(x.to(self.teacher.dtype), t, class_labels=labels, return_dict=False)[0]

    def sizes(self):
        ta = self.targs
        return ta.classes_per_batch * ta.num_generated, ta.classes_per_batch * (ta.num_positives + ta.num_anchors)

    def dmd2_noise(self, x):
        """A VE-noised copy of x at a random EDM σ and its teacher time input."""
        sigma = (torch.randn(x.shape[0], device=self.device) * 1.2 - 1.2).exp()
        t = 250.0 * sigma.log()
        return x + sigma.view(-1, 1, 1, 1) * torch.randn_like(x), t

    def fake_score(self):
        return unprepared_copy(self.accelerator.unwrap_model(self.student))

    def fake_call(self, fake, x, t, labels):
        return fake(x, t, class_labels=labels, return_dict=False)[0].float()

    @contextlib.contextmanager
    def teacher_context(self):
        yield


def text2image_flags(args, mode, precision, prompts, resolution, teacher_ckpt):
    """The text-to-image scripts' flags of one benchmark row (full fine-tunes with 8-bit AdamW when
    bitsandbytes is installed)."""
    n, p = args.sdxl_batch
    flags = ["--pretrained_model_name_or_path", "bench", "--dataset_name", "bench", "--train_mode", mode,
             "--prompts_per_batch", str(prompts), "--num_generated", str(n), "--num_positives", str(p),
             "--resolution", str(resolution), "--mixed_precision", "no" if precision == "fp32" else precision,
             "--teacher_dtype", precision, "--lora_rank", str(args.lora_rank), "--lora_alpha", str(args.lora_rank),
             "--gradient_checkpointing", *teacher_ckpt_flags(teacher_ckpt)]
    return flags + (["--use_8bit_adam"] if mode == "full" and HAVE_BNB else [])


class SDXLRow:
    """train_tfd_sdxl.py's student, teacher, loss and optimiser on the SDXL UNet (full or LoRA); the step
    is the script's own (tfd_text2image.prompt_batch from cache entries, train_step, the backward,
    clip_and_step)."""

    kind = "sdxl"
    mark = staticmethod(no_mark)

    def __init__(self, args, mode, precision, prompts, teacher_ckpt=None):
        import train_tfd_sdxl as script
        from diffusers import DDPMScheduler, UNet2DConditionModel

        self.script, self.args, self.device = script, args, args.device
        self.targs = ta = script.parse_args(text2image_flags(args, mode, precision, prompts, args.sdxl_resolution,
                                                             teacher_ckpt))
        self.lora = lora = mode == "lora"
        self.config = {"full": SDXL_BASE, "reduced": SDXL_REDUCED, "tiny": SDXL_TINY}[args.sdxl_unet]
        size = {"full": "SDXL base", "reduced": "SDXL-shaped reduced", "tiny": "SDXL-shaped tiny"}[args.sdxl_unet]
        what = f"LoRA r{args.lora_rank}, ckpt" if lora else f"full FT (ckpt, {FULL_OPTIMIZER})"
        self.name = f"{size} {args.sdxl_resolution}px, {what}, {precision}{teacher_ckpt_name(teacher_ckpt)}"
        self.accelerator = make_accelerator(self.device, ta.mixed_precision)
        self.alphas_cumprod = DDPMScheduler(**SDXL_SCHEDULER).alphas_cumprod.to(torch.float64)
        self.latent = args.sdxl_resolution // 8
        torch.manual_seed(args.seed)
        with torch.device(self.device):
            unet = UNet2DConditionModel(**self.config)
        self.prepare_student(unet, prompts)

    def prepare_student(self, model, prompts):
        """As in the script: LoRA adapters (fp32) on the teacher's weights, or a float32 copy; the loss,
        AdamW (8-bit for a full fine-tune when bitsandbytes is there) and accelerator.prepare."""
        args, ta, lora = self.args, self.targs, self.lora
        self.num_params = count_params(model)
        model.requires_grad_(False).eval()
        student, teacher = tfd_text2image.student_and_teacher(
            model, ta.train_mode, self.device, DTYPES[ta.teacher_dtype], ta.lora_rank, ta.lora_alpha,
            ta.lora_target_modules)
        student.enable_gradient_checkpointing()  # the teacher's blocks: TFDLoss, --teacher_checkpointing
        student.train()
        prepare_networks(args, *({student, teacher} if not lora else {student}))
        self.teacher = teacher
        self.loss_fn = TimedLoss(teacher, ta, teacher_context=self.teacher_context if lora else None,
                                 checkpoint_teacher=ta.teacher_checkpointing)
        self.params = [q for q in student.parameters() if q.requires_grad]
        self.num_trainable = sum(q.numel() for q in self.params)
        optimizer = tfd_training.make_optimizer(self.params, ta)
        lr_scheduler = tfd_training.make_lr_scheduler(optimizer, ta, 1)
        self.student, self.optimizer, self.lr_scheduler = self.accelerator.prepare(student, optimizer, lr_scheduler)
        mark_student(self.accelerator.unwrap_model(self.student), self)
        self.tmp = tempfile.TemporaryDirectory(prefix="tfd-bench-cache-")
        self.set_groups(prompts)

    def set_groups(self, groups):
        """Batch-dependent state: one PositiveCache entry per prompt (random latents and embeddings)."""
        ta = self.targs
        ta.prompts_per_batch = groups
        self.cache = tfd_text2image.PositiveCache(self.tmp.name, {"benchmark": self.name, "groups": groups})
        self.slots = ["teacher"] * ta.num_positives
        self.prompts = [f"benchmark prompt {i}" for i in range(max(groups, 2))]
        g = torch.Generator().manual_seed(self.args.seed)
        cdt = DTYPES["fp16"] if ta.cache_dtype == "float16" else torch.float32
        for prompt in self.prompts:
            self.cache.save(prompt, self.slots, {
                "positives": torch.randn(ta.num_positives, 4, self.latent, self.latent, generator=g).to(cdt),
                "prompt_embeds": torch.randn(77, self.config["cross_attention_dim"], generator=g).to(cdt),
                "pooled_prompt_embeds": torch.randn(SDXL_POOLED_DIM[self.args.sdxl_unet], generator=g).to(cdt)})
        self.groups = groups
        self.images_per_step = groups * ta.num_generated
        self.step_count = 0

    def tfd_step(self, mark, stop_early=True):
        """train_tfd_sdxl.py's loop body (gradient_accumulation_steps = 1), with time marks; the cache
        entries are read from disk as in training."""
        ta, acc, script = self.targs, self.accelerator, self.script
        self.mark = mark
        self.loss_fn.set_mark(mark, stop_early)
        self.step_count += 1
        mark("start")
        shared, gen = tfd_training.step_generators(ta.seed, self.step_count)
        drawn = tfd_training.shared_draw(len(self.prompts), 0, ta.prompts_per_batch, shared).tolist()
        entries = [self.cache.load(self.prompts[i], self.slots) for i in drawn]
        batch = tfd_text2image.prompt_batch(entries, ta.num_generated, (4, self.latent, self.latent), gen, self.device,
                                    tfd_text2image.cond_dtype(ta))
        mark("student_start")
        with acc.accumulate(self.student):
            loss, logs = script.train_step(ta, acc, self.student, self.teacher, self.loss_fn, batch,
                                           self.alphas_cumprod, gen)
            acc.backward(loss)
            mark("backward")
            optimizer_update(self, logs, loss, ta.max_grad_norm)
        mark("optim")
        return loss

    def bare_inputs(self, n):
        x = torch.randn(n, 4, self.latent, self.latent, device=self.device)
        return x, self.text_cond(n)

    def text_cond(self, n):
        dt = tfd_text2image.cond_dtype(self.targs)
        ehs = torch.randn(n, 77, self.config["cross_attention_dim"], device=self.device, dtype=dt)
        cond = {"text_embeds": torch.randn(n, SDXL_POOLED_DIM[self.args.sdxl_unet], device=self.device, dtype=dt),
                "time_ids": self.script.sdxl_time_ids(self.targs.resolution, n, self.device, dt)}
        return ehs, cond

    def bare_student(self, model, x, cond):
        t = torch.full((x.shape[0],), self.targs.conditioning_timestep, device=self.device, dtype=torch.long)
        return model(x, t, encoder_hidden_states=cond[0], added_cond_kwargs=cond[1], return_dict=False)[0].float()

    def bare_teacher(self, x, cond, t=None):
        t = torch.full((x.shape[0],), 50.0, device=self.device) if t is None else t
        dt = self.teacher.dtype
        return self.teacher(x.to(dt), t, encoder_hidden_states=cond[0].to(dt),
                            added_cond_kwargs={k: v.to(dt) for k, v in cond[1].items()}, return_dict=False)[0]

    def sizes(self):
        ta = self.targs
        return ta.prompts_per_batch * ta.num_generated, ta.prompts_per_batch * ta.num_positives

    def dmd2_noise(self, x):
        t = torch.randint(20, 980, (x.shape[0],), device=self.device)
        a = self.alphas_cumprod.to(self.device)[t].float().view(-1, 1, 1, 1)
        return a.sqrt() * x + (1 - a).sqrt() * torch.randn_like(x), t

    def fake_score(self):
        """A trainable copy of the student (full: float32 + checkpointing; LoRA: its own adapters)."""
        return unprepared_copy(self.accelerator.unwrap_model(self.student))

    def fake_call(self, fake, x, t, cond):
        return fake(x, t, encoder_hidden_states=cond[0], added_cond_kwargs=cond[1], return_dict=False)[0].float()

    def teacher_context(self):
        return tfd_text2image.teacher_mode(self.teacher) if self.lora else contextlib.nullcontext()


class SD3Row(SDXLRow):
    """train_tfd_sd3.py's student, teacher, loss and optimiser on an SD3.5-medium-sized transformer (full or
    LoRA); the step is the script's own (tfd_text2image.prompt_batch from cache entries, train_step, the
    backward, clip_and_step)."""

    kind = "sd3"

    def __init__(self, args, mode, precision, prompts, teacher_ckpt=None):
        import train_tfd_sd3 as script
        from diffusers import SD3Transformer2DModel

        self.script, self.args, self.device = script, args, args.device
        self.targs = ta = script.parse_args(text2image_flags(args, mode, precision, prompts, args.sd3_resolution,
                                                             teacher_ckpt))
        self.lora = lora = mode == "lora"
        self.config = {"full": SD35_MEDIUM, "tiny": SD35_TINY}[args.sd3_transformer]
        self.text_tokens = SD3_TEXT_TOKENS[args.sd3_transformer]
        size = {"full": "SD3.5-medium", "tiny": "SD3.5-shaped tiny"}[args.sd3_transformer]
        what = f"LoRA r{args.lora_rank}, ckpt" if lora else f"full FT (ckpt, {FULL_OPTIMIZER})"
        self.name = f"{size} {args.sd3_resolution}px, {what}, {precision}{teacher_ckpt_name(teacher_ckpt)}"
        self.accelerator = make_accelerator(self.device, ta.mixed_precision)
        self.latent = args.sd3_resolution // 8
        self.channels = self.config["in_channels"]
        torch.manual_seed(args.seed)
        with torch.device(self.device):
            transformer = SD3Transformer2DModel(**self.config)
        self.prepare_student(transformer, prompts)

    def set_groups(self, groups):
        """Batch-dependent state: one PositiveCache entry per prompt (random latents and embeddings)."""
        ta = self.targs
        ta.prompts_per_batch = groups
        self.cache = tfd_text2image.PositiveCache(self.tmp.name, {"benchmark": self.name, "groups": groups})
        self.slots = ["teacher"] * ta.num_positives
        self.prompts = [f"benchmark prompt {i}" for i in range(max(groups, 2))]
        g = torch.Generator().manual_seed(self.args.seed)
        cdt = DTYPES["fp16"] if ta.cache_dtype == "float16" else torch.float32
        for prompt in self.prompts:
            self.cache.save(prompt, self.slots, {
                "positives": torch.randn(ta.num_positives, self.channels, self.latent, self.latent, generator=g).to(cdt),
                "prompt_embeds": torch.randn(self.text_tokens, self.config["joint_attention_dim"], generator=g).to(cdt),
                "pooled_prompt_embeds": torch.randn(self.config["pooled_projection_dim"], generator=g).to(cdt)})
        self.groups = groups
        self.images_per_step = groups * ta.num_generated
        self.step_count = 0

    def tfd_step(self, mark, stop_early=True):
        """train_tfd_sd3.py's loop body (gradient_accumulation_steps = 1), with time marks."""
        ta, acc, script = self.targs, self.accelerator, self.script
        self.mark = mark
        self.loss_fn.set_mark(mark, stop_early)
        self.step_count += 1
        mark("start")
        shared, gen = tfd_training.step_generators(ta.seed, self.step_count)
        drawn = tfd_training.shared_draw(len(self.prompts), 0, ta.prompts_per_batch, shared).tolist()
        entries = [self.cache.load(self.prompts[i], self.slots) for i in drawn]
        batch = tfd_text2image.prompt_batch(entries, ta.num_generated, (self.channels, self.latent, self.latent), gen,
                                            self.device, tfd_text2image.cond_dtype(ta))
        mark("student_start")
        with acc.accumulate(self.student):
            loss, logs = script.train_step(ta, acc, self.student, self.teacher, self.loss_fn, batch, gen)
            acc.backward(loss)
            mark("backward")
            optimizer_update(self, logs, loss, ta.max_grad_norm)
        mark("optim")
        return loss

    def bare_inputs(self, n):
        x = torch.randn(n, self.channels, self.latent, self.latent, device=self.device)
        return x, self.text_cond(n)

    def text_cond(self, n):
        dt = tfd_text2image.cond_dtype(self.targs)
        ehs = torch.randn(n, self.text_tokens, self.config["joint_attention_dim"], device=self.device, dtype=dt)
        return ehs, torch.randn(n, self.config["pooled_projection_dim"], device=self.device, dtype=dt)

    def bare_student(self, model, x, cond):
        t = torch.full((x.shape[0],), 1000.0, device=self.device)
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond[0], pooled_projections=cond[1],
                     return_dict=False)[0].float()

    def bare_teacher(self, x, cond, t=None):
        t = torch.full((x.shape[0],), 50.0, device=self.device) if t is None else t
        dt = self.teacher.dtype
        return self.teacher(hidden_states=x.to(dt), timestep=t, encoder_hidden_states=cond[0].to(dt),
                            pooled_projections=cond[1].to(dt), return_dict=False)[0]

    def feature_map(self, output):
        """A joint block's image tokens folded to the patch grid, as FeatureExtractor does."""
        grid = self.latent // self.config["patch_size"]
        return tfd_utils.tokens_to_map(output[1], grid, grid)

    def dmd2_noise(self, x):
        """The flow point at a random time s: (1 − s)x + sε, and its timestep 1000·s."""
        s = torch.rand(x.shape[0], device=self.device) * 0.96 + 0.02
        return (1 - s.view(-1, 1, 1, 1)) * x + s.view(-1, 1, 1, 1) * torch.randn_like(x), 1000 * s

    def fake_call(self, fake, x, t, cond):
        return fake(hidden_states=x, timestep=t, encoder_hidden_states=cond[0], pooled_projections=cond[1],
                    return_dict=False)[0].float()


def unprepared_copy(model):
    """A deep copy of a prepared model without Accelerator's autocast forward (prepare adds it again)."""
    fake = copy.deepcopy(model)
    if "_original_forward" in fake.__dict__:
        fake.forward = fake.__dict__.pop("_original_forward")
    return fake


def optimizer_update(row, logs, loss, max_grad_norm):
    """The scripts' update after the backward (gradient_accumulation_steps = 1): TrainingMonitor's
    log accumulation, then tfd_training.clip_and_step (clipping, the finiteness check: one host sync,
    optimiser and LR step, zero_grad). The monitor's end_step (logging cadence) is not run."""
    if getattr(row, "monitor", None) is None:
        row.monitor = tfd_training.TrainingMonitor(row.accelerator, row.targs, None, None, 0, row.images_per_step,
                                                   None)
    row.monitor.add(logs)
    if row.accelerator.sync_gradients:
        return tfd_training.clip_and_step(row.accelerator, row.optimizer, row.lr_scheduler, row.params, loss.detach(),
                                          max_grad_norm)


# ----------------------------------------------------------------------------------------------
# The floor and the DMD2-shaped reference step
# ----------------------------------------------------------------------------------------------


def floor_step(row, mark=no_mark):
    """Bare passes: student fwd+bwd through the teacher's full forward on N samples, the teacher's
    full forward on P+M samples (no grad), the optimiser step."""
    n_gen, n_ref = row.sizes()
    x, cond = row.bare_inputs(n_gen)
    refs, ref_cond = row.bare_inputs(n_ref)
    with row.accelerator.autocast():
        gen = row.bare_student(row.student, x, cond)
    with row.teacher_context():
        out = row.bare_teacher(gen, cond)
        with torch.no_grad():
            row.bare_teacher(refs, ref_cond)
    row.accelerator.backward(out.float().mean())
    row.optimizer.step()
    row.optimizer.zero_grad(set_to_none=True)


def dmd2_setup(row):
    fake = row.fake_score()
    fake.train()
    params = [q for q in fake.parameters() if q.requires_grad]
    opt = tfd_training.make_optimizer(params, row.targs)
    fake, opt = row.accelerator.prepare(fake, opt)
    return fake, opt, params


def dmd2_step(row, fake, fake_opt, fake_params, mark=no_mark, guidance=6.0, fake_updates=5):
    """DMD2-shaped step from the same networks (distribution matching, then the fake-score updates)."""
    acc = row.accelerator
    n_gen, _ = row.sizes()
    x, cond = row.bare_inputs(n_gen)
    with acc.autocast():
        gen = row.bare_student(row.student, x, cond)
    with torch.no_grad():
        noisy, t = row.dmd2_noise(gen.detach())
        with row.teacher_context():
            real_c = row.bare_teacher(noisy, cond, t).float()
            real_u = row.bare_teacher(noisy, cond, t).float()
        real = real_u + guidance * (real_c - real_u)
        with acc.autocast():
            fake_out = row.fake_call(fake, noisy, t, cond)
        grad = (fake_out - real) / (gen.detach() - real).abs().mean().clamp_min(1e-6)
    loss = 0.5 * torch.nn.functional.mse_loss(gen, (gen - grad).detach())
    acc.backward(loss)
    acc.clip_grad_norm_(row.params, row.targs.max_grad_norm)
    row.optimizer.step()
    row.optimizer.zero_grad(set_to_none=True)
    for _ in range(fake_updates):
        noisy, t = row.dmd2_noise(gen.detach())
        with acc.autocast():
            pred = row.fake_call(fake, noisy, t, cond)
        acc.backward(torch.nn.functional.mse_loss(pred, torch.randn_like(pred)))
        acc.clip_grad_norm_(fake_params, row.targs.max_grad_norm)
        fake_opt.step()
        fake_opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# Pooling cost (the pooling runs inside the teacher passes; timed apart on the real feature maps)
# ----------------------------------------------------------------------------------------------


def pooling_ms(row, repeats):
    n_gen, n_ref = row.sizes()
    names = tfd_utils.resolve_layers(row.teacher, row.targs.feature_layers)
    modules = dict(row.teacher.named_modules())
    maps = {}

    def capture(name):
        def hook(module, args, output):
            if hasattr(row, "feature_map"):  # a patch transformer's block: its image tokens as a map
                out = row.feature_map(output)
            else:
                out = output[0] if isinstance(output, (tuple, list)) else output
            maps[name] = out.detach()
        return hook

    def run(n):
        x, cond = row.bare_inputs(n)
        handles = [modules[nm].register_forward_hook(capture(nm)) for nm in names if nm in modules]
        try:
            with torch.no_grad(), row.teacher_context():
                row.bare_teacher(x, cond)
        finally:
            for h in handles:
                h.remove()
        return dict(maps)

    gen_maps, ref_maps = run(n_gen), run(n_ref)
    pool = row.targs.feature_pool_size

    def once():
        for f in gen_maps.values():
            f = f.clone().requires_grad_(True)
            tfd_utils.pool_feature(f, pool).float().sum().backward()
        with torch.no_grad():
            for f in ref_maps.values():
                tfd_utils.pool_feature(f, pool)

    def timed(mark):
        once()

    return time_steps(timed, row.device, 1, max(repeats, 3))["ms"]


# ----------------------------------------------------------------------------------------------
# One row: every measurement
# ----------------------------------------------------------------------------------------------


def measure_row(row, args, base_rss):
    res = {"config": row.name, "kind": row.kind, "params": row.num_params,
           "trainable": getattr(row, "num_trainable", row.num_params), "groups": row.groups,
           "batch": describe_batch(row), "images_per_step": row.images_per_step}
    print(f"\n== {row.name}: {res['params'] / 1e6:.1f}M parameters, batch {res['batch']}", flush=True)
    w, r, dev = args.warmup, args.repeats, row.device

    def attempt(key, fn):
        try:
            return fn()
        except Exception as e:  # one failed measurement (OOM, a library error) must not lose the table
            if not is_oom(e):
                import traceback

                traceback.print_exc()
            res[key + "_error"] = "OOM" if is_oom(e) else f"{type(e).__name__}: {e}"[:200]
            print(f"   {key}: {res[key + '_error']}", flush=True)
            row.optimizer.zero_grad(set_to_none=True)
            free_memory()
            return None

    def measure_step():
        def run_step():
            with PeakMemory(dev, base_rss) as pm:
                out = time_steps(lambda m: row.tfd_step(m), dev, w, r, marked=True)
            out["peak_bytes"] = pm.bytes
            return out

        step = attempt("step", run_step)
        if step:
            res.update(step_ms=step["ms"], step_all=step["ms_all"], split=step["split"], peak_bytes=step["peak_bytes"],
                       images_per_s=row.images_per_step / step["ms"] * 1e3)
            res["pool_ms"] = attempt("pool", lambda: pooling_ms(row, r))
            print(f"   TFD step {step['ms']:.1f} ms  split {fmt_split(step['split'])}  pool {res['pool_ms']}", flush=True)

    def measure_nostop():
        nostop = attempt("nostop", lambda: time_steps(lambda m: row.tfd_step(m, stop_early=False), dev, w, r,
                                                      marked=True))
        if nostop:
            res.update(nostop_ms=nostop["ms"], nostop_split=nostop["split"])
            print(f"   TFD step, teacher run to the end {nostop['ms']:.1f} ms  split {fmt_split(nostop['split'])}",
                  flush=True)

    def measure_floor():
        floor = attempt("floor", lambda: time_steps(lambda m: floor_step(row, m), dev, w, r))
        if floor:
            res["floor_ms"] = floor["ms"]
            print(f"   floor {floor['ms']:.1f} ms", flush=True)

    def measure_dmd2():
        def run_dmd2():
            fake, opt, params = dmd2_setup(row)
            try:
                with PeakMemory(dev, base_rss) as pm:
                    out = time_steps(lambda m: dmd2_step(row, fake, opt, params, m), dev, w, r)
                out["peak_bytes"] = pm.bytes
                return out
            finally:
                row.accelerator._models = [m for m in row.accelerator._models if m is not fake]
                row.accelerator._optimizers = [o for o in row.accelerator._optimizers if o is not opt]
                del fake, opt, params
                free_memory()

        dmd2 = attempt("dmd2", run_dmd2)
        if dmd2:
            res.update(dmd2_ms=dmd2["ms"], dmd2_peak_bytes=dmd2["peak_bytes"])
            print(f"   DMD2-shaped step {dmd2['ms']:.1f} ms", flush=True)

    measures = {"step": measure_step, "nostop": measure_nostop, "floor": measure_floor, "dmd2": measure_dmd2}
    for name in args.measure:  # in the order given
        measures[name]()
    derive(res)
    if args.find_max_batch:
        res["max_groups"] = find_max_groups(row, args)
        print(f"   largest batch that fits: {res['max_groups']} groups", flush=True)
    return res


def derive(res):
    """Ratios and shares from the raw times."""
    s = res.get("split")
    if s and res.get("pool_ms") is not None:
        res["loss_pool_share"] = (s["losses"] + res["pool_ms"]) / s["total"]
    if "step_ms" in res and "floor_ms" in res:
        res["step_over_floor"] = res["step_ms"] / res["floor_ms"]
    if "nostop_ms" in res and "floor_ms" in res:
        res["nostop_over_floor"] = res["nostop_ms"] / res["floor_ms"]
    if s and res.get("nostop_split"):
        t_early = s["teacher_gen"] + s["teacher_ref"]
        t_full = res["nostop_split"]["teacher_gen"] + res["nostop_split"]["teacher_ref"]
        res["early_stop_saves"] = 1 - t_early / t_full
    if "step_ms" in res and "dmd2_ms" in res:
        res["tfd_over_dmd2"] = res["step_ms"] / res["dmd2_ms"]


def find_max_groups(row, args):
    """Most groups per GPU whose TFD step runs (doubling, then bisection); restores the row's batch."""
    original = row.groups

    def fits(g):
        row.set_groups(g)
        try:
            for _ in range(2):
                row.tfd_step(no_mark)
            sync(row.device)
            return True
        except Exception as e:
            if not is_oom(e):
                raise
            return False
        finally:
            row.optimizer.zero_grad(set_to_none=True)
            free_memory()

    lo, hi = 0, None
    g = 1
    while g <= args.max_groups:
        if fits(g):
            lo, g = g, g * 2
        else:
            hi = g
            break
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    row.set_groups(original)
    return lo


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def describe_batch(row):
    ta = row.targs
    if row.kind == "imagenet64":
        return f"{row.groups}x({ta.num_generated},{ta.num_positives},{ta.num_anchors})"
    return f"{row.groups}x({ta.num_generated},{ta.num_positives})"


def fmt_split(s):
    return " ".join(f"{k}={s[k]:.1f}" for k in SPLIT if k in s)


def fmt(v, spec=".1f", suffix=""):
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def fmt_mem(b):
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def markdown_tables(results, env):
    clock = "wall time" if env["cuda"] else f"process CPU time, {env['threads']} thread(s)"
    lines = [f"Device: {env['device_name']}; torch {env['torch']}; {env['when']}; load average {env['loadavg']} -> "
             f"{env.get('loadavg_end', '?')}; {clock}; warmup {env['warmup']}, repeats {env['repeats']} (median)"
             f"{'; channels-last' if env['channels_last'] else ''}{'; torch.compile' if env['compile'] else ''}."]
    lines += ["", "| configuration | params | batch | step ms | img/s | peak mem | floor ms | step/floor | no-stop ms "
              "| no-stop/floor | early stop saves | losses+pool | DMD2 ms | TFD/DMD2 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {fmt(r.get('step_ms'))} | "
            f"{fmt(r.get('images_per_s'), '.2f')} | {fmt_mem(r.get('peak_bytes'))} | {fmt(r.get('floor_ms'))} | "
            f"{fmt(r.get('step_over_floor'), '.2f')} | {fmt(r.get('nostop_ms'))} | "
            f"{fmt(r.get('nostop_over_floor'), '.2f')} | "
            f"{fmt(None if r.get('early_stop_saves') is None else 100 * r['early_stop_saves'], '.0f', '%')} | "
            f"{fmt(None if r.get('loss_pool_share') is None else 100 * r['loss_pool_share'], '.1f', '%')} | "
            f"{fmt(r.get('dmd2_ms'))} | {fmt(r.get('tfd_over_dmd2'), '.2f')} |")
    lines += ["", "Time split of the TFD step (ms, median; % of the step):", "",
              "| configuration | student fwd+bwd | teacher gen fwd+bwd | teacher pos+anc | losses fwd+bwd | pooling "
              "(inside the teacher passes) | optimiser | data/other |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.get("split")
        if not s:
            continue
        cells = []
        for k in ("student", "teacher_gen", "teacher_ref", "losses", "pool", "optim", "data"):
            v = r.get("pool_ms") if k == "pool" else s[k]
            cells.append("n/a" if v is None else f"{v:.1f} ({100 * v / s['total']:.0f}%)")
        lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    if any("max_groups" in r for r in results):
        lines += ["", "| configuration | largest groups per GPU that fit |", "|---|---|"]
        lines += [f"| {r['config']} | {r.get('max_groups')} |" for r in results if "max_groups" in r]
    errors = [(r["config"], k[:-6], v) for r in results for k, v in r.items() if k.endswith("_error")]
    if errors:
        lines += [""] + [f"- {c}: {k} failed: {v}" for c, k, v in errors]
    return "\n".join(lines)


def environment(args):
    dev = args.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {"device_name": name, "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg": load, "threads": torch.get_num_threads(), "cuda": dev.type == "cuda", "warmup": args.warmup, "repeats": args.repeats,
            "compile": args.compile, "channels_last": args.channels_last, "tiny": args.tiny,
            "git": git_rev()}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "CPU")
    except OSError:
        model = "CPU"
    return f"CPU ({model}, {torch.get_num_threads()} threads)"


def git_rev():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:
        return None


def rows(args):
    """(builder, description) of every configuration, built one at a time."""
    out = []
    ckpt = args.teacher_checkpointing
    if args.config in ("imagenet64", "all"):
        out += [lambda d=d, c=c: ImageNet64Row(args, d, c) for d in args.teacher_dtype for c in ckpt]
    if args.config in ("sdxl", "all"):
        out += [lambda m=m, p=p, g=g, c=c: SDXLRow(args, m, p, g, c)
                for m in args.sdxl_modes for p in args.sdxl_precision for g in args.sdxl_prompts for c in ckpt]
    if args.config == "sd3":
        out += [lambda m=m, p=p, g=g, c=c: SD3Row(args, m, p, g, c)
                for m in args.sdxl_modes for p in args.sdxl_precision for g in args.sdxl_prompts for c in ckpt]
    return out


def main(args):
    torch.backends.cuda.matmul.allow_tf32 = False  # the scripts' default
    env = environment(args)
    results = []
    for build in rows(args):
        free_memory()
        base_rss = _proc_status("VmRSS")
        try:
            row = build()
        except Exception as e:
            if not is_oom(e):
                raise
            print(f"building a row ran out of memory: {e}")
            continue
        results.append(measure_row(row, args, base_rss))
        del row
    env["loadavg_end"] = environment(args)["loadavg"]
    table = markdown_tables(results, env)
    print("\n" + table)
    if args.output_json:
        payload = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
        tfd_training.atomic_write(args.output_json, lambda p: json.dump(payload, open(p, "w"), indent=2))
    return results


if __name__ == "__main__":
    main(parse_args())
