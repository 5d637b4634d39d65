"""train_tfd_imagenet64.py end to end on a tiny random teacher and a tiny labelled data set (CPU, offline).

Most runs call main(parse_args([...])) in-process; one test goes through `accelerate launch`.
"""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import tfd_training
import tfd_utils
import train_tfd_imagenet64 as script
from tiny_imagenet import NUM_CLASSES, PER_CLASS, RES, class_images, tiny_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDM_TOY = os.path.join(ROOT, "tests", "edm_toy")
LAYERS = "down_blocks.0 mid_block"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Teacher folder, the same data as save_to_disk / imagefolder / EDM zip, an EDM-pickle teacher."""
    import datasets

    root = tmp_path_factory.mktemp("tiny_imagenet")
    tiny_teacher().save_pretrained(root / "teacher")
    tiny_teacher(num_class_embeds=None).save_pretrained(root / "uncond_teacher")
    images, labels = class_images()
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images], "label": labels}, features=feats)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root / "data"))
    ds.rename_column("label", "y").save_to_disk(str(root / "data_y"))
    for i, (a, c) in enumerate(zip(images, labels)):
        os.makedirs(root / "folder" / str(c), exist_ok=True)
        Image.fromarray(a).save(root / "folder" / str(c) / f"{i:03d}.png")
    with zipfile.ZipFile(root / "edm.zip", "w") as zf:
        names = []
        for i, a in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="png")
            names.append(f"00000/img{i:08d}.png")
            zf.writestr(names[-1], buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": [[n, c] for n, c in zip(names, labels)]}))
    sys.path.insert(0, EDM_TOY)
    import toy_edm_networks

    torch.manual_seed(0)
    net = toy_edm_networks.ToyEDMPrecond(RES, 3, 5)
    with open(root / "edm-teacher.pkl", "wb") as f:
        pickle.dump({"ema": net}, f)
    return root


def run(tiny, out, *extra, data="data"):
    """In-process training run; returns the output folder."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    argv = ["--pretrained_teacher_model", str(tiny / "teacher"), "--dataset_name", str(tiny / data),
            "--feature_layers", LAYERS, "--feature_pool_size", "2", "--classes_per_batch", "2",
            "--num_generated", "3", "--num_positives", "3", "--num_anchors", "2", "--learning_rate", "1e-4",
            "--lr_warmup_steps", "0", "--max_train_steps", "2", "--checkpointing_steps", "1000",
            "--validation_steps", "0", "--logging_steps", "1", "--num_validation_images", "4",
            "--report_to", "none", "--mixed_precision", "no", "--output_dir", str(out), *map(str, extra)]
    try:
        script.main(script.parse_args(argv))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    return out


def metrics(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def unet_weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))


# ------------------------------------------------------------------------------------------------
# Pieces: data formats, sampler, teacher closure.
# ------------------------------------------------------------------------------------------------


def test_three_data_formats_give_the_same_images(tiny):
    images, labels = class_images()
    want = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    for kw in ({"dataset_name": str(tiny / "data")}, {"train_data_dir": str(tiny / "folder")},
               {"dataset_name": str(tiny / "edm.zip")}):
        got_labels, fetch, _ = script.open_labelled_images(**kw)
        data = script.LabelledImages(got_labels, fetch, 3, RES, progress=False)
        order = torch.argsort(got_labels, stable=True)  # imagefolder lists by class folder
        assert got_labels[order].tolist() == labels, kw
        assert torch.equal(data.data[order], want), kw
        lazy = script.LabelledImages(got_labels, fetch, 3, RES, preload_max_gb=0)
        idx = torch.tensor([[0, 5], [7, 1]])
        assert lazy.data is None and torch.equal(lazy.get(idx), data.data[idx])


