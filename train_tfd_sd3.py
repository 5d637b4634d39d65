#!/usr/bin/env python
# Teacher-Feature Drifting (TFD): distil Stable Diffusion 3 / 3.5 (any StableDiffusion3Pipeline, a
# rectified-flow transformer teacher) into a one-step text-to-image student, full fine-tune or LoRA.
#
#   # 1. spend the teacher compute up front, on every GPU (sharded, resumable)
#   accelerate launch train_tfd_sd3.py --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \
#     --dataset_name DATASET --caption_column caption --positive_cache_dir cache --prepare_positives_only
#   # 2. train (the same flags, without --prepare_positives_only)
#   accelerate launch train_tfd_sd3.py ... --positive_cache_dir cache --output_dir tfd-sd3
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

SD3_LAYERS = "block:1/2"  # a depth fraction (measured: examples/digits/sd3_layers.py); carries to 24 and 38 blocks
LORA_TARGETS = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"  # the joint attention
VALIDATION_PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "a cozy wooden cabin in a snowy forest at dusk, warm light in the windows",
    "a close-up portrait of a red fox, detailed fur, golden hour",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
]
# Teacher sampling of positives per checkpoint (its model card's): (steps, CFG scale); an unrecognised one gets SD3
# medium's. Recognised from the transformer config (`checkpoint_family`).
POSITIVE_DEFAULTS = {"SD3 medium": (28, 7.0), "SD3.5 large": (28, 3.5), "SD3.5 medium": (40, 4.5)}
RANGES = {}  # this script's own flags' ranges, checked at parse time (the shared ones: tfd_text2image.RANGES)


