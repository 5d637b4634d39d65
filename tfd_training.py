# What every TFD training script's loop shares: files written atomically, the start of a run
# (resume, settings, trackers, Hub repo), per-step seeds and process-disjoint draws, the update,
# logging, checkpoints, images, model cards and the Hub upload. The method itself is in tfd_utils.py.

import contextlib
import copy
import json
import math
import os
import re
import shutil
import time

import torch

# ----------------------------------------------------------------------------------------------
# Files: every file this code writes goes to a temporary name first and is renamed when complete, so a
# killed run never leaves a truncated file behind; metrics.jsonl alone is appended to, one line per
# write (a line cut short by a kill is skipped by its readers and dropped on resume: truncate_metrics).
# ----------------------------------------------------------------------------------------------


def atomic_write(path, write_fn):
    """Run write_fn(tmp_path), fsync, then rename onto `path`: readers see the old file or the whole
    new one, never a partial one."""
    import uuid

    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """Atomically write obj as indented JSON (other values via str)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")

    atomic_write(path, write)


def write_text(path, text):
    """Atomically write a text file."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def save_png(path, image):
    atomic_write(path, lambda tmp: image.save(tmp, format="png"))


def save_into(output_dir, save_fn, name="save"):
    """save_fn(tmp) writes into a temporary folder inside output_dir (`.NAME.incomplete`); then what it wrote is
    moved in, complete: a file by one rename over the old one, a folder after the old one is removed. The
    files that mark a finished export (EXPORT_FILES: model_index.json, the LoRA weights) go last, and an old
    one is removed first: a run killed meanwhile leaves no partial file, and either the whole new export or
    none that counts as finished (the same command with --resume_from_checkpoint latest exports again). The
    temporary folder is cleared by the next save."""
    tmp = os.path.join(output_dir, f".{name}.incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_fn(tmp)
    entries = sorted(os.listdir(tmp), key=lambda e: (e in EXPORT_FILES, not os.path.isdir(os.path.join(tmp, e)), e))
    for entry in entries:
        if entry in EXPORT_FILES and os.path.isfile(os.path.join(output_dir, entry)):
            os.remove(os.path.join(output_dir, entry))
    for entry in entries:
        dst = os.path.join(output_dir, entry)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp, entry), dst)
    os.rmdir(tmp)


def save_pipeline(pipe, output_dir):
    """pipe.save_pretrained into a temporary folder, then each component moved in, complete (save_into)."""
    save_into(output_dir, pipe.save_pretrained, "pipeline")


def tensor_digest(tensors):
    """SHA-256 of named tensors (names, dtypes, shapes, bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


STALE_TMP_SECONDS = 600  # an atomic write takes seconds: an older temporary file is a killed writer's


def remove_stale_tmp_files(root, max_age_s=STALE_TMP_SECONDS):
    """Delete `*.tmp-*` leftovers of killed atomic writes under root (never read: readers open final
    names only). Younger ones may belong to a live writer and are left alone."""
    removed, now = 0, time.time()
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                if ".tmp-" in name and now - os.path.getmtime(path) > max_age_s:
                    os.remove(path)
                    removed += 1
            except FileNotFoundError:  # another process removed or renamed it meanwhile
                pass
    return removed


def split_and_slice(split):
    """'train[:1000]' → ('train', slice(None, 1000)); 'train' → ('train', None)."""
    m = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\])?\s*", split)
    if not m:
        raise ValueError(f"--dataset_split {split!r}: give a split name, optionally sliced, e.g. 'train' or "
                         "'train[:100000]'.")
    if m.group(2) is None:
        return m.group(1), None
    return m.group(1), slice(int(m.group(2)) if m.group(2) else None, int(m.group(3)) if m.group(3) else None)


# ----------------------------------------------------------------------------------------------
# Checkpoints: `checkpoint-N` folders written by accelerator.save_state under a temporary name,
# marked complete, then renamed.
# ----------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_COMPLETE = "tfd_checkpoint_complete"  # written last: a folder without it is incomplete
EXPORT_FILES = ("model_index.json", "pytorch_lora_weights.safetensors", "network-snapshot.pkl")  # what a run ends with
RUN_FILES = ("metrics.jsonl", *EXPORT_FILES)


def list_checkpoints(output_dir, logger=None):
    """Complete `checkpoint-N` folders under output_dir as [(N, path)], oldest first; incomplete ones
    (a run killed while saving) are skipped with a warning."""
    found = []
    if not os.path.isdir(output_dir):
        return found
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        step = name[len(CHECKPOINT_PREFIX):].removesuffix(".incomplete")
        if not (name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and os.path.isdir(path)):
            continue
        if name.endswith(".incomplete") or not os.path.exists(os.path.join(path, CHECKPOINT_COMPLETE)):
            if logger is not None:
                logger.warning(f"Ignoring incomplete checkpoint {path} (no {CHECKPOINT_COMPLETE} marker).")
            continue
        found.append((int(step), path))
    return sorted(found)


def resolve_resume_checkpoint(output_dir, resume_from, logger=None):
    """`latest` → the newest complete checkpoint under output_dir (None if there is none); a path, or a
    checkpoint-N folder inside output_dir → that checkpoint, which must be complete."""
    if not resume_from:
        return None
    if resume_from == "latest":
        ckpts = list_checkpoints(output_dir, logger)
        return ckpts[-1][1] if ckpts else None
    inside = os.path.join(output_dir, resume_from)
    if not os.path.isdir(resume_from) and os.path.isdir(inside):  # a checkpoint-N name, as diffusers' scripts take
        resume_from = inside
    if not os.path.isdir(resume_from):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from!r} does not exist.")
    if not os.path.exists(os.path.join(resume_from, CHECKPOINT_COMPLETE)):
        raise ValueError(f"{resume_from} is an incomplete checkpoint (the run was killed while saving it).")
    return resume_from


def checkpoint_step(path):
    return int(os.path.basename(os.path.normpath(path))[len(CHECKPOINT_PREFIX):])


def check_output_dir(output_dir, resume_from_checkpoint):
    """An output folder holding another run is only continued on request (--resume_from_checkpoint)."""
    if resume_from_checkpoint:
        return
    ckpts = list_checkpoints(output_dir)
    found = [ckpts[-1][1]] if ckpts else [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))]
    if found:
        raise FileExistsError(f"{output_dir} already holds another run ({', '.join(found)}): pass "
                              "--resume_from_checkpoint latest to continue it, or choose a new --output_dir.")



def load_call(output_dir):
    """The call that loads the student exported in output_dir (None when there is none)."""
    if os.path.exists(os.path.join(output_dir, "model_index.json")):
        return f"DiffusionPipeline.from_pretrained('{output_dir}')"
    if os.path.exists(os.path.join(output_dir, "pytorch_lora_weights.safetensors")):
        return f"pipe.load_lora_weights('{output_dir}') on the teacher pipeline"
    if os.path.exists(os.path.join(output_dir, "network-snapshot.pkl")):
        return f"pickle.load(open('{os.path.join(output_dir, 'network-snapshot.pkl')}', 'rb'))['ema']"
    return None


def saved_message(output_dir):
    """The last line of a successful run: where the student is and the call that loads it."""
    return f"Saved the one-step student to {output_dir}: {load_call(output_dir)}"


def finished_steps(output_dir):
    """The step count of the finished run in output_dir, or None when it holds none: a finished run exported
    its student and reached its last step (--max_train_steps in training_args.json: the last line of
    metrics.jsonl, or the newest checkpoint), with no checkpoint past it (a continued run killed before its end
    has one, or has not reached its new last step)."""
    if not any(os.path.exists(os.path.join(output_dir, f)) for f in EXPORT_FILES):
        return None
    try:
        with open(os.path.join(output_dir, "training_args.json")) as f:
            final = int(json.load(f)["max_train_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    reached = None
    if os.path.isfile(os.path.join(output_dir, "metrics.jsonl")):
        with open(os.path.join(output_dir, "metrics.jsonl")) as f:
            for ln in f:
                try:
                    reached = json.loads(ln).get("step", reached)
                except ValueError:  # a line cut short by a kill mid-write
                    pass
    ckpts = list_checkpoints(output_dir)
    newest = ckpts[-1][0] if ckpts else None
    if (newest is not None and newest > final) or final not in (reached, newest):
        return None
    return final


def check_finished_run(args, logger):
    """--resume_from_checkpoint latest on a finished run: True (log where its student is; touch nothing) when
    --max_train_steps asks for no more steps; a FileExistsError when it asks for more but the run kept no
    checkpoint to continue from. False otherwise (a new run, or one to continue from its newest checkpoint)."""
    if args.resume_from_checkpoint != "latest" or getattr(args, "prepare_positives_only", False):
        return False
    final = finished_steps(args.output_dir)
    if final is None:
        return False
    if args.max_train_steps <= final:
        logger.info(f"{args.output_dir} holds a finished run of {final} steps; nothing was changed. Its student: "
                    f"{load_call(args.output_dir)}. To train on, raise --max_train_steps above {final}; for a new "
                    "run, choose a new --output_dir.")
        return True
    if not list_checkpoints(args.output_dir):
        raise FileExistsError(f"{args.output_dir} holds a finished run of {final} steps without a checkpoint: it "
                              f"cannot be continued to --max_train_steps {args.max_train_steps}. Choose a new "
                              "--output_dir (the finished student stays where it is).")
    return False


def save_checkpoint(accelerator, output_dir, step, total_limit=None, logger=None):
    """accelerator.save_state into checkpoint-N atomically, then drop the oldest complete checkpoints
    beyond total_limit. Call on every process."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = final + ".incomplete"
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, CHECKPOINT_COMPLETE), "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        if logger is not None:
            logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------------------------
