# train_tfd_sdxl.py end to end on a tiny random SDXL pipeline (tests/tiny_sdxl.py), offline, CPU.
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import tfd_text2image
import tfd_training
import tfd_utils
import train_tfd_sdxl as script
from scaling_helpers import run_in_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red cube", "a blue sphere", "a green cone", "a yellow star"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """save_to_disk data set: 'a red cube' has two images (one caption spelled differently), 'a blue
    sphere' one, the last two prompts none (null images)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)

    def image(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    ds = datasets.Dataset.from_dict(
        {"text": ["a red cube", "A  red cube.", "a blue sphere", "a green cone", "a yellow star"],
         "image": [image(40, 48), image(48, 40), image(36, 36), None, None]},
        features=datasets.Features({"text": datasets.Value("string"), "image": datasets.Image()}))
    path = tmp_path_factory.mktemp("sdxl_data") / "captions"
    ds.save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def teacher(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_args(teacher_dir, data_dir, out, cache, *extra):
    return ["--pretrained_model_name_or_path", teacher_dir, "--dataset_name", data_dir, "--image_column", "image",
            "--resolution", "32", "--num_positive_steps", "2", "--num_generated", "2", "--num_positives", "2",
            "--prompts_per_batch", "2", "--output_dir", str(out), "--positive_cache_dir", str(cache),
            "--cache_dtype", "float32", "--report_to", "none", "--lr_warmup_steps", "0", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--validation_steps", "0", "--validation_prompts", "a cat", "a dog", *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def embed(pipe, prompt):
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return pe, pooled


def script_args(t, *extra):
    """The script's parsed flags at --conditioning_timestep t (what `generate` reads)."""
    return script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "x", "--resolution", "32",
                              "--conditioning_timestep", str(t), *extra])


def student_latents(unet, pipe, prompt, noise, t=399, teacher_config=None):
    """The training generator (the script's own `generate`, with the one-step scheduler built from the teacher's
    config, as `build` makes it) for a prompt."""
    pe, pooled = embed(pipe, prompt)
    b = noise.shape[0]
    scheduler = tfd_text2image.vp_one_step_scheduler(teacher_config or pipe.scheduler.config, t)
    with torch.no_grad():
        return script.generate(script_args(t), unet, noise, pe.expand(b, -1, -1), pooled.expand(b, -1), scheduler)


def pipeline_latents(pipe, prompt, noise, **when):
    """The pipeline's latents from `noise`, no CFG; by default the plain one-step call (the model card's)."""
    when = when or {"num_inference_steps": 1}
    return pipe(prompt, guidance_scale=0.0, latents=noise.clone(), height=32, width=32,
                num_images_per_prompt=noise.shape[0], output_type="latent", **when).images


@pytest.mark.parametrize("t", [399, 999])
def test_one_step_scheduler_plain_call_and_lcm_at_t_equal_the_generator(teacher, t):
    """The saved one-step scheduler (DDIMScheduler, one step [t]) makes StableDiffusionXLPipeline's plain
    one-step call exactly the script's generator; DMD2's way, LCMScheduler with timesteps=[t], too."""
    from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionXLPipeline

    one_step = tfd_text2image.vp_one_step_scheduler(teacher.scheduler.config, t)
    assert isinstance(one_step, DDIMScheduler)
    torch.testing.assert_close(one_step.alphas_cumprod, teacher.scheduler.alphas_cumprod, rtol=0, atol=0)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = student_latents(teacher.unet, teacher, "a photo of a cat", noise, t)
    pipe = StableDiffusionXLPipeline(**{**teacher.components, "scheduler": one_step})
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(pipeline_latents(pipe, "a photo of a cat", noise), ours, atol=1e-5, rtol=1e-5)
    assert pipe.scheduler.timesteps.tolist() == [t]

    lcm = LCMScheduler.from_config(teacher.scheduler.config)
    pipe = StableDiffusionXLPipeline(**{**teacher.components, "scheduler": lcm})
    pipe.set_progress_bar_config(disable=True)
    torch.testing.assert_close(pipeline_latents(pipe, "a photo of a cat", noise, timesteps=[t]), ours,
                               atol=1e-5, rtol=1e-5)
    assert pipe.scheduler.timesteps.tolist() == [t]
    other = student_latents(teacher.unet, teacher, "a photo of a cat", noise, 399 if t == 999 else 999)
    assert not torch.allclose(ours, other, atol=1e-3)  # the timestep matters: the comparison is not vacuous
    assert ours.abs().mean() > (1.0 if t == 999 else 0.1)


def test_vp_teacher_forward_feeds_scaled_input_at_matching_timestep(teacher):
    """vp_teacher_forward = UNet((x+σξ)/√(1+σ²), t(σ)) with conditioning repeated per sample."""
    unet, ac = teacher.unet, teacher.scheduler.alphas_cumprod
    pe, pooled = embed(teacher, ["a", "b"])
    cond = {"text_embeds": pooled, "time_ids": script.sdxl_time_ids(32, 2)}
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.1, 0.1, 0.5, 0.5, 0.5])
    with torch.no_grad():
        out = tfd_utils.vp_teacher_forward(unet, ac, pe, cond)(x, sigma)
        t = tfd_utils.vp_timestep_for_sigma(sigma, ac)
        sig_t = tfd_utils.vp_sigmas(ac)
        assert torch.allclose(torch.tensor(np.interp(t.double().numpy(), np.arange(1000), sig_t.log().numpy())),
                              sigma.double().log(), atol=1e-4)
        ref = unet(x / (1 + sigma.view(-1, 1, 1, 1) ** 2).sqrt(), t, encoder_hidden_states=pe.repeat_interleave(3, 0),
                   added_cond_kwargs={k: v.repeat_interleave(3, 0) for k, v in cond.items()}).sample
    torch.testing.assert_close(out, ref)


