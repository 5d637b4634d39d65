#!/usr/bin/env python
# Random-weight models of the real architectures, and the stages of one real run of the training
# scripts on them. Each stage runs in its own process (a builder's copy of the weights then never adds to
# the training run's memory) and prints one last line `RESULT {json}`: wall time, peak RSS (ru_maxrss)
# and, on a GPU, torch.cuda.max_memory_allocated.
#
#   python benchmarks/real_arch.py build-sdxl DIR [--device cuda] [--dtype bf16]   # SDXL base sizes (fp32: 10.6 GB)
#   python benchmarks/real_arch.py build-adm DIR [--device cuda]      # ADM ImageNet-64 UNet (296 M), saved
#   python benchmarks/real_arch.py images DIR --classes 2 --per_class 4 --resolution 64   # an imagefolder
#   python benchmarks/real_arch.py train-sdxl SCRIPT_ARGS...          # train_tfd_sdxl.main(parse_args(...))
#   python benchmarks/real_arch.py train-imagenet64 SCRIPT_ARGS...    # train_tfd_imagenet64.main(...)
#   python benchmarks/real_arch.py infer-sdxl PIPE_DIR LORA_DIR [--resolution 256] [--device cuda]
#   python benchmarks/real_arch.py build-sd3 DIR --model sd35-medium|sd35-large|sd3-medium [--device] [--dtype]
#   python benchmarks/real_arch.py train-sd3 SCRIPT_ARGS...           # train_tfd_sd3.main(parse_args(...))
#   python benchmarks/real_arch.py infer-sd3 PIPE_DIR LORA_DIR [--resolution 256] [--device cuda]
#   python benchmarks/real_arch.py chain STAGE ARGS... -- STAGE ARGS...   # several stages in one process (toy
#                                                                         # sizes: saves the imports)
#
# SDXL: the base UNet config (SDXL_BASE below, 2.57 B parameters), the real SDXL VAE config
# (83.7 M), CLIP text encoders of the real widths (768; 1280 with a 1280 projection) with 2 layers each
# (the real ones have 12 and 32), and the tokenizers of tests/tiny_sdxl.py (the real CLIP BPE vocabulary,
# which open_clip ships). --tiny: the toy models of the tests at the same layouts (seconds on a CPU).
# SD3 / SD3.5: the published transformer configs below, the SD3 VAE config, the two CLIP text encoders of the
# real widths (768 and 1280, both with projections: pooled 768 + 1280 = 2048) with 2 layers each, the same
# tokenizers, FlowMatchEulerDiscreteScheduler with shift 3.0, and no T5 (text_encoder_3=None: the pipeline feeds
# zeros in its place; load with from_pretrained(DIR, text_encoder_3=None, tokenizer_3=None)). --tiny: the tiny
# SD3 pipeline of tests/tiny_sd3.py with a toy-width transformer of the chosen model's traits.
# ADM: the openai ImageNet-64 UNet as diffusers' UNet2DModel (296 M). The *_REDUCED configs keep a layout at a
# fraction of its width (CPU measurements). sdxl_pipeline / sd3_pipeline build the pipelines in memory
# (benchmarks/bench_train_step.py hands them to the scripts' `build`).
# Used by tests/test_real_sdxl_slow.py, tests/test_real_sd35_slow.py, benchmarks/gpu_check.sh and the benchmarks.

import argparse
import json
import os
import resource
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE, os.path.join(ROOT, "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from tfd_training import DTYPES  # noqa: E402

# openai consistency-models ImageNet-64 ADM UNet, as diffusers' UNet2DModel (openai/diffusers-cd_imagenet64_l2).
ADM_IMAGENET64 = dict(
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=3, num_class_embeds=1000,
    block_out_channels=(192, 384, 576, 768), attention_head_dim=64, norm_num_groups=32,
    down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    resnet_time_scale_shift="scale_shift", upsample_type="resnet", downsample_type="resnet", norm_eps=1e-5,
)
# The same layout at a third of the width (64 px), and at toy width (16 px, 10 classes; the 16 encoder units that
# enc:6/enc:11/bottleneck need stay).
ADM_REDUCED = dict(ADM_IMAGENET64, block_out_channels=(64, 128, 192, 256))
ADM_TINY = dict(ADM_IMAGENET64, sample_size=16, num_class_embeds=10, block_out_channels=(8, 16, 16, 16),
                attention_head_dim=8, norm_num_groups=8)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the values that differ from diffusers' defaults).
SDXL_BASE = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
# SDXL-shaped, small enough for a CPU: the same block types, layer names and text widths, narrower and shallower.
SDXL_REDUCED = dict(SDXL_BASE, block_out_channels=(64, 128, 256), transformer_layers_per_block=(1, 1, 2),
                    attention_head_dim=(1, 2, 4))

# stabilityai/stable-diffusion-xl-base-1.0 vae/config.json (the values that differ from diffusers' defaults).
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True,
)


