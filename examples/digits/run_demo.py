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
                                  3 ablations, same budget)
5. evaluate.py                    first the rows that need no student (real digits, the teacher), then the
                                  student rows, results.md, samples.png, curves.png (Inception FID: --fid)
Then the text-to-image task, in text2image/:
6. prepare_text2image.py          the same digits with captions (templates per digit), held-out templates
                                  without images, and the "distill" split (both, for train_tfd_sdxl.py)
7. train_text2image_teacher.py    a small SDXL-layout pipeline (VAE, two small CLIPs, text_time UNet);
                                  its ε loss is floored at the x₀ loss where SNR < 1, so that its one-step
                                  output at t = 999 is a smooth average rather than its input noise passed
                                  through
8. train_tfd_sdxl.py --prepare_positives_only: teacher positives of the prompts without images
9. train_tfd_sdxl.py              through `accelerate launch`: full fine-tune and LoRA at t = 399 (the
                                  script's default), and a full fine-tune at t = 999 (the paper's)
10. evaluate_text2image.py        per prompt: FD and prompt accuracy (3 sampling seeds), captioned grids,
                                  FD curves

Stages 1, 3 and 6 take seconds and run here; every other stage is a process of its own, started as soon as
its inputs are ready, as many at a time as there are cores (Scheduler), so that the two tasks share the cores.

The student's TFD settings (TFD_FLAGS; docs/digits_demo.md has the measured results): teacher layers
`down_blocks.1 mid_block up_blocks.0 up_blocks.2` at pool 1 (the last one is the teacher's
full-resolution 16×16 decoder block), clean teacher features (σ = 0), 10 classes × (N=8, P=8, M=4)
per update, AdamW 2e-4 constant, student EMA 0.99, 800 updates. The full-resolution layer with
clean features is there because coarse or noised teacher features cannot see the pixel speckle the
teacher's own one-step output starts with (docs/digits_demo.md, "The speckle").

Every process runs one thread (THREADS): two OpenMP threads in one process on a loaded 2-core machine
are much slower than one; the second core goes to a second process instead.
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
THREADS = 1  # per process (see the module docstring)

