#!/usr/bin/env python
# Cost of one TFD training step of each script on that script's own set-up: step time, images/s, peak memory, and a
# DMD2-shaped reference step built from the same networks.
#
#   python benchmarks/bench_train_step.py --device cuda                  # the full-size table (GPU)
#   python benchmarks/bench_train_step.py --device cuda --find_max_batch # + the most groups per GPU that fit
#   python benchmarks/bench_train_step.py --tiny                         # toy widths, seconds on a CPU (tests)
#   ... --config sd3 --sdxl_modes lora --teacher_checkpointing on,off    # one script's rows, both flag settings
#
# Each row runs a script's own parse_args (the row's flags), its build (real_arch.py's published configs with random
# weights, handed over through build's teacher= / pipe=) and, timed, the loop body of its main() (Row.step). The
# positive cache is filled before timing (--num_positive_steps 1). DMD2: a lower bound of DMD2's step from the same
# networks (dmd2_step). Times: median of --repeats after --warmup; wall time on a GPU, the process's CPU time on a
# CPU (--threads 1). Peak memory: CUDA max_memory_allocated, or the peak RSS above the RSS before the row was built
# (CPU); weights included. docs/performance.md describes the table.

import argparse
import contextlib
import copy
import ctypes
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import real_arch  # noqa: E402  (the published configs and the pipelines built from them)
import tfd_text2image  # noqa: E402
import tfd_training  # noqa: E402
import tfd_utils  # noqa: E402
from tfd_training import DTYPES  # noqa: E402

SCRIPTS = {"imagenet64": "train_tfd_imagenet64", "sdxl": "train_tfd_sdxl", "sd3": "train_tfd_sd3"}
ADM = {"full": real_arch.ADM_IMAGENET64, "reduced": real_arch.ADM_REDUCED, "tiny": real_arch.ADM_TINY}
NAMES = {"imagenet64": ("ImageNet-64 ADM", " (1/3 width)"), "sdxl": ("SDXL base", "SDXL-shaped"),
         "sd3": ("SD3.5-medium", "SD3.5-medium-shaped")}  # the full size's name; the reduced/tiny prefix or suffix
