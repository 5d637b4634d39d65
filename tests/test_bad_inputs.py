"""The bad-input table of docs/bad_inputs.md: each row not already tested in
test_train_imagenet64.py / test_train_sdxl.py is tested here. Every case either fails early with an
error saying what to do, or is converted (image modes and sizes) and trains."""

import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import tfd_training
import tfd_utils
import tfd_text2image
import train_tfd_imagenet64 as inet
import train_tfd_sdxl as sdxl
from scaling_helpers import (imagenet_args, prompts_file, read_jsonl, run_in_process, sdxl_args,  # noqa: F401
                             tiny_imagenet)


def labelled(path, images, labels, label_type="int64"):
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value(label_type)})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=feats).save_to_disk(str(path))
    return str(path)


def png_bytes(array):
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="png")
    return buf.getvalue()


def good_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


def inet_run(tiny, out, *extra):
    return run_in_process(inet, imagenet_args(tiny, out, "--max_train_steps", 1, *extra))


def test_missing_and_empty_data(tiny_imagenet, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"--dataset_name .*nonexistent: no such file or folder"):
        inet_run(tiny_imagenet, out, "--dataset_name", tmp_path / "nonexistent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="doesn't contain any data files"):
        inet_run(tiny_imagenet, out, "--dataset_name", "", "--train_data_dir", tmp_path / "empty")
    empty_rows = labelled(tmp_path / "no_rows", [], [])
    with pytest.raises(ValueError, match="holds no images"):
        inet_run(tiny_imagenet, out, "--dataset_name", empty_rows)
    with pytest.raises(FileNotFoundError, match="--prompts_file .* does not exist"):
        sdxl.parse_args(["--pretrained_model_name_or_path", "x", "--prompts_file", str(tmp_path / "none.txt")])
    assert not out.exists()  # nothing was written


def test_image_modes_and_sizes_are_converted_and_train(tiny_imagenet, tmp_path):
    """Grayscale, RGBA, palette, CMYK, 16-bit and odd sizes: converted to the teacher's RGB 16×16."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)
    sixteen = (np.arange(24 * 30, dtype=np.uint16).reshape(24, 30) * 90)
    cases = {"L.png": Image.fromarray(rgb).convert("L"), "RGBA.png": Image.fromarray(rgb).convert("RGBA"),
             "P.png": Image.fromarray(rgb).convert("P"), "CMYK.jpg": Image.fromarray(rgb).convert("CMYK"),
             "I16.png": Image.fromarray(sixteen), "tiny.png": Image.fromarray(rgb[:5, :7]),
             "large.png": Image.fromarray(np.tile(rgb, (4, 6, 1)))}
    for c in (0, 1):
        (tmp_path / "folder" / str(c)).mkdir(parents=True)
        for name, im in cases.items():
            im.save(tmp_path / "folder" / str(c) / name)
    labels, fetch, _ = inet.open_labelled_images(train_data_dir=str(tmp_path / "folder"))
    data = inet.LabelledImages(labels, fetch, 3, 16, progress=False)
    assert data.data.shape == (14, 3, 16, 16) and data.data.dtype == torch.uint8
    opened = {name: Image.open(tmp_path / "folder" / "0" / name) for name in cases}
    assert opened["I16.png"].mode.startswith("I")  # a real 16-bit file
    x16 = inet.to_teacher_image(opened["I16.png"], 3, 16).float()
    assert 60 < x16.mean() < 200 and x16.std() > 20  # scaled to 8 bits, not clipped to white
    for name in ("L.png", "RGBA.png", "P.png"):
        want = inet.to_teacher_image(opened[name].convert("RGB"), 3, 16)
        assert torch.equal(inet.to_teacher_image(opened[name], 3, 16), want), name
    out = tmp_path / "out"
    inet_run(tiny_imagenet, out, "--dataset_name", "", "--train_data_dir", tmp_path / "folder", "--num_positives", 3,
             "--num_anchors", 2)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1] and (out / "unet").is_dir()


@torch.no_grad()
def test_sdxl_real_images_of_any_mode(tiny_sdxl_dir):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae")
    rgb = np.random.default_rng(2).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    for mode in ("L", "RGBA", "P", "CMYK"):
        im = Image.fromarray(rgb).convert(mode)
        got = tfd_text2image.encode_image(vae, im, 32, "cpu")
        assert got.shape == (4, 8, 8)
        torch.testing.assert_close(got, tfd_text2image.encode_image(vae, im.convert("RGB"), 32, "cpu"))
    sixteen = Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60))
    x16 = tfd_text2image.encode_image(vae, sixteen, 32, "cpu")
    eight = Image.fromarray((np.asarray(sixteen, dtype=np.float64) / 257).round().astype(np.uint8)).convert("RGB")
    torch.testing.assert_close(x16, tfd_text2image.encode_image(vae, eight, 32, "cpu"))  # rescaled to 8 bits
    white = tfd_text2image.encode_image(vae, Image.new("RGB", (32, 32), (255, 255, 255)), 32, "cpu")
    assert not torch.allclose(x16, white, atol=1e-3)  # not clipped to white


def test_labels_out_of_range_and_not_integers(tiny_imagenet, tmp_path):
    for bad in (7, -1):
        data = labelled(tmp_path / f"labels{bad}", good_images(6), [0, 0, 1, 1, bad, bad])
        with pytest.raises(ValueError, match=rf"labels \[{bad}\] outside the teacher's 5 classes \(0..4\)"):
            inet_run(tiny_imagenet, tmp_path / "out", "--dataset_name", data)
    data = labelled(tmp_path / "float_labels", good_images(4), [0.0, 0.5, 1.0, 1.0], label_type="float32")
    with pytest.raises(ValueError, match="must hold one integer class id per image"):
        inet_run(tiny_imagenet, tmp_path / "out", "--dataset_name", data)
    assert not (tmp_path / "out").exists()


def test_corrupted_images_are_named(tiny_imagenet, tmp_path, prompts_file, tiny_sdxl_dir):
    good = png_bytes(np.zeros((16, 16, 3), np.uint8))
    rows = [{"bytes": good, "path": None}] * 3 + [{"bytes": b"not an image at all", "path": None}] + \
           [{"bytes": good, "path": None}] * 2
    data = labelled(tmp_path / "garbled", rows, [0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match=r"Image 3 of the training data cannot be decoded \(UnidentifiedImageError.*"
                                         r"remove or re-encode it"):
        inet_run(tiny_imagenet, tmp_path / "out", "--dataset_name", data, "--num_positives", 1, "--num_anchors", 0)
    folder = tmp_path / "folder"
    for c in (0, 1):
        (folder / str(c)).mkdir(parents=True)
        for i in range(2):
            (folder / str(c) / f"{i}.png").write_bytes(good)
    (folder / "1" / "1.png").write_bytes(good[:40])  # truncated
    with pytest.raises(ValueError, match=r"cannot be decoded .*remove or re-encode it"):
        inet_run(tiny_imagenet, tmp_path / "out", "--dataset_name", "", "--train_data_dir", folder,
                 "--num_positives", 1, "--num_anchors", 0)

    captions = datasets.Dataset.from_dict(
        {"text": ["a red cube", "a blue sphere"], "image": [{"bytes": good, "path": None}, {"bytes": b"garbage", "path": None}]},
        features=datasets.Features({"text": datasets.Value("string"), "image": datasets.Image()}))
    captions.save_to_disk(str(tmp_path / "captions"))
    argv = sdxl_args(tiny_sdxl_dir, prompts_file, tmp_path / "sdxl", tmp_path / "cache", "--prepare_positives_only")
    i = argv.index("--prompts_file")
    argv[i:i + 2] = ["--dataset_name", str(tmp_path / "captions"), "--image_column", "image"]
    with pytest.raises(ValueError, match=r"Row 1 of .*captions: its 'image' image cannot be decoded.*re-encode"):
        run_in_process(sdxl, argv)


def test_unknown_flag_values(tiny_imagenet, tmp_path, capsys):
    base = imagenet_args(tiny_imagenet, tmp_path / "out")
    for extra, message in ((["--drift_kernel", "gaussian"], "invalid choice: 'gaussian'"),
                           (["--learning_rte", "1"], "unrecognized arguments: --learning_rte"),
                           (["--mixed_precision", "fp8"], "invalid choice: 'fp8'")):
        with pytest.raises(SystemExit):
            inet.parse_args(base + extra)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--class_ids 'a-b': give class ids and ranges"):
        inet.parse_args(base + ["--class_ids", "a-b"])
    with pytest.raises(ValueError, match=r"'0.1,x' is not a list of numbers"):
        inet.parse_args(base + ["--drift_radii", "0.1,x"])
    for extra, message in ((["--lr_scheduler", "cosine_wobble"], "invalid choice: 'cosine_wobble'"),
                           (["--report_to", "tensorbored"], "invalid choice: 'tensorbored'")):
        with pytest.raises(SystemExit):  # at parse time, before the teacher, data and student are built
            inet.parse_args(base + extra)
        assert message in capsys.readouterr().err
    s_base = sdxl_args("x", str(tmp_path / "p.txt"), tmp_path / "o", tmp_path / "c")
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(SystemExit):
        sdxl.parse_args(s_base + ["--train_mode", "qlora"])
    assert "invalid choice: 'qlora'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--resolution 30 must be a multiple of 8"):
        sdxl.parse_args(s_base + ["--resolution", "30"])
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint '.*nope' does not exist"):
        inet_run(tiny_imagenet, tmp_path / "out3", "--resume_from_checkpoint", tmp_path / "nope")


def test_output_dir_holding_another_run(tiny_imagenet, tiny_sdxl_dir, prompts_file, tmp_path):
    # A finished run without checkpoints (its export) or a run killed before its first checkpoint
    # (metrics only) is another run too: never overwritten silently.
    for name in ("model_index.json", "metrics.jsonl"):
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text('{"step": 5, "loss/total": 1.0}\n')
        with pytest.raises(FileExistsError, match=rf"already holds another run \({name}\).*--resume_from_checkpoint"):
            inet_run(tiny_imagenet, out, "--dataset_name", tiny_imagenet / "data")
        assert (out / name).read_text() == '{"step": 5, "loss/total": 1.0}\n'
    lora_out = tmp_path / "lora"
    lora_out.mkdir()
    (lora_out / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="pytorch_lora_weights.safetensors"):
        run_in_process(sdxl, sdxl_args(tiny_sdxl_dir, prompts_file, lora_out, tmp_path / "cache"))
    # Resuming a run killed before its first checkpoint: a new run, whose log replaces the old lines.
    out = tmp_path / "metrics"
    inet_run(tiny_imagenet, out, "--resume_from_checkpoint", "latest")
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert "loss/total" in read_jsonl(out / "metrics.jsonl")[0] and (out / "unet").is_dir()
    assert os.listdir(out).count("metrics.jsonl") == 1


def _parser_of(script):
    """The script's own ArgumentParser, as parse_args builds it."""
    import argparse

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, argv=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        script.parse_args([])
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


def _out_of_range(rule, kind):
    """A value just outside a check_ranges rule (">= x", "> x", "a..b")."""
    rule = rule if isinstance(rule, str) else rule[0]
    if ".." in rule:
        return kind(float(rule.split("..")[1]) + 1)
    op, bound = rule.split()
    bound = float(bound)
    return kind(bound - 1) if op == ">=" else kind(bound) if kind is int else bound - 0.5


FREE = {"feature_noise_mean"}  # any real number is a valid mean of log σ


@pytest.mark.parametrize("name", ["train_tfd_imagenet64", "train_tfd_sdxl", "train_tfd_sd3"])
def test_every_numeric_flag_has_a_range_and_out_of_range_values_are_refused_naming_the_flag(name, tmp_path):
    """A new user's nonsense (--drift_radii -0.1, --feature_pool_size 0, --lora_rank 0, ...) fails at parse
    time, before any model loads, with the flag named; every int/float flag of every script has a range."""
    import importlib

    script = importlib.import_module(name)
    parser = _parser_of(script)
    numeric = {a.dest: a.type for a in parser._actions if a.type in (int, float)}
    ranges = {**tfd_training.TRAINING_RANGES, **tfd_training.LOSS_RANGES, **script.RANGES}
    if name != "train_tfd_imagenet64":
        ranges.update(tfd_text2image.RANGES)
    assert set(numeric) - FREE <= set(ranges), set(numeric) - FREE - set(ranges)
    (tmp_path / "p.txt").write_text("a cat\n")
    base = (["--pretrained_model_name_or_path", "x", "--dataset_name", "x"] if name == "train_tfd_imagenet64" else
            ["--pretrained_model_name_or_path", "x", "--prompts_file", str(tmp_path / "p.txt")])
    script.parse_args(base)  # the base is valid
    for dest, kind in numeric.items():
        if dest in FREE:
            continue
        bad = _out_of_range(ranges[dest], kind)
        with pytest.raises(ValueError, match=rf"--{dest} {bad}: must be"):
            script.parse_args(base + [f"--{dest}", str(bad)])
    for extra, message in ((["--drift_radii", "-0.1"], r"--drift_radii \[-0\.1\]: give positive radii"),
                           (["--drift_radii", "0.05,0"], "--drift_radii"),
                           (["--feature_noise_min", "0.2", "--feature_noise_max", "0.1"],
                            "--feature_noise_min 0.2 is above --feature_noise_max 0.1"),
                           (["--feature_layers", " "], "--feature_layers: give at least one")):
        with pytest.raises(ValueError, match=message):
            script.parse_args(base + extra)
