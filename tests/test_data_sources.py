# Where prompts and real images come from: --dataset_split slices, --streaming, img2dataset-style webdataset
# shards, URL columns; and the slices of train_tfd_imagenet64.py's labelled images. Small data written by the
# tests, offline, CPU.
import io
import json
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import tfd_text2image
import train_tfd_imagenet64 as imagenet64
import train_tfd_sdxl as sdxl
from scaling_helpers import reset_accelerate

# Six rows; row 4's caption repeats row 1's (another spelling), so matching crosses the two shards.
CAPTIONS = ["a red cube", "a blue sphere", "a green cone", "a yellow star", "A blue sphere.", "a white cat"]
N = len(CAPTIONS)


def colour(i):
    return (40 * i + 10, 200 - 30 * i, (70 * i) % 256)


def row_image(i, size=(24, 20)):
    return Image.new("RGB", size, colour(i))


def assert_row_image(image, i):
    """A decoded image is row i's (uniform colour; JPEG within a few levels)."""
    mean = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
    assert np.abs(mean - colour(i)).max() < 4, (mean, colour(i))


def write_shard(path, rows, broken=None):
    """A webdataset shard as img2dataset writes it: <key>.jpg, <key>.txt, <key>.json per sample
    (broken: {row: the bytes of its .jpg instead})."""
    with tarfile.open(path, "w") as tar:
        for i in rows:
            key = f"{i:09d}"
            buf = io.BytesIO()
            row_image(i).save(buf, format="JPEG", quality=95)
            jpg = (broken or {}).get(i, buf.getvalue())
            meta = json.dumps({"key": key, "caption": CAPTIONS[i], "status": "success"}).encode()
            for ext, data in (("jpg", jpg), ("txt", CAPTIONS[i].encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same six captioned images as a save_to_disk folder, a parquet folder (load_dataset, streamable),
    two webdataset shards (rows 0-2, 3-5); a JSON-lines data set whose image column holds URLs."""
    import datasets

    root = tmp_path_factory.mktemp("data_sources")
    feats = datasets.Features({"text": datasets.Value("string"), "image": datasets.Image()})
    ds = datasets.Dataset.from_dict({"text": CAPTIONS, "image": [row_image(i) for i in range(N)]}, features=feats)
    ds.save_to_disk(str(root / "disk"))
    (root / "parquet").mkdir()
    ds.to_parquet(str(root / "parquet" / "train.parquet"))
    (root / "shards").mkdir()
    write_shard(root / "shards" / "00000.tar", range(3))
    write_shard(root / "shards" / "00001.tar", range(3, N))
    (root / "laion").mkdir()
    with open(root / "laion" / "train.jsonl", "w") as f:
        for i, cap in enumerate(CAPTIONS):
            f.write(json.dumps({"TEXT": cap, "URL": f"https://example.com/{i}.jpg"}) + "\n")
    return root


def t2i_args(tmp_path, *argv):
    return sdxl.parse_args(["--pretrained_model_name_or_path", "unused", "--cache_dir", str(tmp_path / "hf_cache"),
                            "--output_dir", str(tmp_path / "out"), *map(str, argv)])


def shard_args(sources, tmp_path, *argv):
    return t2i_args(tmp_path, "--dataset_name", "webdataset", "--data_files",
                    str(sources / "shards" / "{00000..00001}.tar"), "--image_column", "jpg", "--caption_column", "txt",
                    *argv)


def check_prompts_and_images(args, rows):
    """load_prompts gives the captions of exactly these source rows, and each prompt's real images are
    the images of the source rows whose caption matches it."""
    prompts, real, ds, _ = tfd_text2image.load_prompts(args)
    want = []
    for i in rows:
        key = tfd_text2image.normalize_caption(CAPTIONS[i])
        if key not in [tfd_text2image.normalize_caption(p) for p in want]:
            want.append(CAPTIONS[i])
    assert prompts == want
    for prompt in prompts:
        key = tfd_text2image.normalize_caption(prompt)
        sources = [i for i in rows if tfd_text2image.normalize_caption(CAPTIONS[i]) == key]
        assert len(real[key]) == len(sources), prompt
        for ds_row, i in zip(real[key], sources):
            assert_row_image(ds[ds_row][args.image_column], i)
    return prompts, real, ds


# ----------------------------------------------------------------------------------------------
# --dataset_split slices, every text-to-image source.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split, rows", [("train[:3]", range(3)), ("train[1:]", range(1, N)),
                                         ("train[2:4]", range(2, 4)), ("train", range(N))])
def test_split_slices_of_every_text_to_image_source(sources, tmp_path, split, rows):
    check_prompts_and_images(t2i_args(tmp_path, "--dataset_name", sources / "disk", "--image_column", "image",
                                      "--dataset_split", split), rows)
    check_prompts_and_images(t2i_args(tmp_path, "--dataset_name", sources / "parquet", "--image_column", "image",
                                      "--dataset_split", split), rows)
    check_prompts_and_images(shard_args(sources, tmp_path, "--dataset_split", split), rows)
    # Streaming: the slice, then at most --max_train_samples rows of it.
    stream = t2i_args(tmp_path, "--dataset_name", sources / "parquet", "--image_column", "image", "--dataset_split",
                      split, "--streaming", "--max_train_samples", 2)
    check_prompts_and_images(stream, list(rows)[:2])
    check_prompts_and_images(shard_args(sources, tmp_path, "--dataset_split", split, "--streaming",
                                        "--max_train_samples", 100), rows)


def test_bad_split_names_and_slices_fail_clearly(sources, tmp_path):
    with pytest.raises(ValueError, match="--dataset_split"):
        tfd_text2image.load_prompts(t2i_args(tmp_path, "--dataset_name", sources / "disk", "--dataset_split",
                                             "train[:x]"))
    with pytest.raises(ValueError, match=r"no split 'test'"):
        datasets_dict = tmp_path / "dict"
        import datasets

        splits = datasets.DatasetDict({"train": datasets.load_from_disk(str(sources / "disk"))})
        splits.save_to_disk(str(datasets_dict))
        tfd_text2image.load_prompts(t2i_args(tmp_path, "--dataset_name", datasets_dict, "--dataset_split", "test"))
    # A stream has no end to count back from: a negative slice cannot be streamed.
    with pytest.raises(ValueError, match="--streaming"):
        tfd_text2image.load_prompts(t2i_args(tmp_path, "--dataset_name", sources / "parquet", "--dataset_split",
                                             "train[-2:]", "--streaming", "--max_train_samples", 2))


# ----------------------------------------------------------------------------------------------
# --streaming: only the first --max_train_samples rows are read.
# ----------------------------------------------------------------------------------------------


def test_streaming_needs_max_train_samples(sources, tmp_path):
    with pytest.raises(ValueError, match="--streaming reads the first --max_train_samples rows"):
        t2i_args(tmp_path, "--dataset_name", sources / "parquet", "--streaming")
    import train_tfd_sd3

    with pytest.raises(ValueError, match="--max_train_samples"):
        train_tfd_sd3.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "d", "--streaming"])


def test_streaming_reads_only_the_first_rows(sources, tmp_path):
    """The first 4 rows become prompts and real images, in order; nothing past them is read: the only
    rows written to the datasets cache are those 4, and a broken shard after them is never opened."""
    import datasets

    args = t2i_args(tmp_path, "--dataset_name", sources / "parquet", "--image_column", "image", "--streaming",
                    "--max_train_samples", 4)
    prompts, real, ds = check_prompts_and_images(args, range(4))
    assert prompts == ["a red cube", "a blue sphere", "a green cone", "a yellow star"]
    assert len(ds) == 4
    arrow_rows = sum(len(datasets.Dataset.from_file(str(p))) for p in (tmp_path / "hf_cache").rglob("*.arrow"))
    assert arrow_rows == 4  # a whole download (non-streaming) would have written all 6

    broken = tmp_path / "broken_shards"
    broken.mkdir()
    write_shard(broken / "00000.tar", range(4))
    (broken / "00001.tar").write_bytes(b"\0garbage, not a tar" * 100)
    argv = ["--dataset_name", "webdataset", "--data_files", str(broken / "{00000..00001}.tar"), "--image_column",
            "jpg", "--caption_column", "txt"]
    check_prompts_and_images(t2i_args(tmp_path, *argv, "--streaming", "--max_train_samples", 3), range(3))
    with pytest.raises(Exception):  # read whole, the broken shard is reached
        tfd_text2image.load_prompts(t2i_args(tmp_path / "whole", *argv))


# ----------------------------------------------------------------------------------------------
# Webdataset shards as img2dataset writes them; URL columns.
# ----------------------------------------------------------------------------------------------


def test_webdataset_shards_prompts_and_matching_across_shards(sources, tmp_path):
    assert tfd_text2image.expand_braces(str(sources / "shards" / "{00000..00001}.tar")) == [
        str(sources / "shards" / "00000.tar"), str(sources / "shards" / "00001.tar")]
    prompts, real, ds = check_prompts_and_images(shard_args(sources, tmp_path), range(N))
    assert len(prompts) == 5 and len(real["a blue sphere"]) == 2  # rows 1 (shard 0) and 4 (shard 1)
    assert {ds[r]["__key__"] for r in real["a blue sphere"]} == {"000000001", "000000004"}


@pytest.mark.parametrize("streaming", [False, True])
def test_webdataset_shards_fill_the_positive_cache_with_their_images(sources, tmp_path, tiny_sdxl_dir, streaming):
    """--prepare_positives_only on the shards: each prompt's cache entry starts with the VAE latents of its
    matching shard images, then teacher samples."""
    from diffusers import StableDiffusionXLPipeline

    cache = tmp_path / "cache"
    argv = ["--pretrained_model_name_or_path", tiny_sdxl_dir, "--dataset_name", "webdataset", "--data_files",
            str(sources / "shards" / "{00000..00001}.tar"), "--image_column", "jpg", "--caption_column", "txt",
            "--resolution", "32", "--num_positive_steps", "1", "--num_positives", "2", "--cache_dtype", "float32",
            "--positive_cache_dir", str(cache), "--output_dir", str(tmp_path / "out"), "--report_to", "none",
            "--cache_dir", str(tmp_path / "hf_cache"), "--prepare_positives_only"]
    if streaming:
        argv += ["--streaming", "--max_train_samples", "5"]
    try:
        stats = sdxl.main(sdxl.parse_args(argv))
    finally:
        reset_accelerate()
    rows = range(5) if streaming else range(N)
    prompts = {tfd_text2image.normalize_caption(CAPTIONS[i]): CAPTIONS[i] for i in reversed(rows)}
    assert stats["generated"] == len(prompts)
    (settings_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    store = tfd_text2image.PositiveCache(str(cache), json.loads((settings_dir / "settings.json").read_text()))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    args = sdxl.parse_args(argv)
    _, real, ds, _ = tfd_text2image.load_prompts(args)
    blue = real["a blue sphere"]
    assert len(blue) == 2  # one image from each shard
    entry = store.load("a blue sphere", [f"real:{r}" for r in blue])
    for slot, r in enumerate(blue):
        with torch.no_grad():
            want = tfd_text2image.encode_image(pipe.vae, ds[r]["jpg"], 32, "cpu")
        torch.testing.assert_close(entry["positives"][slot], want)
    assert store.exists("a green cone", [f"real:{real['a green cone'][0]}", "teacher"])


def test_a_column_of_image_urls_fails_early_with_the_webdataset_recipe(sources, tmp_path, tiny_sdxl_dir):
    argv = ["--dataset_name", sources / "laion", "--caption_column", "TEXT", "--image_column", "URL"]
    with pytest.raises(ValueError, match="holds URLs") as err:
        tfd_text2image.load_prompts(t2i_args(tmp_path, *argv))
    assert tfd_text2image.WEBDATASET_RECIPE in str(err.value) and "img2dataset" in str(err.value)
    with pytest.raises(ValueError, match="img2dataset"):
        tfd_text2image.load_prompts(t2i_args(tmp_path, *argv, "--streaming", "--max_train_samples", 3))
    # Through the script: before any teacher weight is loaded or anything is written.
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="img2dataset"):
        try:
            sdxl.main(sdxl.parse_args(["--pretrained_model_name_or_path", tiny_sdxl_dir, "--output_dir", str(out),
                                       "--report_to", "none", "--cache_dir", str(tmp_path / "hf_cache"),
                                       *map(str, argv)]))
        finally:
            reset_accelerate()
    assert not (out / "positive_cache").exists() and not (out / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# train_tfd_imagenet64.py: slices of its labelled images.
# ----------------------------------------------------------------------------------------------

LABELS = [0, 1, 2, 0, 1, 2]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("labelled")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [row_image(i, (16, 16)) for i in range(N)], "label": LABELS},
                                    features=feats)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root / "disk"))
    (root / "parquet").mkdir()
    ds.to_parquet(str(root / "parquet" / "train.parquet"))
    with zipfile.ZipFile(root / "edm.zip", "w") as zf:
        names = []
        for i in range(N):
            buf = io.BytesIO()
            row_image(i, (16, 16)).save(buf, format="png")
            names.append(f"00000/img{i:08d}.png")
            zf.writestr(names[-1], buf.getvalue())
        zf.writestr("dataset.json", json.dumps({"labels": [[n, c] for n, c in zip(names, LABELS)]}))
    return root


def check_labelled(kw, split, rows):
    labels, fetch, desc = imagenet64.open_labelled_images(split=split, **kw)
    assert labels.tolist() == [LABELS[i] for i in rows], (kw, split)
    for image, i in zip(fetch(range(len(rows))), rows):
        assert_row_image(image, i)
    return desc


@pytest.mark.parametrize("split, rows", [("train[:3]", range(3)), ("train[1:]", range(1, N)),
                                         ("train[-2:]", range(N - 2, N))])
def test_imagenet64_split_slices(labelled, tmp_path, split, rows):
    check_labelled({"dataset_name": str(labelled / "disk")}, split, rows)
    check_labelled({"dataset_name": str(labelled / "parquet"), "cache_dir": str(tmp_path / "c")}, split, rows)
    args = imagenet64.parse_args(["--pretrained_teacher_model", "x", "--dataset_name", str(labelled / "disk"),
                                  "--dataset_split", split])
    assert args.dataset_split == split


def test_imagenet64_split_slice_of_an_edm_zip(labelled):
    check_labelled({"dataset_name": str(labelled / "edm.zip")}, "train[:3]", range(3))


def test_imagenet64_bad_split_fails_at_parse_time():
    with pytest.raises(ValueError, match="--dataset_split"):
        imagenet64.parse_args(["--pretrained_teacher_model", "x", "--dataset_name", "d", "--dataset_split",
                               "train[a:]"])


# ----------------------------------------------------------------------------------------------
# Real images that cannot be decoded: every text-to-image source names them by file or shard key.
# ----------------------------------------------------------------------------------------------


def truncated_jpeg(i):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()[:300]


def refusal(tmp_path, tiny_sdxl_dir, *argv):
    """The message of --prepare_positives_only's refusal of the data's bad real images (--max_bad_images 0)."""
    args = sdxl.parse_args(["--pretrained_model_name_or_path", tiny_sdxl_dir, "--resolution", "32",
                            "--num_positive_steps", "1", "--num_positives", "1", "--positive_cache_dir",
                            str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--report_to", "none",
                            "--cache_dir", str(tmp_path / "hf_cache"), "--prepare_positives_only", *map(str, argv)])
    try:
        with pytest.raises(ValueError, match="cannot be decoded, more than --max_bad_images 0") as err:
            sdxl.main(args)
    finally:
        reset_accelerate()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    return str(err.value)


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_webdataset_images_are_named_by_shard_and_member(tmp_path, tiny_sdxl_dir, streaming):
    """A truncated JPEG in a shard (the only image of 'a white cat'): named by its tar member and shard.
    Streamed, the rows are copied undecoded (datasets would decode the image while copying, failing unnamed)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "00000.tar", range(3))
    write_shard(shards / "00001.tar", range(3, N), broken={5: truncated_jpeg(5)})
    argv = ["--dataset_name", "webdataset", "--data_files", shards / "{00000..00001}.tar", "--image_column", "jpg",
            "--caption_column", "txt"] + (["--streaming", "--max_train_samples", 6] if streaming else [])
    message = refusal(tmp_path, tiny_sdxl_dir, *argv)
    assert message.startswith("1 of 5 images of webdataset (prompts missing from the positive cache) cannot be "
                              "decoded")
    assert f": 000000005.jpg in {shards / '00001.tar'} (OSError: Truncated File Read)" in message


def test_bad_images_of_an_imagefolder_and_a_parquet_stream_are_named(tmp_path, tiny_sdxl_dir):
    """imagefolder (captions in metadata.jsonl): the file's path; a parquet stream of image bytes: the row."""
    import datasets

    folder = tmp_path / "folder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(4):
            row_image(i).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": CAPTIONS[i]}) + "\n")
    (folder / "2.png").write_bytes(b"garbage, not an image")
    message = refusal(tmp_path / "a", tiny_sdxl_dir, "--dataset_name", folder, "--image_column", "image")
    assert f": {folder / '2.png'} (UnidentifiedImageError: cannot identify image file " in message

    images = [{"bytes": b"", "path": None} if i == 1 else row_image(i) for i in range(4)]
    feats = datasets.Features({"text": datasets.Value("string"), "image": datasets.Image()})
    (tmp_path / "parquet").mkdir()
    datasets.Dataset.from_dict({"text": CAPTIONS[:4], "image": images}, features=feats).to_parquet(
        str(tmp_path / "parquet" / "train.parquet"))
    message = refusal(tmp_path / "b", tiny_sdxl_dir, "--dataset_name", tmp_path / "parquet", "--image_column", "image",
                      "--streaming", "--max_train_samples", 4)
    assert f": row 1 of {tmp_path / 'parquet'} (UnidentifiedImageError: cannot identify image file)." in message