def clip_text_config(hidden, heads, act, layers=2, **kw):
    """A CLIP text encoder of SDXL's widths (ViT-L/14: 768, 12 heads, quick_gelu; OpenCLIP bigG: 1280, 20 heads,
    gelu), `layers` deep."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=1, **kw)


# SD3Transformer2DModel configs as published: the transformer/config.json of the checkpoints
# stabilityai/stable-diffusion-3-medium-diffusers, stabilityai/stable-diffusion-3.5-medium and
# stabilityai/stable-diffusion-3.5-large (every key that sets the architecture). Parameters (sd3_param_counts):
# 2.03 B / 2.24 B / 8.06 B, plus the fixed sin-cos position table the checkpoints also store
# (pos_embed_max_size² x width: 57 M / 226 M / 90 M): 2.09 B / 2.47 B / 8.15 B in all (the model cards
# say 2 B / 2.5 B / 8.1 B).
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
SD35_MEDIUM = dict(  # MMDiT-X: the first 13 blocks have a second, image-only self-attention (attn2)
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD35_LARGE = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm",
)
SD3_MODELS = {"sd35-medium": SD35_MEDIUM, "sd35-large": SD35_LARGE, "sd3-medium": SD3_MEDIUM}
# SD3.5-medium's traits (dual attention in the first half, q/k norm, the text widths) at a quarter of its width
# and depth, small enough for a CPU.
SD35_REDUCED = dict(SD35_MEDIUM, num_layers=6, num_attention_heads=6, caption_projection_dim=384,
                    dual_attention_layers=(0, 1, 2))
# stabilityai/stable-diffusion-3-medium-diffusers vae/config.json: SDXL's VAE layout with 16 latent channels,
# no quant convs, and SD3's scaling and shift factors (the same VAE ships with SD3.5).
SD3_VAE = dict(SDXL_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)


def sd3_param_counts(config):
    """(parameters, checkpoint tensors) of an SD3Transformer2DModel config, built on the meta device (no memory).
    The checkpoint also stores the fixed sin-cos position table (a buffer, pos_embed.pos_embed)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    return (sum(p.numel() for p in model.parameters()), sum(t.numel() for t in model.state_dict().values()))


def tiny_sd3_config(config):
    """A published SD3 config at tests/tiny_sd3.py's toy width (3 blocks, 2 heads x 16, token grids up to 8x8),
    keeping its traits: q/k norm, and dual attention in the first blocks where the model has it."""
    import tiny_sd3

    tiny = dict(config, sample_size=tiny_sd3.RESOLUTION // 4, num_layers=tiny_sd3.NUM_LAYERS,
                attention_head_dim=tiny_sd3.HEAD_DIM, num_attention_heads=tiny_sd3.NUM_HEADS,
                joint_attention_dim=tiny_sd3.JOINT_ATTENTION_DIM,
                caption_projection_dim=tiny_sd3.NUM_HEADS * tiny_sd3.HEAD_DIM,
                pooled_projection_dim=sum(tiny_sd3.TEXT_HIDDEN), pos_embed_max_size=tiny_sd3.POS_EMBED_MAX_SIZE)
    if config.get("dual_attention_layers"):
        tiny["dual_attention_layers"] = tuple(range(tiny_sd3.NUM_LAYERS - 1))
    return tiny


def module_params(pipe):
    """Parameters of each of a pipeline's networks."""
    return {k: sum(p.numel() for p in m.parameters()) for k, m in pipe.components.items()
            if isinstance(m, torch.nn.Module)}