# The demo's settings: sized for a 2-core CPU (docs/digits_demo.md has the measured results and times).
SCALES = {
    "full": dict(
        num_test=400, teacher_steps=600, teacher_batch=64, teacher_channels="16,32,32",
        teacher_high_sigma_fraction=0.1,
        classifier_epochs=15, tfd_steps=800, tfd_learning_rate=2e-4, checkpointing_steps=200, classes_per_batch=10,
        num_generated=8, num_positives=8, num_anchors=4, num_samples=1000, seeds="0,1,2", fid_samples=1000,
        fid_reference_max=400, fid_rows="teacher,students", heun_steps=18, ssim_per_class=16,
        t2i_teacher=[], t2i_tfd_steps={"t2i_full": 400, "t2i_full_t999": 100, "t2i_lora": 400}, t2i_curve_points=8,
        t2i_prompts_per_batch=10, t2i_num_generated=8, t2i_num_positives=16, t2i_num_samples=500,
    ),
    "tiny": dict(
        num_test=100, teacher_steps=6, teacher_batch=16, teacher_channels="8,16,16", teacher_high_sigma_fraction=0.1,
        classifier_epochs=1, tfd_steps=2, tfd_learning_rate=2e-4, checkpointing_steps=1, classes_per_batch=10,
        num_generated=2, num_positives=2, num_anchors=2, num_samples=40, seeds="0,1", fid_samples=10,
        fid_reference_max=10, fid_rows="real,teacher,teacher_one_step,students", heun_steps=2, ssim_per_class=3,
        t2i_teacher=["--text_widths", "16,16", "--projection_dim", "8", "--text_pretrain_steps", "3", "--vae_steps",
                     "2", "--vae_batch_size", "8", "--max_train_steps", "2", "--batch_size", "4", "--lr_warmup_steps",
                     "1", "--check_steps", "2", "--log_every", "1", "--vae_channels", "8,8", "--channels", "8,16,16"],
        t2i_tfd_steps={"t2i_full": 2, "t2i_full_t999": 2, "t2i_lora": 2}, t2i_curve_points=2, t2i_prompts_per_batch=2,
        t2i_num_generated=2, t2i_num_positives=2, t2i_num_samples=60,
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
                   help="Processes run at the same time, one thread each (default: one per core).")
    p.add_argument("--fid", action="store_true",
                   help="Also compute the Inception FID of the class-conditional teacher and students (1,000 samples "
                        "against the held-out digits at 299×299: several CPU minutes; FD in the digit classifier's "
                        "features is the main metric).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the data split, the teacher and the TFD runs.")
    return p.parse_args(argv)


class Job:
    """One process of the demo: `cmd(threads)` (a command list) run with OMP_NUM_THREADS=threads once every job
    named in `deps` has finished, its output in `log`.

    run_dir: a TFD run (its completion marker records the command: a finished run with the same command is
    reused, not retrained; its progress is the last step of its metrics.jsonl). elastic: the job takes every
    free core when it starts with nothing else left to start (the last evaluations)."""

    def __init__(self, name, cmd, deps=(), log=None, run_dir=None, max_steps=None, elastic=False):
        self.name, self.cmd, self.deps, self.log = name, cmd, tuple(deps), log
        self.run_dir, self.max_steps, self.elastic = run_dir, max_steps, elastic
        self.proc = self.start = self.wall = self.cpu = None
        self.threads, self.reused = THREADS, False


class Scheduler:
    """Runs Jobs on `slots` cores, in list order as their dependencies finish (the list order is the
    priority), one thread per job (elastic jobs: more when nothing else waits). Records wall and CPU seconds
    per job (os.wait4's rusage of the job's process and the children it waited for), and in-process stages."""

    def __init__(self, slots):
        self.slots, self.t0, self.rows = slots, time.time(), []
        self.load0 = os.getloadavg()

    @staticmethod
    def _cpu():
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime

    def inline(self, name, fn, *a, **kw):
        """A short stage in this process (before the jobs start)."""
        print(f"\n=== {name} ===", flush=True)
        start, cpu = time.time(), self._cpu()
        out = fn(*a, **kw)
        self.rows.append(dict(name=name, start=start - self.t0, wall=time.time() - start, cpu=self._cpu() - cpu,
                              threads=1))
        return out

    def _launch(self, job, threads):
        job.threads = threads
        cmd = job.cmd(threads) if callable(job.cmd) else job.cmd
        if job.run_dir is not None:
            marker = os.path.join(job.run_dir, RUN_COMPLETE)
            if os.path.isfile(marker):
                if json.load(open(marker)).get("command") == cmd[1:]:
                    print(f"Reusing finished run {job.run_dir}", flush=True)
                    job.reused, job.start, job.wall, job.cpu = True, time.time(), 0.0, 0.0
                    return False
                print(f"{job.run_dir} was trained with other settings: retraining it.", flush=True)
                shutil.rmtree(job.run_dir)
            os.makedirs(job.run_dir, exist_ok=True)
            job.log = os.path.join(job.run_dir, "train.log")
        job.cmd_used = cmd
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DIFFUSERS_OFFLINE="1",
                   OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        os.makedirs(os.path.dirname(job.log), exist_ok=True)
        job.log_file = open(job.log, "a")
        print(f"[{time.time() - self.t0:4.0f} s] start {job.name} ({threads} thread{'s' if threads > 1 else ''}; "
              f"log {job.log})", flush=True)
        job.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=job.log_file, stderr=subprocess.STDOUT)
        job.start = time.time()
        return True

    def _finish(self, job, usage):
        job.log_file.close()
        job.wall, job.cpu = time.time() - job.start, usage.ru_utime + usage.ru_stime
        code = job.proc.returncode
        if code != 0:
            tail = open(job.log).read()[-3000:]
            raise RuntimeError(f"{job.name} failed (exit {code}); its log ({job.log}) ends:\n{tail}\n"
                               "Rerun to reuse every finished stage (a TFD run resumes from its last checkpoint).")
        if job.run_dir is not None:
            from tfd_training import write_json

            write_json(os.path.join(job.run_dir, RUN_COMPLETE), {"command": job.cmd_used[1:],
                                                                 "seconds": round(job.wall, 1)})
        last = [ln.strip() for ln in open(job.log).read().replace("\r", "\n").split("\n") if ln.strip()]
        print(f"[{time.time() - self.t0:4.0f} s] done  {job.name} in {job.wall:.0f} s"
              + (f": {last[-1][:200]}" if last else ""), flush=True)

    def run(self, jobs):
        """Run every job; a failed one stops the others (they resume or are reused on a rerun)."""
        pending, running, done = list(jobs), [], set()
        names = {j.name for j in jobs}
        for j in jobs:
            missing = [d for d in j.deps if d not in names]
            if missing:
                raise ValueError(f"{j.name} depends on unknown jobs {missing}")
        last_report = time.time()
        try:
            while pending or running:
                free = self.slots - sum(j.threads for j in running)
                for job in list(pending):
                    if free <= 0:
                        break
                    if not all(d in done for d in job.deps):
                        continue
                    pending.remove(job)
                    threads = free if job.elastic and not pending else THREADS
                    if self._launch(job, threads):
                        running.append(job)
                        free -= threads
                    else:
                        done.add(job.name)
                time.sleep(0.5)
                for job in list(running):
                    pid, status, usage = os.wait4(job.proc.pid, os.WNOHANG)
                    if pid == 0:
                        continue
                    job.proc.returncode = os.waitstatus_to_exitcode(status)
                    running.remove(job)
                    self._finish(job, usage)
                    done.add(job.name)
                if running and time.time() - last_report > 30:
                    last_report = time.time()
                    print(f"[{time.time() - self.t0:4.0f} s] running: " + ", ".join(
                        j.name + (f" (step {last_step(j.run_dir)}/{j.max_steps})" if j.run_dir else "")
                        for j in running), flush=True)
        except BaseException:
            for job in running:
                job.proc.terminate()
            for job in running:
                job.proc.wait()
            raise
        for job in jobs:
            self.rows.append(dict(name=job.name + (" (reused)" if job.reused else ""), start=job.start - self.t0,
                                  wall=job.wall, cpu=job.cpu, threads=job.threads))

    def table(self):
        wall = time.time() - self.t0
        lines = ["| stage | starts at s | wall s | CPU s | threads |", "|---|---|---|---|---|"]
        for r in sorted(self.rows, key=lambda r: r["start"]):
            lines.append(f"| {r['name']} | {r['start']:.0f} | {r['wall']:.0f} | {r['cpu']:.0f} | {r['threads']} |")
        lines.append(f"| total | | {wall:.0f} | {sum(r['cpu'] for r in self.rows):.0f} | |")
        return "\n".join(lines), wall


