"""`make demo`: TFD end to end on scikit-learn's bundled digits, offline, on a CPU.

    python examples/digits/run_demo.py                 # the demo (minutes on 2 CPU cores: docs/digits_demo.md)
    python examples/digits/run_demo.py --ablations     # + the paper's three class-conditional ablations
    python examples/digits/run_demo.py --scale tiny    # the same pipeline in seconds (tests/test_demo.py)

Stages (each finished stage is reused by a rerun; a killed TFD run resumes from its checkpoint):
1. data: prepare_data.py          digits → 16×16, train / held-out test, a `datasets` folder
2. teacher: train_teacher.py      a small class-conditional EDM UNet (diffusers format), 600 steps of 64;
                                  10% of its samples at log-uniform σ in [1, 80], so that σ_max = 80 (where
                                  the one-step student starts) is inside its training range
3. classifier: classifier.py      the metric network (64-d features, class predictions)
4. TFD: train_tfd_imagenet64.py   through `accelerate launch`: the student (with --ablations also the
                                  3 ablations, same budget); meanwhile a second process computes the
                                  evaluation rows that need no student (real digits, the teacher)
5. evaluate.py                    the student rows, results.md, samples.png, curves.png
Then the text-to-image task, in text2image/:
6. prepare_text2image.py          the same digits with captions (templates per digit), held-out templates
                                  without images, and the "distill" split (both, for train_tfd_sdxl.py)
7. train_text2image_teacher.py    a small SDXL-layout pipeline (VAE, two small CLIPs, text_time UNet);
                                  its ε loss is floored at the x₀ loss where SNR < 1, so that its one-step
                                  output at t = 999 (where the student starts) is a smooth average rather
                                  than its input noise passed through
8. train_tfd_sdxl.py --prepare_positives_only: teacher positives of the prompts without images
9. train_tfd_sdxl.py              through `accelerate launch`: full fine-tune at t = 399 (the script's
                                  default) and at t = 999 (the paper's), and LoRA (t = 999), two at a time
10. evaluate_text2image.py        per prompt: FD and prompt accuracy (3 sampling seeds), captioned grids,
                                  FD curves

The student's TFD settings (TFD_FLAGS; docs/digits_demo.md has the measured results): teacher layers
`down_blocks.1 mid_block up_blocks.0 up_blocks.2` at pool 1 (the last one is the teacher's
full-resolution 16×16 decoder block), clean teacher features (σ = 0), 10 classes × (N=8, P=8, M=4)
per update, AdamW 2e-4 constant, student EMA 0.99, 1,200 updates. The full-resolution layer with
clean features is there because coarse or noised teacher features cannot see the pixel speckle the
teacher's own one-step output starts with (docs/digits_demo.md, "The speckle").

Every process runs one thread (THREADS): two OpenMP threads in one process on a loaded 2-core machine
are much slower than one; the second core goes to a second process instead.
"""

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

RUN_COMPLETE = "demo_run_complete.json"
THREADS = 1  # per process (see the module docstring)

# The demo's settings: sized for a 2-core CPU (docs/digits_demo.md has the measured results and times).
SCALES = {
    "full": dict(
        num_test=400, teacher_steps=600, teacher_batch=64, teacher_channels="16,32,32",
        teacher_high_sigma_fraction=0.1,
        classifier_epochs=15, tfd_steps=1200, tfd_learning_rate=2e-4, checkpointing_steps=200, classes_per_batch=10,
        num_generated=8, num_positives=8, num_anchors=4, num_samples=1000, seeds="0,1,2", fid_samples=1000,
        fid_reference_max=400, fid_rows="teacher,students", heun_steps=18, ssim_per_class=16, curve_samples=500,
        t2i_teacher=[], t2i_tfd_steps=200, t2i_checkpointing_steps=50, t2i_prompts_per_batch=10,
        t2i_num_generated=8, t2i_num_positives=8, t2i_num_samples=500, t2i_curve_samples=250,
    ),
    "tiny": dict(
        num_test=100, teacher_steps=6, teacher_batch=16, teacher_channels="8,16,16", teacher_high_sigma_fraction=0.1,
        classifier_epochs=1, tfd_steps=2, tfd_learning_rate=2e-4, checkpointing_steps=1, classes_per_batch=10,
        num_generated=2, num_positives=2, num_anchors=2, num_samples=40, seeds="0,1", fid_samples=10,
        fid_reference_max=10, fid_rows="real,teacher,teacher_one_step,students", heun_steps=2, ssim_per_class=3,
        curve_samples=20,
        t2i_teacher=["--text_widths", "16,16", "--projection_dim", "8", "--text_pretrain_steps", "3", "--vae_steps",
                     "2", "--vae_batch_size", "8", "--max_train_steps", "2", "--batch_size", "4", "--lr_warmup_steps",
                     "1", "--check_steps", "2", "--log_every", "1", "--vae_channels", "8,8", "--channels", "8,16,16"],
        t2i_tfd_steps=2, t2i_checkpointing_steps=1, t2i_prompts_per_batch=2, t2i_num_generated=2,
        t2i_num_positives=2, t2i_num_samples=60, t2i_curve_samples=60,
    ),
}