# Flags every script shares: the objective's (the keywords of tfd_utils.TFDLoss, by the same names),
# optimisation, logging, checkpoints and the Hub. Every value that can be checked without loading
# anything is checked at parse time, naming the flag.
# ----------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow"}


def argument_parser(description):
    """An ArgumentParser whose --help shows every default."""
    import argparse

    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_loss_arguments(parser, layers, radii, sigma_min, sigma_max, pool_size=4):
    """The objective's flags (recipe defaults given by each script): each is the tfd_utils.TFDLoss keyword of
    the same name, passed on by loss_kwargs. A new loss hyperparameter is a TFDLoss keyword and a flag here."""
    g = parser.add_argument_group("TFD objective")
    g.add_argument("--feature_layers", default=layers,
                   help="Teacher layers whose outputs are features, spaces or commas: enc:K, dec:K, bottleneck "
                        "(UNets), block:K or block:A/B (transformers; negative K from the end, A/B a fraction of the "
                        "depth), input (the noised sample itself), or module names (model.named_modules()).")
    g.add_argument("--feature_pool_size", type=int, default=pool_size,
                   help="Average-pool kernel and stride applied to each feature map (1: no pooling).")
    g.add_argument("--drift_radii", default=radii, help="Kernel radii R of the drifting field, summed over.")
    g.add_argument("--drift_kernel", default="drifting", choices=("drifting", "meanshift"),
                   help="drifting: the authors' double-softmax kernel; meanshift: the paper's Eq. (2)-(4).")
    g.add_argument("--feature_noise_mean", type=float, default=-1.2, help="Mean of log σ of the feature noise.")
    g.add_argument("--feature_noise_std", type=float, default=1.2, help="Std of log σ of the feature noise.")
    g.add_argument("--feature_noise_min", type=float, default=sigma_min,
                   help="Lower truncation of σ, in units of the teacher's data (min == max fixes σ; 0: clean).")
    g.add_argument("--feature_noise_max", type=float, default=sigma_max, help="Upper truncation of σ.")
    g.add_argument("--anchor_weight", type=float, default=1.0, help="λ of the anchor-margin loss (0 disables it).")
    g.add_argument("--anchor_alpha", type=float, default=0.5, help="Margin α of the anchor-margin loss.")
    g.add_argument("--anchor_temperature", type=float, default=1.0,
                   help="τ: the bandwidth is the batch's median anchor distance × τ.")
    g.add_argument("--anchor_bandwidth", type=float, default=None, help="A fixed anchor bandwidth instead of τ.")
    return g


LOSS_RANGES = {"feature_pool_size": ">= 1", "feature_noise_std": ">= 0", "feature_noise_min": ">= 0",
               "feature_noise_max": ">= 0", "anchor_weight": ">= 0", "anchor_alpha": "> 0",
               "anchor_temperature": "> 0", "anchor_bandwidth": "> 0"}


def loss_kwargs(args):
    """The tfd_utils.TFDLoss keywords from the flags of the same names."""
    import inspect

    import tfd_utils

    names = inspect.signature(tfd_utils.TFDLoss.__init__).parameters
    return {k: getattr(args, k) for k in names if hasattr(args, k)}