RESOLUTION = {"full": 1024, "reduced": 256, "tiny": 32}
# Full fine-tunes on a GPU: the 8-bit AdamW of a real run where bitsandbytes (optional) is installed.
HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
DMD2_FAKE_UPDATES, DMD2_GUIDANCE = 5, 6.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark of each TFD script's training step on its own set-up.")
    p.add_argument("--config", default="all", choices=("imagenet64", "sdxl", "sd3", "all"), help="Whose rows.")
    p.add_argument("--tiny", action="store_true", help="Toy-width networks of the same layouts: seconds on a CPU.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu.")
    for flag, kind, help in (
            ("--repeats", int, "Timed steps per measurement (median; default 5 GPU, 2 CPU, 1 tiny)."),
            ("--warmup", int, "Untimed steps first (default 2 GPU, 1 CPU, 0 tiny)."),
            ("--teacher_dtype", str, "ImageNet-64 rows: their --teacher_dtype, comma-separated (fp32, bf16, fp16; "
                                     "default fp32,bf16 on a GPU, fp32 on a CPU). --mixed_precision: bf16 on a GPU."),
            ("--imagenet_batch", str, "ImageNet-64 batch per GPU, GROUPSxN,P,M (default 10x4,4,4; CPU 1x2,2,2; tiny "
                                      "2x2,2,2)."),
            ("--sdxl_prompts", str, "SDXL and SD3 rows: their --prompts_per_batch, comma-separated (default 1,2; "
                                    "tiny 1)."),
            ("--sdxl_batch", str, "SDXL and SD3: N,P per prompt (default 4,4; tiny 2,2)."),
            ("--sdxl_precision", str, "SDXL and SD3 rows: fp16, bf16 and/or fp32, their --mixed_precision and "
                                      "--teacher_dtype (default bf16 on a GPU, fp32 on a CPU)."),
            ("--sdxl_resolution", int, "SDXL pixels (default 1024; reduced 256; tiny 32)."),
            ("--sd3_resolution", int, "SD3 pixels (default 1024; reduced 256; tiny 32)."),
            ("--lora_rank", int, "--lora_rank and --lora_alpha of the LoRA rows (default 64; tiny 4)."),
            ("--teacher_checkpointing", str, "on and/or off, comma-separated: rows with --teacher_checkpointing / "
                                             "--no-teacher_checkpointing (default: the scripts' default)."),
            ("--threads", int, "torch CPU threads (default 1 on a CPU: times are then CPU time)."),
            ("--output_json", str, "Write every measurement to this JSON file.")):
        p.add_argument(flag, type=kind, default=None, help=help)
    sizes = ("full", "reduced", "tiny")
    p.add_argument("--imagenet_unet", choices=sizes, help="ADM config (default), at 1/3 width, or a toy one (--tiny).")
    p.add_argument("--sdxl_unet", choices=sizes, help="SDXL base (default on a GPU), real_arch.SDXL_REDUCED (default "
                   "on a CPU) or tests/tiny_sdxl.py's (--tiny).")
    p.add_argument("--sd3_transformer", choices=sizes, help="SD3.5 medium's published config (default on a GPU), "
                   "real_arch.SD35_REDUCED (default on a CPU) or a toy one of its traits (--tiny).")
    p.add_argument("--sdxl_modes", default="full,lora", help="SDXL and SD3 rows: full and/or lora (both with "
                   "--gradient_checkpointing).")
    p.add_argument("--measure", default="step,dmd2", help="What to time per row (step, dmd2), in this order.")
    p.add_argument("--compile", action="store_true", help="Accelerator(dynamo_backend='inductor'): the prepared "
                   "student compiled, as `accelerate launch --dynamo_backend inductor` does for the scripts.")
    p.add_argument("--find_max_batch", action="store_true",
                   help="GPU only: also find the most groups (classes/prompts) per GPU whose TFD step fits.")
    p.add_argument("--max_groups", type=int, default=64, help="Upper limit of the --find_max_batch search.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random weights and data; the scripts' --seed.")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible: use --device cpu.")
    cpu, tiny = args.device.type == "cpu", args.tiny
    split = lambda s: [v.strip() for v in s.split(",") if v.strip()]
    args.repeats = args.repeats or (1 if tiny else 2 if cpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if tiny else 1 if cpu else 2)
    args.teacher_dtype = split(args.teacher_dtype or ("fp32" if cpu else "fp32,bf16"))
    args.sdxl_modes, args.measure = split(args.sdxl_modes), split(args.measure)
    args.sdxl_precision = split(args.sdxl_precision or ("fp32" if cpu else "bf16"))
    args.teacher_checkpointing = split(args.teacher_checkpointing or "") or [None]
    for name, valid in (("teacher_dtype", DTYPES), ("sdxl_modes", ("full", "lora")), ("sdxl_precision", DTYPES),
                        ("measure", ("step", "dmd2")), ("teacher_checkpointing", (None, "on", "off"))):
        if any(v not in valid for v in getattr(args, name)):
            raise ValueError(f"--{name} {getattr(args, name)}: choose from {list(valid)}.")
    if cpu and "fp16" in args.sdxl_precision:
        raise ValueError("--sdxl_precision fp16 needs a GPU (fp16 autocast on a CPU is not a training setting).")
    batch = (args.imagenet_batch or ("2x2,2,2" if tiny else "1x2,2,2" if cpu else "10x4,4,4")).lower()
    args.imagenet_batch = tuple(int(v) for v in batch.replace("x", ",").split(","))
    if len(args.imagenet_batch) != 4:
        raise ValueError(f"--imagenet_batch {batch!r}: write GROUPSxN,P,M, e.g. 10x4,4,4.")
    args.sdxl_prompts = [int(v) for v in split(args.sdxl_prompts or ("1" if tiny else "1,2"))]
    args.sdxl_batch = tuple(int(v) for v in split(args.sdxl_batch or ("2,2" if tiny else "4,4")))
    args.threads = args.threads or (1 if cpu else torch.get_num_threads())
    torch.set_num_threads(args.threads)
    size = "tiny" if tiny else "reduced" if cpu else "full"
    args.imagenet_unet = args.imagenet_unet or ("tiny" if tiny else "full")
    args.sdxl_unet, args.sd3_transformer = args.sdxl_unet or size, args.sd3_transformer or size
    args.sdxl_resolution = args.sdxl_resolution or RESOLUTION[args.sdxl_unet]
    args.sd3_resolution = args.sd3_resolution or RESOLUTION[args.sd3_transformer]
    args.lora_rank = args.lora_rank or (4 if tiny else 64)
    if args.find_max_batch and cpu:
        print("--find_max_batch: skipped on a CPU (it searches for the CUDA out-of-memory limit).")
        args.find_max_batch = False
    return args