# The TFD settings of every demo run (a run's own flags come after these and override them).
TFD_FLAGS = ["--feature_layers", "down_blocks.1 mid_block up_blocks.0 up_blocks.2", "--feature_pool_size", "1",
             "--feature_noise_min", "0", "--feature_noise_max", "0"]

# The student and the paper's ablations (its Figure 4 / Table 5 questions), all with the same budget.
RUNS = {
    "tfd": ("TFD student, one step", []),
    "no_anchor": ("ablation: no anchor term (λ=0)", ["--anchor_weight", "0"]),
    "noised_features": ("ablation: noised features (σ ∈ [0.02, 0.1])",
                        ["--feature_noise_min", "0.02", "--feature_noise_max", "0.1"]),
    "pixel_space": ("ablation: pixel space (input)", ["--feature_layers", "input"]),
}
MAIN_RUN = "tfd"
ABLATIONS = [r for r in RUNS if r != MAIN_RUN]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The offline digits demo of TFD (data, teacher, distillation, metrics).")
    p.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "digits"), help="Where everything goes.")
    p.add_argument("--scale", default="full", choices=sorted(SCALES), help="full: the demo; tiny: seconds (tests).")
    p.add_argument("--ablations", action="store_true",
                   help=f"Also train and evaluate the paper's three ablations ({', '.join(ABLATIONS)}), each with the "
                        "main run's budget; their rows join the same results table.")
    p.add_argument("--runs", default=None,
                   help=f"TFD runs to train and evaluate, from {', '.join(RUNS)} (default: {MAIN_RUN}; "
                        f"{MAIN_RUN} and the ablations with --ablations).")
    p.add_argument("--tfd_steps", type=int, default=None, help="Override the TFD updates per run.")
    p.add_argument("--teacher_steps", type=int, default=None, help="Override the teacher's training steps.")
    p.add_argument("--jobs", type=int, default=None,
                   help="TFD runs trained at the same time, one thread each (default: one per core, at most one "
                        "per run).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the data split, the teacher and the TFD runs.")
    return p.parse_args(argv)


class StageTimer:
    """Wall and CPU seconds per stage (CPU includes finished child processes)."""

    def __init__(self):
        self.stages = []

    @staticmethod
    def _cpu():
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def run(self, name, fn, *a, **kw):
        print(f"\n=== {name} ===", flush=True)
        wall, cpu = time.time(), self._cpu()
        out = fn(*a, **kw)
        self.stages.append((name, time.time() - wall, self._cpu() - cpu))
        print(f"=== {name}: {self.stages[-1][1]:.0f} s ===", flush=True)
        return out

    def table(self):
        lines = ["| stage | wall s | CPU s |", "|---|---|---|"]
        lines += [f"| {n} | {w:.0f} | {c:.0f} |" for n, w, c in self.stages]
        lines.append(f"| total | {sum(s[1] for s in self.stages):.0f} | {sum(s[2] for s in self.stages):.0f} |")
        return "\n".join(lines)


def stage_data(data_dir, cfg, seed):
    import prepare_data

    marker = os.path.join(data_dir, "dataset_dict.json")
    if os.path.isfile(marker):
        print(f"Reusing {data_dir}")
        return
    prepare_data.main(["--output_dir", data_dir, "--num_test", str(cfg["num_test"]), "--seed", str(seed)])


def stage_teacher(data_dir, teacher_dir, cfg, seed):
    import train_teacher

    train_teacher.main(["--data_dir", data_dir, "--output_dir", teacher_dir, "--max_train_steps",
                        str(cfg["teacher_steps"]), "--batch_size", str(cfg["teacher_batch"]), "--channels",
                        cfg["teacher_channels"], "--high_sigma_fraction", str(cfg["teacher_high_sigma_fraction"]),
                        "--seed", str(seed), "--log_every", "250"])