def test_positive_cache_prepare_reuse_and_corruption(tiny_sdxl_dir, data_dir, teacher, tmp_path, caplog):
    cache_root = tmp_path / "cache"
    argv = base_args(tiny_sdxl_dir, data_dir, tmp_path / "out", cache_root, "--prepare_positives_only")
    stats = script.main(script.parse_args(argv))
    assert stats == {"hits": 0, "generated": 4, "regenerated": 0}
    (settings_dir,) = [p for p in cache_root.iterdir() if p.is_dir()]
    settings = json.loads((settings_dir / "settings.json").read_text())
    assert settings["num_positive_steps"] == 2 and settings["scheduler"]["beta_schedule"] == "scaled_linear"
    cache = tfd_text2image.PositiveCache(str(cache_root), settings)
    assert cache.dir == str(settings_dir)

    # Real positives: the VAE posterior mean of the center-cropped image, scaled; rows 0 and 1 match 'a red cube'.
    import datasets

    ds = datasets.load_from_disk(data_dir)
    red = cache.load("a red cube", ["real:0", "real:1"])
    for slot, row in enumerate([0, 1]):
        img = ds[row]["image"]
        expected = tfd_text2image.encode_image(teacher.vae, img, 32, "cpu")
        torch.testing.assert_close(red["positives"][slot], expected)
    pe, pooled = embed(teacher, "a red cube")
    torch.testing.assert_close(red["prompt_embeds"], pe[0])
    torch.testing.assert_close(red["pooled_prompt_embeds"], pooled[0])
    # Mixed: one real image, then a teacher sample (2 steps, CFG 6) seeded by (prompt, slot).
    blue = cache.load("a blue sphere", ["real:2", "teacher"])
    gen = torch.Generator().manual_seed(tfd_text2image.positive_seed("a blue sphere", 1, 0))
    sample = teacher("a blue sphere", num_inference_steps=2, guidance_scale=6.0, height=32, width=32,
                     generator=gen, output_type="latent").images[0]
    torch.testing.assert_close(blue["positives"][1], sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blue["positives"][0],
                               tfd_text2image.encode_image(teacher.vae, ds[2]["image"], 32, "cpu"))
    cone = cache.load("a green cone", ["teacher", "teacher"])
    assert not torch.allclose(cone["positives"][0], cone["positives"][1])  # different seeds per slot

    # A second run reuses every entry, untouched.
    files = sorted(settings_dir.glob("entries/*/*.safetensors"))
    assert len(files) == 4
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert script.main(script.parse_args(argv)) == {"hits": 4, "generated": 0, "regenerated": 0}
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    # A truncated entry is detected, reported and regenerated to the same content.
    path = cache.path("a green cone", ["teacher", "teacher"])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(tfd_text2image.CacheEntryError, match="unreadable"):
        cache.load("a green cone", ["teacher", "teacher"])
    star = cache.load("a yellow star", ["teacher", "teacher"])
    flipped = cache.path("a yellow star", ["teacher", "teacher"])  # same size, one data byte changed
    with open(flipped, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(tfd_text2image.CacheEntryError, match="checksum"):
        cache.load("a yellow star", ["teacher", "teacher"])
    caplog.set_level("WARNING")
    assert script.main(script.parse_args(argv)) == {"hits": 2, "generated": 2, "regenerated": 2}
    assert "unreadable" in caplog.text and "checksum mismatch" in caplog.text and "regenerating" in caplog.text
    torch.testing.assert_close(cache.load("a green cone", ["teacher", "teacher"])["positives"], cone["positives"])
    torch.testing.assert_close(cache.load("a yellow star", ["teacher", "teacher"])["positives"], star["positives"])

    # Other settings never reuse these entries: they get their own cache folder.
    other = script.main(script.parse_args(argv[:-1] + ["--positive_guidance_scale", "3.0",
                                                        "--prepare_positives_only"]))
    assert other["generated"] == 4 and len([p for p in cache_root.iterdir() if p.is_dir()]) == 2


def test_full_training_resume_and_exported_pipeline(tiny_sdxl_dir, data_dir, tmp_path):
    from diffusers import DDIMScheduler, DiffusionPipeline

    cache = tmp_path / "cache"
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    # A half-precision teacher (feature pass, positives, text encoders) and checkpointing in both UNets.
    precision = ["--teacher_dtype", "bf16", "--gradient_checkpointing"]
    student = script.main(script.parse_args(base_args(
        tiny_sdxl_dir, data_dir, out_a, cache, "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--validation_steps", "2", *precision)))
    log_a = metrics(out_a)
    assert sorted(log_a) == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss/total"]) and r["train/grad_norm"] > 0 for r in log_a.values())
    assert os.path.isfile(out_a / "validation" / "step-2.png") and os.path.isfile(out_a / "samples.png")
    assert os.path.isfile(out_a / "checkpoint-4" / tfd_training.CHECKPOINT_COMPLETE)

    # Resume from step 2 into a fresh folder: steps 3 and 4 repeat exactly, weights end equal.
    student_b = script.main(script.parse_args(base_args(
        tiny_sdxl_dir, data_dir, out_b, cache, "--max_train_steps", "4", "--checkpointing_steps", "100",
        "--resume_from_checkpoint", str(out_a / "checkpoint-2"), *precision)))
    log_b = metrics(out_b)
    assert sorted(log_b) == [3, 4]
    # Misses were generated on the fly and written; the resumed run finds every entry it needs.
    # (counts per logging window: every step draws 2 prompts)
    assert log_a[1]["cache/misses"] >= 1 and all(r["cache/hits"] + r["cache/misses"] == 2 for r in log_a.values())
    assert sum(r["cache/misses"] for r in log_b.values()) == 0 and log_b[4]["cache/hits"] == 2
    for step in (3, 4):
        assert log_b[step]["loss/total"] == log_a[step]["loss/total"]
        assert log_b[step]["train/grad_norm"] == log_a[step]["train/grad_norm"]
    for (name, p), q in zip(student.named_parameters(), student_b.parameters()):
        assert torch.equal(p, q), name

    # The saved pipeline's plain call runs the student's one step at the default timestep 399: DiffusionPipeline(
    # prompt, 1 step, no CFG).
    pipe = DiffusionPipeline.from_pretrained(str(out_a))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert json.loads((out_a / "training_args.json").read_text())["conditioning_timestep"] == 399
    base = DiffusionPipeline.from_pretrained(tiny_sdxl_dir)
    trained = student_latents(student, pipe, "a red cube", noise, 399, base.scheduler.config)
    torch.testing.assert_close(pipeline_latents(pipe, "a red cube", noise), trained, atol=1e-5, rtol=1e-5)
    assert pipe.scheduler.timesteps.tolist() == [399]
    assert (student_latents(base.unet, pipe, "a red cube", noise) - trained).abs().max() > 1e-3  # it trained
    image = pipe("a red cube", num_inference_steps=1, guidance_scale=0.0).images[0]
    assert image.size == (32, 32)
    card = (out_a / "README.md").read_text()
    assert "num_inference_steps=1" in card and "samples.png" in card

    # An output folder holding a run is never silently overwritten.
    with pytest.raises(FileExistsError, match="resume_from_checkpoint"):
        script.main(script.parse_args(base_args(tiny_sdxl_dir, data_dir, out_a, cache, "--max_train_steps", "1")))


def test_lora_accelerate_launch_and_load_lora_weights(tiny_sdxl_dir, data_dir, teacher, tmp_path):
    """A real `accelerate launch` run in LoRA mode; its weights load onto the teacher pipeline."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from peft import LoraConfig

    out = tmp_path / "lora"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(ROOT, "train_tfd_sdxl.py"),
           *base_args(tiny_sdxl_dir, data_dir, out, tmp_path / "cache", "--train_mode", "lora", "--lora_rank", "4",
                      "--lora_alpha", "8", "--max_train_steps", "2", "--checkpointing_steps", "2",
                      "--gradient_checkpointing")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")
    assert not os.path.exists(out / "unet")  # LoRA exports adapters only
    assert sorted(metrics(out)) == [1, 2]

    # The training student, rebuilt from the checkpoint the run saved at its last step.
    student = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir).unet
    student.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                   target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    tfd_text2image.import_trainable(student, str(out / "checkpoint-2"), True, StableDiffusionXLPipeline, "unet")

    # The user's three lines (the model card's): teacher pipeline + load_lora_weights + the saved one-step scheduler.
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))
    pipe.scheduler = DDIMScheduler.from_pretrained(str(out), subfolder="scheduler")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    trained = student_latents(student, pipe, "a blue sphere", noise, 399, teacher.scheduler.config)
    torch.testing.assert_close(pipeline_latents(pipe, "a blue sphere", noise), trained, atol=1e-5, rtol=1e-5)
    base = student_latents(teacher.unet, teacher, "a blue sphere", noise)
    assert (base - trained).abs().max() > 1e-4  # the adapters changed the generator
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "DDIMScheduler.from_pretrained(" in card
    assert "num_inference_steps=1" in card and "timesteps=" not in card


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_exported_student_trained_at_999_is_its_generator_at_999(tiny_sdxl_dir, data_dir, teacher, tmp_path, mode):
    """--conditioning_timestep 999: the saved pipeline's plain one-step call (full), or the teacher with the LoRA
    weights and the saved scheduler (the model card's lines), is the script's generator at 999."""
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionXLPipeline

    out = tmp_path / mode
    student = run_in_process(script, base_args(
        tiny_sdxl_dir, data_dir, out, tmp_path / "cache", "--train_mode", mode, "--conditioning_timestep", "999",
        "--lora_rank", "4", "--lora_alpha", "4", "--max_train_steps", "1", "--checkpointing_steps", "100"))
    if mode == "full":
        pipe = DiffusionPipeline.from_pretrained(str(out))
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
        pipe.load_lora_weights(str(out))
        pipe.scheduler = DDIMScheduler.from_pretrained(str(out), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    trained = student_latents(student, pipe, "a green cone", noise, 999, teacher.scheduler.config)
    torch.testing.assert_close(pipeline_latents(pipe, "a green cone", noise), trained, atol=1e-5, rtol=1e-5)
    assert pipe.scheduler.timesteps.tolist() == [999]
    assert not torch.allclose(student_latents(student, pipe, "a green cone", noise, 399), trained, atol=1e-3)


def test_v_prediction_teacher_student_x0_and_its_exported_plain_call(tiny_sdxl_dir, data_dir, tmp_path):
    """A v-prediction SDXL checkpoint: the generator's x0 = √ᾱ z − √(1−ᾱ) v̂ (the UNet's output read as v) at 399
    and 999, and the exported pipeline's plain call (its scheduler keeps the teacher's prediction type) is that
    generator."""
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionXLPipeline

    vpred = tmp_path / "vpred"
    shutil.copytree(tiny_sdxl_dir, vpred)
    config_path = vpred / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    teacher = StableDiffusionXLPipeline.from_pretrained(str(vpred))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    pe, pooled = embed(teacher, "a red cube")
    for t in (399, 999):
        ours = student_latents(teacher.unet, teacher, "a red cube", noise, t)
        with torch.no_grad():
            v = teacher.unet(noise, t, encoder_hidden_states=pe.expand(2, -1, -1), added_cond_kwargs={
                "text_embeds": pooled.expand(2, -1), "time_ids": script.sdxl_time_ids(32, 2)}).sample
        a = teacher.scheduler.alphas_cumprod[t].double()
        torch.testing.assert_close(ours, (a.sqrt() * noise - (1 - a).sqrt() * v).float(), atol=1e-5, rtol=1e-5)

    out = tmp_path / "out"
    student = run_in_process(script, base_args(str(vpred), data_dir, out, tmp_path / "cache", "--max_train_steps",
                                               "1", "--checkpointing_steps", "100"))
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.prediction_type == "v_prediction"
    trained = student_latents(student, pipe, "a red cube", noise, 399, teacher.scheduler.config)
    torch.testing.assert_close(pipeline_latents(pipe, "a red cube", noise), trained, atol=1e-5, rtol=1e-5)


def test_lora_teacher_pass_is_the_base_model_with_checkpointing(teacher):
    """In LoRA mode the teacher is the student's UNet in teacher_mode: the loss and its gradient w.r.t.
    the generated samples equal the base UNet's, with the UNet's own gradient checkpointing on, and with
    the generated samples' teacher pass recomputed in backward (--teacher_checkpointing): the
    recomputation must run with the adapters off too."""
    import copy

    from peft import LoraConfig

    base = copy.deepcopy(teacher.unet)
    unet = copy.deepcopy(teacher.unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_v"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_()  # adapters that change the output
    unet.enable_gradient_checkpointing()
    unet.train()
    pe, pooled = embed(teacher, ["a"])
    cond = {"text_embeds": pooled, "time_ids": script.sdxl_time_ids(32, 1)}
    ac = teacher.scheduler.alphas_cumprod
    sigma = torch.full((1,), 0.1)
    gen0 = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pos = torch.randn(1, 2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def loss_and_grad(model, context, checkpoint):
        loss_fn = tfd_utils.TFDLoss(model, ["down_blocks.2", "mid_block"], 4, drift_radii=[0.05, 0.2],
                                    teacher_context=context, checkpoint_teacher=checkpoint)
        x = gen0.clone().requires_grad_(True)
        torch.manual_seed(5)  # the feature noise
        loss, _ = loss_fn(tfd_utils.vp_teacher_forward(model, ac, pe, cond), x, pos, sigma=sigma)
        loss.backward()
        return loss.detach(), x.grad

    l_ref, g_ref = loss_and_grad(base, None, False)
    assert g_ref.abs().sum() > 0
    for checkpoint in (False, True):
        l_tm, g_tm = loss_and_grad(unet, lambda: tfd_text2image.teacher_mode(unet), checkpoint)
        assert unet.is_gradient_checkpointing  # restored
        torch.testing.assert_close(l_tm, l_ref)
        torch.testing.assert_close(g_tm, g_ref)
    l_st, _ = loss_and_grad(unet, None, True)
    assert not torch.allclose(l_st, l_ref)  # adapters on: a different network


def test_teacher_checkpointing_gives_the_same_gradients_to_the_student(teacher):
    """--teacher_checkpointing recomputes the generated samples' teacher pass in backward: the
    student's parameter gradients are the same as with the activations kept."""
    import copy

    student0 = copy.deepcopy(teacher.unet).requires_grad_(True)
    frozen = copy.deepcopy(teacher.unet).requires_grad_(False)
    pe, pooled = embed(teacher, ["a", "b"])
    cond = {"text_embeds": pooled, "time_ids": script.sdxl_time_ids(32, 2)}
    ac = teacher.scheduler.alphas_cumprod
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pos = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def grads(checkpoint):
        student = copy.deepcopy(student0)
        loss_fn = tfd_utils.TFDLoss(frozen, ["down_blocks.2", "mid_block", "up_blocks.0"], 4,
                                    checkpoint_teacher=checkpoint)
        gen = tfd_utils.sdxl_one_step(student, noise, 999, ac[999], pe.repeat_interleave(2, 0),
                                      {k: v.repeat_interleave(2, 0) for k, v in cond.items()})
        torch.manual_seed(3)
        loss, _ = loss_fn(tfd_utils.vp_teacher_forward(frozen, ac, pe, cond), gen.reshape(2, 2, 4, 8, 8), pos,
                          generator=torch.Generator().manual_seed(4))
        loss.backward()
        return {n: p.grad for n, p in student.named_parameters()}

    kept, recomputed = grads(False), grads(True)
    assert sum(g.abs().sum() for g in kept.values()) > 0
    for name in kept:
        torch.testing.assert_close(recomputed[name], kept[name], rtol=1e-5, atol=1e-7)