def add_training_arguments(parser, output_dir, learning_rate, max_train_steps, max_grad_norm, validation_steps,
                           checkpointing_steps, lr_warmup_steps=500):
    """Optimisation, logging, checkpoint and Hub flags, with the script's recipe defaults."""
    import argparse

    g = parser.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=learning_rate, help="AdamW learning rate.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW β1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW β2.")
    g.add_argument("--adam_weight_decay", type=float, default=0.01, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW ε.")
    g.add_argument("--use_8bit_adam", action="store_true",
                   help="bitsandbytes' 8-bit AdamW: a quarter of AdamW's optimiser memory (`pip install "
                        "bitsandbytes`).")
    g.add_argument("--lr_scheduler", default="constant_with_warmup", choices=LR_SCHEDULERS,
                   help="Learning-rate schedule (diffusers.optimization).")
    g.add_argument("--lr_warmup_steps", type=int, default=lr_warmup_steps, help="Warm-up steps of the learning rate.")
    g.add_argument("--max_train_steps", type=int, default=max_train_steps, help="Optimiser updates.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches per update (each a full batch of groups on every process).")
    g.add_argument("--max_grad_norm", type=float, default=max_grad_norm, help="Gradient clipping norm.")
    g.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"),
                   help="Autocast of the student; its weights stay float32 (default: the accelerate config's "
                        "setting).")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute the student's blocks in backward instead of keeping their activations.")
    g.add_argument("--teacher_checkpointing", default=None, action=argparse.BooleanOptionalAction,
                   help="In the generated samples' teacher pass, recompute the teacher's blocks in backward instead "
                        "of keeping their activations (a diffusers teacher; LoRA: with the adapters off). Default: "
                        "on with --gradient_checkpointing.")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    g.add_argument("--max_bad_steps", type=int, default=10,
                   help="Stop after this many consecutive updates with a non-finite loss or gradient (each skipped).")
    g.add_argument("--seed", type=int, default=0,
                   help="Seed of everything: initialisation, draws, noise (per step and process).")

    g = parser.add_argument_group("logging, validation, checkpoints, output")
    g.add_argument("--output_dir", default=output_dir, help="Where checkpoints, logs and the student go.")
    g.add_argument("--logging_dir", default="logs", help="Tracker log folder, relative to --output_dir.")
    g.add_argument("--report_to", default="tensorboard", choices=(*TRACKERS, "all", "none"),
                   help="Tracker of the training metrics.")
    g.add_argument("--tracker_project_name", default=os.path.basename(output_dir), help="Tracker project name.")
    g.add_argument("--logging_steps", type=int, default=10, help="Log (trackers, metrics.jsonl) every N updates.")
    g.add_argument("--validation_steps", type=int, default=validation_steps,
                   help="Validation grid every N updates (0: never).")
    g.add_argument("--checkpointing_steps", type=int, default=checkpointing_steps,
                   help="Save a checkpoint every N updates.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (the newest complete checkpoint in --output_dir; a new run if there is none), a "
                        "checkpoint-N folder name inside --output_dir, or a checkpoint path.")
    g.add_argument("--push_to_hub", action="store_true",
                   help="Create the Hub repo at the start, upload --output_dir at the end.")
    g.add_argument("--hub_model_id", default=None, help="Hub repo id (default: the output folder's name).")
    g.add_argument("--hub_token", default=None,
                   help="Hub token (default: the cached `hf auth login` or HF_TOKEN, which are safer: a token on the "
                        "command line shows in the process list, and accelerate prints a failed command). Never "
                        "written to any file or tracker.")
    return g


NUM_GENERATED = (">= 2", "the generated samples of a group are each other's negatives")

# Ranges of the flags add_training_arguments defines.
TRAINING_RANGES = {
    "learning_rate": "> 0", "adam_beta1": "0..0.999999", "adam_beta2": "0..0.999999", "adam_weight_decay": ">= 0",
    "adam_epsilon": "> 0", "lr_warmup_steps": ">= 0", "max_train_steps": ">= 1", "gradient_accumulation_steps": ">= 1",
    "max_grad_norm": "> 0", "max_bad_steps": ">= 1", "logging_steps": ">= 1", "validation_steps": ">= 0",
    "checkpointing_steps": ">= 1", "checkpoints_total_limit": ">= 1", "seed": ">= 0",
}


def check_ranges(args, rules):
    """Refuse out-of-range flag values at parse time, naming every offending flag. rules: {dest: rule}
    with rule ">= x", "> x" or "a..b" (inclusive), or (rule, reason); flags left at None are not checked."""
    bad = []
    for dest, rule in rules.items():
        rule, why = (rule, "") if isinstance(rule, str) else (rule[0], f" ({rule[1]})")
        value = getattr(args, dest)
        if value is None:
            continue
        if ".." in rule:
            lo, hi = (float(v) for v in rule.split(".."))
            ok = lo <= value <= hi
        else:
            op, bound = rule.split()
            ok = value >= float(bound) if op == ">=" else value > float(bound)
        if not ok:
            bad.append(f"--{dest} {value}: must be {rule.replace('..', ' to ')}{why}")
    if bad:
        raise ValueError("; ".join(bad) + ".")