def stage_classifier(data_dir, clf_dir, cfg, seed):
    from classifier import get_classifier

    _, info = get_classifier(data_dir, clf_dir, cfg["classifier_epochs"], seed)
    print(f"Classifier: train accuracy {info['train_accuracy']:.3f}, held-out accuracy {info['test_accuracy']:.3f}")


def tfd_command(teacher_dir, data_dir, run_dir, cfg, extra, seed):
    """The real training script through `accelerate launch`, demo-sized (TFD_FLAGS, then the run's own)."""
    args = [
        "--pretrained_teacher_model", teacher_dir, "--dataset_name", data_dir, *TFD_FLAGS,
        "--learning_rate", str(cfg["tfd_learning_rate"]), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--classes_per_batch", str(cfg["classes_per_batch"]), "--num_generated", str(cfg["num_generated"]),
        "--num_positives", str(cfg["num_positives"]), "--num_anchors", str(cfg["num_anchors"]),
        "--max_train_steps", str(cfg["tfd_steps"]), "--checkpointing_steps", str(cfg["checkpointing_steps"]),
        "--use_ema", "--ema_decay", "0.99", "--mixed_precision", "no", "--report_to", "none",
        "--logging_steps", "10" if cfg["tfd_steps"] >= 10 else "1", "--validation_steps", "0",
        "--num_validation_images", "20", "--seed", str(seed), "--output_dir", run_dir,
        "--resume_from_checkpoint", "latest",
    ] + extra
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return launch + [os.path.join(ROOT, "train_tfd_imagenet64.py")] + args


def start_tfd(name, cmd, run_dir, threads):
    """Start one TFD run (log in run_dir/train.log); None when a finished run with the same command exists.

    A run killed before the end resumes from its last checkpoint (--resume_from_checkpoint latest).
    """
    marker = os.path.join(run_dir, RUN_COMPLETE)
    if os.path.isfile(marker):
        if json.load(open(marker)).get("command") == cmd[1:]:
            print(f"Reusing finished run {run_dir}")
            return None
        print(f"{run_dir} was trained with other settings: retraining it.")
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    print(f"[{name}] {' '.join(cmd)}\n[{name}] log: {os.path.join(run_dir, 'train.log')}", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DIFFUSERS_OFFLINE="1",
               OMP_NUM_THREADS=str(threads))
    log = open(os.path.join(run_dir, "train.log"), "a")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return dict(name=name, proc=proc, log=log, cmd=cmd, marker=marker, start=time.time(), run_dir=run_dir)


def finish_tfd(job):
    job["log"].close()
    if job["proc"].returncode != 0:
        tail = open(os.path.join(job["run_dir"], "train.log")).read()[-3000:]
        raise RuntimeError(f"TFD run {job['name']} failed (exit {job['proc'].returncode}); its log ends:\n{tail}\n"
                           f"Rerun to resume from its last checkpoint, or delete {job['run_dir']} to start over.")
    from tfd_training import write_json

    info = {"command": job["cmd"][1:], "seconds": round(time.time() - job["start"], 1)}
    write_json(job["marker"], info)
    print(f"[{job['name']}] finished in {info['seconds']:.0f} s", flush=True)


def stage_tfd(runs, jobs, max_steps, background=None):
    """The TFD runs [(name, command, run_dir)], `jobs` at a time, one thread each (see THREADS), while
    `background` (the evaluation's reference rows, a Popen) runs beside them."""
    pending, active, last_report = list(runs), [], time.time()
    while pending or active:
        while pending and len(active) < jobs:
            job = start_tfd(*pending.pop(0), THREADS)
            if job is not None:
                active.append(job)
        time.sleep(1)
        for job in [j for j in active if j["proc"].poll() is not None]:
            active.remove(job)
            finish_tfd(job)
        if active and time.time() - last_report > 30:
            last_report = time.time()
            extra = "" if background is None else (", reference rows: done" if background.poll() is not None
                                                   else ", reference rows: running")
            print("  " + ", ".join(f"[{j['name']}] step {last_step(j['run_dir'])}/{max_steps}" for j in active)
                  + extra, flush=True)