def sdxl_pipeline(device="cpu", seed=0, tiny=False, unet=None):
    """The random-weight SDXL pipeline in memory, float32; unet: another UNet config (SDXL_REDUCED). tiny:
    tests/tiny_sdxl.py's."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from tiny_sdxl import SDXL_SCHEDULER_CONFIG, make_tiny_sdxl_pipeline, make_tokenizers

    if tiny:
        return make_tiny_sdxl_pipeline(None, seed).to(device)
    torch.manual_seed(seed)
    with torch.device(device):  # random init on a GPU takes seconds, on a CPU about a minute
        components = dict(
            unet=UNet2DConditionModel(**(unet or SDXL_BASE)),
            vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(clip_text_config(768, 12, "quick_gelu")),
            text_encoder_2=CLIPTextModelWithProjection(clip_text_config(1280, 20, "gelu", projection_dim=1280)),
        )
    components["tokenizer"], components["tokenizer_2"] = make_tokenizers()
    components["scheduler"] = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(**components)


def sd3_pipeline(model="sd35-medium", device="cpu", seed=0, tiny=False, transformer=None):
    """The random-weight StableDiffusion3Pipeline of `model` without T5 in memory, float32; transformer: another
    config (SD35_REDUCED). tiny: tests/tiny_sd3.py's pipeline with a toy-width transformer of the model's traits."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from tiny_sd3 import SD3_SCHEDULER_CONFIG, make_tiny_sd3_pipeline
    from tiny_sdxl import make_tokenizers

    config = transformer or SD3_MODELS[model]
    if tiny:
        components = make_tiny_sd3_pipeline(None, seed).components
        torch.manual_seed(seed)
        components["transformer"] = SD3Transformer2DModel(**tiny_sd3_config(config))
        return StableDiffusion3Pipeline(**components).to(device)
    torch.manual_seed(seed)
    with torch.device(device):  # random init on a GPU takes seconds, on a CPU about a minute (sd35-large: 4)
        components = dict(
            transformer=SD3Transformer2DModel(**config),
            vae=AutoencoderKL(**SD3_VAE),
            text_encoder=CLIPTextModelWithProjection(clip_text_config(768, 12, "quick_gelu", projection_dim=768)),
            text_encoder_2=CLIPTextModelWithProjection(clip_text_config(1280, 20, "gelu", projection_dim=1280)),
        )
    components["tokenizer"], components["tokenizer_2"] = make_tokenizers()
    return StableDiffusion3Pipeline(**components, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
                                    text_encoder_3=None, tokenizer_3=None)


def build_sdxl(save_dir, device="cpu", seed=0, dtype="fp32", tiny=False):
    """The random-weight SDXL pipeline, saved in `dtype`; returns the parameter counts. tiny: tests/tiny_sdxl.py's."""
    pipe = sdxl_pipeline(device, seed, tiny)
    params = module_params(pipe)
    pipe.to(dtype=DTYPES[dtype]).save_pretrained(save_dir)
    return {"params": params}


def build_sd3(save_dir, model="sd35-medium", device="cpu", seed=0, dtype="fp32", tiny=False):
    """The random-weight StableDiffusion3Pipeline of `model` without T5, saved in `dtype`; returns the parameter
    counts (and the transformer's checkpoint tensors, its position table included). tiny: tests/tiny_sd3.py's
    pipeline with a toy-width transformer of the model's traits."""
    pipe = sd3_pipeline(model, device, seed, tiny)
    params = module_params(pipe)
    checkpoint = sum(t.numel() for t in pipe.transformer.state_dict().values())
    pipe.to(dtype=DTYPES[dtype]).save_pretrained(save_dir)
    return {"model": model, "params": params, "transformer_checkpoint_numel": checkpoint}


def build_adm(save_dir, device="cpu", seed=0, tiny=False):
    """The random-weight ADM ImageNet-64 UNet2DModel (openai conversion's config; tiny: the same layout at toy
    width, 16 px, 10 classes), saved."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DModel(**(ADM_TINY if tiny else ADM_IMAGENET64))
    unet.save_pretrained(save_dir)
    return {"params": {"unet": sum(p.numel() for p in unet.parameters())}}


def write_class_images(folder, classes, per_class, resolution, seed=0):
    """An imagefolder (one sub-folder per class) of random RGB images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(folder, str(c)), exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(a).save(os.path.join(folder, str(c), f"{i}.png"))
    return {"images": classes * per_class}


def train_sdxl(argv):
    import train_tfd_sdxl

    train_tfd_sdxl.main(train_tfd_sdxl.parse_args(argv))
    return {}


def train_sd3(argv):
    import train_tfd_sd3

    train_tfd_sd3.main(train_tfd_sd3.parse_args(argv))
    return {}


def train_imagenet64(argv):
    import train_tfd_imagenet64

    train_tfd_imagenet64.main(train_tfd_imagenet64.parse_args(argv))
    return {}


