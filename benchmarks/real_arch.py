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
#   python benchmarks/real_arch.py chain STAGE ARGS... -- STAGE ARGS...   # several stages in one process (toy
#                                                                         # sizes: saves the imports)
#
# SDXL: the base UNet config (bench_train_step.SDXL_BASE, 2.57 B parameters), the real SDXL VAE config
# (83.7 M), CLIP text encoders of the real widths (768; 1280 with a 1280 projection) with 2 layers each
# (the real ones have 12 and 32), and the tokenizers of tests/tiny_sdxl.py (the real CLIP BPE vocabulary,
# which open_clip ships). --tiny: the toy models of the tests at the same layouts (seconds on a CPU).
# Used by tests/test_real_sdxl_slow.py and benchmarks/gpu_check.sh.

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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_sdxl(save_dir, device="cpu", seed=0, dtype="fp32", tiny=False):
    """The random-weight SDXL pipeline, saved in `dtype`; returns the parameter counts. tiny: tests/tiny_sdxl.py's."""
    if tiny:
        from tiny_sdxl import make_tiny_sdxl_pipeline

        pipe = make_tiny_sdxl_pipeline(save_dir, seed)
        return {"params": {k: sum(p.numel() for p in m.parameters()) for k, m in pipe.components.items()
                           if isinstance(m, torch.nn.Module)}}
    from bench_train_step import SDXL_BASE
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from tiny_sdxl import SDXL_SCHEDULER_CONFIG, make_tokenizers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with torch.device(device):  # random init on a GPU takes seconds, on a CPU about a minute
        components = dict(
            unet=UNet2DConditionModel(**SDXL_BASE),
            vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(clip_text_config(768, 12, "quick_gelu")),
            text_encoder_2=CLIPTextModelWithProjection(clip_text_config(1280, 20, "gelu", projection_dim=1280)),
        )
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in components.items()}
    for m in components.values():
        m.to(DTYPES[dtype])
    components["tokenizer"], components["tokenizer_2"] = make_tokenizers()
    components["scheduler"] = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    StableDiffusionXLPipeline(**components).save_pretrained(save_dir)
    return {"params": params}


def build_adm(save_dir, device="cpu", seed=0, tiny=False):
    """The random-weight ADM ImageNet-64 UNet2DModel (openai conversion's config; tiny: the same layout at toy
    width, 16 px, 10 classes), saved."""
    from bench_train_step import ADM_IMAGENET64, ADM_TINY
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


def train_imagenet64(argv):
    import train_tfd_imagenet64

    train_tfd_imagenet64.main(train_tfd_imagenet64.parse_args(argv))
    return {}


def infer_sdxl(pipe_dir, lora_dir, resolution=256, device="cpu", prompt="a photo of a red fox"):
    """The user's lines: the teacher pipeline, load_lora_weights, the saved one-step scheduler; one image.
    The same noise through the base pipeline (adapters unloaded) shows that the adapters act."""
    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_dir, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_dir)
    pipe.scheduler = DDIMScheduler.from_pretrained(lora_dir, subfolder="scheduler")
    latent = resolution // pipe.vae_scale_factor
    noise = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    kw = dict(num_inference_steps=1, guidance_scale=0.0, height=resolution, width=resolution)
    with torch.no_grad():
        image = pipe(prompt, latents=noise.clone(), **kw).images[0]
        lora_latents = pipe(prompt, latents=noise.clone(), output_type="latent", **kw).images.float()
        pipe.unload_lora_weights()
        base_latents = pipe(prompt, latents=noise.clone(), output_type="latent", **kw).images.float()
    return {"image_size": list(image.size), "pixel_std": float(np.asarray(image).std()),
            "latents_finite": bool(torch.isfinite(lora_latents).all()),
            "lora_vs_base_max_diff": float((lora_latents - base_latents).abs().max())}


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
    if stage in ("train-sdxl", "train-imagenet64"):
        out = (train_sdxl if stage == "train-sdxl" else train_imagenet64)(rest)
    else:
        p = argparse.ArgumentParser(prog=f"real_arch.py {stage}")
        p.add_argument("paths", nargs="+")
        p.add_argument("--device", default="cpu")
        p.add_argument("--resolution", type=int, default=None)
        p.add_argument("--classes", type=int, default=2)
        p.add_argument("--per_class", type=int, default=4)
        p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
        p.add_argument("--tiny", action="store_true", help="The tests' toy models of the same layouts.")
        a = p.parse_args(rest)
        if stage == "build-sdxl":
            out = build_sdxl(a.paths[0], a.device, dtype=a.dtype, tiny=a.tiny)
        elif stage == "build-adm":
            out = build_adm(a.paths[0], a.device, tiny=a.tiny)
        elif stage == "images":
            out = write_class_images(a.paths[0], a.classes, a.per_class, a.resolution or 64)
        elif stage == "infer-sdxl":
            out = infer_sdxl(a.paths[0], a.paths[1], a.resolution or 256, a.device)
        else:
            raise SystemExit(f"unknown stage {stage!r}: build-sdxl, build-adm, images, train-sdxl, train-imagenet64, "
                             "infer-sdxl")
    out.update(stage=stage, wall_s=round(time.time() - start, 1),
               peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