def test_conversion_to_teacher_channels_and_resolution():
    img = Image.fromarray(np.arange(24 * 32 * 3, dtype=np.uint8).reshape(24, 32, 3))
    x = script.to_teacher_image(img, 1, 16)
    assert x.shape == (1, 16, 16) and x.dtype == torch.uint8
    assert script.to_teacher_image(img, 3, 24).shape == (3, 24, 24)
    assert torch.equal(script.to_teacher_image(img.crop((4, 0, 28, 24)), 3, 24),
                       torch.from_numpy(np.asarray(img)[:, 4:28].copy()).permute(2, 0, 1))  # center crop


def test_sampler_groups_determinism_ranks_and_resume():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 3 + [3] * 10)
    s = script.ClassGroupedSampler(labels, [0, 1, 2, 3], 3, 4, seed=5, rank=0)
    draws = [s() for _ in range(6)]
    for classes, idx in draws:
        assert len(set(classes.tolist())) == 3 and idx.shape == (3, 4)
        for c, row in zip(classes.tolist(), idx):
            assert (labels[row] == c).all()
            if c != 2:
                assert len(set(row.tolist())) == 4  # without replacement
    resumed = script.ClassGroupedSampler(labels, [0, 1, 2, 3], 3, 4, seed=5, rank=0)
    resumed.load_state_dict(script.ClassGroupedSampler(labels, [0, 1, 2, 3], 3, 4, 5, 0).state_dict() | {"draws": 4})
    for want in draws[4:]:
        got = resumed()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other = script.ClassGroupedSampler(labels, [0, 1, 2, 3], 3, 4, seed=5, rank=1)
    assert any(not torch.equal(other()[1], d[1]) for d in draws)
    with pytest.raises(ValueError, match=r"Classes \[7\] have no images"):
        script.ClassGroupedSampler(labels, [0, 7], 1, 4)
    with pytest.raises(ValueError, match="lower --classes_per_batch"):
        script.ClassGroupedSampler(labels, [0, 1], 3, 4)


def test_teacher_forward_closure_matches_the_preconditioned_teacher_call():
    teacher = tiny_teacher().eval()
    x, sigma, labels = torch.randn(6, 3, RES, RES), torch.tensor([0.05, 0.0]), torch.tensor([1, 3])
    out = tfd_utils.edm_teacher_forward(teacher, labels)(x, sigma.repeat_interleave(3))
    sig = torch.tensor([0.05] * 3 + [0.002] * 3)  # σ = 0 is floored at 0.002
    c_in = (1 / (sig**2 + 0.25).sqrt()).view(-1, 1, 1, 1)
    want = teacher(c_in * x, 250 * sig.log(), class_labels=labels.repeat_interleave(3)).sample
    torch.testing.assert_close(out, want)


def test_set_dropout_reaches_torch_modules_and_edm_style_attributes():
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, dropout=0.1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    ps = [m.p for m in unet.modules() if isinstance(m, torch.nn.Dropout)]
    assert 0.1 in ps
    script.set_dropout(unet, 0.0)
    assert all(m.p == 0.0 for m in unet.modules() if isinstance(m, torch.nn.Dropout))
    block = torch.nn.Module()
    block.dropout = 0.1  # NVlabs EDM UNetBlock keeps a float and calls functional dropout
    assert script.set_dropout(torch.nn.Sequential(block), 0.0)[0].dropout == 0.0


# ------------------------------------------------------------------------------------------------
# End to end.
# ------------------------------------------------------------------------------------------------