def parse_floats(text):
    """'0.02,0.05 0.2' → [0.02, 0.05, 0.2] (commas or spaces)."""
    try:
        return [float(v) for v in str(text).replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{text!r} is not a list of numbers separated by commas or spaces.") from None


def check_common_args(args, ranges):
    """The checks every script runs right after parsing (before anything loads): ranges (the shared ones and
    the script's), the objective's lists, optional packages the flags need, the Hub token."""
    import importlib.util

    check_ranges(args, {**TRAINING_RANGES, **LOSS_RANGES, **ranges})
    if isinstance(args.feature_layers, str):
        args.feature_layers = args.feature_layers.replace(",", " ").split()
    if isinstance(args.drift_radii, str):
        args.drift_radii = parse_floats(args.drift_radii)
    if not args.feature_layers:
        raise ValueError("--feature_layers: give at least one teacher layer.")
    if not args.drift_radii or min(args.drift_radii) <= 0:
        raise ValueError(f"--drift_radii {args.drift_radii}: give positive radii (a negative one flips the kernel and "
                         "drives samples the wrong way).")
    if args.feature_noise_min > args.feature_noise_max:
        raise ValueError(f"--feature_noise_min {args.feature_noise_min} is above --feature_noise_max "
                         f"{args.feature_noise_max}.")
    # wandb records the command line itself, so a token on it would be uploaded: refuse the pair.
    if getattr(args, "hub_token", None) is not None and args.report_to in ("wandb", "all"):
        raise ValueError("Do not pass --hub_token together with --report_to wandb (wandb records the command line): "
                         "log in with `hf auth login` instead.")
    for flag, package in (("--use_8bit_adam", "bitsandbytes" if args.use_8bit_adam else None),
                          (f"--report_to {args.report_to}", TRACKERS.get(args.report_to))):
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(f"{flag} needs the {package} package, which is not installed: `pip install {package}`.")
    if args.teacher_checkpointing is None:
        args.teacher_checkpointing = args.gradient_checkpointing
    check_teacher_precision(args)
    if args.lr_warmup_steps > args.max_train_steps and args.lr_scheduler != "constant":
        import logging

        logging.getLogger(__name__).warning(
            f"--lr_warmup_steps {args.lr_warmup_steps} is longer than the run (--max_train_steps "
            f"{args.max_train_steps}): the learning rate never reaches --learning_rate {args.learning_rate}.")


def mixed_precision(args):
    """The autocast the Accelerator will use: --mixed_precision, else ACCELERATE_MIXED_PRECISION (what
    `accelerate launch` sets from its config file or flags), else no."""
    return args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def check_teacher_precision(args):
    """A float16 teacher needs fp16 mixed precision: the feature gradient flows back through the teacher in
    its dtype, and in float16 without the GradScaler's loss scaling most of it is subnormal or flushed to zero
    (docs/scripts.md). bf16 has float32's range. Only the sampling of positives (--prepare_positives_only) has
    no backward."""
    if getattr(args, "teacher_dtype", None) != "fp16" or getattr(args, "prepare_positives_only", False):
        return
    mode = mixed_precision(args)
    if mode != "fp16":
        where = "" if args.mixed_precision else " (from ACCELERATE_MIXED_PRECISION, i.e. the accelerate config)"
        raise ValueError(f"--teacher_dtype fp16 with mixed precision {mode!r}{where}: the feature gradient flows back "
                         "through the float16 teacher, and without the loss scaling of --mixed_precision fp16 most "
                         "of it underflows. Use --teacher_dtype bf16, or --mixed_precision fp16.")


# ----------------------------------------------------------------------------------------------
# The start of a run: resume, recorded settings (secrets never), trackers, the Hub repo.
# ----------------------------------------------------------------------------------------------

SECRET_ARGS = ("hub_token",)


def public_args(args):
    """The run's settings without secrets: what may be written to files, trackers and model cards."""
    return {k: v for k, v in vars(args).items() if k not in SECRET_ARGS}


FILE_SUFFIXES = (".pkl", ".pt", ".pth", ".ckpt", ".safetensors", ".bin", ".zip", ".tar", ".json", ".jsonl", ".csv",
                 ".parquet", ".arrow", ".txt")  # a value ending so names a file, never a Hub repo


def looks_like_path(value):
    """A value that can only be a local path: it starts with /, ./, ../ or ~, has more than the one slash of a Hub
    id ORG/NAME (or a backslash), ends with a file suffix, or its first part is a local folder. Not a URL."""
    if "://" in value:
        return False
    parts = value.split("/")
    return (value.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in value or len(parts) > 2
            or value.lower().endswith(FILE_SUFFIXES) or (len(parts) == 2 and os.path.isdir(parts[0])))


def check_sources(args, models=(), data=(), paths=()):
    """Before anything loads: each flag in models, data and paths (names of args) that holds a local path must
    exist (a typo is told apart from a Hub id); paths are local paths always. A model's Hub id with HF_HUB_OFFLINE
    set must be in the local Hub cache (--cache_dir), else the run would fail only once loading gives up."""
    for dest in (*models, *data, *paths):
        value = getattr(args, dest, None)
        if not value or "://" in value:  # a URL (an EDM pickle's) is neither
            continue
        if value.startswith("~"):
            value = os.path.expanduser(value)
            setattr(args, dest, value)
        if os.path.exists(value):
            continue
        if dest in paths or looks_like_path(value):
            raise FileNotFoundError(f"--{dest} {value}: no such file or folder (a local path, relative to "
                                    f"{os.getcwd()}; a Hub id is NAME or ORG/NAME).")
        if dest in models:
            check_hub_model_cached(f"--{dest}", value, getattr(args, "revision", None),
                                   getattr(args, "cache_dir", None))


def check_hub_model_cached(flag, repo_id, revision=None, cache_dir=None):
    """With HF_HUB_OFFLINE set, a Hub model that is not in the local cache is an error now."""
    from huggingface_hub import constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        return
    try:
        snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception as e:  # not cached (or not a valid repo id)
        raise OSError(f"{flag} {repo_id}: not in the local Hub cache ({cache_dir or constants.HF_HUB_CACHE}), and "
                      f"HF_HUB_OFFLINE is set: download it first (`hf download {repo_id}`), unset HF_HUB_OFFLINE, or "
                      f"pass a local folder. ({type(e).__name__})") from None


def create_hub_repo(args):
    """With --push_to_hub, create the repo before training so a bad token or name fails now. Returns
    its id (None without --push_to_hub)."""
    if not args.push_to_hub:
        return None
    from huggingface_hub import create_repo

    name = hub_repo_name(args)
    try:
        return create_repo(name, exist_ok=True, token=args.hub_token).repo_id
    except Exception as e:
        why, token = f"{type(e).__name__}: {e}", args.hub_token
        leaks = bool(token) and token in why  # then neither it nor its cause is shown: tracebacks print causes
        if leaks:
            why = why.replace(token, "***")
        error = RuntimeError(
            f"--push_to_hub: could not create the Hub repo {name!r} ({why}). Check that you are logged in with write "
            "access (`hf auth login`, or pass --hub_token), that --hub_model_id names a repo you may create "
            "(NAME or ORG/NAME; default: the --output_dir folder's name), and that the Hub is reachable "
            "(HF_HUB_OFFLINE unset). Nothing was trained.")
        raise error from (None if leaks else e)


def start_run(accelerator, args, resume, logger):
    """Load the checkpoint to resume from (None: a new run), drop a killed run's metrics lines past it,
    record the settings and start the trackers. Returns (first_step, metrics.jsonl path)."""
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    first_step = 0
    if resume is None and args.resume_from_checkpoint:
        logger.info(f"No checkpoint in {args.output_dir} to resume from: starting a new run.")
    if resume is not None:
        accelerator.load_state(resume)
        first_step = checkpoint_step(resume)
        logger.info(f"Resumed from {resume} at step {first_step}.")
    if accelerator.is_main_process:
        truncate_metrics(metrics_path, first_step)  # a killed run's lines past the checkpoint (or all)
        os.makedirs(args.output_dir, exist_ok=True)
        settings = public_args(args)
        write_json(os.path.join(args.output_dir, "training_args.json"), settings)
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in settings.items()}
        accelerator.init_trackers(args.tracker_project_name, config=config)
    return first_step, metrics_path


def setup_logging():
    """INFO lines with time, level and logger name. huggingface_hub prints its own warnings: they are kept from
    the root logger too, which would print each twice."""
    import logging

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logging.getLogger("huggingface_hub").propagate = False