def parse_args(argv=None):
    p = tfd_training.argument_parser(
        "TFD one-step distillation of a Stable Diffusion 3 / 3.5 teacher (full fine-tune or LoRA).")
    g = p.add_argument_group("teacher")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="StableDiffusion3Pipeline folder or Hub id (e.g. stabilityai/stable-diffusion-3.5-medium).")
    g.add_argument("--revision", default=None, help="Hub revision of the teacher.")
    g.add_argument("--variant", default=None, help="Weight variant to load, e.g. fp16.")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="A separate VAE; default: the teacher's own.")
    g.add_argument("--drop_t5", action="store_true",
                   help="Run without the T5-XXL text encoder (4.8B parameters): the pipeline feeds zeros in its "
                        "place, in training and in the saved pipeline (load it with text_encoder_3=None, "
                        "tokenizer_3=None).")
    g.add_argument("--teacher_dtype", default="fp32", choices=tuple(tfd_training.DTYPES),
                   help="dtype of the frozen teacher transformer and text encoders: the feature pass and the "
                        "positive sampling run in it. With --train_mode lora it is the dtype of the shared base "
                        "weights. The full fine-tune's student always starts from the checkpoint's exact weights.")
    g.add_argument("--cache_dir", default=None, help="Hub and datasets cache directory.")
    tfd_text2image.add_arguments(
        p, "transformer", positive_steps=None, positive_guidance=None, lora_targets=LORA_TARGETS,
        lora_targets_help="Comma-separated transformer module names that get LoRA adapters (default: the joint "
                          "attention's projections of the image and text streams).",
        positive_defaults_help=" None: the checkpoint's model card's, recognised from the transformer config (steps "
                               "/ CFG: SD3 medium 28 / 7.0, SD3.5 large 28 / 3.5, SD3.5 medium 40 / 4.5; another "
                               "checkpoint: SD3 medium's).")
    tfd_training.add_loss_arguments(p, layers=SD3_LAYERS, radii="0.02,0.05,0.2", sigma_min=0.1, sigma_max=0.1)
    g = tfd_training.add_training_arguments(p, output_dir="tfd-sd3", learning_rate=1e-6, max_train_steps=10_000,
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
    if args.resolution % 16:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of 16 (the VAE's factor 8 x the "
                         "transformer's patch size 2).")


def main(args):
    from diffusers import SD3Transformer2DModel

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
    resume = tfd_text2image.check_run(accelerator, args, SD3Transformer2DModel, "transformer", logger)
    repo_id = tfd_training.create_hub_repo(args) if accelerator.is_main_process else None

    # 3. Prompts, the teacher pipeline, student and teacher, the positives, the loss and the optimiser.
    run = build(args, accelerator)
    if args.prepare_positives_only:
        return run.positives.prepare(accelerator, run.prompts)

    # 4. Resume, record the settings, start the trackers.
    first_step, metrics_path = tfd_training.start_run(accelerator, args, resume, logger)

    def validation_grid(model):  # the teacher's own flow scheduler: one step is x0 = z − v(z, 1000)
        return tfd_text2image.sample_grid(run.pipe, "transformer", model, run.pipe.scheduler, run.val_embeds, args,
                                          accelerator, guidance_scale=1.0)

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

    # 6. Export: the one-step pipeline (the teacher's FlowMatchEulerDiscreteScheduler) or the LoRA weights.
    student = tfd_text2image.export(
        accelerator, args, run.student, run.pipe, "transformer", None, validation_grid,
        lambda: write_model_card(args, repo_id or tfd_training.hub_repo_name(args), len(run.prompts),
                                 run.positives.counts(run.prompts)), repo_id,
        **run.components)
    logger.info(tfd_training.saved_message(args.output_dir))
    return student


def build(args, accelerator, pipe=None):
    """What the loop needs (tfd_text2image.setup: prompts, teacher pipeline, student and teacher, positives,
    loss, prepared optimiser and schedule), with this teacher's latent shape. pipe: a teacher pipeline already
    in memory (the benchmark's) instead of loading --pretrained_model_name_or_path."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    config = pipe.transformer.config if pipe is not None else SD3Transformer2DModel.load_config(
        args.pretrained_model_name_or_path, subfolder="transformer", revision=args.revision, cache_dir=args.cache_dir)
    resolve_positive_defaults(args, config)  # before the cache opens: its key holds the values used
    components = {"text_encoder_3": None, "tokenizer_3": None} if args.drop_t5 else {}
    run = tfd_text2image.setup(args, accelerator, StableDiffusion3Pipeline, "transformer", logger, pipe=pipe,
                               components=components, cache_settings={"drop_t5": args.drop_t5})
    run.components = components
    factor = run.pipe.vae_scale_factor * run.pipe.transformer.config.patch_size
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of {factor} (VAE factor x patch size).")
    latent = args.resolution // run.pipe.vae_scale_factor
    run.latent_shape = (run.pipe.transformer.config.in_channels, latent, latent)
    return run


def checkpoint_family(config):
    """The SD3 checkpoint a transformer config is shaped like (a POSITIVE_DEFAULTS key), or None: SD3.5 medium
    has 24 layers, RMS q/k norm and dual-attention layers; SD3.5 large 38 layers and RMS q/k norm; SD3 medium
    24 layers, neither."""
    layers, qk_norm = config.get("num_layers"), config.get("qk_norm")
    dual = bool(config.get("dual_attention_layers"))
    if qk_norm == "rms_norm" and dual and layers == 24:
        return "SD3.5 medium"
    if qk_norm == "rms_norm" and not dual and layers == 38:
        return "SD3.5 large"
    if qk_norm is None and not dual and layers == 24:
        return "SD3 medium"
    return None


def resolve_positive_defaults(args, config):
    """--num_positive_steps and --positive_guidance_scale left at None: the recognised checkpoint's (else SD3
    medium's), set on args so the positive cache keys and training_args.json record the values used."""
    family = checkpoint_family(config)
    steps, guidance = POSITIVE_DEFAULTS[family or "SD3 medium"]
    given = args.num_positive_steps is not None, args.positive_guidance_scale is not None
    args.num_positive_steps = args.num_positive_steps if given[0] else steps
    args.positive_guidance_scale = args.positive_guidance_scale if given[1] else guidance
    source = (f"the {family} model card's" if family else "SD3 medium's (checkpoint not recognised from its "
              "transformer config)")
    logger.info(f"Teacher positives: {args.num_positive_steps} steps, CFG {args.positive_guidance_scale} (" +
                ("as given" if all(given) else source + (", partly as given" if any(given) else "")) + ").")
    return family


def generate(args, transformer, noise, prompt_embeds, pooled_prompt_embeds):
    """The one-step student: x0 = z − v(z, t = 1000) from pure noise z (flow time 1). Conditioning per sample.
    The saved pipeline's one Euler step (sigmas [1, 0]) runs exactly this."""
    return tfd_utils.flow_one_step(transformer, noise, prompt_embeds, pooled_prompt_embeds)


def train_step(args, accelerator, run, batch, generator):
    """One micro-step: N one-step samples per prompt, then the TFD loss in the teacher's features.

    batch: (positives [G, P, 16, h, w], prompt_embeds [G, L, D], pooled [G, D'], noise [G·N, 16, h, w]).
    Returns (loss, logs); the caller runs the backward.
    """
    positives, prompt_embeds, pooled, noise = batch
    G, N = positives.shape[0], noise.shape[0] // positives.shape[0]
    with accelerator.autocast():
        generated = generate(args, run.student, noise, prompt_embeds.repeat_interleave(N, 0),
                             pooled.repeat_interleave(N, 0))
    generated = generated.float().reshape(G, N, *noise.shape[1:])
    forward = tfd_utils.flow_teacher_forward(run.teacher, prompt_embeds, pooled)
    return run.loss_fn(forward, generated, positives, generator=generator)


def write_model_card(args, repo_id, num_prompts, positive_counts=None):
    teacher = tfd_training.public_name(args.pretrained_model_name_or_path)
    load = ("pipe = StableDiffusion3Pipeline.from_pretrained('{}', dtype=torch.bfloat16{}).to('cuda')\n"
            .format(tfd_training.snippet_teacher(args.pretrained_model_name_or_path) if args.train_mode == "lora"
                    else repo_id,
                    ", text_encoder_3=None, tokenizer_3=None" if args.drop_t5 else ""))
    usage = ("import torch\nfrom diffusers import StableDiffusion3Pipeline\n\n" + load +
             (f"pipe.load_lora_weights('{repo_id}')\n" if args.train_mode == "lora" else "") +
             "image = pipe('a photo of a cat', num_inference_steps=1, guidance_scale=1.0).images[0]")
    tfd_training.save_model_card(
        args, repo_id, args.pretrained_model_name_or_path,
        ["diffusers", "text-to-image", "stable-diffusion-3", "one-step", "tfd"] +
        (["lora"] if args.train_mode == "lora" else []),
        f"One-step TFD student of {teacher}",
        "Distilled with Teacher-Feature Drifting (`train_tfd_sd3.py`): one transformer evaluation per image "
        "(FlowMatchEulerDiscreteScheduler, 1 step, no classifier-free guidance)" +
        (", without the T5 text encoder." if args.drop_t5 else "."),
        usage, tfd_text2image.card_settings(args, num_prompts, positive_counts))


if __name__ == "__main__":
    main(parse_args())