def test_bad_inputs_fail_early(tiny_sdxl_dir, data_dir, tmp_path):
    def run(*extra, data=data_dir):
        return script.main(script.parse_args(base_args(tiny_sdxl_dir, data, tmp_path / "o", tmp_path / "c", *extra)))

    with pytest.raises(ValueError, match=r"Unknown teacher layer 'down_blocks\.9'.*down_blocks\.2"):
        run("--feature_layers", "down_blocks.9 mid_block")
    with pytest.raises(ValueError, match=r"--caption_column 'caption' is not in .*\['text', 'image'\]"):
        run("--caption_column", "caption")
    with pytest.raises(ValueError, match="--image_column 'img'"):
        run("--image_column", "img")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    argv = base_args(tiny_sdxl_dir, data_dir, tmp_path / "o", tmp_path / "c")
    i = argv.index("--dataset_name")
    argv[i:i + 2] = ["--prompts_file", str(empty)]
    argv.remove("--image_column"), argv.remove("image")
    with pytest.raises(ValueError, match="No prompts"):
        script.main(script.parse_args(argv))
    with pytest.raises(ValueError, match="exactly one prompt source"):
        script.parse_args(argv + ["--dataset_name", data_dir])
    with pytest.raises(ValueError, match="--image_column needs --dataset_name"):
        script.parse_args(argv + ["--image_column", "image"])
    with pytest.raises(ValueError, match="num_generated"):
        script.parse_args(argv + ["--num_generated", "1"])
    assert not os.path.exists(tmp_path / "c")  # nothing was written before the errors