def last_step(run_dir):
    """The last step logged in a run's metrics.jsonl (0 before the first log line)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    lines = [ln for ln in open(path) if ln.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


# The text-to-image task: train_tfd_sdxl.py on an SDXL-layout digits teacher, the recipe's layers at pool 1,
# 200 updates (docs/digits_demo.md has what else was measured). At the script's default t = 399
# (x₀ = (z − 0.76 ε̂)/0.65: 1.2×) the full fine-tune keeps improving; at the paper's t = 999 the student's
# x₀ = (z − 0.998 ε̂)/0.068 magnifies every change of ε̂ 14.6×, and the full fine-tune stalls at 1.5–1.9× the
# teacher's FD whatever the lr, layers, noise or batch. The LoRA row is the one measured, at t = 999.
T2I_FLAGS = ["--feature_pool_size", "1"]
T2I_RUNS = {
    "t2i_full": ("TFD student, full fine-tune", ["--learning_rate", "5e-5"]),
    "t2i_full_t999": ("TFD student, full fine-tune, t = 999", ["--conditioning_timestep", "999",
                                                              "--learning_rate", "2e-5"]),
    "t2i_lora": ("TFD student, LoRA r16", ["--conditioning_timestep", "999", "--train_mode", "lora",
                                           "--lora_rank", "16", "--lora_alpha", "16", "--learning_rate", "1e-3"]),
}


def stage_t2i_data(data_dir, cfg, seed):
    import prepare_text2image

    if os.path.isfile(os.path.join(data_dir, "dataset_dict.json")):
        print(f"Reusing {data_dir}")
        return
    prepare_text2image.main(["--output_dir", data_dir, "--num_test", str(cfg["num_test"]), "--seed", str(seed)])


def on_every_core(fn, *args):
    """fn(*args) with torch on every core: for the stages nothing runs beside."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(THREADS)


def stage_t2i_teacher(data_dir, teacher_dir, cfg, seed):
    """The SDXL-layout teacher (train_text2image_teacher.py returns at once when it is finished)."""
    import train_text2image_teacher

    on_every_core(train_text2image_teacher.main, ["--layout", "sdxl", "--data_dir", data_dir, "--output_dir",
                                                  teacher_dir, "--seed", str(seed), *cfg["t2i_teacher"]])


def t2i_command(teacher_dir, data_dir, run_dir, cache_dir, cfg, extra, seed):
    """train_tfd_sdxl.py through `accelerate launch`, as a user runs it on SDXL: the "distill" split
    (captioned digits, plus held-out prompts without images whose positives the teacher samples)."""
    args = [
        "--pretrained_model_name_or_path", teacher_dir, "--dataset_name", data_dir, "--dataset_split", "distill",
        "--image_column", "image", "--caption_column", "text", "--resolution", "16", *T2I_FLAGS,
        "--prompts_per_batch", str(cfg["t2i_prompts_per_batch"]), "--num_generated", str(cfg["t2i_num_generated"]),
        "--num_positives", str(cfg["t2i_num_positives"]), "--num_positive_steps", "25",
        "--positive_guidance_scale", "1.5", "--positive_cache_dir", cache_dir, "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0", "--max_train_steps", str(cfg["t2i_tfd_steps"]),
        "--checkpointing_steps", str(cfg["t2i_checkpointing_steps"]), "--checkpoints_total_limit", "100",
        "--mixed_precision", "no", "--report_to", "none",
        "--logging_steps", "10" if cfg["t2i_tfd_steps"] >= 10 else "1",
        "--validation_steps", "0", "--validation_prompts", "the digit 3", "a handwritten seven",
        "--seed", str(seed), "--output_dir", run_dir, "--resume_from_checkpoint", "latest",
    ] + extra
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return launch + [os.path.join(ROOT, "train_tfd_sdxl.py")] + args


def stage_t2i_positives(cmd, log_path):
    """--prepare_positives_only, once, before the two runs share the cache: the teacher samples the
    positives of the prompts without images (25 steps, CFG 1.5)."""
    cmd = cmd + ["--prepare_positives_only"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DIFFUSERS_OFFLINE="1",
               OMP_NUM_THREADS=str(os.cpu_count() or 1))
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"Preparing the text-to-image positives failed; see {log_path}:\n"
                           + open(log_path).read()[-3000:])


# Targets of the text-to-image students (training prompts): FD / teacher many-step FD, accuracy, and
# how much lower their FD is than the teacher's in one step (their initialisation).
T2I_TARGETS = {"t2i_full": (1.5, 0.90, 5.0), "t2i_full_t999": (1.5, 0.90, 5.0), "t2i_lora": (2.0, 0.85, 3.0)}


