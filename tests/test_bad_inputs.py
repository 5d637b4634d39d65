"""The bad-input table of docs/bad_inputs.md: each row not already tested in
test_train_imagenet64.py / test_train_sdxl.py is tested here. Every case either fails early with an
error saying what to do, or is converted (image modes and sizes) and trains."""

import io
import os
import struct
import zlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import tfd_text2image
import tfd_training
import train_tfd_imagenet64 as inet
import train_tfd_sdxl as sdxl
from scaling_helpers import imagenet_args, read_jsonl, run_in_process, script_parser, sdxl_args


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


# ----------------------------------------------------------------------------------------------
# Images that cannot be decoded: found before the first update, named by file, zip member or shard
# key, skipped up to --max_bad_images (counted in the log and metrics.jsonl), refused beyond it.
# ----------------------------------------------------------------------------------------------


def encoded(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def zero_size_png():
    """A PNG whose header says 0x5 pixels (PIL refuses to write one)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def bad_image_files(seed=0):
    """Every kind of bad image file: name → (bytes, what the check reports)."""
    noise = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    png, jpg = encoded(noise, "png"), encoded(noise, "jpeg", quality=95)
    return {"truncated.png": (png[: len(png) // 2], "OSError: image file is truncated"),
            "truncated.jpg": (jpg[: len(jpg) // 2], "OSError: image file is truncated"),
            "garbage.png": (b"\x00garbage, not an image" * 10, "UnidentifiedImageError: cannot identify image file"),
            "empty.jpg": (b"", "UnidentifiedImageError: cannot identify image file"),
            "zero_size.png": (zero_size_png(), "UnidentifiedImageError: cannot identify image file")}


def fine_image_files(seed=1):
    """Images that are not bad: 16-bit and CMYK files convert."""
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 18, 3), dtype=np.uint8))
    sixteen = Image.fromarray(np.arange(20 * 18, dtype=np.uint16).reshape(20, 18) * 150)
    return {"sixteen_bit.png": encoded(sixteen, "png"), "cmyk.jpg": encoded(rgb.convert("CMYK"), "jpeg")}


BAD, FINE = bad_image_files(), fine_image_files()


def labelled_files():
    """[(file name, bytes, label)] in the index order of every source: classes 0 and 1 with 6 good images each;
    the 5 bad kinds (3 in class 0, 2 in class 1) and the 16-bit and CMYK files (class 1) among them."""
    good = [png_bytes(im) for im in (np.asarray(g) for g in good_images(12, seed=3))]
    extra = {0: list(BAD)[:3], 1: list(BAD)[3:] + list(FINE)}
    files = []
    for c in (0, 1):
        items = [(f"good{k}.png", good[6 * c + k]) for k in range(6)]
        items += [(n, BAD[n][0] if n in BAD else FINE[n]) for n in extra[c]]
        items.sort(key=lambda item: item[0])  # datasets' imagefolder lists files sorted: one order for all sources
        files += [(f"{c}{k:02d}_{n}", data, c) for k, (n, data) in enumerate(items)]
    return files


def write_labelled_source(kind, root, files):
    """The files as one labelled source; returns (script flags, {index: how messages name that image})."""
    import json
    import zipfile

    path = root / kind
    if kind in ("disk_bytes", "disk_files"):
        if kind == "disk_files":
            (root / "files").mkdir()
            for n, data, _ in files:
                (root / "files" / n).write_bytes(data)
        images = [str(root / "files" / n) if kind == "disk_files" else {"bytes": data, "path": None}
                  for n, data, _ in files]
        labelled(path, images, [c for *_, c in files])
        names = {i: f"{n} (row {i} of {path})" if kind == "disk_files" else f"row {i} of {path}"
                 for i, (n, *_) in enumerate(files)}
        return ["--dataset_name", path], names
    if kind == "imagefolder":
        for n, data, c in files:
            (path / str(c)).mkdir(parents=True, exist_ok=True)
            (path / str(c) / n).write_bytes(data)
        return ["--dataset_name", "", "--train_data_dir", path], {
            i: str(path / str(c) / n) for i, (n, _, c) in enumerate(files)}
    members = [f"00000/{n}" for n, *_ in files]
    meta = json.dumps({"labels": [[m, c] for m, (*_, c) in zip(members, files)]})
    if kind == "edm_zip":
        path = root / "edm.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for m, (_, data, _) in zip(members, files):
                zf.writestr(m, data)
            zf.writestr("dataset.json", meta)
        return ["--dataset_name", path], {i: f"{m} in {path}" for i, m in enumerate(members)}
    (path / "00000").mkdir(parents=True)
    for m, (_, data, _) in zip(members, files):
        (path / m).write_bytes(data)
    (path / "dataset.json").write_text(meta)
    return ["--dataset_name", path], {i: str(path / m) for i, m in enumerate(members)}


SOURCES = ["disk_bytes", "disk_files", "imagefolder", "edm_zip", "edm_folder"]


@pytest.mark.parametrize("source", SOURCES)
def test_bad_imagenet64_images_are_named_by_file_and_refused_before_training(tiny_imagenet, tmp_path, source):
    files = labelled_files()
    flags, names = write_labelled_source(source, tmp_path, files)
    bad = {i: BAD[n.split("_", 1)[1]][1] for i, (n, *_) in enumerate(files) if n.split("_", 1)[1] in BAD}
    assert len(bad) == 5
    out = tmp_path / "out"
    for preload in ("8", "0"):  # preloaded; decoded on the fly after the up-front check
        with pytest.raises(ValueError) as err:
            inet_run(tiny_imagenet, out, *flags, "--preload_max_gb", preload, "--num_positives", 1, "--num_anchors", 0)
        message = str(err.value)
        assert message.startswith(f"5 of {len(files)} images of ") and "more than --max_bad_images 0: " in message
        for i, reason in bad.items():
            assert f"{names[i]} ({reason}" in message, (names[i], message)
        assert message.endswith("Remove or re-encode them, or pass --max_bad_images 5 to train without them.")
        assert not out.exists()  # refused before anything is written


@pytest.mark.parametrize("source, preload", [("disk_bytes", "8"), ("disk_files", "0"), ("imagefolder", "8"),
                                             ("edm_zip", "0"), ("edm_folder", "8")])
def test_bad_imagenet64_images_are_skipped_counted_and_never_drawn(tiny_imagenet, tmp_path, source, preload,
                                                                 caplog, monkeypatch):
    """With --max_bad_images 5 the 5 bad images are skipped: a warning names each, one line sums them up,
    metrics.jsonl counts them, no draw of the run picks one; the 16-bit and CMYK images are used."""
    import logging

    files = labelled_files()
    flags, names = write_labelled_source(source, tmp_path, files)
    bad = {i for i, (n, *_) in enumerate(files) if n.split("_", 1)[1] in BAD}
    fine = {i for i, (n, *_) in enumerate(files) if n.split("_", 1)[1] in FINE}
    out, debug = tmp_path / "out", tmp_path / "debug"
    monkeypatch.setenv("TFD_DEBUG_DIR", str(debug))
    with caplog.at_level(logging.INFO):
        inet_run(tiny_imagenet, out, *flags, "--preload_max_gb", preload, "--max_bad_images", 5,
                 "--max_train_steps", 6, "--logging_steps", 3)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "bad image" in r.getMessage()]
    assert len(warnings) == 5
    for i in bad:
        assert any(f"Skipping a bad image: {names[i]} cannot be decoded (" in w for w in warnings), names[i]
    assert any(f"Images decoded before training: {len(files)} of " in r.getMessage() and
               r.getMessage().endswith("; 5 bad, skipped (--max_bad_images 5).") for r in caplog.records)
    assert [r["data/bad_images"] for r in read_jsonl(out / "metrics.jsonl")] == [5, 5]
    drawn = {i for r in read_jsonl(debug / "draws-rank0.jsonl") for row in r["indices"] for i in row}
    assert len(drawn) > 6 and not drawn & bad  # 6 steps x 2 classes x 5 images: most good ones, never a bad one
    labels, fetch, _ = inet.open_labelled_images(**({"train_data_dir": str(flags[3])} if source == "imagefolder"
                                                    else {"dataset_name": str(flags[1])}))
    data = inet.LabelledImages(labels, fetch, 3, 16, preload_max_gb=float(preload), progress=False)
    assert sorted(data.bad) == sorted(bad) and not set(data.bad) & fine
    assert (data.data is None) == (preload == "0")
    assert data.get(sorted(fine)).float().std() > 10  # the 16-bit and CMYK images convert


def test_a_class_whose_images_are_all_bad_is_not_trained(tiny_imagenet, tmp_path, caplog):
    import logging

    good = [png_bytes(np.asarray(g)) for g in good_images(10, seed=4)]
    files = [(f"{c}{k}.png", good[5 * c + k], c) for c in (0, 1) for k in range(5)]
    files += [("20_truncated.png", BAD["truncated.png"][0], 2), ("21_empty.jpg", BAD["empty.jpg"][0], 2)]
    flags, _ = write_labelled_source("edm_zip", tmp_path, files)
    with caplog.at_level(logging.INFO):
        inet_run(tiny_imagenet, tmp_path / "out", *flags, "--max_bad_images", 2)
    assert "3 of the teacher's 5 classes have no images and are not trained: [2, 3, 4]" in caplog.text
    assert "12 images (2 bad, skipped), 2 classes" in caplog.text
    with pytest.raises(ValueError, match=r"^Classes \[2\] named by --class_ids have no images in the data set\.$"):
        inet_run(tiny_imagenet, tmp_path / "out2", *flags, "--max_bad_images", 2, "--class_ids", "0-2")


def test_labelled_images_of_a_plain_fetch_name_zero_size_and_garbled_images():
    """A fetch that opens its own images (the benchmark's kind): a zero-size image and bytes PIL cannot read are
    found by index, with and without preloading; decoding one on the fly raises naming it."""
    good = good_images(4)
    empty = Image.fromarray(np.zeros((0, 4, 3), np.uint8))

    def fetch(idx):
        return [empty if i == 1 else tfd_training.open_image(b"garbage") if i == 3 else good[i] for i in idx]

    labels = torch.tensor([0, 0, 1, 1])
    for preload in (8.0, 0.0):
        data = inet.LabelledImages(labels, fetch, 3, 16, preload_max_gb=preload, progress=False)
        assert data.bad == {1: ("image 1", "ValueError: the image has no pixels (4x0)"),
                            3: ("image 3", "UnidentifiedImageError: cannot identify image file")}
    with pytest.raises(ValueError, match=r"^image 1 cannot be decoded \(ValueError: the image has no pixels "
                                         r"\(4x0\)\): remove or re-encode it\.$"):
        data.get([0, 1])


def t2i_data_args(tiny_sdxl_dir, tmp_path, data, *extra):
    """sdxl_args with a captioned data set (its 'image' column the real images) instead of a prompt file."""
    argv = sdxl_args(tiny_sdxl_dir, "unused", tmp_path / "out", tmp_path / "cache", *extra)
    i = argv.index("--prompts_file")
    argv[i:i + 2] = ["--dataset_name", str(data), "--image_column", "image"]
    return argv


def captioned_files(root):
    """A captioned data set made from files (save_to_disk keeps their names): 'a blue sphere' has a truncated
    image and then a good one, 'a green cone' only a garbled one; 16-bit and CMYK images are good."""
    files = [("cube.png", png_bytes(np.asarray(good_images(1, seed=5)[0])), "a red cube"),
             ("sphere_truncated.png", BAD["truncated.png"][0], "a blue sphere"),
             ("sphere.png", png_bytes(np.asarray(good_images(1, seed=6)[0])), "A blue sphere."),
             ("cone_garbage.png", BAD["garbage.png"][0], "a green cone"),
             ("star_16bit.png", FINE["sixteen_bit.png"], "a yellow star"),
             ("cat_cmyk.jpg", FINE["cmyk.jpg"], "a white cat")]
    (root / "files").mkdir()
    for name, data, _ in files:
        (root / "files" / name).write_bytes(data)
    datasets.Dataset.from_dict(
        {"text": [c for *_, c in files], "image": [str(root / "files" / n) for n, *_ in files]},
        features=datasets.Features({"text": datasets.Value("string"), "image": datasets.Image()}),
    ).save_to_disk(str(root / "captions"))
    return root / "captions"


def test_bad_real_images_leave_the_slot_plans_before_any_teacher_sampling(tiny_sdxl_dir, tmp_path, caplog):
    """SDXL real positives (a data set made from files): the images of every prompt missing from the cache are
    decoded first. Too many bad ones stop the run before any entry is made; within --max_bad_images each is
    named and skipped: 'a blue sphere' takes its next matching image, 'a green cone' (its only image bad) a
    teacher sample. A later training run on the cache finds the same plans: every entry is a hit."""
    import json
    import logging

    from diffusers import StableDiffusionXLPipeline

    data = captioned_files(tmp_path)
    argv = t2i_data_args(tiny_sdxl_dir, tmp_path, data, "--num_positives", 1)
    cache = tmp_path / "cache"

    with pytest.raises(ValueError) as err:
        run_in_process(sdxl, argv + ["--prepare_positives_only", "--max_bad_images", "1"])
    assert str(err.value) == (
        f"2 of 6 images of {data} (prompts missing from the positive cache) cannot be decoded, more than "
        f"--max_bad_images 1: sphere_truncated.png (row 1 of {data}) (OSError: image file is truncated); "
        f"cone_garbage.png (row 3 of {data}) (UnidentifiedImageError: cannot identify image file). Remove or "
        "re-encode them, or pass --max_bad_images 2 to train without them.")
    assert not list(cache.rglob("*.safetensors"))  # before any teacher sampling or encoding

    with caplog.at_level(logging.INFO):
        stats = run_in_process(sdxl, argv + ["--prepare_positives_only", "--max_bad_images", "2"])
    assert stats["generated"] == 5
    log = caplog.text
    assert (f"Skipping a bad image: sphere_truncated.png (row 1 of {data}) cannot be decoded (OSError: image "
            "file is truncated") in log
    assert (f"Skipping a bad image: cone_garbage.png (row 3 of {data}) cannot be decoded (UnidentifiedImageError: "
            "cannot identify image file).") in log
    assert "Images decoded before training: 6 of" in log and "2 bad, skipped (--max_bad_images 2)." in log
    assert "2 bad real images skipped." in log
    (settings_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    store = tfd_text2image.PositiveCache(str(cache), json.loads((settings_dir / "settings.json").read_text()))
    for prompt, slots in (("a red cube", ["real:0"]), ("a blue sphere", ["real:2"]), ("a green cone", ["teacher"]),
                          ("a yellow star", ["real:4"]), ("a white cat", ["real:5"])):
        assert store.exists(prompt, slots), (prompt, slots)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    sphere = tfd_text2image.encode_image(pipe.vae, str(tmp_path / "files" / "sphere.png"), 32, "cpu")
    torch.testing.assert_close(store.load("a blue sphere", ["real:2"])["positives"][0], sphere)

    out = tmp_path / "out"
    run_in_process(sdxl, argv + ["--max_bad_images", "2", "--max_train_steps", "3"])
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["cache/misses"] for r in records] == [0, 0, 0] and [r["cache/bad_images"] for r in records] == [2] * 3

    # A file that breaks after the check (a prompt drawn with an unchecked plan) still fails naming it.
    args = sdxl.parse_args(argv)
    _, real, ds, _ = tfd_text2image.load_prompts(args)
    positives = tfd_text2image.Positives(args, store, real, ds, pipe, "cpu", logger=logging.getLogger("t"))
    with pytest.raises(ValueError, match=rf"^sphere_truncated\.png \(row 1 of {data}\) cannot be decoded \(OSError: "
                                         r"image file is truncated.*\): remove or re-encode it\.$"):
        positives.make("a blue sphere", ["real:1"])


def test_bad_images_under_two_processes_give_both_the_same_plans_and_pools(tiny_sdxl_dir, tiny_imagenet, tmp_path):
    """accelerate launch, 2 CPU processes: the check is sharded and gathered, so both processes skip the same
    images. SDXL: --prepare_positives_only fills every prompt's bad-free plan once; ImageNet-64 decoded on the
    fly: neither process ever draws a bad image."""
    import json

    from scaling_helpers import launch

    data = captioned_files(tmp_path)
    proc = launch("train_tfd_sdxl.py", t2i_data_args(tiny_sdxl_dir, tmp_path, data, "--num_positives", 1,
                                                     "--prepare_positives_only", "--max_bad_images", 2))
    assert proc.stderr.count("2 bad real images skipped.") == 2  # each process's summary
    cache = tmp_path / "cache"
    (settings_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    store = tfd_text2image.PositiveCache(str(cache), json.loads((settings_dir / "settings.json").read_text()))
    for prompt, slots in (("a red cube", ["real:0"]), ("a blue sphere", ["real:2"]), ("a green cone", ["teacher"]),
                          ("a yellow star", ["real:4"]), ("a white cat", ["real:5"])):
        assert store.exists(prompt, slots), (prompt, slots)
    assert len(list(cache.rglob("*.safetensors"))) == 5

    files = labelled_files()
    flags, _ = write_labelled_source("edm_zip", tmp_path, files)
    bad = {i for i, (n, *_) in enumerate(files) if n.split("_", 1)[1] in BAD}
    debug = tmp_path / "debug"
    launch("train_tfd_imagenet64.py", imagenet_args(tiny_imagenet, tmp_path / "inet", *flags, "--preload_max_gb", 0,
                                                    "--max_bad_images", 5, "--max_train_steps", 4,
                                                    "--classes_per_batch", 1), TFD_DEBUG_DIR=debug)
    for rank in (0, 1):
        drawn = {i for r in read_jsonl(debug / f"draws-rank{rank}.jsonl") for row in r["indices"] for i in row}
        assert drawn and not drawn & bad, rank


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


def test_lora_under_fsdp_is_refused_before_any_weight_loads(tiny_sdxl_dir, prompts_file, tmp_path, monkeypatch):
    """The check itself, with an accelerator that reports FSDP (FSDP needs GPUs, or the FSDP test's runner)."""
    import logging
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    def no_weights(cls, *args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(no_weights))
    args = sdxl.parse_args(sdxl_args(tiny_sdxl_dir, prompts_file, tmp_path / "out", tmp_path / "c", "--train_mode",
                                     "lora"))
    fsdp = SimpleNamespace(distributed_type=SimpleNamespace(value="FSDP"))
    with pytest.raises(ValueError, match=r"^--train_mode lora under FSDP is not supported: LoRA weights are small, "
                                         r"use DDP \(examples/accelerate_configs/8gpu_ddp\.yaml\)\.$"):
        tfd_text2image.check_run(fsdp, args, UNet2DConditionModel, "unet", logging.getLogger("test"))
    args.train_mode = "full"  # a full fine-tune under FSDP passes the check
    tfd_text2image.check_run(fsdp, args, UNet2DConditionModel, "unet", logging.getLogger("test"))


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
    parser = script_parser(script)
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
