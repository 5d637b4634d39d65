# Does train_tfd_sdxl.py's student LEARN? A CI-sized check on the tiny random SDXL pipeline.
#
# Two prompts with their own real images. The random teacher's one-step latents sit far from the
# real positives (its x0 = (z − √(1−ᾱ)ε̂)/√ᾱ amplifies ε̂'s error 1.2× at the default t = 399, 14.6× at
# t = 999); after 60 TFD updates the mean one-step latent of each prompt must be much closer to the mean
# of that prompt's positives. A sign error in x₀, a wrong student timestep or positives drawn from the wrong scale
# move it away. (The tiny random VAE encodes both prompts' images to nearly the same latents, so
# this cannot tell the prompts apart; the cache tests check which positives a prompt gets.)
import json
import shutil

import numpy as np
import pytest
import torch

import tfd_text2image
import train_tfd_sdxl as script

PROMPTS = ["light on the left", "light on the right"]
LIGHT_LEFT = {"light on the left": True, "light on the right": False}
NUM_IMAGES = 8
NOISE_SAMPLES = 256


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    texts, images = [], []
    for prompt, left in LIGHT_LEFT.items():
        for _ in range(NUM_IMAGES):
            base = np.zeros((32, 32, 3))
            base[:, :16] = 230 if left else 25
            base[:, 16:] = 25 if left else 230
            pixels = np.clip(base + rng.normal(0, 15, (32, 32, 3)), 0, 255).astype(np.uint8)
            texts.append(prompt)
            images.append(Image.fromarray(pixels))
    ds = datasets.Dataset.from_dict({"text": texts, "image": images},
                                    features=datasets.Features({"text": datasets.Value("string"),
                                                                "image": datasets.Image()}))
    path = tmp_path_factory.mktemp("learn_data") / "colours"
    ds.save_to_disk(str(path))
    return str(path), ds


def one_step_latents(pipe, prompt, noise):
    """A pipeline's one-step latents from `noise` (its scheduler's plain one-step call, no guidance): the saved
    student's own sampler, independent of the training code's x₀ formula."""
    with torch.no_grad():
        return pipe([prompt] * len(noise), num_inference_steps=1, guidance_scale=0.0, latents=noise.clone(),
                    output_type="latent").images


@pytest.fixture(scope="module")
def teacher_dir(tiny_sdxl_dir, tmp_path_factory):
    """The tiny pipeline with a VAE scaling_factor that puts the positives' latents at norm ~20: the
    random encoder maps images near 0, where a sign error in x₀ would go unseen."""
    path = tmp_path_factory.mktemp("learn_teacher") / "pipeline"
    shutil.copytree(tiny_sdxl_dir, path)
    config = json.loads((path / "vae" / "config.json").read_text())
    config["scaling_factor"] = 0.13025 * 60
    (path / "vae" / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("t", [399, 999])
def test_student_moves_to_its_prompts_real_images(teacher_dir, data_dir, tmp_path, t):
    from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionXLPipeline

    path, ds = data_dir
    tiny_sdxl_dir = teacher_dir
    teacher = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    positives = {p: torch.stack([tfd_text2image.encode_image(teacher.vae, im, 32, "cpu")
                                 for im, t in zip(ds["image"], ds["text"]) if t == p]) for p in PROMPTS}
    out = tmp_path / "run"
    script.main(script.parse_args([
        "--pretrained_model_name_or_path", tiny_sdxl_dir, "--dataset_name", path, "--image_column", "image",
        "--resolution", "32", "--prompts_per_batch", "2", "--num_generated", "4", "--num_positives", "4",
        "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--max_train_steps", "60", "--checkpointing_steps", "1000", "--validation_steps", "0",
        "--validation_prompts", "a cat", "a dog", "--report_to", "none", "--seed", "0", "--conditioning_timestep",
        str(t), "--output_dir", str(out), "--positive_cache_dir", str(tmp_path / "cache")]))
    student = DiffusionPipeline.from_pretrained(str(out))
    assert isinstance(student.scheduler, DDIMScheduler)
    start = StableDiffusionXLPipeline(**{**teacher.components, "scheduler": DDIMScheduler.from_config(
        student.scheduler.config)})  # the teacher with the student's one-step sampler: step 0
    for pipe in (student, start):
        pipe.set_progress_bar_config(disable=True)

    noise = torch.randn(NOISE_SAMPLES, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def gap(pipe, prompt):
        """Distance between the mean one-step latent of `prompt` and the mean of its real positives."""
        return float((one_step_latents(pipe, prompt, noise).mean(0) - positives[prompt].mean(0)).norm())

    for prompt in PROMPTS:
        before, after = gap(start, prompt), gap(student, prompt)
        assert after < 0.93 * before, (prompt, before, after)  # measured ratios: docs/testing.md