def stage_data(data_dir, cfg, seed):
    import prepare_data

    marker = os.path.join(data_dir, "dataset_dict.json")
    if os.path.isfile(marker):
        print(f"Reusing {data_dir}")
        return
    prepare_data.main(["--output_dir", data_dir, "--num_test", str(cfg["num_test"]), "--seed", str(seed)])


def script(name, *args):
    """python examples/digits/NAME args (a job's command)."""
    return [sys.executable, os.path.join(HERE, name), *map(str, args)]


def teacher_command(data_dir, teacher_dir, cfg, seed):
    return script("train_teacher.py", "--data_dir", data_dir, "--output_dir", teacher_dir, "--max_train_steps",
                  cfg["teacher_steps"], "--batch_size", cfg["teacher_batch"], "--channels", cfg["teacher_channels"],
                  "--high_sigma_fraction", cfg["teacher_high_sigma_fraction"], "--seed", seed, "--log_every", 250)


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


def last_step(run_dir):
    """The last step logged in a run's metrics.jsonl (0 before the first log line)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    lines = [ln for ln in open(path) if ln.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


# The text-to-image task: train_tfd_sdxl.py on an SDXL-layout digits teacher at pool 1, 16 positives per
# prompt. The full fine-tune and the LoRA run at the script's default t = 399 (x₀ = (z − 0.76 ε̂)/0.65), with
# clean teacher features (σ = 0, as the class-conditional student) and a cosine lr; the full fine-tune also
# reads the teacher's two finer decoder blocks. The t = 999 row (x₀ = (z − 0.998 ε̂)/0.068: every change of ε̂
# magnified 14.6×) keeps the previous recipe for comparison. docs/digits_demo.md has what was measured.
T2I_FLAGS = ["--feature_pool_size", "1"]
T2I_CLEAN = ["--feature_noise_min", "0", "--feature_noise_max", "0", "--lr_scheduler", "cosine"]
T2I_LORA_TARGETS = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,conv1,conv2,ff.net.0.proj,ff.net.2"
T2I_RUNS = {
    "t2i_full": ("TFD student, full fine-tune", [*T2I_CLEAN, "--learning_rate", "1e-4", "--feature_layers",
                                                 "down_blocks.2,mid_block,up_blocks.0,up_blocks.1,up_blocks.2"]),
    "t2i_full_t999": ("TFD student, full fine-tune, t = 999", ["--conditioning_timestep", "999",
                                                              "--learning_rate", "2e-5"]),
    "t2i_lora": ("TFD student, LoRA r16", [*T2I_CLEAN, "--train_mode", "lora", "--lora_rank", "16", "--lora_alpha",
                                           "16", "--learning_rate", "1e-3", "--lora_target_modules",
                                           T2I_LORA_TARGETS]),
}


def stage_t2i_data(data_dir, cfg, seed):
    import prepare_text2image

    if os.path.isfile(os.path.join(data_dir, "dataset_dict.json")):
        print(f"Reusing {data_dir}")
        return
    prepare_text2image.main(["--output_dir", data_dir, "--num_test", str(cfg["num_test"]), "--seed", str(seed)])


def t2i_teacher_command(data_dir, teacher_dir, cfg, seed):
    """The SDXL-layout teacher (train_text2image_teacher.py returns at once when it is finished)."""
    return script("train_text2image_teacher.py", "--layout", "sdxl", "--data_dir", data_dir, "--output_dir",
                  teacher_dir, "--seed", seed, *cfg["t2i_teacher"])


def t2i_command(teacher_dir, data_dir, run_dir, cache_dir, cfg, extra, seed, steps, checkpointing_steps):
    """train_tfd_sdxl.py through `accelerate launch`, as a user runs it on SDXL: the "distill" split
    (captioned digits, plus held-out prompts without images whose positives the teacher samples)."""
    args = [
        "--pretrained_model_name_or_path", teacher_dir, "--dataset_name", data_dir, "--dataset_split", "distill",
        "--image_column", "image", "--caption_column", "text", "--resolution", "16", *T2I_FLAGS,
        "--prompts_per_batch", str(cfg["t2i_prompts_per_batch"]), "--num_generated", str(cfg["t2i_num_generated"]),
        "--num_positives", str(cfg["t2i_num_positives"]), "--num_positive_steps", "25",
        "--positive_guidance_scale", "1.5", "--positive_cache_dir", cache_dir, "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0", "--max_train_steps", str(steps),
        "--checkpointing_steps", str(checkpointing_steps), "--checkpoints_total_limit", "100",
        "--mixed_precision", "no", "--report_to", "none", "--logging_steps", "10" if steps >= 10 else "1",
        "--validation_steps", "0", "--validation_prompts", "the digit 3", "a handwritten seven",
        "--seed", str(seed), "--output_dir", run_dir, "--resume_from_checkpoint", "latest",
    ] + extra
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return launch + [os.path.join(ROOT, "train_tfd_sdxl.py")] + args


# Targets of the text-to-image students on the training prompts, over the sampling seeds: (FD at most this
# times the teacher's many-step FD, prompt accuracy at least this); None: a row for comparison, without one.
T2I_TARGETS = {"t2i_full": (1.0, 0.95), "t2i_full_t999": None, "t2i_lora": (1.3, 0.95)}


def t2i_section(t2i_dir):
    """The text-to-image table (evaluate_text2image's results.md) and each student against its targets."""
    rows = {r["label"]: r for r in json.load(open(os.path.join(t2i_dir, "results.json")))["rows"]}
    teacher = rows[list(rows)[0]]
    lines = ["## Text-to-image: train_tfd_sdxl.py on an SDXL-layout digits teacher", "",
             open(os.path.join(t2i_dir, "results.md")).read().strip(), ""]

    def mark(ok):
        return "met" if ok else "**missed**"

    for key, (label, _) in T2I_RUNS.items():
        if label not in rows:
            continue
        r, target = rows[label]["train"], T2I_TARGETS.get(key)
        ratio = r["fd"] / teacher["train"]["fd"]
        line = (f"- {label} (training prompts): FD {r['fd']:.2f} ± {r['fd_std']:.2f}, {ratio:.2f}× the teacher's "
                f"{teacher['steps']}-step FD ({teacher['train']['fd']:.2f} ± {teacher['train']['fd_std']:.2f})")
        if target is None:
            line += f", accuracy {r['acc']:.3f} (for comparison: no target)."
        else:
            max_ratio, min_acc = target
            line += (f" (target ≤ {max_ratio}×: {mark(ratio <= max_ratio)}), accuracy {r['acc']:.3f} "
                     f"(≥ {min_acc}: {mark(r['acc'] >= min_acc)}).")
        lines.append(line)
    lines += ["", "Pictures: text2image/compare_train.png, compare_heldout.png (rows: real, teacher, students; the "
              "prompt under each column), text2image/curves.png (FD against TFD updates)."]
    return "\n".join(lines) + "\n"


def eval_argv(cfg, out, data_dir, teacher_dir, clf_dir, fid):
    """evaluate.py's arguments without the runs (the same for the background reference rows)."""
    return ["--data_dir", data_dir, "--teacher_dir", teacher_dir, "--classifier_dir", clf_dir, "--output_dir", out,
            "--num_samples", str(cfg["num_samples"]), "--seeds", cfg["seeds"], "--heun_steps", str(cfg["heun_steps"]),
            "--fid_samples", str(cfg["fid_samples"] if fid else 0), "--fid_reference_max",
            str(cfg["fid_reference_max"]), "--fid_rows", cfg["fid_rows"] if fid else "", "--ssim_per_class",
            str(cfg["ssim_per_class"])]


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
    t2i = os.path.join(out, "text2image")
    t2i_data, t2i_teacher, t2i_cache = (os.path.join(t2i, d) for d in ("data", "teacher", "positive_cache"))
    logs = os.path.join(out, "logs")
    os.makedirs(out, exist_ok=True)
    cores = os.cpu_count() or 1
    sched = Scheduler(args.jobs or cores)
    load = sched.load0
    print(f"{cores} CPU cores, {sched.slots} processes at a time; load average at the start "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}", flush=True)

    # Seconds-long stages in this process, then every other stage as a job (Scheduler: one thread each,
    # side by side on the cores, in the order below as their inputs are ready).
    sched.inline("1 data", stage_data, data_dir, cfg, args.seed)
    sched.inline("3 classifier", stage_classifier, data_dir, clf_dir, cfg, args.seed)
    sched.inline("6 text-to-image data", stage_t2i_data, t2i_data, cfg, args.seed)

    base_eval = eval_argv(cfg, out, data_dir, teacher_dir, clf_dir, args.fid)
    run_dirs = {key: os.path.join(out, "runs", key) for key in runs}
    t2i_dirs = {key: os.path.join(t2i, "runs", key) for key in T2I_RUNS}
    t2i_steps = {key: cfg["t2i_tfd_steps"][key] for key in T2I_RUNS}
    t2i_cmds = {key: t2i_command(t2i_teacher, t2i_data, t2i_dirs[key], t2i_cache, cfg, extra, args.seed,
                                 t2i_steps[key], max(1, t2i_steps[key] // cfg["t2i_curve_points"]))
                for key, (_, extra) in T2I_RUNS.items()}
    # the teacher samples the positives of the prompts without images (25 steps, CFG 1.5) once, before the
    # runs share the cache
    prepare = t2i_command(t2i_teacher, t2i_data, os.path.join(t2i, "runs", "prepare"), t2i_cache, cfg, [],
                          args.seed, 1, 1) + ["--prepare_positives_only"]
    students = [f"{label}={t2i_dirs[key]}" for key, (label, _) in T2I_RUNS.items()]

    def evaluate_command(threads):
        return script("evaluate.py", *base_eval, "--workers", threads, "--runs",
                      *[f"{RUNS[key][0]}={run_dirs[key]}" for key in runs])

    def t2i_evaluate_command(threads):
        return script("evaluate_text2image.py", "--teacher_dir", t2i_teacher, "--data_dir", t2i_data,
                      "--classifier_dir", clf_dir, "--output_dir", t2i, "--num_samples", cfg["t2i_num_samples"],
                      "--seeds", cfg["seeds"], "--students", *students, "--curves", *students)

    # The order is the priority: the two long chains (class-conditional teacher → TFD, text-to-image teacher →
    # positives → the long full fine-tune) first, then what fills the cores around them.
    jobs = [Job("2 teacher", teacher_command(data_dir, teacher_dir, cfg, args.seed), log=os.path.join(logs,
                                                                                                       "teacher.log")),
            Job("7 text-to-image teacher", t2i_teacher_command(t2i_data, t2i_teacher, cfg, args.seed),
                log=os.path.join(logs, "text2image_teacher.log"))]
    jobs += [Job(f"4 TFD {key}", tfd_command(teacher_dir, data_dir, run_dirs[key], cfg, RUNS[key][1], args.seed),
                 deps=["2 teacher"], run_dir=run_dirs[key], max_steps=cfg["tfd_steps"]) for key in runs]
    jobs.append(Job("8 text-to-image positives", prepare, deps=["7 text-to-image teacher"],
                    log=os.path.join(logs, "text2image_positives.log")))
    jobs += [Job(f"9 text-to-image TFD {key}", t2i_cmds[key], deps=["8 text-to-image positives"],
                 run_dir=t2i_dirs[key], max_steps=t2i_steps[key]) for key in T2I_RUNS]
    jobs.append(Job("5a evaluation: reference rows", script("evaluate.py", *base_eval, "--reference_rows_only"),
                    deps=["2 teacher"], log=os.path.join(logs, "evaluate_reference_rows.log")))
    jobs.append(Job("5 evaluation", evaluate_command, deps=["5a evaluation: reference rows"]
                    + [f"4 TFD {key}" for key in runs], log=os.path.join(logs, "evaluate.log"), elastic=True))
    jobs.append(Job("10 text-to-image evaluation", t2i_evaluate_command,
                    deps=[f"9 text-to-image TFD {key}" for key in T2I_RUNS], log=os.path.join(logs,
                                                                                            "evaluate_text2image.log"),
                    elastic=True))
    sched.run(jobs)

    from tfd_training import atomic_write, write_text

    results = os.path.join(out, "results.md")
    write_text(results, open(results).read().rstrip() + "\n\n" + t2i_section(t2i))

    table, wall = sched.table()
    load = os.getloadavg()
    summary = (f"{table}\n\nWall time {wall:.0f} s ({wall / 60:.1f} min) on {cores} CPU cores, {sched.slots} "
               f"processes at a time (scale {args.scale}); load average at the start {sched.load0[0]:.1f} / "
               f"{sched.load0[1]:.1f} / {sched.load0[2]:.1f}, at the end {load[0]:.1f} / {load[1]:.1f} / "
               f"{load[2]:.1f}. Stages 1, 3 and 6 run in run_demo.py itself; every other stage is a process of its "
               f"own (logs in logs/ and each run's train.log).\n")
    atomic_write(os.path.join(out, "timings.md"), lambda p: open(p, "w").write(summary))
    print("\n" + summary)
    print(f"Results: {results}; pictures: samples.png, curves.png in {out}, compare_train.png, compare_heldout.png, "
          f"curves.png in {t2i}")


if __name__ == "__main__":
    main()
