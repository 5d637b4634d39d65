"""`make demo` scaled down to seconds: the whole digits pipeline, real scripts, real subprocesses.

Data → teacher → classifier → `accelerate launch train_tfd_imagenet64.py` (two runs) → evaluation
(classifier FD, Inception FID, accuracy, SSIM) → results.md and the figures.
"""

import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "digits"))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    import run_demo

    out = tmp_path_factory.mktemp("demo")
    run_demo.main(["--scale", "tiny", "--output_dir", str(out), "--runs", "tfd,pixel_space", "--fid"])
    return out


def test_demo_writes_results_and_pictures(demo_dir):
    md = (demo_dir / "results.md").read_text()
    for row in ("real digits", "teacher, EDM Heun", "teacher, one step", "TFD student, one step",
                "ablation: pixel space"):
        assert row in md, f"row {row!r} missing from results.md"
    assert "Target (student in one step)" in md
    rows = json.loads((demo_dir / "results.json").read_text())["rows"]
    assert len(rows) == 5
    for r in rows:
        for key in ("fd_mean", "fd_std", "acc", "ssim", "fid"):
            assert math.isfinite(r[key]), (r["name"], key, r[key])
        assert 0.0 <= r["acc"] <= 1.0 and -1.0 <= r["ssim"] <= 1.0 and r["fd_mean"] >= 0
    for name in ("samples.png", "samples_ablations.png", "curves.png"):
        from PIL import Image

        with Image.open(demo_dir / name) as im:
            assert im.size[0] > 100 and im.size[1] > 50
    assert "total" in (demo_dir / "timings.md").read_text()


def test_demo_student_is_a_loadable_pipeline_with_a_curve(demo_dir):
    import torch
    from diffusers import DiffusionPipeline

    run = demo_dir / "runs" / "tfd"
    pipe = DiffusionPipeline.from_pretrained(str(run))
    out = pipe(class_labels=[3], num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 1, 16, 16) and torch.isfinite(out.images).all()
    curve = json.loads((run / "fd_curve.json").read_text())["curve"]
    assert [s for s, _, _ in curve] == [0, 1, 2]  # step 0 (the teacher) and both checkpoints
    assert all(math.isfinite(fd) and std >= 0 for _, fd, std in curve)  # mean and std over the table's seeds
    assert (run / "demo_run_complete.json").is_file()


def test_demo_rerun_reuses_finished_stages(demo_dir, capsys):
    import run_demo

    logs = demo_dir / "logs"  # every stage but 1, 3 and 6 is a process with its own log, appended to
    before = {p.name: p.stat().st_size for p in logs.iterdir()}
    run_demo.main(["--scale", "tiny", "--output_dir", str(demo_dir), "--runs", "tfd,pixel_space", "--fid"])
    log = capsys.readouterr().out
    assert log.count("Reusing finished run") == 5  # 2 class-conditional + 3 text-to-image runs

    def new_lines(name):
        with open(logs / name) as f:
            f.seek(before[name])
            return f.read()

    assert "Teacher already trained" in new_lines("teacher.log")
    assert "Text-to-image teacher already trained" in new_lines("text2image_teacher.log")
    assert new_lines("evaluate.log").count(": cached") == 5


def test_demo_text_to_image_task(demo_dir):
    """The second task: train_tfd_sdxl.py (full at the default t = 399 and at 999, LoRA at 399) on the SDXL-layout
    digits teacher, evaluated per prompt over sampling seeds, each student at its own timestep, with the captioned
    grids and the FD curves."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    t2i = demo_dir / "text2image"
    md = (demo_dir / "results.md").read_text()
    assert "## Text-to-image" in md
    rows = {r["label"]: r for r in json.loads((t2i / "results.json").read_text())["rows"]}
    students = ("TFD student, full fine-tune", "TFD student, full fine-tune, t = 999", "TFD student, LoRA r16")
    assert {"teacher, one step", *students} <= set(rows)
    for r in rows.values():
        for key in ("train", "heldout"):
            assert math.isfinite(r[key]["fd"]) and 0.0 <= r[key]["acc"] <= 1.0 and len(r[key]["per_seed"]) == 2
    for label, t in zip(students, (399, 999, 399)):  # sampled where each was trained: the plain one-step call
        assert rows[label]["timesteps"] == [t] and rows[label]["steps"] == 1, label
    for label in students:
        assert f"- {label} (training prompts)" in md
    curves = json.loads((t2i / "curves.json").read_text())
    assert all([p[0] for p in c] == [0, 1, 2] and all(len(p) == 3 for p in c) for c in curves.values())
    assert len(curves) == 3
    for name in ("compare_train.png", "compare_heldout.png", "curves.png"):
        with Image.open(t2i / name) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    pipe = DiffusionPipeline.from_pretrained(str(t2i / "runs" / "t2i_full"))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert (t2i / "runs" / "t2i_lora" / "pytorch_lora_weights.safetensors").is_file()


def test_results_table_without_fid_has_no_fid_column():
    """make demo skips the Inception FID unless --fid: its table then has no FID column (not a column of dashes
    under "N=0")."""
    import evaluate

    row = dict(label="teacher", nfe=35, fd_mean=28.0, fd_std=1.4, fid=None, acc=0.945, ssim=0.908)
    md = evaluate.results_markdown([row, dict(row, label="student")], dict(seeds=["0", "1", "2"], fid_samples=0,
                                                                           notes="notes"))
    assert "FID" not in md and md.splitlines()[1] == "|---|---|---|---|---|"
    assert md.splitlines()[2] == "| teacher | 35 | 28.00 ± 1.40 | 0.945 | 0.908 |"
    with_fid = evaluate.results_markdown([dict(row, fid=25.5)], dict(seeds=["0"], fid_samples=1000, notes=""))
    assert "FID ↓ (N=1000)" in with_fid and "| 25.5 |" in with_fid