@contextlib.contextmanager
def stop_on_interrupt(accelerator, args, logger):
    """Around the training loop: Ctrl-C ends the run with one line naming the last complete checkpoint and how to
    continue from it (no traceback), after accelerator.end_training (trackers flushed); exit status 130."""
    try:
        yield
    except KeyboardInterrupt:
        ckpts = list_checkpoints(args.output_dir)
        where = (f"the last checkpoint is {ckpts[-1][1]}" if ckpts else "no checkpoint was saved yet")
        logger.warning(f"Training interrupted: {where}. Run the same command with --resume_from_checkpoint latest "
                       "to continue.")
        accelerator.end_training()
        raise SystemExit(130) from None


def cast(model, *args):
    """model.to(*args) (a device and/or a dtype). A diffusers model without modules it keeps in float32 is cast by
    torch.nn.Module.to: diffusers' own .to warns about such modules at every dtype cast, even when there are none."""
    if getattr(model, "_keep_in_fp32_modules", None):
        return model.to(*args)
    return torch.nn.Module.to(model, *args)


def student_and_frozen_teacher(model, device, teacher_dtype):
    """(student, teacher) of a full fine-tune from the teacher's network as loaded, placed so that the device never
    holds two float32 copies of it: the float32 student is copied on the CPU (the checkpoint's exact weights), the
    teacher then goes to the device already in teacher_dtype (each tensor cast while it moves: a float32 teacher is
    never on the device when teacher_dtype is half), then the student follows. The host holds two copies while the
    student is made. A network handed over on the device (the benchmark's) goes to the CPU first."""
    cast(model.requires_grad_(False), "cpu")
    student = cast(copy.deepcopy(model), torch.float32).requires_grad_(True)
    teacher = cast(model, device, teacher_dtype)
    return cast(student, device), teacher


# ----------------------------------------------------------------------------------------------
# Memory on the device, component by component, logged once at start-up.
# ----------------------------------------------------------------------------------------------


def same_device(a, b):
    """Whether two devices are one (cuda:0 and cuda:0, cpu and cpu:0)."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def local_tensor(t):
    """The part of `t` this process holds: its shard of an FSDP2 DTensor, else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