def sync(device):
    torch.cuda.synchronize(device) if device.type == "cuda" else None


def time_steps(fn, device, warmup, repeats):
    """Median time (ms) of fn() over `repeats` runs after `warmup`, and each timed run's."""
    clock, times = time.perf_counter if device.type == "cuda" else time.process_time, []
    for _ in range(warmup + repeats):
        sync(device)
        t0 = clock()
        fn()
        sync(device)
        times.append((clock() - t0) * 1e3)
    return statistics.median(times[warmup:]), times[warmup:]


def rss(key="VmRSS"):
    with open("/proc/self/status") as f:
        return next((int(ln.split()[1]) * 1024 for ln in f if ln.startswith(key + ":")), None)


@contextlib.contextmanager
def peak_memory(device, base=None):
    """{"bytes": the block's peak}: CUDA max_memory_allocated, or on a CPU the peak RSS above `base` (Linux VmHWM,
    reset through /proc/self/clear_refs)."""
    out, cuda = {"bytes": None}, device.type == "cuda"
    try:
        torch.cuda.reset_peak_memory_stats(device) if cuda else open("/proc/self/clear_refs", "w").write("5")
        ok = True
    except OSError:
        ok = False
    yield out
    out["bytes"] = torch.cuda.max_memory_allocated(device) if cuda else rss("VmHWM") - (base or 0) if ok else None