def t2i_section(t2i_dir):
    """The text-to-image table (evaluate_text2image's results.md) and each student against its targets."""
    rows = {r["label"]: r for r in json.load(open(os.path.join(t2i_dir, "results.json")))["rows"]}
    labels = list(rows)
    teacher, one_step = rows[labels[0]], rows["teacher, one step"]
    lines = ["## Text-to-image: train_tfd_sdxl.py on an SDXL-layout digits teacher", "",
             open(os.path.join(t2i_dir, "results.md")).read().strip(), ""]
    def mark(ok):
        return "met" if ok else "**missed**"

    for key, (label, _) in T2I_RUNS.items():
        if label not in rows:
            continue
        r, (max_ratio, min_acc, min_gain) = rows[label]["train"], T2I_TARGETS[key]
        ratio, gain = r["fd"] / teacher["train"]["fd"], one_step["train"]["fd"] / r["fd"]
        lines.append(f"- {label} (training prompts): FD {ratio:.2f}× the teacher's {teacher['steps']}-step FD "
                     f"(target ≤ {max_ratio}×: {mark(ratio <= max_ratio)}), accuracy {r['acc']:.3f} (≥ {min_acc}: "
                     f"{mark(r['acc'] >= min_acc)}), FD {gain:.2f}× lower than the teacher in one step "
                     f"(≥ {min_gain}×: {mark(gain >= min_gain)}).")
    lines += ["", "Pictures: text2image/compare_train.png, compare_heldout.png (rows: real, teacher, students; the "
              "prompt under each column), text2image/curves.png (FD against TFD updates)."]
    return "\n".join(lines) + "\n"


def eval_argv(cfg, out, data_dir, teacher_dir, clf_dir):
    """evaluate.py's arguments without the runs (the same for the background reference rows)."""
    return ["--data_dir", data_dir, "--teacher_dir", teacher_dir, "--classifier_dir", clf_dir, "--output_dir", out,
            "--num_samples", str(cfg["num_samples"]), "--seeds", cfg["seeds"], "--heun_steps", str(cfg["heun_steps"]),
            "--fid_samples", str(cfg["fid_samples"]), "--fid_reference_max", str(cfg["fid_reference_max"]),
            "--fid_rows", cfg["fid_rows"], "--ssim_per_class", str(cfg["ssim_per_class"]), "--curve_samples",
            str(cfg["curve_samples"])]


