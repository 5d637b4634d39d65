#!/usr/bin/env python
# Teacher-Feature Drifting (TFD): distil SDXL (or any StableDiffusionXLPipeline teacher) into a
# one-step text-to-image student, full fine-tune or LoRA.
#
#   # 1. spend the teacher compute up front, on every GPU (sharded, resumable)
#   accelerate launch train_tfd_sdxl.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
#     --dataset_name DATASET --caption_column caption --positive_cache_dir cache --prepare_positives_only
#   # 2. train (the same flags, without --prepare_positives_only)
#   accelerate launch train_tfd_sdxl.py ... --positive_cache_dir cache --output_dir tfd-sdxl
#
# To fork, copy this file with tfd_utils.py (the method), tfd_training.py (the loop's plumbing) and
# tfd_text2image.py (prompts, positives, LoRA). `train_step` is the step; `main` reads top to bottom.

import argparse
import logging
import os

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed

import tfd_text2image
import tfd_training
import tfd_utils

logger = get_logger(__name__, log_level="INFO")

SDXL_LAYERS = "down_blocks.2 mid_block up_blocks.0"
VALIDATION_PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "a cozy wooden cabin in a snowy forest at dusk, warm light in the windows",
    "a close-up portrait of a red fox, detailed fur, golden hour",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
]


