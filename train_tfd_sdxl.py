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
# tfd_text2image.py (prompts, positives, LoRA, export). `main` reads top to bottom and holds the loop;
# `build` sets up what a step needs; `train_step` is the step; `generate` is the one-step student.

import os

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

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
RANGES = {"conditioning_timestep": "0..999"}  # this script's own flags' ranges, checked at parse time


def parse_args(argv=None):
    p = tfd_training.argument_parser("TFD one-step distillation of an SDXL teacher (full fine-tune or LoRA).")
    g = p.add_argument_group("teacher")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="StableDiffusionXLPipeline folder or Hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0).")
    g.add_argument("--revision", default=None, help="Hub revision of the teacher.")
    g.add_argument("--variant", default=None, help="Weight variant to load, e.g. fp16.")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="A separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix); default: the teacher's own.")
    g.add_argument("--teacher_dtype", default="fp32", choices=tuple(tfd_training.DTYPES),
                   help="dtype of the frozen teacher UNet and text encoders: the feature pass and the positive "
                        "sampling run in it (the recipe: fp32). With --train_mode lora it is the dtype of the shared "
                        "base weights. The full fine-tune's student always starts from the checkpoint's exact "
                        "weights.")
    g.add_argument("--cache_dir", default=None, help="Hub and datasets cache directory.")
    g = tfd_text2image.add_arguments(p, "UNet", positive_steps=50, positive_guidance=6.0,
                                     lora_targets="to_k,to_q,to_v,to_out.0",
                                     lora_targets_help="Comma-separated UNet module names that get LoRA adapters.")
    g.add_argument("--conditioning_timestep", type=int, default=399,
                   help="Timestep T at which the student maps pure noise to x0 in one step: 399 (DMD2's; x0 "
                        "magnifies the UNet's output 1.2x) or 999 (the paper's; 14.6x).")
    tfd_training.add_loss_arguments(p, layers=SDXL_LAYERS, radii="0.02,0.05,0.2", sigma_min=0.1, sigma_max=0.1)
    g = tfd_training.add_training_arguments(p, output_dir="tfd-sdxl", learning_rate=1e-6, max_train_steps=10_000,
                                            max_grad_norm=2.0, validation_steps=500, checkpointing_steps=500)
    g.add_argument("--validation_prompts", nargs="+", default=VALIDATION_PROMPTS,
                   help="Fixed prompts of the validation grid (one image each, fixed seeds, one step). For more "
                        "images of a prompt, repeat it: each position has its own seed (what the ImageNet script's "
                        "--num_validation_images sets).")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Bad settings fail here, before any model or data is loaded."""
    tfd_text2image.check_args(args, RANGES)
    if args.resolution % 8:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of 8 (the VAE's factor).")


def main(args):
    from diffusers import UNet2DConditionModel

    # 1. Accelerator, logging and the seed.
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" or args.prepare_positives_only else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        # DDP: the gradients are views into its all-reduce buckets, not a second float32 copy of the student
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)])
    tfd_training.setup_logging()
    logger.info(accelerator.state, main_process_only=False)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)

    # 2. Checks that need no weights: a finished run (nothing to do), local paths and Hub ids, another run's output
    #    folder, what a checkpoint holds, layer names, the Hub repo.
    if tfd_training.check_finished_run(args, logger):
        return None
    resume = tfd_text2image.check_run(accelerator, args, UNet2DConditionModel, "unet", logger)
    repo_id = tfd_training.create_hub_repo(args) if accelerator.is_main_process else None

    # 3. Prompts, the teacher pipeline, student and teacher, the positives, the loss and the optimiser.
    run = build(args, accelerator)
    if args.prepare_positives_only:
        return run.positives.prepare(accelerator, run.prompts)

    # 4. Resume, record the settings, start the trackers.
    first_step, metrics_path = tfd_training.start_run(accelerator, args, resume, logger)

    def validation_grid(model):
        return tfd_text2image.sample_grid(run.pipe, "unet", model, run.scheduler, run.val_embeds, args, accelerator,
                                          guidance_scale=0.0)

    # 5. Train! Each micro-step draws --prompts_per_batch prompts (positions [rank·G, (rank+1)·G) of one sequence
    #    every process shares: they never repeat each other) and runs train_step on their cache entries.
    G, N, rank = args.prompts_per_batch, args.num_generated, accelerator.process_index
    logger.info(f"***** TFD ({args.train_mode}): {args.max_train_steps} updates, {G} prompts x (N={N}, "
                f"P={args.num_positives}) per process, {accelerator.num_processes} processes, layers "
                f"{run.loss_fn.layers}, σ in [{args.feature_noise_min}, {args.feature_noise_max}] *****")
    params = [prm for prm in run.student.parameters() if prm.requires_grad]  # FSDP clips the prepared model's own
    progress = tqdm(range(args.max_train_steps), initial=first_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    images_per_update = G * N * args.gradient_accumulation_steps * accelerator.num_processes
    monitor = tfd_training.TrainingMonitor(accelerator, args, progress, metrics_path, first_step, images_per_update,
                                           logger)
    with tfd_training.stop_on_interrupt(accelerator, args, logger):  # Ctrl-C: one line, how to resume
        for step in range(first_step + 1, args.max_train_steps + 1):
            loss_sum = 0.0
            for micro in range(args.gradient_accumulation_steps):
                shared, gen = tfd_training.step_generators(args.seed, step, micro, rank)
                drawn = tfd_training.shared_draw(len(run.prompts), rank * G, G, shared).tolist()
                entries = [run.positives.get(run.prompts[i]) for i in drawn]
                batch = tfd_text2image.prompt_batch(entries, N, run.latent_shape, gen, accelerator.device,
                                                    tfd_text2image.cond_dtype(args))
                with accelerator.accumulate(run.student):
                    loss, logs = train_step(args, accelerator, run, batch, gen)
                    accelerator.backward(loss)
                    monitor.add(logs)
                    loss_sum = loss_sum + loss.detach()
                    if accelerator.sync_gradients:  # skips the update when the loss or gradient is not finite
                        ok, grad_norm = tfd_training.clip_and_step(accelerator, run.optimizer, run.lr_scheduler,
                                                                   params, loss_sum, args.max_grad_norm)
            monitor.end_step(step, ok, grad_norm, lambda: {"train/lr": run.lr_scheduler.get_last_lr()[0],
                                                           **run.positives.window(accelerator)})
            if step % args.checkpointing_steps == 0 and monitor.can_checkpoint(step):
                tfd_training.save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, logger)
            if tfd_training.is_validation_step(accelerator, args, step):
                grid = validation_grid(accelerator.unwrap_model(run.student))
                tfd_training.save_validation_grid(accelerator, args, grid, step)
    progress.close()

    # 6. Export: the one-step pipeline (its scheduler's one step is the student's) or the LoRA weights with
    #    that scheduler, samples and a model card.
    student = tfd_text2image.export(
        accelerator, args, run.student, run.pipe, "unet", run.scheduler, validation_grid,
        lambda: write_model_card(args, repo_id or tfd_training.hub_repo_name(args), len(run.prompts),
                                 run.positives.counts(run.prompts), type(run.scheduler).__name__), repo_id)
    logger.info(tfd_training.saved_message(args.output_dir))
    return student


def build(args, accelerator, pipe=None):
    """What the loop needs (tfd_text2image.setup: prompts, teacher pipeline, student and teacher, positives,
    loss, prepared optimiser and schedule), with this teacher's noise schedule (alphas_cumprod, for the feature
    pass), latent shape and the one-step scheduler (the student's sampler: the saved pipeline's, the validation
    grid's). pipe: a teacher pipeline already in memory (the benchmark's) instead of loading
    --pretrained_model_name_or_path."""
    from diffusers import StableDiffusionXLPipeline

    run = tfd_text2image.setup(args, accelerator, StableDiffusionXLPipeline, "unet", logger, pipe=pipe)
    teacher_scheduler = run.pipe.scheduler
    prediction = teacher_scheduler.config.get("prediction_type", "epsilon")
    if not hasattr(teacher_scheduler, "alphas_cumprod") or prediction not in tfd_utils.VP_PREDICTION_TYPES:
        raise ValueError(f"The teacher's scheduler {type(teacher_scheduler).__name__} (prediction type "
                         f"{prediction!r}) is not a variance-preserving DDPM schedule with ε, v or sample prediction: "
                         "this script's student needs one (an EDM-formulated checkpoint such as Playground v2.5 is "
                         "not supported).")
    run.alphas_cumprod = teacher_scheduler.alphas_cumprod.to(torch.float64)
    factor = run.pipe.vae_scale_factor
    run.latent_shape = (run.pipe.unet.config.in_channels, args.resolution // factor, args.resolution // factor)
    run.scheduler = tfd_text2image.vp_one_step_scheduler(teacher_scheduler.config, args.conditioning_timestep)
    if prediction == "epsilon" and run.scheduler.alphas_cumprod[args.conditioning_timestep] == 0:
        raise ValueError(f"--conditioning_timestep {args.conditioning_timestep}: this teacher's schedule has ᾱ = 0 "
                         "there (zero terminal SNR), where an ε-prediction has no x0; choose a lower timestep.")
    # σ below the schedule's smallest σ(t=0) has no timestep (σ fixed at 0: clean features, at t = 0)
    if args.feature_noise_min == 0 < args.feature_noise_max:
        raise ValueError("--feature_noise_min 0 with --feature_noise_max > 0 draws σ below the teacher's smallest "
                         f"noise level σ(t=0) = {tfd_utils.vp_sigmas(run.alphas_cumprod)[0]:.4g}: raise "
                         "--feature_noise_min to it, or also set --feature_noise_max 0 (clean features).")
    tfd_utils.vp_timestep_for_sigma(torch.tensor([args.feature_noise_min]), run.alphas_cumprod)
    logger.info(f"One-step student at timestep {args.conditioning_timestep} ({prediction} prediction); sampler "
                f"{type(run.scheduler).__name__}.")
    return run


def generate(args, unet, noise, prompt_embeds, pooled_prompt_embeds, scheduler):
    """The one-step student: the UNet at T = --conditioning_timestep on pure noise z, then x0 from its output
    with the one-step scheduler's ᾱ_T and prediction type (ε: x0 = (z − √(1−ᾱ_T)·ε̂)/√ᾱ_T; v: x0 = √ᾱ_T·z −
    √(1−ᾱ_T)·v̂). Conditioning per sample. The saved pipeline's plain one-step call runs exactly this."""
    t = args.conditioning_timestep
    cond = {"text_embeds": pooled_prompt_embeds,
            "time_ids": sdxl_time_ids(args.resolution, noise.shape[0], noise.device, pooled_prompt_embeds.dtype)}
    return tfd_utils.sdxl_one_step(unet, noise, t, scheduler.alphas_cumprod[t], prompt_embeds, cond,
                                   scheduler.config.prediction_type)


