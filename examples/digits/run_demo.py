"""`make demo`: TFD end to end on scikit-learn's bundled digits, offline, on a CPU.

    python examples/digits/run_demo.py                 # the demo (~15 min on 2 idle CPU cores)
    python examples/digits/run_demo.py --scale tiny    # the same pipeline in seconds (tests/test_demo.py)

Stages (each finished stage is reused by a rerun; a killed TFD run resumes from its checkpoint):
1. data: prepare_data.py          digits → 16×16, train / held-out test, a `datasets` folder
2. teacher: train_teacher.py      a small class-conditional EDM UNet (diffusers format)
3. classifier: classifier.py      the metric network (64-d features, class predictions)
4. TFD: train_tfd_imagenet64.py   through `accelerate launch`: the student and 3 ablations
5. evaluate.py                    results.md, samples.png, curves.png
"""

import argparse
import json
import os
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

# The demo's settings: sized for a 2-core CPU (README, "The demo", has the measured results and times).
SCALES = {
    "full": dict(
        num_test=400, teacher_steps=600, teacher_batch=64, teacher_channels="16,32,32", classifier_epochs=15,
        tfd_steps=360, checkpointing_steps=40, classes_per_batch=10, num_generated=8, num_positives=8,
        num_anchors=4, num_samples=1000, seeds="0,1,2", fid_samples=100, fid_reference_max=400, heun_steps=18,
        ssim_per_class=32, curve_samples=500,
    ),
    "tiny": dict(
        num_test=100, teacher_steps=6, teacher_batch=16, teacher_channels="8,16,16", classifier_epochs=1,
        tfd_steps=2, checkpointing_steps=1, classes_per_batch=10, num_generated=2, num_positives=2,
        num_anchors=2, num_samples=40, seeds="0,1", fid_samples=10, fid_reference_max=10, heun_steps=2,
        ssim_per_class=3, curve_samples=20,
    ),
}

# The student and the paper's ablations (Table 4 of the paper), all with the same budget.
RUNS = {
    "tfd": ("TFD student, one step", []),
    "no_anchor": ("ablation: no anchor term (λ=0)", ["--anchor_weight", "0"]),
    "clean_features": ("ablation: clean features (σ=0)", ["--feature_noise_min", "0", "--feature_noise_max", "0"]),
    "pixel_space": ("ablation: pixel space (input)", ["--feature_layers", "input"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The offline digits demo of TFD (data, teacher, distillation, metrics).")
    p.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "digits"), help="Where everything goes.")
    p.add_argument("--scale", default="full", choices=sorted(SCALES), help="full: the demo; tiny: seconds (tests).")
    p.add_argument("--runs", default=",".join(RUNS), help=f"TFD runs to train and evaluate, from {', '.join(RUNS)}.")
    p.add_argument("--tfd_steps", type=int, default=None, help="Override the TFD updates per run.")
    p.add_argument("--teacher_steps", type=int, default=None, help="Override the teacher's training steps.")
    p.add_argument("--jobs", type=int, default=None,
                   help="TFD runs trained at the same time, each with cpu_count/jobs threads (default: one per core).")
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
                        cfg["teacher_channels"], "--seed", str(seed), "--log_every", "250"])


def stage_classifier(data_dir, clf_dir, cfg, seed):
    from classifier import get_classifier

    _, info = get_classifier(data_dir, clf_dir, cfg["classifier_epochs"], seed)
    print(f"Classifier: train accuracy {info['train_accuracy']:.3f}, held-out accuracy {info['test_accuracy']:.3f}")


def tfd_command(teacher_dir, data_dir, run_dir, cfg, extra, seed):
    """The real training script through `accelerate launch`, demo-sized."""
    args = [
        "--pretrained_teacher_model", teacher_dir, "--dataset_name", data_dir,
        "--feature_layers", "down_blocks.1 mid_block up_blocks.0", "--feature_pool_size", "2",
        "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
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


def start_tfd(name, teacher_dir, data_dir, run_dir, cfg, extra, seed, threads):
    """Start one TFD run (log in run_dir/train.log); None when a finished run with the same command exists.

    A run killed before the end resumes from its last checkpoint (--resume_from_checkpoint latest).
    """
    cmd = tfd_command(teacher_dir, data_dir, run_dir, cfg, extra, seed)
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


def stage_tfd(runs, teacher_dir, data_dir, out, cfg, seed, jobs):
    """The TFD runs, `jobs` at a time (each with cpu_count // jobs threads)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending, active, last_report = list(runs), [], time.time()
    while pending or active:
        while pending and len(active) < jobs:
            key = pending.pop(0)
            job = start_tfd(key, teacher_dir, data_dir, os.path.join(out, "runs", key), cfg, RUNS[key][1], seed,
                            threads)
            if job is not None:
                active.append(job)
        time.sleep(1)
        for job in [j for j in active if j["proc"].poll() is not None]:
            active.remove(job)
            finish_tfd(job)
        if active and time.time() - last_report > 30:
            last_report = time.time()
            print("  " + ", ".join(f"[{j['name']}] step {last_step(j['run_dir'])}/{cfg['tfd_steps']}" for j in active),
                  flush=True)


def last_step(run_dir):
    """The last step logged in a run's metrics.jsonl (0 before the first log line)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    lines = [ln for ln in open(path) if ln.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def main(argv=None):
    args = parse_args(argv)
    cfg = dict(SCALES[args.scale])
    for key in ("tfd_steps", "teacher_steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    runs = [r for r in args.runs.replace(" ", ",").split(",") if r]
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
    jobs = args.jobs or min(len(runs), os.cpu_count() or 1)
    timer.run(f"4 TFD: {len(runs)} runs, {jobs} at a time", stage_tfd, runs, teacher_dir, data_dir, out, cfg,
              args.seed, jobs)
    run_args = [f"{RUNS[key][0]}={os.path.join(out, 'runs', key)}" for key in runs]

    import evaluate

    eval_argv = ["--data_dir", data_dir, "--teacher_dir", teacher_dir, "--classifier_dir", clf_dir, "--output_dir",
                 out, "--num_samples", str(cfg["num_samples"]), "--seeds", cfg["seeds"], "--heun_steps",
                 str(cfg["heun_steps"]), "--fid_samples", str(cfg["fid_samples"]), "--fid_reference_max",
                 str(cfg["fid_reference_max"]), "--ssim_per_class", str(cfg["ssim_per_class"]), "--curve_samples",
                 str(cfg["curve_samples"]), "--runs"] + run_args
    timer.run("5 evaluate", evaluate.main, eval_argv)

    table = timer.table()
    load = os.getloadavg()
    summary = (f"{table}\n\nWall time {time.time() - wall0:.0f} s on {os.cpu_count()} CPU cores (scale {args.scale}; "
               f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}).\n")
    from tfd_training import atomic_write

    atomic_write(os.path.join(out, "timings.md"), lambda p: open(p, "w").write(summary))
    print("\n" + summary)
    print(f"Results: {os.path.join(out, 'results.md')}; pictures: samples.png, curves.png in {out}")


if __name__ == "__main__":
    main()