# Valid ranges of the numeric flags, checked at parse time (tfd_training.check_ranges).
RANGES = {**tfd_training.COMMON_RANGES, **tfd_utils.TFDLoss.RANGES,
          "num_generated": tfd_training.NUM_GENERATED, "num_positives": ">= 1", "prompts_per_batch": ">= 1",
          "num_positive_steps": ">= 1", "positive_guidance_scale": ">= 0", "positive_seed": ">= 0",
          "resolution": "> 0", "conditioning_timestep": "0..999", "lora_rank": ">= 1", "lora_alpha": "> 0",
          "max_train_samples": ">= 1"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="TFD one-step distillation of an SDXL teacher (full fine-tune or LoRA).")
    g = p.add_argument_group("teacher")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="StableDiffusionXLPipeline folder or Hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0).")
    g.add_argument("--revision", default=None, help="Hub revision of the teacher.")
    g.add_argument("--variant", default=None, help="Weight variant to load, e.g. fp16.")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="A separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix); default: the teacher's own.")
    g.add_argument("--teacher_dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="dtype of the frozen teacher UNet and text encoders: the feature pass and the positive "
                        "sampling run in it (the recipe: fp32). With --train_mode lora it is the dtype of the shared "
                        "base weights. The full fine-tune's student always starts from the checkpoint's exact weights.")
    g.add_argument("--cache_dir", default=None, help="Hub and datasets cache directory.")

    g = p.add_argument_group("prompts and real images")
    g.add_argument("--dataset_name", default=None,
                   help="Captioned data set: a Hub id, a local path datasets.load_dataset takes, a save_to_disk folder, "
                        "or 'webdataset' with --data_files.")
    g.add_argument("--dataset_config_name", default=None, help="Config name of --dataset_name.")
    g.add_argument("--data_files", nargs="+", default=None,
                   help="Data files of --dataset_name, e.g. webdataset shards 'shards/{00000..00099}.tar' (ranges in "
                        "braces are expanded).")
    g.add_argument("--dataset_split", default="train",
                   help="Split, optionally sliced as datasets does it: 'train', 'train[:100000]'.")
    g.add_argument("--streaming", action="store_true",
                   help="Stream the data set instead of downloading it whole: only the first --max_train_samples "
                        "rows are read (and their images, with --image_column).")
    g.add_argument("--caption_column", default="text",
                   help="Caption column (a string or a list of strings per row; LAION metadata: TEXT, Re-LAION: "
                        "caption, img2dataset webdataset shards: txt). Every distinct caption is a prompt.")
    g.add_argument("--image_column", default=None,
                   help="Optional image column (webdataset: jpg): images whose caption matches a prompt become its "
                        "first positives.")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Use this many rows (a seeded random subset; with --streaming the first rows).")
    g.add_argument("--prompts_file", default=None, help="A text file of prompts, one per line (instead of a data set).")

    g = p.add_argument_group("positives and their cache")
    g.add_argument("--positive_cache_dir", default=None,
                   help="On-disk cache of positives and text embeddings (default: OUTPUT_DIR/positive_cache). Share it "
                        "between runs: entries are keyed by every setting they depend on.")
    g.add_argument("--prepare_positives_only", action="store_true",
                   help="Fill the cache for the whole prompt set (sharded over all processes, resumable) and exit. "
                        "Run this first: a prompt missing from the cache is sampled inside a training step.")
    g.add_argument("--num_positive_steps", type=int, default=50, help="Teacher sampling steps of a positive.")
    g.add_argument("--positive_guidance_scale", type=float, default=6.0, help="CFG scale of teacher positives.")
    g.add_argument("--positive_seed", type=int, default=0,
                   help="Base seed of teacher positives (each (prompt, slot) derives its own from it).")
    g.add_argument("--cache_dtype", default="float16", choices=("float16", "float32"),
                   help="Storage dtype of cached latents and text embeddings.")

    g = p.add_argument_group("batch and student")
    g.add_argument("--resolution", type=int, default=1024, help="Image resolution (pixels) of students and positives.")
    g.add_argument("--conditioning_timestep", type=int, default=999,
                   help="Timestep at which the student maps pure noise to x0 in one step: 999 (the recipe), or lower "
                        "(DMD2's one-step SDXL uses 399), where x0 = (z - sqrt(1-a)·eps)/sqrt(a) magnifies the UNet's "
                        "changes less (14.6x at 999, 1.2x at 399; on the digits demo's toy teacher 399 kept learning "
                        "where 999 stalled). Other than 999, sample with timesteps=[T].")
    g.add_argument("--prompts_per_batch", type=int, default=1, help="Prompts (groups) per step per process.")
    g.add_argument("--num_generated", type=int, default=4, help="Student samples per prompt (N, at least 2).")
    g.add_argument("--num_positives", type=int, default=4,
                   help="Positives per prompt (P): matching real images first, then teacher samples. They are also "
                        "the anchors of the anchor-margin loss.")
    g.add_argument("--train_mode", default="full", choices=("full", "lora"),
                   help="full: train a copy of the teacher UNet; lora: train LoRA adapters on it (the teacher is the "
                        "same UNet with adapters disabled: no second copy).")
    g.add_argument("--lora_rank", type=int, default=64, help="LoRA rank.")
    g.add_argument("--lora_alpha", type=float, default=64, help="LoRA alpha (scale = alpha / rank).")
    g.add_argument("--lora_target_modules", default="to_k,to_q,to_v,to_out.0",
                   help="Comma-separated UNet module names that get LoRA adapters.")
    tfd_utils.TFDLoss.add_arguments(p, layers=SDXL_LAYERS, radii="0.02,0.05,0.2", sigma_min=0.1, sigma_max=0.1)

    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=1e-6, help="AdamW learning rate.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW β1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW β2.")
    g.add_argument("--adam_weight_decay", type=float, default=0.01, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW ε.")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (saves optimiser memory).")
    g.add_argument("--lr_scheduler", default="constant_with_warmup",
                   help="diffusers.optimization schedule name (constant, constant_with_warmup, cosine, ...).")
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up steps of the learning rate.")
    g.add_argument("--max_train_steps", type=int, default=10_000, help="Optimiser updates.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per update.")
    g.add_argument("--max_grad_norm", type=float, default=2.0, help="Gradient clipping norm.")
    g.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"),
                   help="Autocast of the student (default: the accelerate config's setting).")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Gradient checkpointing in the student UNet (the teacher's pass: --teacher_checkpointing).")
    g.add_argument("--teacher_checkpointing", default=None, action=argparse.BooleanOptionalAction,
                   help="In the generated samples' teacher pass, recompute the teacher's blocks in backward instead "
                        "of keeping their activations (LoRA: with the adapters off). Default: on with "
                        "--gradient_checkpointing.")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    g.add_argument("--max_bad_steps", type=int, default=10,
                   help="Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped).")
    g.add_argument("--seed", type=int, default=0,
                   help="Seed of everything: LoRA initialisation, prompt draws, noise (per step and process).")

    g = p.add_argument_group("logging, validation, checkpoints, output")
    g.add_argument("--output_dir", default="tfd-sdxl", help="Where checkpoints, logs and the student go.")
    g.add_argument("--logging_dir", default="logs", help="Tracker log folder, relative to --output_dir.")
    g.add_argument("--report_to", default="tensorboard", help="Trackers: tensorboard, wandb, all or none.")
    g.add_argument("--tracker_project_name", default="tfd-sdxl", help="Tracker project name.")
    g.add_argument("--logging_steps", type=int, default=10, help="Log (trackers, metrics.jsonl) every N updates.")
    g.add_argument("--validation_steps", type=int, default=500, help="Validation grid every N updates (0: never).")
    g.add_argument("--validation_prompts", nargs="+", default=VALIDATION_PROMPTS,
                   help="Fixed prompts of the validation grid (one image each, fixed seeds, one step).")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint every N updates.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="A checkpoint-N folder, or 'latest' (the newest complete one in --output_dir; a new run if "
                        "there is none).")
    g.add_argument("--push_to_hub", action="store_true",
                   help="Create the Hub repo at the start, upload --output_dir at the end.")
    g.add_argument("--hub_model_id", default=None, help="Hub repo id (default: the output folder's name).")
    g.add_argument("--hub_token", default=None,
                   help="Hub token (default: the cached `hf auth login` or HF_TOKEN, which are safer: a token on the "
                        "command line shows in the process list, and accelerate prints a failed command). Never "
                        "written to any file or tracker.")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Bad settings fail here, before any model or data is loaded."""
    tfd_text2image.check_data_args(args)
    tfd_training.check_ranges(args, RANGES)
    if args.resolution % 8:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of 8 (the VAE's factor).")
    if args.conditioning_timestep != 999:
        logging.getLogger(__name__).warning(
            f"--conditioning_timestep {args.conditioning_timestep}: the saved pipeline's LCMScheduler takes t=999 "
            f"with num_inference_steps=1; call it with timesteps=[{args.conditioning_timestep}] instead.")
    tfd_utils.TFDLoss.check_arguments(args)
    tfd_training.check_hub_args(args)
    args.lora_target_modules = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    if args.teacher_checkpointing is None:
        args.teacher_checkpointing = args.gradient_checkpointing
    if args.positive_cache_dir is None:
        args.positive_cache_dir = os.path.join(args.output_dir, "positive_cache")


def main(args):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    # 1. Accelerator, logging and the seed.
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" or args.prepare_positives_only else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    device, teacher_dtype = accelerator.device, tfd_text2image.DTYPES[args.teacher_dtype]

    # 2. Checks that need no weights: another run's output folder, layer names, the Hub repo.
    resume = tfd_text2image.check_run(accelerator, args, UNet2DConditionModel, "unet", logger)
    repo_id = tfd_training.create_hub_repo(args) if accelerator.is_main_process else None

    # 3. Prompts, and the real images whose captions match them.
    prompts, real_rows, dataset, data_desc = tfd_text2image.load_prompts(args, logger)

    # 4. The teacher pipeline: both CLIP text encoders in the teacher's dtype, the VAE in float32.
    pipe = tfd_text2image.load_pipeline(StableDiffusionXLPipeline, args, device, teacher_dtype)
    alphas_cumprod = pipe.scheduler.alphas_cumprod.to(torch.float64)
    latent_shape = (pipe.unet.config.in_channels, args.resolution // pipe.vae_scale_factor,
                    args.resolution // pipe.vae_scale_factor)

    # 5. Student and teacher; the positives (the cache, filled up front with --prepare_positives_only).
    student, teacher, teacher_context = tfd_text2image.make_student(pipe, "unet", args, device)
    positives = tfd_text2image.open_positives(args, pipe, real_rows, dataset, device, teacher_context, logger)
    if args.prepare_positives_only:
        return positives.prepare(accelerator, prompts)
    val_embeds = tfd_text2image.encode_prompts(pipe, args.validation_prompts, device)
    positives.offload_if_complete(prompts)

    # 6. The loss, the optimiser and its schedule.
    loss_fn, student, optimizer, lr_scheduler = tfd_text2image.prepare_training(
        accelerator, args, student, teacher, teacher_context, StableDiffusionXLPipeline, "unet")

    # 7. Resume, record the settings, start the trackers.
    first_step, metrics_path = tfd_training.start_run(accelerator, args, resume, logger)
    one_step = LCMScheduler.from_config(one_step_scheduler_config(pipe.scheduler.config))

    def validation_grid(model):
        return tfd_text2image.sample_grid(pipe, "unet", model, one_step, val_embeds, args, accelerator,
                                          guidance_scale=0.0)

    # 8. Train: the loop is tfd_text2image.train_loop; the step is train_step below.
    tfd_text2image.train_loop(
        accelerator, args, student, optimizer, lr_scheduler, loss_fn, positives, prompts,
        lambda batch, gen: train_step(args, accelerator, student, teacher, loss_fn, batch, alphas_cumprod, gen),
        latent_shape, validation_grid, first_step, metrics_path, logger)

    # 9. Export: the one-step pipeline (LCMScheduler) or the LoRA weights, samples and a model card.
    return tfd_text2image.export(
        accelerator, args, student, pipe, "unet", one_step, validation_grid,
        lambda: write_model_card(args, repo_id or tfd_training.hub_repo_name(args), data_desc, len(prompts)), repo_id)


def train_step(args, accelerator, student, teacher, loss_fn, batch, alphas_cumprod, generator):
    """One micro-step: N one-step samples per prompt, then the TFD loss in the teacher's features.

    batch: (positives [G, P, 4, h, w], prompt_embeds [G, 77, D], pooled [G, D'], noise [G·N, 4, h, w]).
    Returns (loss, logs); the caller runs the backward.
    """
    positives, prompt_embeds, pooled, noise = batch
    G, N = positives.shape[0], noise.shape[0] // positives.shape[0]
    cond = {"text_embeds": pooled, "time_ids": sdxl_time_ids(args.resolution, G, noise.device, pooled.dtype)}
    t = args.conditioning_timestep
    with accelerator.autocast():
        generated = tfd_utils.sdxl_one_step(student, noise, t, alphas_cumprod[t], prompt_embeds.repeat_interleave(N, 0),
                                            {k: v.repeat_interleave(N, 0) for k, v in cond.items()})
    generated = generated.float().reshape(G, N, *noise.shape[1:])
    forward = tfd_utils.vp_teacher_forward(teacher, alphas_cumprod, prompt_embeds, cond)
    return loss_fn(forward, generated, positives, generator=generator)


def sdxl_time_ids(resolution, batch_size, device=None, dtype=torch.float32):
    """SDXL micro-conditioning ids [B, 6]: original size, crop (0, 0), target size, all at the training
    resolution (what StableDiffusionXLPipeline passes for a square image)."""
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype, device=device)
    return ids.expand(batch_size, 6)


def one_step_scheduler_config(teacher_config):
    """LCMScheduler config with the teacher's noise schedule: at num_inference_steps=1 its step is
    x₀ = (z − √(1−ᾱ)ε̂)/√ᾱ at timestep 999 (boundary c_skip ≈ 3e-9), the student's generator."""
    import inspect

    from diffusers import LCMScheduler

    keys = inspect.signature(LCMScheduler.__init__).parameters
    return LCMScheduler.from_config({k: v for k, v in teacher_config.items() if k in keys}).config


def write_model_card(args, repo_id, data_desc, num_prompts):
    teacher = tfd_training.public_name(args.pretrained_model_name_or_path)
    steps = "num_inference_steps=1" if args.conditioning_timestep == 999 else f"timesteps=[{args.conditioning_timestep}]"
    if args.train_mode == "lora":
        usage = ("import torch\nfrom diffusers import LCMScheduler, StableDiffusionXLPipeline\n\n"
                 f"pipe = StableDiffusionXLPipeline.from_pretrained('{teacher}', torch_dtype=torch.float16).to('cuda')\n"
                 f"pipe.load_lora_weights('{repo_id}')\n"
                 f"pipe.scheduler = LCMScheduler.from_pretrained('{repo_id}', subfolder='scheduler')\n"
                 f"image = pipe('a photo of a cat', {steps}, guidance_scale=0).images[0]")
    else:
        usage = ("import torch\nfrom diffusers import DiffusionPipeline\n\n"
                 f"pipe = DiffusionPipeline.from_pretrained('{repo_id}', torch_dtype=torch.float16).to('cuda')\n"
                 f"image = pipe('a photo of a cat', {steps}, guidance_scale=0).images[0]")
    tfd_training.save_model_card(
        args, repo_id, args.pretrained_model_name_or_path,
        ["diffusers", "text-to-image", "stable-diffusion-xl", "one-step", "tfd"] + (["lora"] if args.train_mode ==
                                                                                     "lora" else []),
        f"One-step TFD student of {teacher}",
        "Distilled with Teacher-Feature Drifting (`train_tfd_sdxl.py`): one UNet evaluation per image "
        "(LCMScheduler, 1 step, no classifier-free guidance).",
        usage, tfd_text2image.card_settings(args, num_prompts, data_desc))


if __name__ == "__main__":
    main(parse_args())