def train_step(args, accelerator, run, batch, generator):
    """One micro-step: N one-step samples per prompt, then the TFD loss in the teacher's features.

    batch: (positives [G, P, 4, h, w], prompt_embeds [G, 77, D], pooled [G, D'], noise [G·N, 4, h, w]).
    Returns (loss, logs); the caller runs the backward.
    """
    positives, prompt_embeds, pooled, noise = batch
    G, N = positives.shape[0], noise.shape[0] // positives.shape[0]
    with accelerator.autocast():
        generated = generate(args, run.student, noise, prompt_embeds.repeat_interleave(N, 0),
                             pooled.repeat_interleave(N, 0), run.scheduler)
    generated = generated.float().reshape(G, N, *noise.shape[1:])
    cond = {"text_embeds": pooled, "time_ids": sdxl_time_ids(args.resolution, G, noise.device, pooled.dtype)}
    forward = tfd_utils.vp_teacher_forward(run.teacher, run.alphas_cumprod, prompt_embeds, cond)
    return run.loss_fn(forward, generated, positives, generator=generator)


def sdxl_time_ids(resolution, batch_size, device=None, dtype=torch.float32):
    """SDXL micro-conditioning ids [B, 6]: original size, crop (0, 0), target size, all at the training
    resolution (what StableDiffusionXLPipeline passes for a square image)."""
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype, device=device)
    return ids.expand(batch_size, 6)


