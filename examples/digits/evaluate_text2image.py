"""Evaluate text-to-image pipelines on the captioned digits: per prompt set FD and prompt accuracy.

    python examples/digits/evaluate_text2image.py --teacher_dir outputs/digits/teacher_t2i_sdxl \
        --students "TFD student=outputs/digits/runs_t2i/tfd" --output_dir outputs/digits/eval_t2i_sdxl

Rows: the teacher through its own pipeline and scheduler (`--steps` Euler steps with CFG
`--guidance_scale`), the teacher in one step (SDXL: the one-step DDIMScheduler at timestep 999, where a
TFD student trained at 999 starts; SD3: FlowMatchEulerDiscreteScheduler with one step), and each student
(a saved pipeline folder, or a folder holding pytorch_lora_weights.safetensors for the teacher), run one
step without CFG through its pipeline at the timestep it was trained at. Prompt sets: the data set's
captions ("train") and the held-out templates ("heldout"), every prompt equally often (so every digit
equally often).
Metrics per prompt set, with the digit classifier of classifier.py: FD of its 64-d features against
the held-out test digits (class-balanced), and accuracy = the classifier agrees with the digit the
prompt names (prepare_text2image.caption_digit).
"""

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from classifier import get_classifier  # noqa: E402
from evaluate import classifier_outputs, curve_caption, frechet, mean_std, plot_curve, readable_log_axis  # noqa: E402
from prepare_text2image import caption_digit, load_split_text, read_prompts  # noqa: E402
from train_text2image_teacher import fast_t5_zeros, gray_uint8, grid_image, ints, load_teacher  # noqa: E402

PROMPT_SETS = ("train", "heldout")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FD and prompt accuracy of text-to-image digit pipelines.")
    p.add_argument("--teacher_dir", required=True, help="Teacher pipeline folder (train_text2image_teacher.py).")
    p.add_argument("--students", nargs="*", default=[],
                   help="One-step students as LABEL=PATH: a pipeline folder, or a folder with LoRA weights.")
    p.add_argument("--data_dir", default="outputs/digits/data_t2i", help="Folder written by prepare_text2image.py.")
    p.add_argument("--classifier_dir", default="outputs/digits/classifier", help="The metric classifier folder.")
    p.add_argument("--output_dir", default=None, help="Where results.json/results.md and grids go (default: none).")
    p.add_argument("--num_samples", type=int, default=1000, help="Samples per prompt set (a multiple of its size).")
    p.add_argument("--steps", type=int, default=25, help="Teacher sampling steps.")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="Teacher CFG scale (default: the teacher's check_guidance_scale: sdxl 1.5, sd3 1.25).")
    p.add_argument("--seeds", default="0",
                   help="Sampling seeds, comma-separated (the same noise for every row): the table gives the mean and "
                        "standard deviation over them; grids and curves use the first.")
    p.add_argument("--batch_size", type=int, default=250, help="Images per pipeline call.")
    p.add_argument("--no_teacher_one_step", action="store_true", help="Skip the teacher's one-step row.")
    p.add_argument("--curves", nargs="*", default=[],
                   help="TFD runs as LABEL=RUN_DIR: FD (train prompts) of every checkpoint-N, drawn in curves.png.")
    p.add_argument("--curve_samples", type=int, default=None,
                   help="Samples per seed at each checkpoint for the FD curves, over every --seeds (default: "
                        "--num_samples, so that the curves' points and the teacher's line are measured as the table "
                        "is).")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Samplers: (prompts, seed) → uint8 gray [N, 1, H, W], through the pipelines themselves.
# ----------------------------------------------------------------------------------------------


def is_sd3(pipe):
    return type(pipe).__name__.startswith("StableDiffusion3")