def test_load_prompts_matching_subsets_and_text_files(data_dir, tmp_path):
    import datasets

    args = script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", data_dir,
                              "--image_column", "image"])
    prompts, real, ds, _ = tfd_text2image.load_prompts(args)
    assert prompts == PROMPTS  # "A  red cube." is the same prompt as "a red cube"
    assert real == {"a red cube": [0, 1], "a blue sphere": [2], "a green cone": [], "a yellow star": []}
    args.image_column = None
    assert tfd_text2image.load_prompts(args)[1] == {p: [] for p in PROMPTS}

    # Lists of captions per row (COCO style): every caption is a prompt matched to its row's image.
    path = tmp_path / "coco_like"
    datasets.Dataset.from_dict({"captions": [["One dog.", "a dog "], ["a cat", "A DOG"]],
                                "image": ["a.png", "b.png"]}).save_to_disk(str(path))
    args = script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", str(path),
                              "--caption_column", "captions", "--image_column", "image"])
    prompts, real, _, _ = tfd_text2image.load_prompts(args)
    assert prompts == ["One dog.", "a dog", "a cat"] and real["a dog"] == [0, 1] and real["a cat"] == [1]
    args.max_train_samples = 1
    assert len(tfd_text2image.load_prompts(args)[0]) in (2, 3)

    # A plain image folder with metadata.jsonl captions (datasets' imagefolder), loaded offline.
    from PIL import Image

    folder = tmp_path / "imagefolder"
    folder.mkdir()
    for i, cap in enumerate(["a boat", "a tree"]):
        Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n"
                                                   for i, c in enumerate(["a boat", "a tree"])))
    args = script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", str(folder),
                              "--image_column", "image"])
    prompts, real, ds, _ = tfd_text2image.load_prompts(args)
    assert sorted(prompts) == ["a boat", "a tree"] and ds[real["a tree"][0]]["text"] == "a tree"

    text = tmp_path / "prompts.txt"
    text.write_text("a red cube\n\nA red cube.\na tree\n")
    args = script.parse_args(["--pretrained_model_name_or_path", "x", "--prompts_file", str(text)])
    assert tfd_text2image.load_prompts(args)[0] == ["a red cube", "a tree"]


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_sdxl_dir, data_dir, tmp_path):
    """A learning rate of 1e30 blows the weights up after one update: later steps are non-finite,
    skipped (weights untouched), and --max_bad_steps of them in a row stop the run clearly."""
    with pytest.raises(RuntimeError, match="2 consecutive non-finite steps"):
        script.main(script.parse_args(base_args(
            tiny_sdxl_dir, data_dir, tmp_path / "o", tmp_path / "c", "--learning_rate", "1e30", "--max_bad_steps", "2",
            "--max_train_steps", "6", "--checkpointing_steps", "100", "--prompts_per_batch", "1")))
    log = metrics(tmp_path / "o")
    assert np.isfinite(log[1]["loss/total"]) and log[1]["train/bad_steps"] == 0
    bad = [log[s]["train/bad_steps"] for s in sorted(log)]
    assert bad[-1] == 1 and max(log) < 6  # the step that made it 2 in a row raised before logging