def write_model_card(args, repo_id, num_prompts, positive_counts=None, scheduler_class="DDIMScheduler"):
    """scheduler_class: the saved one-step scheduler's class (a LoRA student loads it from scheduler/)."""
    teacher = tfd_training.public_name(args.pretrained_model_name_or_path)
    if args.train_mode == "lora":
        usage = (f"import torch\nfrom diffusers import {scheduler_class}, StableDiffusionXLPipeline\n\n"
                 f"pipe = StableDiffusionXLPipeline.from_pretrained("
                 f"'{tfd_training.snippet_teacher(args.pretrained_model_name_or_path)}', dtype=torch.float16)"
                 ".to('cuda')\n"
                 f"pipe.load_lora_weights('{repo_id}')\n"
                 f"pipe.scheduler = {scheduler_class}.from_pretrained('{repo_id}', subfolder='scheduler')\n"
                 "image = pipe('a photo of a cat', num_inference_steps=1, guidance_scale=0).images[0]")
    else:
        usage = ("import torch\nfrom diffusers import DiffusionPipeline\n\n"
                 f"pipe = DiffusionPipeline.from_pretrained('{repo_id}', dtype=torch.float16).to('cuda')\n"
                 "image = pipe('a photo of a cat', num_inference_steps=1, guidance_scale=0).images[0]")
    tfd_training.save_model_card(
        args, repo_id, args.pretrained_model_name_or_path,
        ["diffusers", "text-to-image", "stable-diffusion-xl", "one-step", "tfd"] +
        (["lora"] if args.train_mode == "lora" else []),
        f"One-step TFD student of {teacher}",
        "Distilled with Teacher-Feature Drifting (`train_tfd_sdxl.py`): one UNet evaluation per image "
        f"({scheduler_class} at timestep {args.conditioning_timestep}, 1 step, no classifier-free guidance).",
        usage, tfd_text2image.card_settings(args, num_prompts, positive_counts))


if __name__ == "__main__":
    main(parse_args())
