# Flow-matching transformer teachers (Stable Diffusion 3 / 3.5) on a tiny random SD3 pipeline
# (tests/tiny_sd3.py, no T5), offline, CPU: the one-step student against the pipeline, the token fold
# against the transformer's unpatchify, the VE → flow noise mapping, `block:K` features with early stop,
# LoRA on the joint attention, and train_tfd_sd3.py end to end (full and LoRA, resume, cache).
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

import tfd_text2image
import tfd_utils
import train_tfd_sd3 as script
from tiny_sd3 import LATENT_CHANNELS, NUM_LAYERS, make_tiny_sd3_pipeline, tiny_sd3_transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATENT_HW = (8, 12)  # non-square on purpose: a transposed fold cannot pass
IMAGE_HW = (32, 48)  # the tiny VAE downsamples by 4
PROMPTS = ["a red cube on a table", "two cats"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_sd3_pipeline(seed=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """'a red cube' has two images, 'a blue sphere' one, the last two prompts none."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    ds = datasets.Dataset.from_dict(
        {"text": ["a red cube", "A red cube.", "a blue sphere", "a green cone", "a yellow star"],
         "image": [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(3)] + [None] * 2},
        features=datasets.Features({"text": datasets.Value("string"), "image": datasets.Image()}))
    path = tmp_path_factory.mktemp("sd3_data") / "captions"
    ds.save_to_disk(str(path))
    return str(path)


def conditioning(n, seed=1):
    """Random text conditioning of the tiny transformer's widths: [n, 7, 96], [n, 80]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, 96, generator=g), torch.randn(n, 80, generator=g)


def call_counter(module):
    counts = {"n": 0}

    def pre_hook(mod, args):
        counts["n"] += 1

    return counts, module.register_forward_pre_hook(pre_hook)


def base_args(teacher_dir, data_dir, out, cache, *extra):
    return ["--pretrained_model_name_or_path", teacher_dir, "--dataset_name", data_dir, "--image_column", "image",
            "--resolution", "32", "--num_positive_steps", "2", "--num_generated", "2", "--num_positives", "2",
            "--prompts_per_batch", "2", "--output_dir", str(out), "--positive_cache_dir", str(cache),
            "--cache_dtype", "float32", "--report_to", "none", "--lr_warmup_steps", "0", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--validation_steps", "0", "--validation_prompts", "a cat", "a dog",
            "--feature_layers", "block:0 block:-1", *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def student_latents(transformer, pipe, prompt, noise, args=None):
    """The script's own generator (train_tfd_sd3.generate, under its parsed flags) for a prompt."""
    pe, pooled = tfd_text2image.encode_prompts(pipe, [prompt], "cpu")
    b = noise.shape[0]
    args = args or script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "x"])
    with torch.no_grad():
        return script.generate(args, transformer, noise, pe.expand(b, -1, -1), pooled.expand(b, -1))


def pipeline_latents(pipe, prompt, noise):
    return pipe(prompt, num_inference_steps=1, guidance_scale=1.0, latents=noise.clone(), height=32, width=32,
                num_images_per_prompt=noise.shape[0], output_type="latent").images


# ----------------------------------------------------------------------------------------------
# The method's pieces on the tiny pipeline.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_scale", [0.0, 1.0])
def test_flow_one_step_equals_the_pipeline_with_one_euler_step(pipe, guidance_scale):
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [1000.0] and sched.sigmas.tolist() == [1.0, 0.0]  # shift 3 keeps 1 at 1
    per_prompt = 2
    out = pipe(PROMPTS, num_inference_steps=1, guidance_scale=guidance_scale, num_images_per_prompt=per_prompt,
               height=IMAGE_HW[0], width=IMAGE_HW[1], output_type="latent",
               generator=torch.Generator().manual_seed(3)).images
    # The pipeline draws plain N(0, I) latents (no initial-sigma scaling).
    noise = torch.randn(len(PROMPTS) * per_prompt, LATENT_CHANNELS, *LATENT_HW,
                        generator=torch.Generator().manual_seed(3))
    pe, pooled = tfd_text2image.encode_prompts(pipe, PROMPTS, "cpu")
    args = script.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", "x"])
    with torch.no_grad():
        ours = script.generate(args, pipe.transformer, noise, pe.repeat_interleave(per_prompt, 0),
                               pooled.repeat_interleave(per_prompt, 0))
    assert ours.dtype == torch.float32 and ours.shape == out.shape
    assert ((ours - out).abs().max() / out.abs().max()).item() < 1e-6
    assert not torch.allclose(ours, noise)


def test_fold_order_is_the_transformers_unpatchify_order():
    """The last block's image tokens, folded, then norm_out + proj_out position by position with each
    position's p×p patch placed at rows i·p.., columns j·p..: the transformer's own output."""
    tr = tiny_sd3_transformer().eval()
    p = tr.config.patch_size
    x = torch.randn(2, LATENT_CHANNELS, *LATENT_HW, generator=torch.Generator().manual_seed(0))
    ctx, pooled = conditioning(2)
    temb, outputs = {}, []
    handle = tr.norm_out.register_forward_pre_hook(lambda mod, args: temb.update(t=args[1]))
    with torch.no_grad(), tfd_utils.FeatureExtractor(tr, ["block:-1"], pool_size=1, stop_early=False) as fx:
        feats = fx(lambda s: outputs.append(tr(s, ctx, pooled, torch.tensor([500.0, 20.0]), return_dict=False)[0]), x)
    handle.remove()
    gh, gw = LATENT_HW[0] // p, LATENT_HW[1] // p
    fmap = feats["block:-1"].view(2, -1, gh, gw)  # pool 1 only flattens [B, C, H/p, W/p]
    with torch.no_grad():
        for i in range(gh):
            for j in range(gw):
                y = tr.proj_out(tr.norm_out(fmap[:, None, :, i, j], temb["t"]))[:, 0]
                patch = y.view(2, p, p, LATENT_CHANNELS).permute(0, 3, 1, 2)  # proj_out's (row, col, channel) layout
                torch.testing.assert_close(patch, outputs[0][:, :, i * p:(i + 1) * p, j * p:(j + 1) * p],
                                           rtol=1e-5, atol=1e-6)


def test_tokens_to_map_is_row_major():
    tokens = torch.arange(2 * 6 * 3).view(2, 6, 3)  # token l carries 3·l .. 3·l + 2
    m = tfd_utils.tokens_to_map(tokens, 2, 3)
    assert m.shape == (2, 3, 2, 3) and m[0, 0].tolist() == [[0, 3, 6], [9, 12, 15]]  # row 0 = tokens 0, 1, 2


def test_flow_noise_mapping_is_the_forward_process():
    sigma = torch.tensor([0.0, 0.1, 0.5])  # one σ per group
    s = tfd_utils.flow_time_for_sigma(sigma)
    torch.testing.assert_close(s, torch.tensor([0.0, 0.1 / 1.1, 1 / 3]))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, LATENT_CHANNELS, 4, 4, generator=g)  # [G, K, C, H, W]
    xi = torch.randn(x0.shape, generator=g)
    noisy = tfd_utils.add_feature_noise(x0, sigma, xi).flatten(0, 1)  # x₀ + σξ
    sig = sigma.repeat_interleave(2)
    s_k = s.repeat_interleave(2).view(-1, 1, 1, 1)
    x_s = (1 - s_k) * x0.flatten(0, 1) + s_k * xi.flatten(0, 1)
    torch.testing.assert_close(noisy, x_s / (1 - s_k), rtol=1e-5, atol=1e-6)  # x₀ + σξ = x_s/(1 − s)
    model_in = tfd_utils.flow_scale_input(noisy, sig)
    torch.testing.assert_close(model_in, x_s, rtol=1e-5, atol=1e-6)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)  # diffusers' forward process
    for k in range(len(sig)):
        sched.set_timesteps(sigmas=[s_k[k].item()])
        theirs = sched.scale_noise(x0.flatten(0, 1)[k:k + 1], sched.timesteps[:1], xi.flatten(0, 1)[k:k + 1])
        torch.testing.assert_close(model_in[k:k + 1], theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sched.timesteps[0], 1000 * s_k[k, 0, 0, 0])