def test_accelerate_launch_end_to_end_and_saved_pipeline_is_the_training_generator(tiny, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           "--mixed_precision", "no", "--num_machines", "1", "--dynamo_backend", "no",
           os.path.join(ROOT, "train_tfd_imagenet64.py"), "--pretrained_teacher_model", str(tiny / "teacher"),
           "--dataset_name", str(tiny / "data"), "--feature_layers", LAYERS, "--feature_pool_size", "2",
           "--classes_per_batch", "2", "--num_generated", "3", "--num_positives", "3", "--num_anchors", "2",
           "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--max_train_steps", "4",
           "--checkpointing_steps", "2", "--validation_steps", "2", "--logging_steps", "1",
           "--num_validation_images", "4", "--use_ema", "--ema_decay", "0.9", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = script.parse_args(cmd[cmd.index(os.path.join(ROOT, "train_tfd_imagenet64.py")) + 1:])
    for name in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "README.md",
                 "samples.png", "validation/step-2.png", "validation/step-4.png", "training_args.json",
                 "checkpoint-2/unet/diffusion_pytorch_model.safetensors", "checkpoint-4/tfd_checkpoint_complete"):
        assert (out / name).exists(), name
    assert list((out / "logs").rglob("events.out.tfevents*")), "no tensorboard events"
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss/total", "loss/drift", "loss/anchor", "anchor/covered", "sigma/mean", "train/lr",
                "train/grad_norm", "train/images_per_s", "force/mid_block/r0.02"):
        assert np.isfinite(rows[-1][key]), key
    assert 0.02 <= rows[-1]["sigma/min"] <= rows[-1]["sigma/max"] <= 0.1
    card = (out / "README.md").read_text()
    assert "samples.png" in card and "| learning rate | 0.001 |" in card and "one-step" in card
    assert str(tiny) not in card  # no local paths

    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "ConsistencyModelPipeline" and pipe.scheduler.config.clip_denoised is False
    # The export is the EMA (it equals the EMA weights checkpointed at the last step), and it trained.
    ema = torch.load(out / "checkpoint-4" / "custom_checkpoint_1.pkl", weights_only=False)
    for p, shadow in zip(pipe.unet.parameters(), ema["shadow_params"]):
        torch.testing.assert_close(p.data, shadow, rtol=0, atol=0)
    teacher = unet_weights(tiny / "teacher")
    assert any(not torch.equal(v, teacher[k]) for k, v in pipe.unet.state_dict().items())

    noise, labels = torch.randn(4, 3, RES, RES, generator=torch.Generator().manual_seed(1)), [0, 1, 2, 3]
    images = pipe(batch_size=4, class_labels=labels, num_inference_steps=1, latents=noise, output_type="pt").images
    with torch.no_grad():  # the script's own generator under the run's flags
        x = script.generate(args, pipe.unet, noise, torch.tensor(labels), 5)
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)


def test_edm_pickle_teacher_trains_and_saves_an_edm_pickle_of_the_same_generator(tiny, tmp_path):
    out = run(tiny, tmp_path / "edm", "--pretrained_teacher_model", tiny / "edm-teacher.pkl", "--edm_repo", EDM_TOY,
              "--feature_layers", "enc:1 bottleneck dec:1", "--learning_rate", "1e-3", "--precond", "edm",
              data="edm.zip")
    assert [r["step"] for r in metrics(out)] == [1, 2] and (out / "samples.png").exists()
    with open(out / "network-snapshot.pkl", "rb") as f:
        net = pickle.load(f)["ema"]
    with open(tiny / "edm-teacher.pkl", "rb") as f:
        teacher = pickle.load(f)["ema"]
    assert type(net).__name__ == "ToyEDMPrecond" and not any(p.requires_grad for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(net.state_dict().values(), teacher.state_dict().values()))
    # EDM's own sampler with num_steps=1 (S_churn=0): x = x̂ + (0 − t)(x̂ − D(x̂; t))/t.
    z, labels = torch.randn(4, 3, RES, RES), torch.tensor([0, 1, 2, 3])
    onehot = torch.eye(5)[labels]
    with torch.no_grad():
        x_hat = z.double() * 80.0
        edm = x_hat + (0 - 80.0) * (x_hat - net(x_hat.float(), torch.full((4,), 80.0), onehot).double()) / 80.0
        ours = tfd_utils.edm_net_one_step(net, z, labels, 80.0)
    torch.testing.assert_close(ours.double(), edm, atol=1e-4, rtol=0)


