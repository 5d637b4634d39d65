"""Which teacher layers (and which feature noise) for a flow-matching transformer teacher?

No recipe exists for transformer teachers. This measures it on the digits text-to-image task: the
SD3-layout teacher of train_text2image_teacher.py (a 4-block SD3Transformer2DModel, 16-channel VAE, two
small CLIPs, no T5) is distilled with the real `train_tfd_sd3.py` for each candidate setting:
- layers at about 1/3, 1/2 and 2/3 of the depth and their pairs (selectors `block:A/B`, which carry to
  the 24 blocks of SD3/3.5-medium and the 38 of 3.5-large), feature noise σ = 0.1;
- for the best layers, σ = 0 (clean features) and the log-normal law truncated to [0.02, 0.1].
Every run has the same budget and seed; the students are scored with evaluate_text2image.py (FD against
held-out digits / the teacher's 25-step FD, prompt accuracy).

    python examples/digits/sd3_layers.py                 # after the demo's data, classifier and SD3 teacher
    python examples/digits/sd3_layers.py --steps 300 --output_dir outputs/digits/sd3_layers
"""

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

LAYER_SETS = ["block:1/3", "block:1/2", "block:2/3", "block:1/3 block:2/3", "block:1/3 block:1/2",
              "block:1/2 block:2/3"]