def test_full_student_starts_from_the_checkpoint_bit_for_bit_with_a_bf16_teacher(tiny_sdxl_dir, tmp_path):
    """--teacher_dtype bf16 (the memory advice) casts the teacher, not the student: the float32 student is
    copied from the denoiser as loaded, before the cast."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    (tmp_path / "p.txt").write_text("a cat\n")
    args = script.parse_args(["--pretrained_model_name_or_path", tiny_sdxl_dir, "--prompts_file",
                              str(tmp_path / "p.txt"), "--teacher_dtype", "bf16"])
    pipe = tfd_text2image.load_pipeline(StableDiffusionXLPipeline, args, torch.bfloat16)
    student, teacher, _ = tfd_text2image.make_student(pipe, "unet", args, "cpu")
    loaded = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet").state_dict()
    assert teacher.dtype == torch.bfloat16 and pipe.unet is teacher
    assert pipe.text_encoder.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    for name, p in student.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(p, loaded[name]), name
    assert not torch.equal(teacher.state_dict()["conv_in.weight"].float(), loaded["conv_in.weight"])  # rounded


@pytest.mark.parametrize("t, bound", [(999, 1e-4), (399, 1e-5)])
def test_bf16_autocast_adds_no_rounding_after_the_unet_body(teacher, t, bound):
    """Under bf16 autocast the student's last layer (conv_out) and x0 run in float32: its x0 equals, to float32
    rounding, conv_out and x0 evaluated in float64 on the same body output (conv_out in bf16 would round ε̂ to
    2⁻⁹, which x0 multiplies by 1/√ᾱ, and fail the bound). Against a float32 forward the bf16 body's own
    rounding remains: bounded at 1 % of x0's RMS."""
    unet = teacher.unet
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(8, 4, 8, 8, generator=g)
    pe, pooled = torch.randn(8, 77, 64, generator=g), torch.randn(8, 32, generator=g)
    scheduler = tfd_text2image.vp_one_step_scheduler(teacher.scheduler.config, t)
    body = {}
    hook = unet.conv_out.register_forward_pre_hook(lambda m, a: body.update(x=a[0].detach()))
    with torch.no_grad():
        full = script.generate(script_args(t), unet, noise, pe, pooled, scheduler)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = script.generate(script_args(t), unet, noise, pe, pooled, scheduler)
    hook.remove()
    conv = unet.conv_out
    eps = torch.nn.functional.conv2d(body["x"].double(), conv.weight.double(), conv.bias.double(), padding=1)
    tail = tfd_utils.vp_x0(noise, eps, scheduler.alphas_cumprod[t])

    def rms(a, b):
        return (a - b).double().square().mean().sqrt().item()

    assert mixed.dtype == torch.float32 and body["x"].dtype == torch.bfloat16  # the body did run in bf16
    assert rms(mixed, tail) < bound, rms(mixed, tail)
    assert rms(mixed, full) < 0.01 * full.square().mean().sqrt().item()