def test_resumed_run_continues_exactly(tiny, tmp_path):
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--use_ema", "--ema_decay", "0.9"]
    full = run(tiny, tmp_path / "full", *extra)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")  # as if killed after saving it
    with open(resumed / "metrics.jsonl", "w") as f:  # the killed run's log also ran past the checkpoint
        f.writelines(json.dumps(r) + "\n" for r in metrics(full)[:3])
    run(tiny, resumed, *extra, "--resume_from_checkpoint", "latest")
    a, b = metrics(full), metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a[2:], b[2:]):
        for key in ("loss/total", "loss/drift", "loss/anchor", "sigma/mean", "train/grad_norm"):
            assert ra[key] == rb[key], (ra["step"], key)
    wa, wb = unet_weights(full / "unet"), unet_weights(resumed / "unet")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_student_autocast_and_bf16_teacher(tiny, tmp_path):
    out = run(tiny, tmp_path / "bf16", "--mixed_precision", "bf16", "--teacher_dtype", "bf16")
    rows = metrics(out)
    assert len(rows) == 2 and all(np.isfinite(r["loss/total"]) and r["train/bad_steps"] == 0 for r in rows)
    assert unet_weights(out / "unet")["conv_in.weight"].dtype == torch.float32  # master weights stay fp32


def test_gradient_accumulation_counts_updates_not_micro_batches(tiny, tmp_path):
    out = run(tiny, tmp_path / "accum", "--gradient_accumulation_steps", "2", "--max_train_steps", "2",
              "--checkpointing_steps", "2")
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    sampler = torch.load(out / "checkpoint-2" / "custom_checkpoint_0.pkl", weights_only=False)
    assert sampler["draws"] == 4  # two micro-batches per update, each its own class draw


def test_the_student_learns_the_class_images(tiny, tmp_path):
    """Distance from each class's one-step samples to that class's real images falls while training."""
    from diffusers import UNet2DModel

    out = run(tiny, tmp_path / "learn", "--max_train_steps", "30", "--learning_rate", "1e-3",
              "--num_generated", "4", "--num_positives", "6", "--num_anchors", "2", "--classes_per_batch", "4",
              "--logging_steps", "10", "--feature_layers", "conv_in down_blocks.0 mid_block")
    images, labels = class_images()
    real = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = torch.tensor(labels)
    noise = torch.randn(32, 3, RES, RES, generator=torch.Generator().manual_seed(3))
    gen_labels = torch.arange(32) % NUM_CLASSES

    def class_distance(unet):
        with torch.no_grad():
            x = tfd_utils.edm_one_step(unet.eval(), noise, gen_labels)
        d = torch.cdist(x.flatten(1), real.flatten(1)) / (3 * RES * RES) ** 0.5  # RMS pixel distance
        same = labels[None, :] == gen_labels[:, None]
        return d[same].reshape(32, PER_CLASS).min(dim=1).values.mean().item()

    before = class_distance(UNet2DModel.from_pretrained(tiny / "teacher"))
    after = class_distance(UNet2DModel.from_pretrained(out / "unet"))
    print(f"class distance before {before:.4f} after {after:.4f}")
    assert after < 0.7 * before, (before, after)


def test_periodic_fid_runs_through_the_project_fid_code(tiny, tmp_path):
    import tfd_fid

    ref = tmp_path / "ref.npz"  # any valid statistics do: this checks the code path, not the number
    tfd_fid.save_reference_stats(ref, np.zeros(2048), np.eye(2048))
    out = run(tiny, tmp_path / "fid", "--eval_fid_every", "2", "--fid_reference_stats", ref, "--fid_num_samples", "6",
              "--fid_batch_size", "6")
    fids = [r["eval/fid"] for r in metrics(out) if "eval/fid" in r]
    assert len(fids) == 1 and np.isfinite(fids[0]) and fids[0] > 0