@torch.no_grad()
def one_step_with_and_without_lora(pipe, prompt, noise, kw):
    """One image with the loaded adapters, then the same noise through the base (adapters unloaded): the image's
    size and spread, and how far the adapters move the latents."""
    import numpy as np

    image = pipe(prompt, latents=noise.clone(), **kw).images[0]
    lora_latents = pipe(prompt, latents=noise.clone(), output_type="latent", **kw).images.float()
    pipe.unload_lora_weights()
    base_latents = pipe(prompt, latents=noise.clone(), output_type="latent", **kw).images.float()
    return {"image_size": list(image.size), "pixel_std": float(np.asarray(image).std()),
            "latents_finite": bool(torch.isfinite(lora_latents).all()),
            "lora_vs_base_max_diff": float((lora_latents - base_latents).abs().max())}


def infer_sdxl(pipe_dir, lora_dir, resolution=256, device="cpu", prompt="a photo of a red fox"):
    """The user's lines: the teacher pipeline, load_lora_weights, the saved one-step scheduler; one image.
    The same noise through the base pipeline (adapters unloaded) shows that the adapters act."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_dir, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_dir)
    pipe.scheduler = DDIMScheduler.from_pretrained(lora_dir, subfolder="scheduler")
    latent = resolution // pipe.vae_scale_factor
    noise = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    kw = dict(num_inference_steps=1, guidance_scale=0.0, height=resolution, width=resolution)
    return one_step_with_and_without_lora(pipe, prompt, noise, kw)


def infer_sd3(pipe_dir, lora_dir, resolution=256, device="cpu", prompt="a photo of a red fox"):
    """The user's lines: the teacher pipeline without T5, load_lora_weights, one step of the teacher's own flow
    scheduler with guidance 1.0; one image. The same noise through the base pipeline (adapters unloaded) shows
    that the adapters act."""
    from diffusers import StableDiffusion3Pipeline

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_dir)
    latent = resolution // pipe.vae_scale_factor
    noise = torch.randn(1, pipe.transformer.config.in_channels, latent, latent,
                        generator=torch.Generator().manual_seed(0)).to(device, dtype)
    kw = dict(num_inference_steps=1, guidance_scale=1.0, height=resolution, width=resolution)
    return one_step_with_and_without_lora(pipe, prompt, noise, kw)


def main(argv):
    if argv[:1] == ["chain"]:
        stages, current = [], []
        for a in argv[1:] + ["--"]:
            if a == "--":
                if current:
                    stages.append(current)
                current = []
            else:
                current.append(a)
        for st in stages:
            run(st)
    else:
        run(argv)


def run(argv):
    """One stage; prints `RESULT {json}`."""
    stage, rest = (argv[0], argv[1:]) if argv else ("", [])
    start = time.time()
    trainers = {"train-sdxl": train_sdxl, "train-sd3": train_sd3, "train-imagenet64": train_imagenet64}
    if stage in trainers:
        out = trainers[stage](rest)
    else:
        p = argparse.ArgumentParser(prog=f"real_arch.py {stage}")
        p.add_argument("paths", nargs="+")
        p.add_argument("--device", default="cpu")
        p.add_argument("--resolution", type=int, default=None)
        p.add_argument("--classes", type=int, default=2)
        p.add_argument("--per_class", type=int, default=4)
        p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
        p.add_argument("--tiny", action="store_true", help="The tests' toy models of the same layouts.")
        p.add_argument("--model", default="sd35-medium", choices=tuple(SD3_MODELS), help="build-sd3: which model.")
        a = p.parse_args(rest)
        if stage == "build-sdxl":
            out = build_sdxl(a.paths[0], a.device, dtype=a.dtype, tiny=a.tiny)
        elif stage == "build-sd3":
            out = build_sd3(a.paths[0], a.model, a.device, dtype=a.dtype, tiny=a.tiny)
        elif stage == "build-adm":
            out = build_adm(a.paths[0], a.device, tiny=a.tiny)
        elif stage == "images":
            out = write_class_images(a.paths[0], a.classes, a.per_class, a.resolution or 64)
        elif stage == "infer-sdxl":
            out = infer_sdxl(a.paths[0], a.paths[1], a.resolution or 256, a.device)
        elif stage == "infer-sd3":
            out = infer_sd3(a.paths[0], a.paths[1], a.resolution or 256, a.device)
        else:
            raise SystemExit(f"unknown stage {stage!r}: build-sdxl, build-sd3, build-adm, images, train-sdxl, "
                             "train-sd3, train-imagenet64, infer-sdxl, infer-sd3")
    if "RANK" in os.environ:  # under accelerate launch every process reports
        out["rank"] = int(os.environ["RANK"])
    out.update(stage=stage, wall_s=round(time.time() - start, 1),
               peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