@pytest.mark.parametrize("precision", [["--mixed_precision", "no"],
                                       ["--mixed_precision", "bf16", "--gradient_checkpointing"]])
def test_lora_with_a_bf16_teacher_trains_without_and_with_autocast(tiny_sdxl_dir, data_dir, tmp_path, precision):
    """--train_mode lora --teacher_dtype bf16 --mixed_precision no: the generator casts its float32 inputs to the
    bf16 base weights (no "mat1 and mat2 must have the same dtype"); under bf16 autocast with gradient
    checkpointing the bf16 conv_out runs in float32 (float32_layer). The step's loss and gradient are finite."""
    out = tmp_path / "o"
    run_in_process(script, base_args(tiny_sdxl_dir, data_dir, out, tmp_path / "c", "--train_mode", "lora",
                                     "--teacher_dtype", "bf16", "--lora_rank", "4", *precision,
                                     "--max_train_steps", "1", "--checkpointing_steps", "100"))
    row = metrics(out)[1]
    assert np.isfinite(row["loss/total"]) and row["train/grad_norm"] > 0 and row["train/bad_steps"] == 0


@pytest.mark.parametrize("name", ["train_tfd_sdxl", "train_tfd_sd3", "train_tfd_imagenet64"])
def test_fp16_teacher_needs_fp16_mixed_precision(name, monkeypatch):
    """A float16 teacher without the loss scaling of --mixed_precision fp16 is refused at parse time in every
    script (its feature gradient would underflow); the accelerate config's setting counts when the flag is
    absent; the positives alone (no backward) may be sampled in float16."""
    import importlib

    module = importlib.import_module(name)
    argv = ["--pretrained_model_name_or_path", "x", "--dataset_name", "x", "--teacher_dtype", "fp16"]
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    for extra in ([], ["--mixed_precision", "no"], ["--mixed_precision", "bf16"]):
        with pytest.raises(ValueError, match="--teacher_dtype fp16 .*Use --teacher_dtype bf16, or --mixed_precision "
                                             "fp16"):
            module.parse_args(argv + extra)
    assert module.parse_args(argv + ["--mixed_precision", "fp16"]).teacher_dtype == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what `accelerate launch` sets from its config
    module.parse_args(argv)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match="from ACCELERATE_MIXED_PRECISION"):
        module.parse_args(argv)
    if name != "train_tfd_imagenet64":
        module.parse_args(argv + ["--prepare_positives_only"])