def free_memory():
    """Frees what the last row held: the CUDA cache and the heap glibc keeps (a true CPU baseline)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def is_oom(e):
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


class Row:
    """One configuration of one script: its args (`targs`), its Accelerator and the namespace its build returns."""

    def __init__(self, args, kind, precision, groups, ckpt=None, mode=None):
        self.args, self.kind, self.device, self.mode, self.steps = args, kind, args.device, mode, 0
        self.script = importlib.import_module(SCRIPTS[kind])
        self.tmp = tempfile.TemporaryDirectory(prefix="tfd-bench-")
        path = lambda name: os.path.join(self.tmp.name, name)
        cuda, most = self.device.type == "cuda", max(groups, args.max_groups if args.find_max_batch else 0)
        flags = dict(pretrained_model_name_or_path="random-weights", output_dir=path("out"), seed=args.seed,
                     teacher_dtype=precision)
        switches = [] if ckpt is None else [f"--{'' if ckpt == 'on' else 'no-'}teacher_checkpointing"]
        ckpt_name = "" if ckpt is None else f", teacher ckpt {ckpt}"
        if kind == "imagenet64":
            from diffusers import UNet2DModel

            _, n, p, m = args.imagenet_batch
            config = ADM[args.imagenet_unet]
            real_arch.write_class_images(path("data"), min(config["num_class_embeds"], max(2, most)), p + m,
                                         config["sample_size"], args.seed)  # imagefolder labels need 2 classes
            flags.update(train_data_dir=path("data"), cache_dir=path("hf"), classes_per_batch=groups, num_generated=n,
                         num_positives=p, num_anchors=m, mixed_precision="bf16" if cuda else "no")
            torch.manual_seed(args.seed)
            with torch.device(self.device):
                self.net = UNet2DModel(**config)
            size = {"full": "", "reduced": NAMES[kind][1], "tiny": " (tiny)"}[args.imagenet_unet]
            self.name = f"{NAMES[kind][0]}{size}, teacher {precision}{ckpt_name}"
        else:
            (n, p), sdxl = args.sdxl_batch, kind == "sdxl"
            size, res = (args.sdxl_unet, args.sdxl_resolution) if sdxl else (args.sd3_transformer, args.sd3_resolution)
            with open(path("prompts.txt"), "w") as f:
                f.write("".join(f"a benchmark photo of object number {i}\n" for i in range(max(2, most))))
            eight_bit = mode == "full" and HAVE_BNB and cuda
            flags.update(prompts_file=path("prompts.txt"), positive_cache_dir=path("cache"), num_positive_steps=1,
                         train_mode=mode, prompts_per_batch=groups, num_generated=n, num_positives=p, resolution=res,
                         mixed_precision="no" if precision == "fp32" else precision, lora_rank=args.lora_rank,
                         lora_alpha=args.lora_rank)
            switches += ["--gradient_checkpointing"] + ["--use_8bit_adam"] * eight_bit + ["--drop_t5"] * (not sdxl)
            tiny, reduced = size == "tiny", size == "reduced"  # (real_arch's SD3 pipelines have no T5: --drop_t5)
            self.net = (real_arch.sdxl_pipeline(self.device, args.seed, tiny, reduced and real_arch.SDXL_REDUCED)
                        if sdxl else real_arch.sd3_pipeline("sd35-medium", self.device, args.seed, tiny,
                                                            reduced and real_arch.SD35_REDUCED))
            for name, module in self.net.components.items():  # as tfd_text2image.load_pipeline loads them
                if isinstance(module, torch.nn.Module):
                    module.requires_grad_(False).eval()
                    if name.startswith("text_encoder"):  # on the CPU until used, as the VAE
                        module.to("cpu", DTYPES[precision])
                    elif name == "vae":
                        module.to("cpu")
            what = f"LoRA r{args.lora_rank}, ckpt" if mode == "lora" else \
                f"full FT (ckpt, {'8-bit AdamW' if eight_bit else 'AdamW'})"
            name = NAMES[kind][0] if size == "full" else f"{NAMES[kind][1]} {size}"
            self.name = f"{name} {res}px, {what}, {precision}{ckpt_name}"
        self.targs = self.script.parse_args([x for k, v in flags.items() for x in (f"--{k}", str(v))] + switches)
        self.build()

    def build(self):
        """The script's build on this row's networks, under a fresh Accelerator; the positive cache filled."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        self.run = self.acc = self.monitor = self.params = None  # a rebuild first frees the last one
        free_memory()
        AcceleratorState._reset_state(True)  # rows differ in mixed precision
        self.acc = Accelerator(cpu=self.device.type == "cpu", mixed_precision=self.targs.mixed_precision,
                               dynamo_backend="inductor" if self.args.compile else None)
        net = {"teacher" if self.kind == "imagenet64" else "pipe": self.net}
        self.run = self.script.build(self.targs, self.acc, **net)
        self.params = [q for q in self.run.student.parameters() if q.requires_grad]
        images = self.groups * self.targs.num_generated
        self.monitor = tfd_training.TrainingMonitor(self.acc, self.targs, None, None, 0, images, None)
        if self.kind != "imagenet64":  # every prompt cached, as --prepare_positives_only leaves it
            for prompt in self.run.prompts:
                self.run.positives.get(prompt)

    @property
    def groups(self):
        return self.targs.classes_per_batch if self.kind == "imagenet64" else self.targs.prompts_per_batch

    def set_groups(self, groups):
        """Another batch: ImageNet-64's class sampler is made by build; the text-to-image loop reads the flag."""
        if self.kind == "imagenet64":
            self.targs.classes_per_batch = groups
            self.build()
        else:
            self.targs.prompts_per_batch = groups

    def batch(self):
        """The next micro-step's generators and batch, as the script's loop draws them."""
        a, run, acc = self.targs, self.run, self.acc
        self.steps += 1
        shared, gen = tfd_training.step_generators(a.seed, self.steps, 0, acc.process_index)
        if self.kind == "imagenet64":
            return self.script.class_batch(run.sampler, run.data, a, run.image_shape, gen, acc.device), gen
        G = a.prompts_per_batch
        drawn = tfd_training.shared_draw(len(run.prompts), acc.process_index * G, G, shared).tolist()
        entries = [run.positives.get(run.prompts[i]) for i in drawn]
        return tfd_text2image.prompt_batch(entries, a.num_generated, run.latent_shape, gen, acc.device,
                                           tfd_text2image.cond_dtype(a)), gen

    def step(self):
        """One update of the script's loop body (gradient_accumulation_steps 1)."""
        a, acc, run = self.targs, self.acc, self.run
        batch, gen = self.batch()
        loss_sum = 0.0
        with acc.accumulate(run.student):
            loss, logs = self.script.train_step(a, acc, run, batch, gen)
            acc.backward(loss)
            self.monitor.add(logs)
            loss_sum = loss_sum + loss.detach()
            if acc.sync_gradients:
                tfd_training.clip_and_step(acc, run.optimizer, run.lr_scheduler, self.params, loss_sum,
                                           a.max_grad_norm)

    def parts(self, batch):
        """For DMD2: generate(model) → the one-step samples [G·N, ...] (the script's generate) and forward(model) →
        (sample, σ) ↦ the denoiser's output under the batch's conditioning (tfd_utils' teacher forwards)."""
        a, run, s = self.targs, self.run, self.script
        if self.kind == "imagenet64":
            classes, positives, anchors, noise = batch
            n = noise.shape[0] // classes.shape[0]
            generate = lambda m: s.generate(a, m, noise, classes.repeat_interleave(n), run.num_classes)
            return generate, lambda m: tfd_utils.edm_teacher_forward(m, classes, a.precond, a.sigma_data)
        positives, pe, pooled, noise = batch
        rep = lambda t: t.repeat_interleave(noise.shape[0] // positives.shape[0], 0)
        if self.kind == "sdxl":
            ids = s.sdxl_time_ids(a.resolution, len(pe), noise.device, pooled.dtype)
            cond = {"text_embeds": pooled, "time_ids": ids}
            generate = lambda m: s.generate(a, m, noise, rep(pe), rep(pooled), run.scheduler)
            forward = lambda m: tfd_utils.vp_teacher_forward(m, run.alphas_cumprod, pe, cond)
        else:
            generate = lambda m: s.generate(a, m, noise, rep(pe), rep(pooled))
            forward = lambda m: tfd_utils.flow_teacher_forward(m, pe, pooled)
        return generate, forward

    def teacher_context(self):
        return (getattr(self.run, "teacher_context", None) or contextlib.nullcontext)()


def dmd2_setup(row):
    """The fake score: a trainable copy of the student (full: float32; LoRA: its own adapters), AdamW, prepared."""
    fake = copy.deepcopy(row.acc.unwrap_model(row.run.student))
    if "_original_forward" in fake.__dict__:  # Accelerator's autocast forward: prepare adds it again
        fake.forward = fake.__dict__.pop("_original_forward")
    fake.train()
    params = [q for q in fake.parameters() if q.requires_grad]
    fake, opt = row.acc.prepare(fake, tfd_training.make_optimizer(params, row.targs))
    return fake, opt, params


def dmd2_step(row, fake, fake_opt, fake_params):
    """The student's generate and backward, two teacher forwards (CFG), one fake-score forward, the generator update
    (clip_and_step), then the fake-score updates (forward, backward, AdamW) on the detached samples. No GAN head, no
    regression loss, no extra generator forwards: a lower bound of DMD2's step."""
    run, acc, a = row.run, row.acc, row.targs
    generate, forward = row.parts(row.batch()[0])

    def noised(x):
        sigma = (torch.randn(x.shape[0], device=x.device) * 1.2 - 1.2).exp().clamp(0.002, 80.0)
        return x + sigma.view(-1, *[1] * (x.ndim - 1)) * torch.randn_like(x), sigma

    with acc.autocast():
        x = generate(run.student).float()
    with torch.no_grad():
        noisy, sigma = noised(x)
        with row.teacher_context():
            real_c, real_u = (forward(run.teacher)(noisy, sigma).float() for _ in range(2))
        real = real_u + DMD2_GUIDANCE * (real_c - real_u)
        grad = (forward(fake)(noisy, sigma).float() - real) / (x - real).abs().mean().clamp_min(1e-6)
    loss = 0.5 * torch.nn.functional.mse_loss(x, (x - grad).detach())
    acc.backward(loss)
    tfd_training.clip_and_step(acc, run.optimizer, run.lr_scheduler, row.params, loss.detach(), a.max_grad_norm)
    for _ in range(DMD2_FAKE_UPDATES):
        pred = forward(fake)(*noised(x.detach())).float()
        acc.backward(torch.nn.functional.mse_loss(pred, torch.randn_like(pred)))
        acc.clip_grad_norm_(fake_params, a.max_grad_norm)
        fake_opt.step()
        fake_opt.zero_grad(set_to_none=True)


def measure_row(row, args, base_rss):
    ta, dev, w, r = row.targs, row.device, args.warmup, args.repeats
    images = row.groups * ta.num_generated
    trainable = sum(q.numel() for q in row.params)
    total = sum(q.numel() for q in row.run.teacher.parameters()) - (trainable if row.mode == "lora" else 0)
    batch = f"{row.groups}x({ta.num_generated},{ta.num_positives}" + (
        f",{ta.num_anchors})" if row.kind == "imagenet64" else ")")
    res = {"config": row.name, "script": row.script.__name__ + ".py", "kind": row.kind, "params": total,
           "trainable": trainable, "groups": row.groups, "batch": batch, "images_per_step": images}
    print(f"\n== {row.name} ({res['script']}): {total / 1e6:.1f}M parameters, batch {batch}", flush=True)

    def step():
        with peak_memory(dev, base_rss) as peak:
            res["step_ms"], res["step_all"] = time_steps(row.step, dev, w, r)
        res.update(peak_bytes=peak["bytes"], images_per_s=images / res["step_ms"] * 1e3)

    def dmd2():
        fake, opt, params = dmd2_setup(row)
        try:
            with peak_memory(dev, base_rss) as peak:
                res["dmd2_ms"] = time_steps(lambda: dmd2_step(row, fake, opt, params), dev, w, r)[0]
            res["dmd2_peak_bytes"] = peak["bytes"]
        finally:  # the fake score leaves the Accelerator (its memory is freed)
            row.acc._models = [m for m in row.acc._models if m is not fake]
            row.acc._optimizers = [o for o in row.acc._optimizers if o is not opt]

    for name in args.measure:  # in the order given
        try:
            {"step": step, "dmd2": dmd2}[name]()
            print(f"   {name}: {res[name + '_ms']:.1f} ms", flush=True)
        except Exception as e:  # one failed measurement (OOM, a library error) must not lose the table
            if not is_oom(e):
                traceback.print_exc()
            res[name + "_error"] = "OOM" if is_oom(e) else f"{type(e).__name__}: {e}"[:200]
            print(f"   {name}: {res[name + '_error']}", flush=True)
            row.run.optimizer.zero_grad(set_to_none=True)
        free_memory()
    if "step_ms" in res and "dmd2_ms" in res:
        res["tfd_over_dmd2"] = res["step_ms"] / res["dmd2_ms"]
    if args.find_max_batch:
        res["max_groups"] = find_max_groups(row, args)
        print(f"   largest batch that fits: {res['max_groups']} groups", flush=True)
    return res


def find_max_groups(row, args):
    """Most groups per GPU whose TFD step runs (doubling, then bisection); restores the row's batch."""
    def fits(g):
        try:
            row.set_groups(g)
            row.step(), row.step(), sync(row.device)
            return True
        except Exception as e:
            if not is_oom(e):
                raise
            return False
        finally:
            if row.run is not None:
                row.run.optimizer.zero_grad(set_to_none=True)
            free_memory()

    original, lo, hi = row.groups, 0, 1
    while hi <= args.max_groups and fits(hi):
        lo, hi = hi, hi * 2
    while hi <= args.max_groups and hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    row.set_groups(original)
    return lo


def fmt(v, spec=".1f"):
    return "n/a" if v is None else f"{v:{spec}}"


def markdown_table(results, env):
    clock = "wall time" if env["cuda"] else f"process CPU time, {env['threads']} thread(s)"
    lines = [f"Device: {env['device_name']}; torch {env['torch']}; {clock}; warmup {env['warmup']}, repeats "
             f"{env['repeats']} (median){'; torch.compile' if env['compile'] else ''}. Each row times the named "
             "script's own build and training step.", "",
             "| configuration | script | params | trainable | batch | step ms | img/s | peak mem | DMD2 ms | "
             "TFD/DMD2 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mem, n = r.get("peak_bytes"), lambda v: f"{v / 1e6:.1f}M" if v >= 1e5 else f"{v / 1e3:.1f}K"
        lines.append(f"| {r['config']} | {r['script']} | {n(r['params'])} | {n(r['trainable'])} | "
                     f"{r['batch']} | {fmt(r.get('step_ms'))} | {fmt(r.get('images_per_s'), '.2f')} | "
                     f"{'n/a' if mem is None else f'{mem / 2**30:.2f} GiB'} | {fmt(r.get('dmd2_ms'))} | "
                     f"{fmt(r.get('tfd_over_dmd2'), '.2f')} |")
    if any("max_groups" in r for r in results):
        lines += ["", "| configuration | largest groups per GPU that fit |", "|---|---|"]
        lines += [f"| {r['config']} | {r['max_groups']} |" for r in results if "max_groups" in r]
    errors = [(r["config"], k[:-6], v) for r in results for k, v in r.items() if k.endswith("_error")]
    return "\n".join(lines + ([""] + [f"- {c}: {k} failed: {v}" for c, k, v in errors] if errors else []))


def environment(args):
    cuda = args.device.type == "cuda"
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "CPU")
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {"device_name": torch.cuda.get_device_name(args.device) if cuda else f"CPU ({cpu})", "cuda": cuda,
            "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg": load,
            "threads": torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats,
            "compile": args.compile, "tiny": args.tiny}


def rows(args):
    """Row's arguments for every configuration (rows are built one at a time)."""
    ckpt, wanted = args.teacher_checkpointing, lambda kind: args.config in (kind, "all")
    return ([("imagenet64", d, args.imagenet_batch[0], c) for d in args.teacher_dtype for c in ckpt
             if wanted("imagenet64")] + [(k, p, g, c, m) for k in ("sdxl", "sd3") if wanted(k)
                                         for m in args.sdxl_modes for p in args.sdxl_precision
                                         for g in args.sdxl_prompts for c in ckpt])


def main(args):
    torch.backends.cuda.matmul.allow_tf32 = False  # the scripts' default
    env, results = environment(args), []
    for module in ("datasets", "diffusers", "peft", *SCRIPTS.values()):  # before the first row's memory baseline
        importlib.import_module(module)
    for config in rows(args):
        free_memory()
        base_rss = rss()
        try:
            row = Row(args, *config)
        except Exception as e:
            if not is_oom(e):
                raise
            print(f"building a row ran out of memory: {e}")
            continue
        results.append(measure_row(row, args, base_rss))
        del row
    table = markdown_table(results, env)
    print("\n" + table)
    if args.output_json:
        payload = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
        tfd_training.atomic_write(args.output_json, lambda p: json.dump(payload, open(p, "w"), indent=2))
    return results


if __name__ == "__main__":
    main(parse_args())
