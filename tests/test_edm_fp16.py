"""An NVlabs EDM teacher pickled with use_fp16=True (as edm-imagenet-64x64-cond-adm.pkl is) through
train_tfd_imagenet64.py, on the toy EDM network of tests/edm_toy (CPU, offline).

EDM's EDMPrecond runs its UNet in float16 when use_fp16 and not force_fp32 (on CUDA; the toy on any
device, so these tests exercise it here) and asserts that the UNet returns that dtype. The project's
policy: the teacher's feature pass runs in float32 outside autocast (force_fp32=True); the student keeps
float32 master weights and computes under the chosen autocast (force_fp32=True, its UNet's output cast
to float32 for EDM's assert); the exported network-snapshot.pkl keeps use_fp16=True, so EDM's own code
loads and runs it as it runs the teacher (its one step: the direct call net(z·σmax, σmax, labels)).
"""

import importlib
import io
import json
import os
import pickle
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import train_tfd_imagenet64 as script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDM_TOY = os.path.join(ROOT, "tests", "edm_toy")
NUM_CLASSES, PER_CLASS, RES = 4, 6, 16


def toy_module():
    """tests/edm_toy/toy_edm_networks, the module object the pickles resolve to (sys.modules)."""
    if EDM_TOY not in sys.path:
        sys.path.insert(0, EDM_TOY)
    return importlib.import_module("toy_edm_networks")


@pytest.fixture(scope="module")
def fp16_teacher(tmp_path_factory):
    """An EDM-format zip of labelled images and a use_fp16=True toy EDMPrecond teacher pickle."""
    root = tmp_path_factory.mktemp("edm_fp16")
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(root / "edm.zip", "w") as zf:
        labels = []
        for i in range(NUM_CLASSES * PER_CLASS):
            c = i % NUM_CLASSES
            a = np.full((RES, RES, 3), 30.0)
            a[..., c % 3] = 200
            a += rng.normal(0, 20, a.shape)
            buf = io.BytesIO()
            Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(buf, format="png")
            labels.append([f"00000/img{i:08d}.png", c])
            zf.writestr(labels[-1][0], buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": labels}))
    torch.manual_seed(0)
    net = toy_module().ToyEDMPrecond(RES, 3, NUM_CLASSES, use_fp16=True)
    with open(root / "teacher.pkl", "wb") as f:
        pickle.dump({"ema": net}, f)
    return root


def train(root, out, mixed_precision):
    """Two TFD updates in-process; returns (metrics rows, the toy UNet's call records)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    argv = ["--pretrained_teacher_model", str(root / "teacher.pkl"), "--edm_repo", EDM_TOY, "--precond", "edm",
            "--dataset_name", str(root / "edm.zip"), "--feature_layers", "enc:1 bottleneck dec:1",
            "--feature_pool_size", "2", "--classes_per_batch", "2", "--num_generated", "2", "--num_positives", "2",
            "--num_anchors", "1", "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--max_train_steps", "2",
            "--checkpointing_steps", "1000", "--validation_steps", "0", "--logging_steps", "1",
            "--num_validation_images", "2", "--report_to", "none", "--mixed_precision", mixed_precision,
            "--output_dir", str(out)]
    toy = toy_module()
    try:
        with toy.recording() as calls:
            script.main(script.parse_args(argv))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows, calls


def student_and_teacher_calls(calls):
    """The student's training forwards (trainable, with grad) and the teacher's feature passes."""
    student = [c for c in calls if c["trainable"] and c["grad"]]
    teacher = [c for c in calls if not c["trainable"]]
    assert student and teacher, calls
    return student, teacher


def load_snapshot(out):
    toy_module()
    with open(out / "network-snapshot.pkl", "rb") as f:
        return pickle.load(f)["ema"]


def test_fp16_edm_teacher_trains_in_float32_and_exports_a_use_fp16_snapshot(fp16_teacher, tmp_path):
    rows, calls = train(fp16_teacher, tmp_path / "fp32", "no")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss/total"]) and r["train/bad_steps"] == 0 for r in rows)
    student, teacher = student_and_teacher_calls(calls)
    # without mixed precision the student computes in float32, not in use_fp16's float16
    assert {(c["input"], c["compute"], c["output"]) for c in student} == {(torch.float32,) * 3}
    assert {(c["input"], c["compute"]) for c in teacher} == {(torch.float32,) * 2}  # the feature pass
    assert not any(torch.float16 in (c["input"], c.get("compute")) for c in calls)

    net = load_snapshot(tmp_path / "fp32")
    assert type(net).__name__ == "ToyEDMPrecond" and net.use_fp16 is True
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in net.parameters())
    # EDM's call convention, net(x, σ, one-hot): float16 inside (use_fp16), float32 out, EDM's assert holds
    z = torch.randn(4, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    sigma, onehot = torch.full((4,), 80.0), torch.eye(NUM_CLASSES)[torch.arange(4)]
    with torch.no_grad(), toy_module().recording() as used:
        half = net(z * 80.0, sigma, onehot)
        full = net(z * 80.0, sigma, onehot, force_fp32=True)
    assert [(c["input"], c["output"]) for c in used] == [(torch.float16,) * 2, (torch.float32,) * 2]
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, full, atol=2e-2, rtol=0)  # the same generator, to float16 precision


def test_fp16_edm_teacher_under_bf16_autocast(fp16_teacher, tmp_path):
    rows, calls = train(fp16_teacher, tmp_path / "bf16", "bf16")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss/total"]) and np.isfinite(r["train/grad_norm"]) and r["train/bad_steps"] == 0
               for r in rows)
    student, teacher = student_and_teacher_calls(calls)
    # the student: float32 input and master weights, bf16 compute by autocast (not float16 by use_fp16)
    assert {(c["input"], c["weights"], c["compute"]) for c in student} == {
        (torch.float32, torch.float32, torch.bfloat16)}
    assert {(c["input"], c["compute"]) for c in teacher} == {(torch.float32,) * 2}  # autocast off
    net = load_snapshot(tmp_path / "bf16")
    assert net.use_fp16 is True and all(p.dtype == torch.float32 for p in net.parameters())


def test_edm_pickle_model_card_snippet_is_the_direct_one_step_call(fp16_teacher, tmp_path):
    """The model card of an EDM-pickle student shows the direct call net(z·σmax, σmax, labels), not EDM's
    edm_sampler (which cannot take one step: it divides by num_steps − 1). Its lines, run as written in the
    output folder, give the training generator's samples."""
    import re

    import tfd_utils

    out = tmp_path / "card"
    train(fp16_teacher, out, "no")
    card = (out / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert "edm_sampler" not in card and "generate.py" not in card
    assert "net(z * 80.0, torch.full((4,), 80.0), labels)" in code
    toy_module()  # the pickle's classes, as "the NVlabs/edm code on sys.path" of the card
    cwd, scope = os.getcwd(), {}
    os.chdir(out)
    try:
        torch.manual_seed(7)
        with torch.no_grad():
            exec(code, scope)
    finally:
        os.chdir(cwd)
    net = scope["net"]
    torch.manual_seed(7)
    z = torch.randn(4, net.img_channels, net.img_resolution, net.img_resolution)
    with torch.no_grad():
        ours = tfd_utils.edm_net_one_step(net, z, torch.tensor([0, 1, 2, 3]), 80.0)
    # the card's call runs use_fp16's float16 inside; the generator forces float32
    torch.testing.assert_close(scope["x"].float(), ours, atol=2e-2, rtol=0)
    assert (scope["x"].float() - ours).abs().max() < 0.1 * ours.abs().max()