def test_feature_noise_below_the_teachers_smallest_level_is_refused_before_training(tiny_sdxl_dir, data_dir,
                                                                                    tmp_path):
    """σ between 0 and σ(t=0) = 0.0292 has no timestep of the schedule (it used to be run at t = 0 silently):
    refused before any step, naming both values and the flag; σ = 0 (clean features) still trains."""
    def run(*extra):
        return run_in_process(script, base_args(tiny_sdxl_dir, data_dir, tmp_path / "o", tmp_path / "c",
                                                "--max_train_steps", "1", "--checkpointing_steps", "100", *extra))

    with pytest.raises(ValueError, match=r"σ = 0\.02 is below .* σ\(t=0\) = 0\.02917.*--feature_noise_min to at "
                                         r"least 0\.0292"):
        run("--feature_noise_min", "0.02", "--feature_noise_max", "0.1")
    with pytest.raises(ValueError, match="--feature_noise_min 0 with --feature_noise_max > 0"):
        run("--feature_noise_min", "0", "--feature_noise_max", "0.1")
    assert not os.path.exists(tmp_path / "o" / "metrics.jsonl")
    run("--feature_noise_min", "0", "--feature_noise_max", "0")
    assert np.isfinite(metrics(tmp_path / "o")[1]["loss/total"])