def test_non_finite_steps_are_skipped_then_stop_naming_the_last_checkpoint(tiny, tmp_path):
    with pytest.raises(RuntimeError, match=r"3 consecutive non-finite steps.*checkpoint-1"):
        run(tiny, tmp_path / "nan", "--learning_rate", "1e30", "--max_train_steps", "10", "--checkpointing_steps", "1",
            "--max_bad_steps", "3", "--max_grad_norm", "1e30")
    rows = metrics(tmp_path / "nan")
    assert rows[-1]["train/bad_steps"] >= 1


# ------------------------------------------------------------------------------------------------
# Bad inputs: clear, early errors.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, data, error, match", [
    (["--feature_layers", "down_blocks.0 mid_blok"], "data", ValueError,
     r"Unknown teacher layer 'mid_blok'.*mid_block"),
    ([], "data_y", ValueError, r"no label column 'label'.*\['image', 'y'\].*--label_column"),
    (["--class_ids", "0-4"], "data", ValueError, r"Classes \[4\] named by --class_ids have no images"),
    (["--pretrained_teacher_model", "{tiny}/uncond_teacher"], "data", ValueError, "has no class embeddings"),
    (["--num_generated", "1"], "data", ValueError,
     r"--num_generated 1: must be >= 2 \(the generated samples of a group are each other's negatives\)"),
    (["--precond", "edm"], "data", ValueError, "--precond edm needs an NVlabs EDM network pickle"),
    (["--eval_fid_every", "10", "--fid_reference_stats", "{tiny}/missing.npz"], "data", FileNotFoundError,
     "fid_reference_stats"),
    (["--classes_per_batch", "5"], "data", ValueError, "lower --classes_per_batch"),
    (["--pretrained_teacher_model", "{tiny}/edm-teacher.pkl"], "edm.zip", ModuleNotFoundError, "--edm_repo"),
    (["--pretrained_teacher_model", "{tiny}/edm-teacher.pkl", "--edm_repo", EDM_TOY, "--teacher_dtype", "bf16"],
     "edm.zip", ValueError, r"An EDM pickle's feature pass runs in float32 .*: drop --teacher_dtype\."),
])
def test_bad_inputs_fail_early_with_a_clear_error(tiny, tmp_path, extra, data, error, match, monkeypatch):
    if "edm-teacher" in " ".join(extra):  # unpickling needs --edm_repo: the toy module unimportable for this test
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p != EDM_TOY])
        monkeypatch.delitem(sys.modules, "toy_edm_networks", raising=False)
    extra = [e.format(tiny=tiny) for e in extra]
    with pytest.raises(error, match=match):
        run(tiny, tmp_path / "bad", *extra, data=data)
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_unknown_layers_fail_before_any_weight_loads(tiny, tmp_path, monkeypatch):
    """A diffusers teacher's --feature_layers are checked on its config (a UNet2DModel built on the meta device),
    read from the teacher folder or a pipeline folder's unet/, before any weight is read; good names go on to
    load the weights."""
    import shutil

    from diffusers import UNet2DModel

    def no_weights(cls, *args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(UNet2DModel, "from_pretrained", classmethod(no_weights))
    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny / "teacher", pipeline / "unet")
    (pipeline / "model_index.json").write_text('{"_class_name": "ConsistencyModelPipeline"}\n')
    for teacher in (tiny / "teacher", pipeline):
        for layers, match in (("down_blocks.0 mid_blok", r"Unknown teacher layer 'mid_blok'.*Did you mean mid_block"),
                              ("enc:99", r"Layer selector 'enc:99' is out of range")):
            with pytest.raises(ValueError, match=match):
                run(tiny, tmp_path / "out", "--pretrained_teacher_model", teacher, "--feature_layers", layers)
        with pytest.raises(AssertionError, match="weights loaded"):  # good names: on to the weights
            run(tiny, tmp_path / "out", "--pretrained_teacher_model", teacher)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_output_dir_of_another_run_needs_resume(tiny, tmp_path):
    out = tmp_path / "taken"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoint-7" / tfd_training.CHECKPOINT_COMPLETE).write_text("7\n")
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint latest"):
        run(tiny, out)