def tensor_bytes(t):
    t = local_tensor(t)
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer, param, device):
    """(bytes on `device` of the state `optimizer` keeps for `param` once it has stepped, whether that is exact):
    what the first step will allocate. torch's AdamW and Adam: two moments shaped and typed like the parameter
    (three with amsgrad) and a float32 step count, kept on the parameter's device only when capturable or fused
    (else on the CPU). bitsandbytes' 8-bit AdamW (not exact): one byte per parameter per moment and a float32
    scale per block of 256, float32 moments for tensors under its min_8bit_size. Another optimiser: what
    optimizer.state holds now."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    local = local_tensor(param)
    numel, on_device = local.numel(), same_device(local.device, device)
    if type(opt) in (torch.optim.AdamW, torch.optim.Adam):
        group = next(g for g in opt.param_groups if any(p is param for p in g["params"]))
        moments = (3 if group.get("amsgrad") else 2) * numel * local.element_size() if on_device else 0
        step_device = local.device if group.get("capturable") or group.get("fused") else torch.device("cpu")
        return moments + 4 * same_device(step_device, device), True
    if type(opt).__module__.startswith("bitsandbytes") and "8bit" in type(opt).__name__:
        if not on_device:
            return 0, False
        if numel < getattr(getattr(opt, "args", None), "min_8bit_size", 4096):
            return 2 * numel * 4, False
        return 2 * numel + 2 * 4 * -(-numel // 256), False
    return sum(tensor_bytes(v) for v in opt.state.get(param, {}).values()
               if torch.is_tensor(v) and same_device(local_tensor(v).device, device)), False


def format_bytes(n):
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def memory_report(device, components, optimizer):
    """Bytes on `device`, per component: {label: {"params", "trainable", "buffers", "grads", "ddp_buckets",
    "optimizer", "elsewhere", "dtypes", "optimizer_exact"}}. components: [(label, module or tensors)] (a tensor met
    twice, e.g. a LoRA student that is also its teacher, counts once, under its first label). params: the bytes of
    its parameters (this process's shards under FSDP) on the device, of them `trainable` those that require grad;
    buffers: its buffers on the device (SD3's position table); grads: what the gradients will take (shaped and
    typed like their parameters); ddp_buckets: DDP's flat gradient buckets, as much again unless
    gradient_as_bucket_view; optimizer: optimizer_state_bytes; elsewhere: parameter and buffer bytes on other
    devices."""
    opt = getattr(optimizer, "optimizer", optimizer)
    seen, report = set(), {}
    for label, thing in components:
        params = list(thing.parameters()) if isinstance(thing, torch.nn.Module) else list(thing)
        ddp = isinstance(thing, torch.nn.parallel.DistributedDataParallel) and not thing.gradient_as_bucket_view
        row = dict.fromkeys(("params", "trainable", "buffers", "grads", "ddp_buckets", "optimizer", "elsewhere"), 0)
        row.update(dtypes=[], optimizer_exact=True)
        for b in thing.buffers() if isinstance(thing, torch.nn.Module) else ():
            if id(b) not in seen:
                seen.add(id(b))
                row["buffers" if same_device(local_tensor(b).device, device) else "elsewhere"] += tensor_bytes(b)
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = tensor_bytes(p)
            if not same_device(local_tensor(p).device, device):
                row["elsewhere"] += n
                continue
            row["params"] += n
            if str(p.dtype).removeprefix("torch.") not in row["dtypes"]:
                row["dtypes"].append(str(p.dtype).removeprefix("torch."))
            if p.requires_grad:
                row["trainable"] += n
                row["grads"] += n
                row["ddp_buckets"] += n * ddp
                state, exact = optimizer_state_bytes(opt, p, device)
                row["optimizer"] += state
                row["optimizer_exact"] &= exact
        report[label] = row
    return report


def log_memory(accelerator, components, optimizer, logger):
    """One line per component (memory_report on the accelerator's device) and a total, after accelerator.prepare:
    parameters as they are now, gradients and optimiser states as the first step will allocate them; activations
    (and an FSDP unit's gathered weights) not counted. Returns the report."""
    device = accelerator.device
    report = memory_report(device, components, optimizer)
    opt = type(getattr(optimizer, "optimizer", optimizer)).__name__
    logger.info(f"Memory on {device} (this process; parameters as they are now, gradients and {opt} states as the "
                "first step allocates them; activations not counted):")
    for label, r in report.items():
        if not r["params"] + r["buffers"]:
            where = f" ({format_bytes(r['elsewhere'])} on the CPU)" if r["elsewhere"] else ""
            logger.info(f"  {label}: none{where}")
            continue
        some = 0 < r["trainable"] < r["params"]
        parts = [f"{format_bytes(r['params'])} params ({' + '.join(r['dtypes'])}"
                 + (f"; {format_bytes(r['trainable'])} of them trainable)" if some else ")")
                 + (f" + {format_bytes(r['buffers'])} buffers" if r["buffers"] >= 2 ** 20 else "")]
        if r["trainable"]:
            parts.append(f"{format_bytes(r['grads'])} grads")
            if r["ddp_buckets"]:
                parts.append(f"{format_bytes(r['ddp_buckets'])} DDP gradient buckets")
            parts.append(("" if r["optimizer_exact"] else "≈ ") + f"{format_bytes(r['optimizer'])} {opt} states")
        logger.info(f"  {label}: " + " + ".join(parts))
    total = sum(r[k] for r in report.values() for k in ("params", "buffers", "grads", "ddp_buckets", "optimizer"))
    logger.info(f"  total: {format_bytes(total)} before activations")
    return report


def step_generators(seed, step, micro=0, rank=0):
    """Generators of one micro-step from (seed, step, micro, rank) alone, so a resumed run repeats it:
    (shared: the same on every process, own: this process's). Also seeds torch's global generator
    (the feature noise ξ, dropout)."""
    base = ((seed * 1_000_003 + step) * 1009 + micro) * 4099
    shared = torch.Generator().manual_seed(base - 1)
    own = torch.Generator().manual_seed(base + rank)
    torch.manual_seed(base + rank)
    return shared, own


def shared_draw(n, start, count, generator, chunk=256):
    """Positions [start, start+count) of one random sequence of indices in range(n).

    Every lap of n consecutive positions is a permutation of range(n), and the sequence depends only
    on the generator's seed: processes seeding it alike and taking positions [rank·G, (rank+1)·G)
    draw disjoint sets while G·world fits in n. Costs O(start + count) draws, not O(n).
    """
    out, seen = [], set()
    while len(out) < start + count:
        for i in torch.randint(n, (chunk,), generator=generator).tolist():
            if i in seen:
                continue
            seen.add(i)
            out.append(i)
            if len(seen) == n:  # a lap is complete: the next one is a new permutation
                seen = set()
            if len(out) == start + count:
                break
    return torch.tensor(out[start:], dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# The update: optimiser, schedule, clipping with the non-finite guard; the trained model for saving.
# ----------------------------------------------------------------------------------------------


def make_optimizer(params, args):
    """AdamW (or bitsandbytes' 8-bit AdamW with --use_8bit_adam) from the scripts' optimiser flags."""
    kw = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
              eps=args.adam_epsilon)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from e
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def make_lr_scheduler(optimizer, args, num_processes):
    """diffusers' schedule by name; prepared schedulers step once per process, hence the factor."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes)


def clip_and_step(accelerator, optimizer, lr_scheduler, params, loss_sum, max_grad_norm):
    """Clip, step the optimiser and schedule only when the gradient norm and the loss (summed over
    processes) are finite, zero the gradients. Returns (ok, grad_norm); computing `ok` is the step's
    one host sync. A GradScaler (fp16) steps either way: it skips the update itself."""
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, which the logs' all-reduce refuses; the plain norm
        grad_norm = grad_norm.full_tensor()
    ok = bool(torch.isfinite(torch.as_tensor(grad_norm)) &
              torch.isfinite(accelerator.reduce(loss_sum.float(), reduction="sum")))
    if ok or accelerator.scaler is not None:
        optimizer.step()
    if ok:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return ok, grad_norm


def consolidated_model(accelerator, model):
    """The trained module with complete weights, for saving on the main process (call on every process).

    DDP / ZeRO-2 / one process: the unwrapped module. FSDP: the full state dict is gathered (a
    collective) and loaded into a fresh copy built from the diffusers config on the main process
    (None elsewhere).
    """
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type != DistributedType.FSDP:
        return unwrapped
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    full = type(unwrapped).from_config(unwrapped.config)
    full.load_state_dict(state)
    return full


# ----------------------------------------------------------------------------------------------
# Logging: averaged over micro-steps and processes, to trackers, the progress bar and metrics.jsonl.
# ----------------------------------------------------------------------------------------------


def scalars(logs):
    """Tensor logs → floats, with one host sync for all of them."""
    keys = list(logs)
    device = next((v.device for v in logs.values() if torch.is_tensor(v)), "cpu")
    vals = torch.stack([torch.as_tensor(logs[k], dtype=torch.float32, device=device).reshape(()) for k in keys])
    return dict(zip(keys, vals.cpu().tolist()))


def append_metrics(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path, step):
    """Drop the lines of a metrics.jsonl past `step` (a resumed run rewrites them), atomically."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for ln in f:
            try:
                record = json.loads(ln)
            except ValueError:  # empty, or cut short by a kill mid-write
                continue
            if record.get("step", 0) <= step:
                kept.append(ln.rstrip("\n") + "\n")

    write_text(path, "".join(kept))


class TrainingMonitor:
    """The loop's bookkeeping: logs averaged over micro-steps, the non-finite-step guard, and every
    --logging_steps one line to the trackers, the progress bar and metrics.jsonl. The loss's own log
    keys are logged as they come; the first is shown on the progress bar."""

    def __init__(self, accelerator, args, progress, metrics_path, first_step, images_per_step, logger):
        self.accelerator, self.args, self.progress, self.logger = accelerator, args, progress, logger
        self.metrics_path, self.images_per_step = metrics_path, images_per_step
        self.bad_steps, self.last_time, self.last_step = 0, time.perf_counter(), first_step
        self.logs = {}

    def add(self, logs):
        """Accumulate one micro-step's logs (tensors), averaged over gradient accumulation."""
        n = self.args.gradient_accumulation_steps
        for k, v in logs.items():
            self.logs[k] = self.logs.get(k, 0.0) + v.detach().float() / n

    def end_step(self, step, ok, grad_norm, extra=None):
        """After an update: count a skipped one (stop after --max_bad_steps in a row, naming the last
        good checkpoint), and log every --logging_steps. extra: scalars, or a function returning them
        (called only when logging)."""
        args = self.args
        self.bad_steps = 0 if ok else self.bad_steps + 1
        if not ok:
            self.logger.warning(f"Step {step}: non-finite loss or gradient norm; update skipped "
                                f"({self.bad_steps} in a row).")
            if self.bad_steps >= args.max_bad_steps:
                ckpts = list_checkpoints(args.output_dir)
                last = ckpts[-1][1] if ckpts else "none (no checkpoint yet)"
                self.accelerator.end_training()
                raise RuntimeError(f"{self.bad_steps} consecutive non-finite steps: stopping. Last good checkpoint: "
                                   f"{last}. Lower --learning_rate or use --mixed_precision no/bf16.")
        self.progress.update(1)
        if step % args.logging_steps == 0 or step == args.max_train_steps:
            self._log(step, grad_norm, (extra() if callable(extra) else extra) or {})
        self.logs = {}

    def can_checkpoint(self, step):
        """False (with a warning) inside a run of skipped updates: such a checkpoint is no good to resume."""
        if self.bad_steps:
            self.logger.warning(f"Step {step}: not checkpointing during {self.bad_steps} non-finite steps in a row.")
        return not self.bad_steps

    def _log(self, step, grad_norm, extra):
        device = self.accelerator.device
        logs = dict(self.logs, **{"train/grad_norm": torch.as_tensor(grad_norm, device=device).float(),
                                  "train/bad_steps": torch.tensor(float(self.bad_steps), device=device)})
        keys = list(logs)
        vals = self.accelerator.reduce(torch.stack([logs[k].reshape(()).to(device) for k in keys]), "mean")
        values = scalars(dict(zip(keys, vals)))
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        values.update({"train/steps_per_s": rate, "train/images_per_s": rate * self.images_per_step}, **extra)
        self.accelerator.log(values, step=step)
        self.progress.set_postfix({keys[0]: f"{values[keys[0]]:.4g}", "lr": f"{values.get('train/lr', 0):.3g}"})
        if self.accelerator.is_main_process:
            append_metrics(self.metrics_path, {"step": step, **values})


def is_validation_step(accelerator, args, step):
    """Every --validation_steps, on the main process; never under FSDP (one process cannot run a sharded model)."""
    return bool(args.validation_steps and step % args.validation_steps == 0 and accelerator.is_main_process and
                accelerator.distributed_type.value != "FSDP")


def save_validation_grid(accelerator, args, grid, step):
    """OUTPUT_DIR/validation/step-N.png, and the image to the trackers."""
    os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
    save_png(os.path.join(args.output_dir, "validation", f"step-{step}.png"), grid)
    log_image(accelerator, grid, step)


def log_image(accelerator, image, step, tag="validation"):
    """A PIL image to the accelerator's trackers (tensorboard, wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image)]}, step=step)


# ----------------------------------------------------------------------------------------------
# Images.
# ----------------------------------------------------------------------------------------------


def to_uint8(images):
    """Images in [−1, 1], [B, C, H, W] → uint8 [B, H, W, C] via clamp((x + 1)·127.5), truncating (the
    conversion of the FID protocols)."""
    x = ((images.detach().float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()


def image_grid(images, nrow=None):
    """Images in [−1, 1], [B, C, H, W] → one PIL grid image (rows of nrow)."""
    from PIL import Image

    x = to_uint8(images)
    b, h, w, c = x.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    grid = torch.zeros(math.ceil(b / nrow) * h, nrow * w, c, dtype=torch.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i]
    arr = grid.numpy()
    return Image.fromarray(arr[..., 0] if c == 1 else arr)


def eight_bit(image):
    """16-bit grayscale PIL images (modes I;16*, I) rescaled to 8-bit L (PIL's convert() would clip
    them to white); other images as they are."""
    import numpy as np
    from PIL import Image

    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return image
    return Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# Training images: read undecoded from their source, decoded before the first update; the bad ones
# named (file, zip member or webdataset shard and key), counted, skipped up to --max_bad_images.
# ----------------------------------------------------------------------------------------------


def add_bad_images_argument(group):
    group.add_argument(
        "--max_bad_images", type=int, default=0,
        help="Every training image is decoded before the first update; one that cannot be (truncated, corrupted, "
             "empty) is named in a warning and left out, and more than this many stop the run there. Default 0: "
             "any bad image stops the run, naming it, before compute is spent (a bad image usually means a broken "
             "download or conversion worth fixing); give a count to train without them.")


def open_image(value):
    """A PIL image, opened lazily, from what a data set holds: a PIL image, datasets' undecoded
    {"bytes", "path"}, encoded bytes, a file path or an array."""
    import io

    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("path") if value.get("bytes") is None else value["bytes"]
    if value is None:
        raise ValueError("no image in this row")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str) and "://" in value:  # a remote file of a Hub data set: datasets fetches it
        import datasets

        return datasets.Image().decode_example({"path": value, "bytes": None})
    if isinstance(value, (str, os.PathLike)):
        return Image.open(value)
    import numpy as np

    return Image.fromarray(np.asarray(value))


def decode_image(image, mode):
    """A PIL image fully decoded (Image.open reads only the header: a truncated file fails here), 16-bit
    rescaled to 8 bits, in `mode`; ValueError for an image without pixels."""
    image.load()
    if 0 in image.size:
        raise ValueError(f"the image has no pixels ({image.width}x{image.height})")
    return eight_bit(image).convert(mode)


def image_error(e):
    """What a message says about why an image failed (without PIL's in-memory object address)."""
    return f"{type(e).__name__}: " + re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))


class ImageSource:
    """Images by index: read(indices) → the raw images as the source holds them (open_image opens each);
    name(i) → how a message names image i; calling it, fetch(indices) → PIL images (opened lazily)."""

    def __init__(self, read, name):
        self.read, self.name = read, name

    def __call__(self, indices):
        return [open_image(v) for v in self.read(indices)]


def column_images(ds, column, where):
    """The images of one column of a datasets.Dataset as an ImageSource, read from arrow without decoding
    (datasets decodes a batch at once, and one bad image fails it). Names: the image's member and shard of
    webdataset shards (the __key__/__url__ columns), else its file (imagefolder, a column made from files),
    else its row of `where`."""
    keys = [c for c in ("__url__", "__key__") if c in ds.column_names and c != column]
    raw = ds.select_columns([column, *keys]).with_format("arrow")

    def read(rows):
        return raw[[int(r) for r in rows]].column(column).to_pylist()

    def name(row):
        record = raw[[int(row)]].to_pylist()[0]
        value = record[column]
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        if "__url__" in record:
            return f"{path or record.get('__key__')} in {record['__url__']}"
        if path and os.path.isabs(path):
            return path
        return f"{path} (row {row} of {where})" if path else f"row {row} of {where}"

    return ImageSource(read, name)


def read_each(read, ids):
    """read(ids), or where that fails (a source that opens its images, a damaged zip member), each id read
    alone, its exception in place of its image."""
    try:
        return list(read(ids))
    except Exception:
        values = []
        for i in ids:
            try:
                values.append(read([i])[0])
            except Exception as e:
                values.append(e)
        return values


def find_bad_images(ids, read, decode, name, accelerator=None, progress=True, desc="checking images", chunk=512):
    """{id: (name, reason)} of the images among `ids` that cannot be decoded, the same on every process:
    each process decodes its share (ids[rank::world]) on a few threads (PIL decodes without the GIL) and
    the bad ones are gathered. read(ids) → raw images, in this thread; decode(raw) raises for a bad image."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    mine = list(ids)[rank::world]
    threads = max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))

    def attempt(value):
        try:
            if isinstance(value, Exception):
                raise value
            decode(value)
        except Exception as e:  # whatever PIL, the source or the checks raise for a broken image
            return image_error(e)

    bad = []
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(mine), desc=desc, unit="image",
                                                   disable=not progress) as bar:
        for start in range(0, len(mine), chunk):
            part = mine[start:start + chunk]
            bad += [(i, name(i), reason) for i, reason in zip(part, pool.map(attempt, read_each(read, part)))
                    if reason is not None]
            bar.update(len(part))
    if world > 1:
        from accelerate.utils import gather_object

        bad = gather_object(bad)
    return {i: (n, reason) for i, n, reason in sorted(bad)}


def check_bad_images(bad, max_bad, checked, where, logger):
    """Stop when more than --max_bad_images of the `checked` images of `where` are bad ({id: (name,
    reason)}, listing the first); otherwise name each in a warning and sum them up in one line."""
    if len(bad) > max_bad:
        listed = "; ".join(f"{n} ({reason})" for n, reason in list(bad.values())[:5])
        raise ValueError(f"{len(bad)} of {checked} images of {where} cannot be decoded, more than --max_bad_images "
                         f"{max_bad}: {listed}{' ...' if len(bad) > 5 else ''}. Remove or re-encode them, or pass "
                         f"--max_bad_images {len(bad)} to train without them.")
    for n, reason in bad.values():
        logger.warning(f"Skipping a bad image: {n} cannot be decoded ({reason}).")
    logger.info(f"Images decoded before training: {checked} of {where}; {len(bad)} bad, skipped "
                f"(--max_bad_images {max_bad}).")


# ----------------------------------------------------------------------------------------------
# Model card and Hub upload.
# ----------------------------------------------------------------------------------------------


def hub_id(path_or_id):
    """path_or_id when it is a Hub repo id (NAME or ORG/NAME), else None: a local path, a URL or a weights
    file is no base model a Hub card may name."""
    if (not path_or_id or os.path.exists(path_or_id) or looks_like_path(path_or_id)
            or not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", path_or_id)):
        return None
    return path_or_id


def base_model_license(path_or_id, token=None):
    """The licence in the base model's own model card (a local folder's README.md, or the Hub's), or
    None when there is none or it cannot be read."""
    from huggingface_hub import ModelCard

    readme = os.path.join(path_or_id, "README.md")
    if not os.path.isfile(readme) and hub_id(path_or_id) is None:
        return None
    try:
        card = ModelCard.load(readme if os.path.isfile(readme) else path_or_id, token=token)
        return card.data.license
    except Exception:  # offline, private, no card: the card is written without a licence
        return None


def public_name(path_or_id):
    """A model or data set as a model card may name it: a Hub id as it is, a local path not at all."""
    return "<local folder>" if os.path.exists(path_or_id) else path_or_id


def sigma_text(args):
    """The feature noise σ as a model card states it: fixed (min == max; 0: clean features) or log-normal."""
    lo, hi = args.feature_noise_min, args.feature_noise_max
    if lo == hi:
        return "fixed σ = 0 (clean features)" if hi == 0 else f"fixed σ = {hi}"
    return f"log σ ~ N({args.feature_noise_mean}, {args.feature_noise_std}²), σ in [{lo}, {hi}]"


LOCAL_TEACHER = "PATH/TO/TEACHER"  # what a snippet loads for a teacher that is not on the Hub


def snippet_teacher(path_or_id):
    """The teacher a snippet loads: its Hub id, or LOCAL_TEACHER (a card never shows a local path)."""
    return hub_id(path_or_id) or LOCAL_TEACHER


def save_model_card(args, repo_id, base_model, tags, title, description, usage, settings, library_name="diffusers"):
    """README.md of the output folder: base model (a Hub id; a local path or URL is left out, and the card says so)
    and its licence, tags, the sample grid, an inference snippet for `repo_id`, and a table of the settings that
    matter (given by the script: no local paths, no secrets). With --push_to_hub a card already on the Hub is
    updated (diffusers' load_or_create_model_card)."""
    from huggingface_hub import ModelCard, ModelCardData

    license = base_model_license(base_model, args.hub_token)
    base_id = hub_id(base_model)
    if base_id is None and base_model:
        description += ("\n\nThe teacher is a local folder or file, not a Hub model, so this card names no "
                        "`base_model`" + (f" (`{LOCAL_TEACHER}` in the snippet: the teacher you trained with)."
                                          if LOCAL_TEACHER in usage else "."))
    rows = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    body = (f"# {title}\n\n{description}\n\n![samples](samples.png)\n\n## Use\n\n```python\n{usage}\n```\n\n"
            f"## Training settings\n\n| setting | value |\n|---|---|\n{rows}\n")
    if args.push_to_hub:
        from diffusers.utils.hub_utils import load_or_create_model_card

        card = load_or_create_model_card(repo_id, token=args.hub_token, from_training=True, base_model=base_id,
                                         license=license, model_description=body)
    else:  # written here, from nothing: no Hub look-up, no stub card read back
        card = ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n")
    # A card already on the Hub (a repeated push) is updated: tags once each, this teacher's base model.
    card.data.tags = list(dict.fromkeys((card.data.tags or []) + list(tags)))
    card.data.base_model, card.data.library_name = base_id, library_name
    if license:
        card.data.license = license
    card.text = body  # the template's TODO sections are ours to fill: the body says it all
    atomic_write(os.path.join(args.output_dir, "README.md"), card.save)


def hub_repo_name(args):
    """The repo id a model card's snippet names: --hub_model_id, else the output folder's name."""
    return args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))


def push_folder_to_hub(folder, repo_id, token=None, message="TFD one-step student"):
    """Upload a training output folder: the student, its card and samples; not checkpoints, caches, logs,
    temporary files, nor training_args.json (it holds this machine's paths; the card has the settings)."""
    from huggingface_hub import upload_folder

    upload_folder(repo_id=repo_id, folder_path=folder, token=token, commit_message=message,
                  ignore_patterns=["checkpoint-*", "positive_cache/*", "logs/*", "*.incomplete*", "*.tmp-*",
                                   "training_args.json"])
    return repo_id