def test_a_teacher_scheduler_without_a_ddpm_schedule_is_refused_before_training(tiny_sdxl_dir, data_dir, tmp_path):
    """An SDXL pipeline whose scheduler has no DDPM noise schedule (EDM-formulated, as Playground v2.5's
    EDMDPMSolverMultistepScheduler): the variance-preserving student has no x0 there, so the run stops, naming
    the scheduler, before any positive is sampled or step taken."""
    edm = tmp_path / "edm_scheduler"
    shutil.copytree(tiny_sdxl_dir, edm)
    (edm / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "EDMEulerScheduler", "prediction_type": "epsilon"}))
    index = json.loads((edm / "model_index.json").read_text())
    (edm / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "EDMEulerScheduler"]}))
    with pytest.raises(ValueError, match=r"The teacher's scheduler EDMEulerScheduler \(prediction type 'epsilon'\) is "
                                         r"not a variance-preserving DDPM schedule"):
        run_in_process(script, base_args(str(edm), data_dir, tmp_path / "o", tmp_path / "c", "--max_train_steps", "1"))
    assert not os.path.exists(tmp_path / "o" / "metrics.jsonl") and not list((tmp_path / "c").glob("*/entries/*/*"))


def test_vae_latents_mean_and_std_scale_latents_as_the_sdxl_pipeline_decodes(teacher):
    """A VAE with latents_mean/latents_std in its config (Playground v2.5 style): denoiser latents =
    (z − mean)·scaling_factor/std per channel. decode_latents decodes exactly as StableDiffusionXLPipeline does,
    and encode_image's latents are the inverse of that decoding."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from PIL import Image

    config = dict(teacher.vae.config)
    config.update(latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[0.5, 2.0, 1.5, 0.8])
    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict(teacher.vae.state_dict())
    pipe = StableDiffusionXLPipeline(**{**teacher.components, "vae": vae,
                                        "scheduler": tfd_text2image.vp_one_step_scheduler(teacher.scheduler.config,
                                                                                          399)})
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = pipeline_latents(pipe, "a cat", noise)
    images = pipe("a cat", guidance_scale=0.0, latents=noise.clone(), height=32, width=32, num_images_per_prompt=2,
                  num_inference_steps=1, output_type="pt").images
    torch.testing.assert_close(tfd_text2image.decode_latents(vae, latents), images * 2 - 1, atol=1e-5, rtol=1e-5)
    plain = tfd_text2image.decode_latents(teacher.vae, latents)
    assert (plain - (images * 2 - 1)).abs().max() > 0.01  # without the mean and std: another image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    z = tfd_text2image.encode_image(vae, image, 32, "cpu")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean[0]
    torch.testing.assert_close(tfd_text2image.from_latents(vae, z), mean, atol=1e-5, rtol=1e-5)
    std = torch.tensor(config["latents_std"]).view(-1, 1, 1)
    torch.testing.assert_close(z, (mean - torch.tensor(config["latents_mean"]).view(-1, 1, 1)) * 0.13025 / std)