NOISE = {"σ = 0.1": ["--feature_noise_min", "0.1", "--feature_noise_max", "0.1"],
         "σ = 0": ["--feature_noise_min", "0", "--feature_noise_max", "0"],
         "σ log-normal in [0.02, 0.1]": ["--feature_noise_min", "0.02", "--feature_noise_max", "0.1"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Teacher layers and feature noise for an SD3-layout (flow) teacher.")
    p.add_argument("--teacher_dir", default="outputs/digits/teacher_t2i_sd3", help="The SD3-layout digits teacher.")
    p.add_argument("--data_dir", default="outputs/digits/data_t2i", help="Folder written by prepare_text2image.py.")
    p.add_argument("--classifier_dir", default="outputs/digits/classifier", help="The metric classifier folder.")
    p.add_argument("--output_dir", default="outputs/digits/sd3_layers", help="Runs, results.md and results.json.")
    p.add_argument("--steps", type=int, default=300, help="TFD updates per run.")
    p.add_argument("--num_samples", type=int, default=500, help="Samples per prompt set in the evaluation.")
    p.add_argument("--jobs", type=int, default=1, help="Runs trained at the same time (one thread each).")
    return p.parse_args(argv)


def command(args, run_dir, layers, noise):
    """train_tfd_sd3.py on the digits: prompts with their real images as positives, 5 × (4, 4) per step."""
    return [sys.executable, os.path.join(ROOT, "train_tfd_sd3.py"),
            "--pretrained_model_name_or_path", args.teacher_dir, "--dataset_name", args.data_dir,
            "--image_column", "image", "--caption_column", "text", "--resolution", "16",
            "--positive_guidance_scale", "1.25", "--prompts_per_batch", "5", "--num_generated", "4",
            "--num_positives", "4", "--feature_layers", layers, "--feature_pool_size", "1", *NOISE[noise],
            "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--max_train_steps", str(args.steps), "--checkpointing_steps", str(args.steps), "--validation_steps", "0",
            "--logging_steps", "50", "--validation_prompts", "the digit 3", "a handwritten seven",
            "--mixed_precision", "no", "--report_to", "none", "--seed", "0",
            "--positive_cache_dir", os.path.join(args.output_dir, "positive_cache"), "--output_dir", run_dir,
            "--resume_from_checkpoint", "latest"]


def train(args, settings):
    """Each setting's run (reused when finished), `--jobs` at a time."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    pending, active = list(settings), []
    while pending or active:
        while pending and len(active) < args.jobs:
            name, layers, noise = pending.pop(0)
            run_dir = os.path.join(args.output_dir, "runs", name)
            if os.path.isfile(os.path.join(run_dir, "model_index.json")):
                continue
            os.makedirs(run_dir, exist_ok=True)
            log = open(os.path.join(run_dir, "train.log"), "a")
            print(f"[{name}] training ({layers}, {noise})", flush=True)
            active.append((name, subprocess.Popen(command(args, run_dir, layers, noise), cwd=ROOT, env=env, stdout=log,
                                                  stderr=subprocess.STDOUT), log, time.time()))
        time.sleep(2)
        for job in [j for j in active if j[1].poll() is not None]:
            active.remove(job)
            job[2].close()
            if job[1].returncode:
                log = os.path.join(args.output_dir, "runs", job[0], "train.log")
                raise RuntimeError(f"run {job[0]} failed: see {log}")
            print(f"[{job[0]}] done in {time.time() - job[3]:.0f} s", flush=True)


def evaluate(args, settings):
    import evaluate_text2image

    students = [f"{name}={os.path.join(args.output_dir, 'runs', name)}" for name, _, _ in settings]
    return evaluate_text2image.main(["--teacher_dir", args.teacher_dir, "--data_dir", args.data_dir,
                                     "--classifier_dir", args.classifier_dir, "--num_samples", str(args.num_samples),
                                     "--output_dir", os.path.join(args.output_dir, "eval"),
                                     "--students", *students])


def table(results, settings):
    """Rows: setting → FD ratio (train prompts; held-out prompts) and accuracy; the best first."""
    teacher, students = results[0], results[2:]  # then the teacher in one step, then the students
    assert len(students) == len(settings), (len(students), len(settings))
    rows = []
    for (name, layers, noise), r in zip(settings, students):
        rows.append((r["train"]["fd"] / teacher["train"]["fd"], name, layers, noise, r))
    rows.sort(key=lambda row: row[0])
    lines = ["| layers | feature noise | FD / teacher FD (train prompts) | accuracy | FD / teacher FD (held-out "
             "prompts) | accuracy |", "|---|---|---|---|---|---|"]
    for ratio, _, layers, noise, r in rows:
        lines.append(f"| `{layers}` | {noise} | {ratio:.2f} | {r['train']['acc']:.3f} | "
                     f"{r['heldout']['fd'] / teacher['heldout']['fd']:.2f} | {r['heldout']['acc']:.3f} |")
    one = results[1]
    lines.append(f"\nTeacher, 25 steps: FD {teacher['train']['fd']:.1f} (train prompts), "
                 f"{teacher['heldout']['fd']:.1f} (held-out prompts); in one step {one['train']['fd']:.1f} and "
                 f"{one['heldout']['fd']:.1f}.")
    return "\n".join(lines), rows


def main(argv=None):
    args = parse_args(argv)
    from tfd_training import write_json, write_text

    start = time.time()
    settings = [(f"layers{i}", layers, "σ = 0.1") for i, layers in enumerate(LAYER_SETS)]
    train(args, settings)
    results = evaluate(args, settings)
    best = table(results, settings)[1][0][2]
    noise_runs = [(f"noise{i}", best, noise) for i, noise in enumerate(NOISE) if noise != "σ = 0.1"]
    train(args, noise_runs)
    all_settings = settings + noise_runs
    results = evaluate(args, all_settings)
    md, _ = table(results, all_settings)
    md += (f"\n\nSD3-layout digits teacher (4 blocks: block:1/3 = block 0, 1/2 = 1, 2/3 = 2), train_tfd_sd3.py with "
           f"5 prompts x (4 generated, 4 real positives) per step, {args.steps} updates, lr 1e-4, pool 1, seed 0; "
           f"{args.num_samples} samples per prompt set. Wall time {time.time() - start:.0f} s.")
    write_text(os.path.join(args.output_dir, "results.md"), md + "\n")
    write_json(os.path.join(args.output_dir, "results.json"), {"settings": all_settings, "rows": results})
    print(md)


if __name__ == "__main__":
    main()