def test_flow_teacher_forward_feeds_the_flow_point_timestep_and_group_conditioning():
    tr = tiny_sd3_transformer().eval()
    seen = {}
    handle = tr.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    ctx, pooled = conditioning(2)  # two groups
    fwd = tfd_utils.flow_teacher_forward(tr, ctx, pooled)
    sample = torch.randn(6, LATENT_CHANNELS, *LATENT_HW, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.3]).repeat_interleave(3)
    with torch.no_grad():
        assert fwd(sample, sigma).shape == sample.shape
    torch.testing.assert_close(seen["hidden_states"], sample / (1 + sigma.view(-1, 1, 1, 1)))
    torch.testing.assert_close(seen["timestep"], 1000 * sigma / (1 + sigma))
    assert torch.equal(seen["encoder_hidden_states"], ctx.repeat_interleave(3, dim=0))
    assert torch.equal(seen["pooled_projections"], pooled.repeat_interleave(3, dim=0))
    with torch.no_grad():  # σ = 0: the clean latent at timestep 0
        fwd(sample, torch.zeros(6))
    handle.remove()
    assert torch.equal(seen["hidden_states"], sample) and seen["timestep"].abs().max() == 0


def test_block_selectors_shapes_independent_capture_and_early_stop():
    tr = tiny_sd3_transformer().eval()
    assert tfd_utils.resolve_layers(tr, ["block:0", "block:-1", "input", "transformer_blocks.1", "block:1/2"]) == [
        "transformer_blocks.0", f"transformer_blocks.{NUM_LAYERS - 1}", "input", "transformer_blocks.1",
        "transformer_blocks.1"]
    x = torch.randn(3, LATENT_CHANNELS, *LATENT_HW, generator=torch.Generator().manual_seed(0))
    ctx, pooled = conditioning(3)
    fwd = tfd_utils.flow_teacher_forward(tr, ctx, pooled)
    sigma = torch.full((3,), 0.1)
    raw = {}  # independent capture: the block's second output, transposed to channels-first
    handle = tr.transformer_blocks[1].register_forward_hook(lambda m, a, out: raw.update(tokens=out[1]))
    with torch.no_grad():
        fwd(x, sigma)
    handle.remove()
    gh, gw = LATENT_HW[0] // 2, LATENT_HW[1] // 2
    ref = torch.nn.functional.avg_pool2d(raw["tokens"].transpose(1, 2).reshape(3, -1, gh, gw), 2).flatten(1)

    later = [call_counter(m) for m in list(tr.transformer_blocks)[2:] + [tr.norm_out, tr.proj_out]]
    with torch.no_grad(), tfd_utils.FeatureExtractor(tr, ["block:0", "block:1", "input"], pool_size=2) as fx:
        feats = fx(lambda s: fwd(s, sigma), x)
    for _, h in later:
        h.remove()
    inner = tr.config.num_attention_heads * tr.config.attention_head_dim
    assert feats["block:0"].shape == feats["block:1"].shape == (3, inner * (gh // 2) * (gw // 2))
    assert feats["input"].shape == (3, LATENT_CHANNELS * 4 * 6)
    torch.testing.assert_close(feats["block:1"], ref)
    assert all(c["n"] == 0 for c, _ in later)  # nothing after block 1 ran
    # the last (context_pre_only) block returns (None, image tokens): still a feature
    with torch.no_grad(), tfd_utils.FeatureExtractor(tr, ["block:-1"], pool_size=2) as fx:
        assert fx(lambda s: fwd(s, sigma), x)["block:-1"].shape == (3, inner * 6)


def test_attention_selector_takes_the_image_tokens_of_its_tuple():
    """A block's joint attention returns (image tokens, context tokens), the block itself (context, image): the
    feature of `transformer_blocks.1.attn` is its image tokens folded to the patch grid; a tuple holding no
    image tokens is refused, naming the valid choices."""
    tr = tiny_sd3_transformer().eval()
    x = torch.randn(3, LATENT_CHANNELS, *LATENT_HW, generator=torch.Generator().manual_seed(0))
    ctx, pooled = conditioning(3)
    fwd = tfd_utils.flow_teacher_forward(tr, ctx, pooled)
    sigma = torch.full((3,), 0.1)
    raw = {}
    attn = tr.transformer_blocks[1].attn
    handle = attn.register_forward_hook(lambda m, a, out: raw.update(image=out[0], context=out[1]))
    with torch.no_grad():
        fwd(x, sigma)
    handle.remove()
    gh, gw = LATENT_HW[0] // 2, LATENT_HW[1] // 2
    assert raw["image"].shape[1] == gh * gw and raw["context"].shape[1] == ctx.shape[1] != gh * gw
    ref = torch.nn.functional.avg_pool2d(tfd_utils.tokens_to_map(raw["image"], gh, gw), 2).flatten(1)
    with torch.no_grad(), tfd_utils.FeatureExtractor(tr, ["transformer_blocks.1.attn"], pool_size=2) as fx:
        torch.testing.assert_close(fx(lambda s: fwd(s, sigma), x)["transformer_blocks.1.attn"], ref)

    # the same module made to return its context tokens twice: no image tokens to take
    handle = attn.register_forward_hook(lambda m, a, out: (out[1], out[1]))
    try:
        with torch.no_grad(), tfd_utils.FeatureExtractor(tr, ["transformer_blocks.1.attn"], pool_size=2) as fx:
            with pytest.raises(ValueError, match=r"returns \[\(3, 7, 32\), \(3, 7, 32\)\]: none of them is the 24 "
                                                 r"image tokens.*block:0\.\.block:2"):
                fx(lambda s: fwd(s, sigma), x)
    finally:
        handle.remove()


def test_block_fractions_carry_across_depths_and_bad_selectors_list_the_range():
    deep = torch.nn.Module()
    deep.transformer_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(24))
    assert tfd_utils.resolve_layers(deep, ["block:1/3", "block:1/2", "block:2/3", "block:1/1"]) == [
        "transformer_blocks.7", "transformer_blocks.11", "transformer_blocks.15", "transformer_blocks.23"]
    deep.transformer_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(38))
    assert tfd_utils.resolve_layers(deep, ["block:1/3", "block:2/3"]) == ["transformer_blocks.12",
                                                                          "transformer_blocks.24"]
    tr = tiny_sd3_transformer()
    for bad in (f"block:{NUM_LAYERS}", f"block:-{NUM_LAYERS + 1}", "block:x", "block:3/2", "block:1/0"):
        with pytest.raises(ValueError, match=rf"block:0\.\.block:{NUM_LAYERS - 1}"):
            tfd_utils.resolve_layers(tr, [bad])
    with pytest.raises(ValueError, match=r"Unknown teacher layer 'transformer_block\.1'.*block:0\.\.block:"):
        tfd_utils.FeatureExtractor(tr, ["transformer_block.1"])