@torch.no_grad()
def sample(pipe, prompts, seed, steps, guidance_scale, batch_size=250):
    """pipe(prompts) in chunks; one CPU generator seeded `seed` draws every chunk's noise in turn. steps:
    a number of steps, or a list of timesteps (a student trained with --conditioning_timestep T: [T]).

    T5-less SD3 pipelines run with one zero T5 token standing for the default 256 (the same
    function, train_text2image_teacher.collapsed_t5)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    when = {"num_inference_steps": steps}
    if isinstance(steps, (list, tuple)):
        when = {"timesteps": list(steps)}
        # on purpose: LCMScheduler warns on every call that the first timestep is not 999
        logging.getLogger("diffusers.schedulers.scheduling_lcm").setLevel(logging.ERROR)
    with fast_t5_zeros(pipe) as kw:
        for i in range(0, len(prompts), batch_size):
            images = pipe(list(prompts[i:i + batch_size]), guidance_scale=guidance_scale, generator=gen,
                          output_type="pt", **when, **kw).images
            out.append(gray_uint8(images))
    return torch.cat(out)


def one_step_pipeline(teacher, timestep=999):
    """The teacher with the one-step scheduler a TFD student trained at `timestep` uses: SDXL the DDIMScheduler
    whose one step is [timestep] (train_tfd_sdxl.py's export), SD3 its FlowMatchEulerDiscreteScheduler (one
    step: sigmas [1, 0])."""
    from tfd_text2image import vp_one_step_scheduler

    if is_sd3(teacher):
        return teacher
    pipe = type(teacher)(**{**teacher.components,
                            "scheduler": vp_one_step_scheduler(teacher.scheduler.config, timestep)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_student(path, teacher_dir):
    """A student folder: a whole pipeline (model_index.json), or LoRA weights for the teacher (with the
    student's scheduler/ when saved)."""
    from diffusers import DiffusionPipeline

    if os.path.isfile(os.path.join(path, "model_index.json")):
        index = json.load(open(os.path.join(path, "model_index.json")))
        sd3 = index["_class_name"].startswith("StableDiffusion3")
        kw = {"text_encoder_3": None, "tokenizer_3": None} if sd3 else {}
        pipe = DiffusionPipeline.from_pretrained(path, **kw)
    elif os.path.isfile(os.path.join(path, "pytorch_lora_weights.safetensors")):
        pipe = one_step_pipeline(load_teacher(teacher_dir), run_timestep(path))
        pipe.load_lora_weights(path)
        saved = os.path.join(path, "scheduler", "scheduler_config.json")
        if os.path.isfile(saved):
            import diffusers

            cls = getattr(diffusers, json.load(open(saved))["_class_name"])
            pipe.scheduler = cls.from_pretrained(path, subfolder="scheduler")
    else:
        raise FileNotFoundError(f"{path} holds neither a pipeline (model_index.json) nor LoRA weights.")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_timestep(run_dir):
    """The --conditioning_timestep a TFD run's student was trained at (its training_args.json); 999 when it
    records none."""
    path = os.path.join(run_dir, "training_args.json")
    return json.load(open(path)).get("conditioning_timestep", 999) if os.path.isfile(path) else 999


def one_step_timesteps(pipe):
    """The timesteps of the pipeline's plain one-step call."""
    pipe.scheduler.set_timesteps(1)
    return [int(t) if float(t).is_integer() else float(t) for t in pipe.scheduler.timesteps.tolist()]


def student_steps(run_dir, pipe):
    """How a TFD run's student samples: its pipeline's plain one-step call (1) where that is the timestep it
    was trained at, else [T] (a student saved with a scheduler whose one step is another timestep, e.g.
    LCMScheduler's 999). SD3 students (no timestep recorded) take the plain call."""
    path = os.path.join(run_dir, "training_args.json")
    t = json.load(open(path)).get("conditioning_timestep") if os.path.isfile(path) else None
    return 1 if t is None or one_step_timesteps(pipe) == [t] else [t]


# ----------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------


def prompt_set(data_dir, key, num_samples):
    """The set's prompts, each repeated num_samples / len(set) times (prompt-major), and their digits."""
    base = read_prompts(data_dir, key)
    reps = max(1, num_samples // len(base))
    prompts = [p for p in base for _ in range(reps)]
    return prompts, torch.tensor([caption_digit(p) for p in prompts])


def reference(data_dir, clf):
    """Classifier feature statistics of the held-out test digits (stratified: class-balanced)."""
    import tfd_fid

    x, _, _ = load_split_text(data_dir, "test")
    feats, _ = classifier_outputs(clf, torch.from_numpy(x)[:, None])
    return tfd_fid.feature_stats(feats)


def metrics(clf, images_u8, digits, ref_stats):
    feats, preds = classifier_outputs(clf, images_u8)
    return {"fd": float(frechet(feats, ref_stats)), "acc": float((preds == digits).float().mean())}


def evaluate_rows(rows, data_dir, clf, num_samples, seeds, batch_size, log=print):
    """rows: [(label, pipe, steps, guidance)] → [{label, steps, guidance, <set>: {fd, acc, fd_std, acc_std, per_seed},
    seconds}] (mean and standard deviation over the sampling seeds), grids (first seed)."""
    ref_stats = reference(data_dir, clf)
    sets = {k: prompt_set(data_dir, k, num_samples) for k in PROMPT_SETS}
    results, grids = [], {}
    for label, pipe, steps, guidance in rows:
        t0 = time.time()
        row = {"label": label, "steps": steps, "guidance_scale": guidance}
        if isinstance(steps, (list, tuple)):
            row.update(steps=len(steps), timesteps=list(steps))
        elif steps == 1:
            row["timesteps"] = one_step_timesteps(pipe)
        for key, (prompts, digits) in sets.items():
            per_seed = []
            for seed in seeds:
                images = sample(pipe, prompts, seed, steps, guidance, batch_size)
                per_seed.append(metrics(clf, images, digits, ref_stats))
                if seed == seeds[0]:
                    grids[(label, key)] = first_per_prompt(images, prompts)
            row[key] = {"n": len(prompts), "per_seed": per_seed}
            for m in ("fd", "acc"):
                row[key][m], row[key][f"{m}_std"] = mean_std([r[m] for r in per_seed])
        row["seconds"] = round(time.time() - t0, 1)
        log(f"  {label}: " + ", ".join(f"{k} FD {row[k]['fd']:.2f} ± {row[k]['fd_std']:.2f} acc {row[k]['acc']:.3f}"
                                       for k in PROMPT_SETS) + f" ({row['seconds']} s)")
        results.append(row)
    return results, grids


def first_per_prompt(images, prompts):
    """The first sample of each distinct prompt, in prompt order."""
    seen, keep = set(), []
    for i, p in enumerate(prompts):
        if p not in seen:
            seen.add(p)
            keep.append(i)
    return images[keep]


def checkpoint_pipeline(teacher_dir, ckpt_dir, timestep=999):
    """The one-step pipeline of a TFD checkpoint trained at `timestep`: its `unet/` or `transformer/` (full
    fine-tune) or its LoRA weights, on the teacher with the one-step scheduler."""
    pipe = one_step_pipeline(load_teacher(teacher_dir), timestep)
    for name in ("unet", "transformer"):
        if os.path.isdir(os.path.join(ckpt_dir, name)):
            model = type(getattr(pipe, name)).from_pretrained(ckpt_dir, subfolder=name)
            pipe = type(pipe)(**{**pipe.components, name: model})
            break
    else:
        pipe.load_lora_weights(ckpt_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fd_curve(run_dir, teacher_dir, clf, data_dir, num_samples, seeds):
    """[(step, FD mean, FD std)] on the training prompts from step 0 (the teacher in one step, at the run's
    conditioning timestep), each checkpoint sampled as the table's rows are (num_samples per seed, every seed),
    cached in run_dir/fd_curve.json."""
    from tfd_training import list_checkpoints, write_json

    ckpts = list_checkpoints(run_dir)
    t = run_timestep(run_dir)
    key = {"n": num_samples, "seeds": list(seeds), "steps": [s for s, _ in ckpts],
           "teacher": os.path.abspath(teacher_dir), "timestep": t}
    cache = os.path.join(run_dir, "fd_curve.json")
    if os.path.isfile(cache) and json.load(open(cache)).get("key") == key:
        return [tuple(p) for p in json.load(open(cache))["curve"]]
    ref_stats = reference(data_dir, clf)
    prompts, digits = prompt_set(data_dir, "train", num_samples)
    curve = []
    for step, path in [(0, None)] + ckpts:
        pipe = (one_step_pipeline(load_teacher(teacher_dir), t) if path is None
                else checkpoint_pipeline(teacher_dir, path, t))
        fds = [metrics(clf, sample(pipe, prompts, seed, 1, 0.0), digits, ref_stats)["fd"] for seed in seeds]
        curve.append((step, *mean_std(fds)))
    write_json(cache, {"key": key, "curve": curve})
    return curve


def teacher_curve_level(teacher_row, teacher, args, clf, seeds):
    """The teacher's many-step FD (training prompts) measured as the curves are: its table row when the curves
    use the table's samples, else the same sampler on --curve_samples samples per seed."""
    if args.curve_samples == args.num_samples:
        return teacher_row["train"]["fd"], teacher_row["train"]["fd_std"]
    ref_stats = reference(args.data_dir, clf)
    prompts, digits = prompt_set(args.data_dir, "train", args.curve_samples)
    fds = [metrics(clf, sample(teacher, prompts, seed, args.steps, args.guidance_scale, args.batch_size), digits,
                   ref_stats)["fd"] for seed in seeds]
    return mean_std(fds)


def curves_figure(curves, teacher_level, teacher_label, samples_text, path):
    """FD (training prompts) against TFD updates (step 0: the teacher in one step), with the teacher's
    many-step level (mean, std) measured as the curves are (samples_text says how)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    values = []
    for label, curve in curves.items():
        values += plot_curve(ax, label, curve)
    mean, std = teacher_level
    ax.axhline(mean, color="k", ls="--", lw=1, label=f"{teacher_label}: {mean:.1f} ± {std:.1f}")
    ax.axhspan(mean - std, mean + std, color="k", alpha=0.08, lw=0)
    readable_log_axis(ax, values + [mean])  # a student trained at t < 999 starts far above the others
    ax.set_xlabel("TFD updates")
    ax.set_ylabel("FD ↓ (training prompts, log scale)")
    ax.set_title(f"Text-to-image digits: one-step FD during training\n{samples_text}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    from tfd_training import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def grid_prompts(data_dir, key, count=10):
    """One prompt per digit (0–9), templates rotating, for the captioned grid."""
    by_digit = {}
    for p in read_prompts(data_dir, key):
        by_digit.setdefault(caption_digit(p), []).append(p)
    return [by_digit[d][d % len(by_digit[d])] for d in range(count)]


def real_per_prompt(data_dir, prompts, seed=0):
    """A held-out real digit of each prompt's class (the test split), seeded."""
    x, _, y = load_split_text(data_dir, "test")
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([x[rng.choice(np.flatnonzero(y == caption_digit(p)))] for p in prompts]))[:, None]


def label_font(size=11):
    """A TrueType font for the grids' labels: matplotlib's DejaVu Sans (PIL's default font drops the space after
    some capitals: "TFD student" came out as "TFDstudent")."""
    from matplotlib import font_manager
    from PIL import ImageFont

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except OSError:
        return ImageFont.load_default()


def wrap_pixels(text, font, width):
    """`text` in lines of at most `width` pixels in `font` (a longer single word keeps its own line)."""
    lines = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def captioned_grid(rows, captions, scale=5):
    """rows: [(label, uint8 [C, 1, H, W])] → a PIL image: one row per label (named on the left), one
    column per caption (written under the columns)."""
    from PIL import Image, ImageDraw

    font = label_font()
    cols, h, w = len(captions), rows[0][1].shape[-2] * scale, rows[0][1].shape[-1] * scale
    left, gap, line = 190, 4, 13
    wrapped = [wrap_pixels(c, font, w + gap - 2) for c in captions]
    bottom = line * max(len(t) for t in wrapped) + 6
    canvas = Image.new("L", (left + cols * (w + gap), len(rows) * (h + gap) + bottom), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = r * (h + gap)
        text = wrap_pixels(label, font, left - 10)
        draw.multiline_text((4, y + h // 2 - line * len(text) // 2), "\n".join(text), fill=0, font=font, spacing=2)
        for c, im in enumerate(images[:cols, 0].numpy()):
            canvas.paste(Image.fromarray(im).resize((w, h), Image.NEAREST), (left + c * (w + gap), y))
    for c, text in enumerate(wrapped):
        draw.multiline_text((left + c * (w + gap), len(rows) * (h + gap) + 2), "\n".join(text), fill=0, font=font,
                            spacing=2)
    return canvas


def comparison_grid(data_dir, key, rows, seed):
    """The captioned grid of one prompt set: real digits, then one sample per row pipeline (seed `seed`)."""
    prompts = grid_prompts(data_dir, key)
    out = [("real (held-out digit of the class)", real_per_prompt(data_dir, prompts, seed))]
    out += [(label, sample(pipe, prompts, seed, steps, guidance)) for label, pipe, steps, guidance in rows]
    return captioned_grid(out, prompts)


def results_markdown(results, info):
    lines = ["| samples | steps | CFG | FD ↓ train prompts | acc ↑ train prompts | FD ↓ held-out prompts | "
             "acc ↑ held-out prompts |", "|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [f"{r[k]['fd']:.2f} ± {r[k]['fd_std']:.2f} | {r[k]['acc']:.3f} ± {r[k]['acc_std']:.3f}"
                 for k in PROMPT_SETS]
        lines.append(f"| {r['label']} | {r['steps']} | {r['guidance_scale']:g} | " + " | ".join(cells) + " |")
    lines += ["", info]
    return "\n".join(lines) + "\n"


def teacher_guidance(teacher_dir, fallback=1.5):
    """The CFG scale the teacher was checked with (its completion marker), else `fallback`."""
    from train_text2image_teacher import COMPLETE

    path = os.path.join(teacher_dir, COMPLETE)
    if os.path.isfile(path):
        return float(json.load(open(path))["config"].get("check_guidance_scale", fallback))
    return fallback


def main(argv=None):
    args = parse_args(argv)
    from tfd_training import save_png, write_json, write_text

    if args.curve_samples is None:
        args.curve_samples = args.num_samples

    clf, clf_info = get_classifier(args.data_dir, args.classifier_dir)
    teacher = load_teacher(args.teacher_dir)
    if args.guidance_scale is None:
        args.guidance_scale = teacher_guidance(args.teacher_dir)
    rows = [(f"teacher, {args.steps} steps, CFG {args.guidance_scale:g}", teacher, args.steps, args.guidance_scale)]
    if not args.no_teacher_one_step:
        rows.append(("teacher, one step", one_step_pipeline(teacher), 1, 0.0))
    for spec in args.students:
        label, path = spec.rsplit("=", 1)
        pipe = load_student(path, args.teacher_dir)
        rows.append((label, pipe, student_steps(path, pipe), 0.0))
    seeds = ints(args.seeds)
    print(f"Evaluating {len(rows)} rows, {args.num_samples} samples per prompt set, seeds {seeds}:")
    results, grids = evaluate_rows(rows, args.data_dir, clf, args.num_samples, seeds, args.batch_size)
    info = (f"FD: Fréchet distance in the 64-d features of the digit classifier (held-out accuracy "
            f"{clf_info['test_accuracy']:.3f}) against the held-out test digits; accuracy: the classifier names the "
            f"prompt's digit. Per prompt set about {args.num_samples} samples (every prompt equally often) per "
            f"sampling seed; mean ± standard deviation over seeds {args.seeds}. Teacher: {type(teacher).__name__}, "
            f"{type(teacher.scheduler).__name__}.")
    md = results_markdown(results, info)
    print(md)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "results.json"), {"rows": results, "teacher": args.teacher_dir,
                                                                  "num_samples": args.num_samples, "seeds": seeds})
        write_text(os.path.join(args.output_dir, "results.md"), md)
        for key in PROMPT_SETS:  # one band per row: 10 columns = the digits, rows = templates
            grid = torch.cat([grids[(r[0], key)] for r in rows])
            save_png(os.path.join(args.output_dir, f"samples_{key}.png"), grid_image(grid, 10))
            save_png(os.path.join(args.output_dir, f"compare_{key}.png"),
                     comparison_grid(args.data_dir, key, rows, seeds[0]))
        if args.curves:
            curves = {}
            for spec in args.curves:
                label, path = spec.rsplit("=", 1)
                curves[label] = fd_curve(path, args.teacher_dir, clf, args.data_dir, args.curve_samples, seeds)
            level = teacher_curve_level(results[0], teacher, args, clf, seeds)
            n = len(prompt_set(args.data_dir, "train", args.curve_samples)[0])
            samples_text = curve_caption(args.seeds, n, args.curve_samples == args.num_samples)
            curves_figure(curves, level, rows[0][0], samples_text, os.path.join(args.output_dir, "curves.png"))
            write_json(os.path.join(args.output_dir, "curves.json"), curves)
        print(f"Grids in {args.output_dir}: compare_train.png / compare_heldout.png (rows: real, teacher, students; "
              f"the prompt under each column), samples_train.png / samples_heldout.png (per row of the table, one "
              f"image per prompt: templates down, digits 0–9 across).")
    return results


if __name__ == "__main__":
    main()