def start_reference_rows(argv, out):
    """evaluate.py --reference_rows_only in a one-thread process (log: eval_reference.log): the rows
    that need no student, computed on the core the TFD run leaves free; the evaluation stage reuses them."""
    log = open(os.path.join(out, "eval_reference.log"), "w")
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1", DIFFUSERS_OFFLINE="1")
    cmd = [sys.executable, os.path.join(HERE, "evaluate.py"), *argv, "--reference_rows_only"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log, proc.started = log, time.time()
    return proc


def finish_reference_rows(proc):
    """Wait for the background reference rows; a failure only costs time (evaluate.py recomputes them).

    Returns the process's own wall seconds (from its log), or None if it failed.
    """
    proc.wait()
    proc.log.close()
    if proc.returncode != 0:
        print(f"Reference rows FAILED (exit {proc.returncode}; see eval_reference.log): evaluating them now.")
        return None
    log = open(proc.log.name).read()
    found = re.findall(r"Reference rows done in (\d+) s", log)
    seconds = float(found[-1]) if found else time.time() - proc.started
    print(f"Reference rows done in {seconds:.0f} s beside the TFD stage", flush=True)
    return seconds


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(THREADS)
    cfg = dict(SCALES[args.scale])
    for key in ("tfd_steps", "teacher_steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.runs is None:
        runs = [MAIN_RUN] + (ABLATIONS if args.ablations else [])
    else:
        runs = [r for r in args.runs.replace(" ", ",").split(",") if r]
        runs += [r for r in (ABLATIONS if args.ablations else []) if r not in runs]
    unknown = [r for r in runs if r not in RUNS]
    if unknown or not runs:
        raise ValueError(f"Unknown --runs {unknown}; choose from {', '.join(RUNS)}.")
    out = os.path.abspath(args.output_dir)
    data_dir, teacher_dir, clf_dir = (os.path.join(out, d) for d in ("data", "teacher", "classifier"))
    os.makedirs(out, exist_ok=True)
    timer, wall0 = StageTimer(), time.time()

    timer.run("1 data", stage_data, data_dir, cfg, args.seed)
    timer.run("2 teacher", stage_teacher, data_dir, teacher_dir, cfg, args.seed)
    timer.run("3 classifier", stage_classifier, data_dir, clf_dir, cfg, args.seed)
    base_eval = eval_argv(cfg, out, data_dir, teacher_dir, clf_dir)
    cores = os.cpu_count() or 1
    jobs = args.jobs or min(len(runs), cores)
    background = start_reference_rows(base_eval, out) if cores > 1 else None
    tfd_runs = [(key, tfd_command(teacher_dir, data_dir, os.path.join(out, "runs", key), cfg, RUNS[key][1], args.seed),
                 os.path.join(out, "runs", key)) for key in runs]
    timer.run(f"4 TFD: {len(runs)} run{'s' if len(runs) > 1 else ''}, {jobs} at a time"
              + (" (+ reference rows beside it)" if background is not None else ""), stage_tfd, tfd_runs, jobs,
              cfg["tfd_steps"], background)
    run_args = [f"{RUNS[key][0]}={os.path.join(out, 'runs', key)}" for key in runs]

    import evaluate

    reference_seconds = []

    def evaluation():
        if background is not None:
            reference_seconds.append(finish_reference_rows(background))
        return evaluate.main(base_eval + ["--workers", str(min(2, cores)), "--runs"] + run_args)

    timer.run("5 evaluate", evaluation)

    # The text-to-image task: the same digits with captions, through train_tfd_sdxl.py.
    t2i = os.path.join(out, "text2image")
    t2i_data, t2i_teacher, t2i_cache = (os.path.join(t2i, d) for d in ("data", "teacher", "positive_cache"))
    timer.run("6 text-to-image data", stage_t2i_data, t2i_data, cfg, args.seed)
    timer.run("7 text-to-image teacher (SDXL layout)", stage_t2i_teacher, t2i_data, t2i_teacher, cfg, args.seed)
    prepare = t2i_command(t2i_teacher, t2i_data, os.path.join(t2i, "runs", "prepare"), t2i_cache, cfg, [], args.seed)
    timer.run("8 text-to-image positives (--prepare_positives_only)", stage_t2i_positives, prepare,
              os.path.join(t2i, "prepare_positives.log"))
    t2i_runs = [(key, t2i_command(t2i_teacher, t2i_data, os.path.join(t2i, "runs", key), t2i_cache, cfg, extra,
                                  args.seed), os.path.join(t2i, "runs", key)) for key, (_, extra) in T2I_RUNS.items()]
    timer.run(f"9 text-to-image TFD: {len(t2i_runs)} runs, {min(2, cores)} at a time", stage_tfd, t2i_runs,
              min(2, cores), cfg["t2i_tfd_steps"])
    import evaluate_text2image

    students = [f"{label}={os.path.join(t2i, 'runs', key)}" for key, (label, _) in T2I_RUNS.items()]
    timer.run("10 text-to-image evaluate", on_every_core, evaluate_text2image.main, [
        "--teacher_dir", t2i_teacher, "--data_dir", t2i_data, "--classifier_dir", clf_dir, "--output_dir", t2i,
        "--num_samples", str(cfg["t2i_num_samples"]), "--seeds", cfg["seeds"], "--students", *students,
        "--curves", *students, "--curve_samples", str(cfg["t2i_curve_samples"])])

    from tfd_training import write_text

    results = os.path.join(out, "results.md")
    write_text(results, open(results).read().rstrip() + "\n\n" + t2i_section(t2i))

    table = timer.table()
    load = os.getloadavg()
    summary = (f"{table}\n\nWall time {time.time() - wall0:.0f} s on {cores} CPU cores (scale {args.scale}; "
               f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}).")
    if reference_seconds and reference_seconds[0] is not None:
        summary += (f" The evaluation's reference rows (real digits, the teacher in many steps and in one step, the "
                    f"Inception reference) ran beside stage 4 in a one-thread process for "
                    f"{reference_seconds[0]:.0f} s "
                    f"(their CPU time counts in stage 5's; log: eval_reference.log).")
    summary += "\n"
    from tfd_training import atomic_write

    atomic_write(os.path.join(out, "timings.md"), lambda p: open(p, "w").write(summary))
    print("\n" + summary)
    print(f"Results: {os.path.join(out, 'results.md')}; pictures: samples.png, curves.png in {out}")


if __name__ == "__main__":
    main()