@pytest.mark.parametrize("lora", [False, True])
def test_teacher_block_checkpointing_gives_the_same_loss_and_gradient(lora):
    """A transformer checkpoints the very blocks the hooks sit on: those (and their ancestors) run plainly,
    the others are recomputed in backward, for a LoRA student's teacher with the adapters off again. The
    loss and its gradient equal the pass that keeps every activation."""
    from peft import LoraConfig

    base = tiny_sd3_transformer().eval().requires_grad_(False)
    model = copy.deepcopy(base)
    context = None
    if lora:
        model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        with torch.no_grad():
            for name, prm in model.named_parameters():
                if "lora_B" in name:
                    prm.normal_(generator=torch.Generator().manual_seed(0))
        context = lambda: tfd_text2image.teacher_mode(model)  # noqa: E731
        model.enable_gradient_checkpointing()  # the student's own, as --gradient_checkpointing sets it
    x0 = torch.randn(2, 3, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(1))
    pos = torch.randn(2, 2, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(2))
    ctx, pooled = conditioning(2)

    def loss_and_grad(teacher, context, checkpoint):
        loss_fn = tfd_utils.TFDLoss(teacher, ["block:1"], 2, drift_radii=[0.05, 0.2], teacher_context=context,
                                    checkpoint_teacher=checkpoint)
        calls, handle = call_counter(teacher.transformer_blocks[0])
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(5)
        loss, _ = loss_fn(tfd_utils.flow_teacher_forward(teacher, ctx, pooled), x, pos, sigma=torch.full((2,), 0.1))
        loss.backward()
        handle.remove()
        return loss.detach(), x.grad, calls["n"]

    ref = loss_and_grad(base, None, False)
    for checkpoint in (False, True):
        got = loss_and_grad(model, context, checkpoint)
        torch.testing.assert_close(got[0], ref[0])
        torch.testing.assert_close(got[1], ref[1])
        assert got[2] == 2 + checkpoint  # block 0: the two passes, and its recomputation in backward
    if lora:
        assert model.is_gradient_checkpointing  # restored


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_lora_on_joint_attention_saves_and_loads_into_the_pipeline(variant, tmp_path):
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    base_dir = tmp_path / "base"
    pipe = make_tiny_sd3_pipeline(save_dir=str(base_dir), seed=0, variant=variant)
    tr = pipe.transformer
    kw = dict(num_inference_steps=1, guidance_scale=1.0, height=IMAGE_HW[0], width=IMAGE_HW[1], output_type="latent")
    base = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kw).images
    tr.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    wrapped = {n for n, m in tr.named_modules() if isinstance(m, LoraLayer)}
    expected = set()
    for k in range(NUM_LAYERS):
        names = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
        names += ["to_add_out"] if k != NUM_LAYERS - 1 else []  # the context_pre_only block has no to_add_out
        expected |= {f"transformer_blocks.{k}.attn.{n}" for n in names}
        if variant == "sd35" and k != NUM_LAYERS - 1:  # dual attention: the same suffixes also match attn2
            expected |= {f"transformer_blocks.{k}.attn2.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")}
    assert wrapped == expected and script.LORA_TARGETS.split(",") == LORA_TARGETS
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # gaussian init leaves lora_B at zero: make the adapter do something
        for name, prm in tr.named_parameters():
            if "lora_B" in name:
                prm.copy_(0.1 * torch.randn(prm.shape, generator=g))
    tuned = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kw).images
    assert (tuned - base).abs().max() > 1e-3
    tfd_text2image.export_trainable(tr, str(tmp_path / "lora"), True, StableDiffusion3Pipeline, "transformer")
    fresh = StableDiffusion3Pipeline.from_pretrained(str(base_dir), text_encoder_3=None, tokenizer_3=None)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    again = fresh(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(again, tuned, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# train_tfd_sd3.py end to end.
# ----------------------------------------------------------------------------------------------


def test_positive_cache_prepare_then_reuse(tiny_sd3_dir, data_dir, tmp_path):
    cache_root = tmp_path / "cache"
    argv = base_args(tiny_sd3_dir, data_dir, tmp_path / "out", cache_root, "--prepare_positives_only")
    assert script.main(script.parse_args(argv)) == {"hits": 0, "generated": 4, "regenerated": 0}
    (settings_dir,) = [p for p in cache_root.iterdir() if p.is_dir()]
    settings = json.loads((settings_dir / "settings.json").read_text())
    assert settings["num_positive_steps"] == 2 and settings["drop_t5"] is False
    cache = tfd_text2image.PositiveCache(str(cache_root), settings)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    # Real positives are the VAE mean, shifted and scaled (SD3's latents); teacher positives its samples.
    import datasets

    red = cache.load("a red cube", ["real:0", "real:1"])
    img = datasets.load_from_disk(data_dir)[0]["image"]
    torch.testing.assert_close(red["positives"][0], tfd_text2image.encode_image(pipe.vae, img, 32, "cpu"))
    assert red["positives"].shape == (2, LATENT_CHANNELS, 8, 8)
    cone = cache.load("a green cone", ["teacher", "teacher"])
    gen = torch.Generator().manual_seed(tfd_text2image.positive_seed("a green cone", 1, 0))
    sample = pipe("a green cone", num_inference_steps=2, guidance_scale=7.0, height=32, width=32, generator=gen,
                  output_type="latent").images[0]
    torch.testing.assert_close(cone["positives"][1], sample, atol=1e-5, rtol=1e-5)
    pe, pooled = tfd_text2image.encode_prompts(pipe, ["a green cone"], "cpu")
    torch.testing.assert_close(cone["prompt_embeds"], pe[0])
    assert script.main(script.parse_args(argv)) == {"hits": 4, "generated": 0, "regenerated": 0}
    # Without T5 the text embeddings differ (here: the same zeros, but another key): never mixed.
    other = script.main(script.parse_args(argv + ["--drop_t5"]))
    assert other["generated"] == 4 and len([p for p in cache_root.iterdir() if p.is_dir()]) == 2


def test_full_training_resume_and_exported_pipeline(tiny_sd3_dir, data_dir, tmp_path):
    from diffusers import DiffusionPipeline

    cache, out_a, out_b = tmp_path / "cache", tmp_path / "a", tmp_path / "b"
    extra = ["--max_train_steps", "4", "--gradient_checkpointing"]  # checkpointed student, recomputed teacher pass
    student = script.main(script.parse_args(base_args(tiny_sd3_dir, data_dir, out_a, cache, *extra,
                                                      "--checkpointing_steps", "2", "--validation_steps", "2")))
    log_a = metrics(out_a)
    assert sorted(log_a) == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss/total"]) and r["train/grad_norm"] > 0 for r in log_a.values())
    assert "drift/block:0" in log_a[1] and "force/block:-1/r0.05" in log_a[1]
    assert os.path.isfile(out_a / "validation" / "step-2.png") and os.path.isfile(out_a / "samples.png")
    student_b = script.main(script.parse_args(base_args(tiny_sd3_dir, data_dir, out_b, cache, *extra,
                                                        "--resume_from_checkpoint", str(out_a / "checkpoint-2"))))
    log_b = metrics(out_b)
    assert sorted(log_b) == [3, 4]
    for step in (3, 4):
        assert log_b[step]["loss/total"] == log_a[step]["loss/total"]
    for (name, p), q in zip(student.named_parameters(), student_b.parameters()):
        assert torch.equal(p, q), name

    # The saved pipeline (no T5, as the teacher) runs the student's one step at guidance 1.
    pipe = DiffusionPipeline.from_pretrained(str(out_a), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    noise = torch.randn(2, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(1))
    trained = student_latents(student, pipe, "a red cube", noise)
    torch.testing.assert_close(pipeline_latents(pipe, "a red cube", noise), trained, atol=1e-5, rtol=1e-5)
    teacher = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    assert (student_latents(teacher.transformer, pipe, "a red cube", noise) - trained).abs().max() > 1e-3
    for name, p in pipe.text_encoder.state_dict().items():  # the other components exactly as published
        assert torch.equal(p, teacher.text_encoder.state_dict()[name]), name
    card = (out_a / "README.md").read_text()
    assert "num_inference_steps=1" in card and "stable-diffusion-3" in card and tiny_sd3_dir not in card


def test_lora_accelerate_launch_and_load_lora_weights(tiny_sd3_dir, data_dir, tmp_path):
    """A real `accelerate launch` run in LoRA mode (bf16 base weights); its weights load onto the teacher."""
    out = tmp_path / "lora"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(ROOT, "train_tfd_sd3.py"),
           *base_args(tiny_sd3_dir, data_dir, out, tmp_path / "cache", "--train_mode", "lora", "--lora_rank", "4",
                      "--lora_alpha", "8", "--max_train_steps", "2", "--checkpointing_steps", "2",
                      "--gradient_checkpointing", "--learning_rate", "1e-2")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors") and not os.path.exists(out / "transformer")
    assert sorted(metrics(out)) == [1, 2]
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(2))
    base = pipeline_latents(pipe, "a blue sphere", noise)
    pipe.load_lora_weights(str(out))
    tuned = pipeline_latents(pipe, "a blue sphere", noise)
    assert (tuned - base).abs().max() > 1e-4  # the adapters changed the generator
    # The checkpointed adapters are the exported ones: the user's pipeline runs the trained generator.
    student = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None).transformer
    from peft import LoraConfig

    student.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    tfd_text2image.import_trainable(student, str(out / "checkpoint-2"), True, StableDiffusion3Pipeline, "transformer")
    torch.testing.assert_close(student_latents(student, pipe, "a blue sphere", noise), tuned, atol=1e-5, rtol=1e-5)
    assert "load_lora_weights" in (out / "README.md").read_text()


def test_bad_inputs_fail_early(tiny_sd3_dir, data_dir, tmp_path):
    def run(*extra):
        return script.main(script.parse_args(base_args(tiny_sd3_dir, data_dir, tmp_path / "o", tmp_path / "c",
                                                       *extra)))

    with pytest.raises(ValueError, match=r"'block:7' is out of range: this transformer has block:0\.\.block:2"):
        run("--feature_layers", "block:7")
    with pytest.raises(ValueError, match=r"Unknown teacher layer 'down_blocks\.2'.*block:0\.\.block:2"):
        run("--feature_layers", "down_blocks.2")
    with pytest.raises(ValueError, match="--resolution 40 must be a multiple of 16"):
        run("--resolution", "40")
    with pytest.raises(ValueError, match=r"--num_generated 1: must be >= 2"):
        run("--num_generated", "1")
    with pytest.raises(ValueError, match=r"--lora_rank 0: must be >= 1"):
        run("--train_mode", "lora", "--lora_rank", "0")
    with pytest.raises(ValueError, match="--caption_column 'caption'"):
        run("--caption_column", "caption")
    assert not os.path.exists(tmp_path / "c")  # nothing was written before the errors


def test_lora_with_a_bf16_teacher_trains_without_autocast(tiny_sd3_dir, data_dir, tmp_path):
    """--train_mode lora --teacher_dtype bf16 --mixed_precision no: the generator casts its float32 inputs to the
    bf16 base weights; the step's loss and gradient are finite."""
    from scaling_helpers import run_in_process

    out = tmp_path / "o"
    run_in_process(script, base_args(tiny_sd3_dir, data_dir, out, tmp_path / "c", "--train_mode", "lora",
                                     "--teacher_dtype", "bf16", "--mixed_precision", "no", "--lora_rank", "4",
                                     "--max_train_steps", "1", "--checkpointing_steps", "100"))
    row = metrics(out)[1]
    assert np.isfinite(row["loss/total"]) and row["train/grad_norm"] > 0 and row["train/bad_steps"] == 0


def sd3_config(**traits):
    """An SD3Transformer2DModel config with the given traits (built on the meta device: no weights)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel(**traits).config


def test_checkpoint_families_from_transformer_configs():
    """SD3.5 medium: 24 layers, RMS q/k norm, dual attention; SD3.5 large: 38 layers, RMS q/k norm; SD3 medium:
    24 layers, neither; anything else is not recognised."""
    assert script.checkpoint_family(sd3_config(num_layers=24)) == "SD3 medium"
    assert script.checkpoint_family(sd3_config(num_layers=38, qk_norm="rms_norm")) == "SD3.5 large"
    assert script.checkpoint_family(sd3_config(num_layers=24, qk_norm="rms_norm",
                                               dual_attention_layers=tuple(range(13)))) == "SD3.5 medium"
    assert script.checkpoint_family(sd3_config(num_layers=NUM_LAYERS)) is None
    assert script.checkpoint_family(sd3_config(num_layers=24, qk_norm="rms_norm")) is None


@pytest.mark.parametrize("extra, steps, guidance", [([], 40, 4.5), (["--positive_guidance_scale", "2"], 40, 2.0),
                                                    (["--num_positive_steps", "3"], 3, 4.5)])
def test_positive_defaults_follow_the_checkpoint_and_key_the_cache(pipe, tmp_path, caplog, extra, steps, guidance):
    """A teacher whose transformer config has SD3.5 medium's traits samples its positives with that model card's
    40 steps and CFG 4.5 unless a flag says otherwise; the values used key the positive cache and are logged."""
    import datasets
    from diffusers import SD3Transformer2DModel
    from PIL import Image

    from scaling_helpers import run_in_process

    teacher_dir = tmp_path / "sd35m"
    torch.manual_seed(0)
    medium_like = SD3Transformer2DModel(**{**pipe.transformer.config, "num_layers": 24, "qk_norm": "rms_norm",
                                           "dual_attention_layers": (0, 1)})
    StableDiffusion3Pipeline(**{**pipe.components, "transformer": medium_like}).save_pretrained(str(teacher_dir))
    data = tmp_path / "data"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    datasets.Dataset.from_dict({"text": ["a red cube"], "image": [image]}, features=datasets.Features(
        {"text": datasets.Value("string"), "image": datasets.Image()})).save_to_disk(str(data))
    argv = base_args(str(teacher_dir), str(data), tmp_path / "out", tmp_path / "cache", "--num_positives", "1",
                     "--feature_layers", "block:0", "--prepare_positives_only")
    argv = argv[:argv.index("--num_positive_steps")] + argv[argv.index("--num_positive_steps") + 2:] + extra
    caplog.set_level("INFO")
    assert run_in_process(script, argv)["generated"] == 1  # a real image: no teacher sampling needed
    (settings,) = (tmp_path / "cache").glob("*/settings.json")
    settings = json.loads(settings.read_text())
    assert (settings["num_positive_steps"], settings["positive_guidance_scale"]) == (steps, guidance)
    assert f"Teacher positives: {steps} steps, CFG {guidance} (" in caplog.text
    if not extra:
        assert "the SD3.5 medium model card's" in caplog.text
