#!/usr/bin/env python
# Teacher-Feature Drifting (TFD): distil SDXL (or any StableDiffusionXLPipeline teacher) into a
# one-step text-to-image student, full fine-tune or LoRA.
#
#   # 1. optional: spend the teacher compute up front, on every GPU (sharded, resumable)
#   accelerate launch train_tfd_sdxl.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
#     --dataset_name PATH_OR_HUB_ID --positive_cache_dir cache --prepare_positives_only
#   # 2. train (cache misses are generated on the fly)
#   accelerate launch train_tfd_sdxl.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
#     --dataset_name PATH_OR_HUB_ID --positive_cache_dir cache --output_dir tfd-sdxl
#
# Defaults follow SPEC.md §2–§4 (SDXL column). The method lives in tfd_utils.py; this file is the
# loop around it: prompts, the positive cache, student, optimiser, logging, checkpoints, export.

import argparse
import contextlib
import logging
import os

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

import tfd_utils

logger = get_logger(__name__, log_level="INFO")

SDXL_LAYERS = "down_blocks.2 mid_block up_blocks.0"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16}
VALIDATION_PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "a cozy wooden cabin in a snowy forest at dusk, warm light in the windows",
    "a close-up portrait of a red fox, detailed fur, golden hour",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="TFD one-step distillation of an SDXL teacher (full or LoRA).")
    g = p.add_argument_group("teacher")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="StableDiffusionXLPipeline folder or Hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0).")
    g.add_argument("--revision", default=None, help="Hub revision of the teacher.")
    g.add_argument("--variant", default=None, help="Weight variant to load, e.g. fp16.")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="A separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix); default: the teacher's own.")
    g.add_argument("--teacher_dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="dtype of the frozen teacher UNet: the feature pass and the positive sampling run in it "
                        "(the recipe: fp32). With --train_mode lora it is the dtype of the shared base weights.")
    g.add_argument("--cache_dir", default=None, help="Hub/datasets cache directory.")

    g = p.add_argument_group("prompts and real images")
    g.add_argument("--dataset_name", default=None,
                   help="Hub id or local path of a captioned data set (anything datasets.load_dataset takes, or a "
                        "folder written by save_to_disk).")
    g.add_argument("--dataset_config_name", default=None, help="Config name of --dataset_name.")
    g.add_argument("--dataset_split", default="train", help="Split of --dataset_name to use.")
    g.add_argument("--caption_column", default="text",
                   help="Caption column (a string or a list of strings per row); every distinct caption is a prompt.")
    g.add_argument("--image_column", default=None,
                   help="Optional image column: images whose caption matches a prompt become its real positives.")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Use this many rows of the data set (a seeded random subset).")
    g.add_argument("--prompts_file", default=None, help="A text file of prompts, one per line (instead of a data set).")

    g = p.add_argument_group("positives and their cache (SPEC §4)")
    g.add_argument("--positive_cache_dir", default=None,
                   help="On-disk cache of positives and text embeddings (default: OUTPUT_DIR/positive_cache). Share "
                        "it between runs: entries are keyed by every setting they depend on.")
    g.add_argument("--prepare_positives_only", action="store_true",
                   help="Fill the cache for the whole prompt set (sharded over all processes, resumable) and exit.")
    g.add_argument("--num_positive_steps", type=int, default=50, help="Teacher sampling steps of a positive.")
    g.add_argument("--positive_guidance_scale", type=float, default=6.0, help="CFG scale of teacher positives.")
    g.add_argument("--positive_seed", type=int, default=0,
                   help="Base seed of teacher positives (each (prompt, slot) derives its own from it).")
    g.add_argument("--cache_dtype", default="float16", choices=("float16", "float32"),
                   help="Storage dtype of cached latents and text embeddings.")

    g = p.add_argument_group("TFD objective (SPEC §1–§2)")
    g.add_argument("--resolution", type=int, default=1024, help="Image resolution (pixels) of students and positives.")
    g.add_argument("--conditioning_timestep", type=int, default=999,
                   help="Timestep at which the student maps pure noise to x0 in one step.")
    g.add_argument("--feature_layers", default=SDXL_LAYERS, help="Teacher UNet modules whose outputs are features.")
    g.add_argument("--feature_pool_size", type=int, default=4, help="Average-pool kernel/stride of feature maps.")
    g.add_argument("--drift_radii", default="0.02,0.05,0.2", help="Kernel radii R, summed over.")
    g.add_argument("--drift_kernel", default="drifting", choices=tfd_utils.DRIFT_KERNELS,
                   help="drifting = the authors' double-softmax kernel; meanshift = the paper's Eq. (2)-(4).")
    g.add_argument("--feature_noise_mean", type=float, default=-1.2, help="Mean of log σ of the feature noise.")
    g.add_argument("--feature_noise_std", type=float, default=1.2, help="Std of log σ of the feature noise.")
    g.add_argument("--feature_noise_min", type=float, default=0.1,
                   help="Lower truncation of σ (σ in VE units of the scaled latents; min == max fixes it).")
    g.add_argument("--feature_noise_max", type=float, default=0.1, help="Upper truncation of σ.")
    g.add_argument("--prompts_per_batch", type=int, default=1, help="Prompts (groups) per step per process.")
    g.add_argument("--num_generated", type=int, default=4, help="Student samples per prompt (N, at least 2).")
    g.add_argument("--num_positives", type=int, default=4,
                   help="Positives per prompt (P): matching real images first, then teacher samples. They are "
                        "also the anchors of the anchor-margin loss.")
    g.add_argument("--anchor_weight", type=float, default=1.0, help="λ of the anchor-margin loss (0 disables it).")
    g.add_argument("--anchor_alpha", type=float, default=0.5, help="Margin α of the anchor-margin loss.")
    g.add_argument("--anchor_temperature", type=float, default=1.0, help="τ: bandwidth = median distance × τ.")
    g.add_argument("--anchor_bandwidth", type=float, default=None, help="A fixed anchor bandwidth instead of τ.")

    g = p.add_argument_group("student")
    g.add_argument("--train_mode", default="full", choices=("full", "lora"),
                   help="full: train a copy of the teacher UNet; lora: train LoRA adapters on it (the teacher is "
                        "the same UNet with adapters disabled: no second copy).")
    g.add_argument("--lora_rank", type=int, default=64, help="LoRA rank.")
    g.add_argument("--lora_alpha", type=float, default=64, help="LoRA alpha (scale = alpha / rank).")
    g.add_argument("--lora_target_modules", default="to_k,to_q,to_v,to_out.0",
                   help="Comma-separated UNet module names that get LoRA adapters.")

    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=1e-6, help="AdamW learning rate.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW β1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW β2.")
    g.add_argument("--adam_weight_decay", type=float, default=0.01, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW ε.")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    g.add_argument("--lr_scheduler", default="constant_with_warmup",
                   help="diffusers.optimization schedule name (constant, constant_with_warmup, cosine, ...).")
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up steps of the learning rate.")
    g.add_argument("--max_train_steps", type=int, default=10_000, help="Optimiser updates.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per update.")
    g.add_argument("--max_grad_norm", type=float, default=2.0, help="Gradient clipping norm.")
    g.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"),
                   help="Autocast of the student (default: accelerate config's setting).")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Gradient checkpointing in the UNet(s).")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--max_bad_steps", type=int, default=10,
                   help="Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped).")
    g.add_argument("--seed", type=int, default=0, help="Seed of the training randomness (per step and process).")

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
                   help="A checkpoint-N folder, or 'latest' (the newest complete one in --output_dir).")
    g.add_argument("--push_to_hub", action="store_true", help="Upload --output_dir to the Hub at the end.")
    g.add_argument("--hub_model_id", default=None, help="Hub repo id (default: the output folder's name).")
    g.add_argument("--hub_token", default=None, help="Hub token (default: the cached login).")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Cheap checks of flag combinations, before anything is loaded."""
    if bool(args.dataset_name) == bool(args.prompts_file):
        raise ValueError("Give exactly one prompt source: --dataset_name (captions) or --prompts_file.")
    if args.prompts_file and args.image_column:
        raise ValueError("--image_column needs --dataset_name: a --prompts_file has no images.")
    if args.prompts_file and not os.path.isfile(args.prompts_file):
        raise FileNotFoundError(f"--prompts_file {args.prompts_file} does not exist.")
    if args.num_generated < 2:
        raise ValueError("--num_generated must be at least 2 (the generated samples are each other's negatives).")
    if args.num_positives < 1 or args.prompts_per_batch < 1:
        raise ValueError("--num_positives and --prompts_per_batch must be at least 1.")
    if args.resolution % 8:
        raise ValueError(f"--resolution {args.resolution} must be a multiple of 8.")
    if not 0 <= args.conditioning_timestep < 1000:
        raise ValueError("--conditioning_timestep must be a training timestep (0..999 for SDXL).")
    if args.conditioning_timestep != 999:
        logging.getLogger(__name__).warning(
            f"--conditioning_timestep {args.conditioning_timestep}: the saved pipeline's LCMScheduler takes t=999 "
            f"with num_inference_steps=1; call it with timesteps=[{args.conditioning_timestep}] instead.")
    args.feature_layers = args.feature_layers.replace(",", " ").split()
    args.drift_radii = tfd_utils.parse_floats(args.drift_radii)
    args.lora_target_modules = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    if args.positive_cache_dir is None:
        args.positive_cache_dir = os.path.join(args.output_dir, "positive_cache")


def load_prompts(args):
    """(prompts, real rows per prompt, data set or None, description).

    Prompts are the distinct captions (first spelling of each normalised caption); real rows map a
    normalised caption to the indices of the rows whose caption matches it (with --image_column).
    """
    if args.prompts_file:
        with open(args.prompts_file) as f:
            captions = [[line.strip()] for line in f if line.strip()]
        ds, desc, rows = None, args.prompts_file, range(len(captions))
    else:
        ds = open_dataset(args)
        if args.caption_column not in ds.column_names:
            raise ValueError(f"--caption_column {args.caption_column!r} is not in {args.dataset_name}; its columns "
                             f"are {ds.column_names}.")
        if args.image_column and args.image_column not in ds.column_names:
            raise ValueError(f"--image_column {args.image_column!r} is not in {args.dataset_name}; its columns "
                             f"are {ds.column_names}.")
        rows = range(len(ds))
        if args.max_train_samples is not None and args.max_train_samples < len(ds):
            perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))
            rows = sorted(perm[: args.max_train_samples].tolist())
        column = ds.select_columns([args.caption_column])[args.caption_column]
        captions = [column[i] for i in rows]
        if args.image_column:  # rows without an image (null) give prompts only; read from arrow, nothing decoded
            import pyarrow.compute as pc

            has_image = pc.is_valid(ds.select_columns([args.image_column]).with_format("arrow")[:][args.image_column])
            has_image = has_image.to_pylist()
        captions = [c if isinstance(c, (list, tuple)) else [c] for c in captions]
        desc = f"{args.dataset_name} ({args.dataset_split}, {len(rows)} rows)"
    prompts, real = [], {}
    for row, caps in zip(rows, captions):
        for cap in caps:
            if not isinstance(cap, str) or not cap.strip():
                continue
            key = tfd_utils.normalize_caption(cap)
            if key not in real:
                real[key] = []
                prompts.append(cap.strip())
            if args.image_column and has_image[row] and row not in real[key]:
                real[key].append(row)
    if not prompts:
        raise ValueError(f"No prompts: {desc} has no non-empty captions" +
                         ("" if args.prompts_file else f" in column {args.caption_column!r}") + ".")
    return prompts, real, ds, desc


def open_dataset(args):
    import datasets

    path = args.dataset_name
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
    else:
        ds = datasets.load_dataset(path, args.dataset_config_name, cache_dir=args.cache_dir)
    if isinstance(ds, datasets.DatasetDict):
        if args.dataset_split not in ds:
            raise ValueError(f"{path} has no split {args.dataset_split!r}; it has {list(ds)} (--dataset_split).")
        ds = ds[args.dataset_split]
    return ds


def main(args):
    from diffusers import (AutoencoderKL, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel)
    from diffusers.optimization import get_scheduler
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" or args.prepare_positives_only else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    device, lora = accelerator.device, args.train_mode == "lora"
    fsdp = accelerator.distributed_type.value == "FSDP"  # full fine-tune only: LoRA runs under DDP
    if fsdp and lora:
        raise ValueError("--train_mode lora under FSDP is not supported: LoRA weights are small, use DDP "
                         "(examples/accelerate_configs/8gpu_ddp.yaml).")
    teacher_dtype = DTYPES[args.teacher_dtype]
    student_dtype = teacher_dtype if lora else torch.float32  # LoRA: fp32 adapters on the teacher's base weights

    # Early checks: an output folder with checkpoints is another run's; layer names exist in the UNet.
    resume = None
    if not args.prepare_positives_only:
        resume = tfd_utils.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint, logger)
        tfd_utils.check_output_dir(args.output_dir, args.resume_from_checkpoint)
    load_kw = dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir)
    unet_config = UNet2DConditionModel.load_config(args.pretrained_model_name_or_path, subfolder="unet",
                                                   revision=args.revision, cache_dir=args.cache_dir)
    with torch.device("meta"):
        tfd_utils.resolve_layers(UNet2DConditionModel.from_config(unet_config), args.feature_layers)
    prompts, real_rows, dataset, data_desc = load_prompts(args)
    logger.info(f"Prompts: {len(prompts)} from {data_desc}; {sum(bool(v) for v in real_rows.values())} have "
                f"matching real images." if args.image_column else f"Prompts: {len(prompts)} from {data_desc}.")

    # Teacher pipeline components. Text encoders run in the teacher's dtype (the pipeline feeds their
    # output to the teacher UNet); the VAE stays float32 (SDXL's VAE overflows in fp16).
    path = args.pretrained_model_name_or_path
    tok_kw = dict(revision=args.revision, cache_dir=args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **tok_kw)
    tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **tok_kw)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **load_kw)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **load_kw)
    vae = (AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
           if args.pretrained_vae_model_name_or_path else AutoencoderKL.from_pretrained(path, subfolder="vae", **load_kw))
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **load_kw)
    teacher_scheduler = load_scheduler(path, args)
    for m in (text_encoder, text_encoder_2, vae, unet):
        m.requires_grad_(False).eval()
    text_encoder.to(device, teacher_dtype)
    text_encoder_2.to(device, teacher_dtype)
    vae.to(device, torch.float32)
    alphas_cumprod = teacher_scheduler.alphas_cumprod.to(torch.float64)
    latent_size = args.resolution // (2 ** (len(vae.config.block_out_channels) - 1))

    # The positive cache: keyed by everything its content depends on.
    cache = tfd_utils.PositiveCache(args.positive_cache_dir, {
        "teacher": path, "revision": args.revision, "variant": args.variant,
        "vae": args.pretrained_vae_model_name_or_path, "teacher_dtype": args.teacher_dtype,
        "resolution": args.resolution, "num_positive_steps": args.num_positive_steps,
        "positive_guidance_scale": args.positive_guidance_scale, "positive_seed": args.positive_seed,
        "scheduler": {k: v for k, v in teacher_scheduler.config.items() if not k.startswith("_")},
        "real_images": [args.dataset_name, args.dataset_config_name, args.dataset_split, args.image_column]
        if args.image_column else None, "cache_dtype": args.cache_dtype,
    })
    logger.info(f"Positive cache: {cache.dir}" + (f" ({len(cache.other_settings)} caches made with other settings "
                                                   f"in {args.positive_cache_dir} are not used)"
                                                   if cache.other_settings else ""))
    if accelerator.is_local_main_process:  # leftovers of writers killed mid-entry (never read, only cleaned)
        removed = tfd_utils.remove_stale_tmp_files(cache.dir)
        if removed:
            logger.info(f"Positive cache: removed {removed} temporary files of killed writers.")

    # Teacher UNet: a frozen copy (full) or the student's own base weights (lora).
    if args.prepare_positives_only:
        student, teacher_unet = None, unet.to(device, teacher_dtype)
    else:
        student, teacher_unet = tfd_utils.sdxl_student_and_teacher(
            unet, args.train_mode, device, teacher_dtype, args.lora_rank, args.lora_alpha, args.lora_target_modules)
    teacher_pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                             tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=teacher_unet,
                                             scheduler=teacher_scheduler)
    teacher_pipe.set_progress_bar_config(disable=True)
    stats = {"hits": 0, "generated": 0, "regenerated": 0}
    offloaded = [False]  # text encoders and VAE parked off the accelerator

    def slot_plan(prompt):
        rows = real_rows.get(tfd_utils.normalize_caption(prompt), [])[: args.num_positives]
        return [f"real:{r}" for r in rows] + ["teacher"] * (args.num_positives - len(rows))

    @torch.no_grad()
    def make_entry(prompt, slots):
        """Text embeddings and positives of one prompt: real latents where images match, else teacher samples."""
        on_device(device, text_encoder, text_encoder_2, vae)
        pe, _, pooled, _ = teacher_pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        latents = [None] * len(slots)
        for i, tag in enumerate(slots):
            if tag.startswith("real:"):
                try:
                    image = dataset[int(tag[5:])][args.image_column]
                    latents[i] = encode_image(vae, image, args.resolution, device)
                except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for truncated/garbled files
                    raise ValueError(f"Row {tag[5:]} of {args.dataset_name}: its {args.image_column!r} image cannot be "
                                     f"decoded ({type(e).__name__}: {e}); remove or re-encode it.") from e
        teacher_slots = [i for i, tag in enumerate(slots) if tag == "teacher"]
        if teacher_slots:
            gens = [torch.Generator().manual_seed(tfd_utils.positive_seed(prompt, i, args.positive_seed))
                    for i in teacher_slots]
            with tfd_utils.teacher_mode(teacher_unet) if lora else contextlib.nullcontext():
                out = teacher_pipe(prompt, height=args.resolution, width=args.resolution,
                                   num_inference_steps=args.num_positive_steps,
                                   guidance_scale=args.positive_guidance_scale, num_images_per_prompt=len(gens),
                                   generator=gens, output_type="latent").images
            for i, lat in zip(teacher_slots, out):
                latents[i] = lat.float()
        cdt = DTYPES[args.cache_dtype]
        return {"positives": torch.stack(latents).to(cdt), "prompt_embeds": pe[0].to(cdt),
                "pooled_prompt_embeds": pooled[0].to(cdt)}

    def get_entry(prompt):
        slots = slot_plan(prompt)
        try:
            entry = cache.load(prompt, slots)
        except tfd_utils.CacheEntryError as e:
            logger.warning(f"Positive cache: {e}; regenerating it.", main_process_only=False)
            cache.discard(prompt, slots)
            entry, stats["regenerated"] = None, stats["regenerated"] + 1
        if entry is None:
            entry = make_entry(prompt, slots)
            cache.save(prompt, slots, entry)
            stats["generated"] += 1
            if offloaded[0]:
                on_device("cpu", text_encoder, text_encoder_2, vae)
        else:
            stats["hits"] += 1
        return entry

    if args.prepare_positives_only:
        mine = prompts[accelerator.process_index:: accelerator.num_processes]
        for prompt in tqdm(mine, desc=f"positives (process {accelerator.process_index})", unit="prompt"):
            get_entry(prompt)
        accelerator.wait_for_everyone()
        logger.info(f"Positive cache ready: {cache.dir}; this process: {stats['hits']} reused, {stats['generated']} "
                    f"generated ({stats['regenerated']} of them replaced unreadable entries).", main_process_only=False)
        accelerator.end_training()
        return stats

    # Text encoders and VAE leave the GPU when the cache holds everything they would produce.
    offloaded[0] = all(cache.exists(p, slot_plan(p)) for p in prompts)
    val_embeds = encode_prompts(teacher_pipe, args.validation_prompts, device)
    if offloaded[0]:
        on_device("cpu", text_encoder, text_encoder_2, vae)
        logger.info("Every prompt is cached: text encoders and VAE moved off the accelerator.")
    else:
        logger.info("Some prompts are not cached: text encoders and VAE stay on the accelerator (run "
                    "--prepare_positives_only first to free that memory).")

    # Checkpoints hold the trainable weights only: the UNet (full) or the LoRA layers.
    def save_model_hook(models, weights, output_dir):
        for model in models:
            full = tfd_utils.consolidated_model(accelerator, model)  # every process: FSDP gathers the shards
            if accelerator.is_main_process:
                export_unet(full, output_dir, lora)
            if weights:  # empty under FSDP/DeepSpeed, which save their own (sharded) state next to it
                weights.pop()

    def load_model_hook(models, input_dir):
        if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
            return  # accelerate loads the engine's own state
        for _ in range(len(models)):
            import_unet(accelerator.unwrap_model(models.pop()), input_dir, lora)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
        if not lora:  # safe for a separate frozen teacher: hooks sit on whole blocks, outside the recomputation
            teacher_unet.enable_gradient_checkpointing()
    student.train()
    params = [prm for prm in student.parameters() if prm.requires_grad]
    optimizer = tfd_utils.make_optimizer(params, args.learning_rate, (args.adam_beta1, args.adam_beta2),
                                         args.adam_weight_decay, args.adam_epsilon, args.use_8bit_adam)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    params = [prm for prm in student.parameters() if prm.requires_grad]  # FSDP clips the prepared model's own
    if lora:
        teacher_unet = accelerator.unwrap_model(student)
    extractor = tfd_utils.FeatureExtractor(teacher_unet, args.feature_layers, args.feature_pool_size)

    first_step, metrics_path = tfd_utils.start_run(accelerator, args, resume, logger)

    lcm_config = one_step_scheduler_config(teacher_scheduler.config)

    @torch.no_grad()
    def validation_grid(step, model=None):
        """One step per validation prompt through the real pipeline (LCMScheduler, 1 step, no CFG)."""
        model = accelerator.unwrap_model(student) if model is None else model
        # Text encoders left out: the prompts are pre-encoded, and the pipeline would cast them to their dtype.
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=tokenizer,
                                         tokenizer_2=tokenizer_2, unet=model,
                                         scheduler=LCMScheduler.from_config(lcm_config))
        pipe.set_progress_bar_config(disable=True)
        pe, pooled = (e.to(device, model.dtype) for e in val_embeds)
        gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(pe))]
        with accelerator.autocast():
            latents = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, num_inference_steps=1, guidance_scale=0.0,
                           height=args.resolution, width=args.resolution, generator=gens, output_type="latent").images
        on_device(device, vae)
        images = decode_latents(vae, latents)
        if offloaded[0]:
            on_device("cpu", vae)
        grid = tfd_utils.image_grid(images)
        if step is not None:
            os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
            grid.save(os.path.join(args.output_dir, "validation", f"step-{step}.png"))
            tfd_utils.log_image(accelerator, grid, step)
        return grid

    # Training.
    G, N = args.prompts_per_batch, args.num_generated
    shape = (4, latent_size, latent_size)
    t_cond = args.conditioning_timestep
    logger.info(f"***** TFD-SDXL ({args.train_mode}): {args.max_train_steps} updates, {G} prompts x (N={N}, "
                f"P={args.num_positives}) per process, {accelerator.num_processes} processes, layers "
                f"{extractor.names}, σ in [{args.feature_noise_min}, {args.feature_noise_max}] *****")
    progress = tqdm(range(args.max_train_steps), initial=first_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    images_per_step = G * N * args.gradient_accumulation_steps * accelerator.num_processes
    monitor = tfd_utils.TrainingMonitor(accelerator, args, progress, metrics_path, first_step, images_per_step, logger)
    for step in range(first_step + 1, args.max_train_steps + 1):
        loss_sum = 0.0
        for micro in range(args.gradient_accumulation_steps):
            # Every draw of this micro-step comes from its own seed: a resumed run repeats it exactly.
            seed = ((args.seed * 1_000_003 + step) * 1009 + micro) * 4099 + accelerator.process_index
            shared = torch.Generator().manual_seed(seed - accelerator.process_index - 1)  # same on every process
            gen = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)  # the feature noise ξ
            with accelerator.accumulate(student):
                # Prompts: positions [rank·G, (rank+1)·G) of one shared sequence, so processes never repeat each other.
                drawn = tfd_utils.shared_draw(len(prompts), accelerator.process_index * G, G, shared).tolist()
                tfd_utils.debug_record(accelerator, "draws", lambda: {"step": step, "micro": micro, "prompts": drawn})
                batch = [get_entry(prompts[i]) for i in drawn]
                positives = torch.stack([e["positives"] for e in batch]).to(device, torch.float32)
                pe = torch.stack([e["prompt_embeds"] for e in batch]).to(device, student_dtype)
                cond = {"text_embeds": torch.stack([e["pooled_prompt_embeds"] for e in batch]).to(device, student_dtype),
                        "time_ids": tfd_utils.sdxl_time_ids(args.resolution, G, device, student_dtype)}
                noise = torch.randn(G * N, *shape, generator=gen).to(device)
                sigma = tfd_utils.sample_feature_sigmas(G, args.feature_noise_mean, args.feature_noise_std,
                                                        args.feature_noise_min, args.feature_noise_max,
                                                        generator=gen, device=device)
                with accelerator.autocast():
                    generated = tfd_utils.sdxl_one_step(
                        student, noise, t_cond, alphas_cumprod[t_cond], pe.repeat_interleave(N, 0),
                        {k: v.repeat_interleave(N, 0) for k, v in cond.items()})
                generated = generated.float().reshape(G, N, *shape)
                forward = tfd_utils.vp_teacher_forward(teacher_unet, alphas_cumprod, pe, cond)
                with extractor, tfd_utils.teacher_mode(teacher_unet) if lora else contextlib.nullcontext():
                    loss, logs = tfd_utils.tfd_step_loss(
                        extractor, forward, generated, positives, None, sigma, args.drift_radii, args.drift_kernel,
                        args.anchor_weight, args.anchor_alpha, args.anchor_temperature, args.anchor_bandwidth)
                loss = tfd_utils.inject_test_fault(loss, step, accelerator.process_index)  # no-op outside tests
                accelerator.backward(loss)
                logs.update({"sigma/mean": sigma.mean()})
                monitor.add(logs)
                loss_sum = loss_sum + loss.detach()
                if accelerator.sync_gradients:  # skips the update when the loss or gradient is not finite
                    ok, grad_norm = tfd_utils.clip_and_step(accelerator, optimizer, lr_scheduler, params,
                                                            loss_sum, args.max_grad_norm)
        monitor.end_step(step, ok, grad_norm, {"train/lr": lr_scheduler.get_last_lr()[0], "cache/hits": stats["hits"],
                                               "cache/generated": stats["generated"],
                                               "cache/regenerated": stats["regenerated"]})
        tfd_utils.debug_record(accelerator, "steps", lambda: {
            "step": step, "ok": ok, "digest": tfd_utils.state_digest(accelerator.unwrap_model(student))})
        if args.validation_steps > 0 and step % args.validation_steps == 0 and accelerator.is_main_process and not fsdp:
            validation_grid(step)  # (FSDP: the main process alone cannot run the sharded student)

    # Export: the one-step pipeline (full) or the LoRA weights, samples and a model card.
    accelerator.wait_for_everyone()
    model = tfd_utils.consolidated_model(accelerator, student)  # every process: FSDP gathers the shards
    if accelerator.is_main_process:
        validation_grid(None, model.to(device)).save(os.path.join(args.output_dir, "samples.png"))
        if lora:
            export_unet(model, args.output_dir, lora=True)
            LCMScheduler.from_config(lcm_config).save_pretrained(os.path.join(args.output_dir, "scheduler"))
        else:  # saved in float32 throughout: users pick the dtype with from_pretrained(torch_dtype=...)
            on_device("cpu", text_encoder, text_encoder_2, vae)
            for m in (text_encoder, text_encoder_2, vae, model):
                m.to(torch.float32)
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                             tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=model,
                                             scheduler=LCMScheduler.from_config(lcm_config))
            tfd_utils.save_pipeline(pipe, args.output_dir)
        write_model_card(args, data_desc, len(prompts))
        if args.push_to_hub:
            tfd_utils.push_folder_to_hub(args.output_dir, args.hub_model_id, args.hub_token, "TFD one-step SDXL student")
        logger.info(f"Saved the one-step student to {args.output_dir}")
    accelerator.end_training()
    return model


def load_scheduler(path, args):
    """The teacher's own scheduler class and config (SDXL base: EulerDiscreteScheduler)."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(path, subfolder="scheduler", revision=args.revision,
                                                 cache_dir=args.cache_dir)  # any scheduler class reads it
    return getattr(diffusers, config["_class_name"]).from_config(config)


def one_step_scheduler_config(teacher_config):
    """LCMScheduler config with the teacher's noise schedule: at num_inference_steps=1 its step is
    x₀ = (z − √(1−ᾱ)ε̂)/√ᾱ at timestep 999 (boundary c_skip ≈ 3e-9), the student's generator."""
    import inspect

    from diffusers import LCMScheduler

    keys = inspect.signature(LCMScheduler.__init__).parameters
    return LCMScheduler.from_config({k: v for k, v in teacher_config.items() if k in keys}).config


@torch.no_grad()
def decode_latents(vae, latents):
    """Pipeline latents → images in [−1, 1], decoded in float32."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(vae.device, torch.float32) / vae.config.scaling_factor + shift
    return vae.decode(z.to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)


def on_device(device, *modules):
    for m in modules:
        m.to(device)


def encode_prompts(pipe, prompts, device):
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return pe, pooled


def encode_image(vae, image, resolution, device):
    """A real positive: RGB, shorter side resized to the resolution (Lanczos), center-cropped, VAE-encoded.

    The latent is the posterior mean (no sampling noise: a positive is a fixed point), shifted and
    scaled like the pipeline's latents: (mean − shift_factor) · scaling_factor.
    """
    import numpy as np
    from PIL import Image

    if isinstance(image, str):
        image = Image.open(image)
    image = tfd_utils.eight_bit(image).convert("RGB")  # any mode (L, RGBA, P, CMYK, 16-bit) → RGB
    scale = resolution / min(image.size)
    w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((w, h), Image.LANCZOS)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(device)
    mean = vae.encode(x.to(vae.dtype)).latent_dist.mean.float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((mean - shift) * vae.config.scaling_factor)[0]


def export_unet(unet, output_dir, lora):
    """The trainable weights: `unet/` (full) or pytorch_lora_weights.safetensors (lora, with its config)."""
    from diffusers import StableDiffusionXLPipeline

    if not lora:
        unet.save_pretrained(os.path.join(output_dir, "unet"))
        return
    from peft.utils import get_peft_model_state_dict

    StableDiffusionXLPipeline.save_lora_weights(
        output_dir, unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())


def import_unet(unet, input_dir, lora):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    if not lora:
        loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
        unet.load_state_dict(loaded.state_dict())
        return
    from peft.utils import set_peft_model_state_dict

    state, _ = StableDiffusionXLPipeline.lora_state_dict(input_dir)
    state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"LoRA checkpoint {input_dir} does not fit this UNet: {result.unexpected_keys[:5]}")


def write_model_card(args, data_desc, num_prompts):
    from huggingface_hub import ModelCard

    teacher = args.pretrained_model_name_or_path
    settings = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(vars(args).items()) if k != "hub_token")
    t = args.conditioning_timestep
    steps = "num_inference_steps=1" if t == 999 else f"timesteps=[{t}]"
    if args.train_mode == "lora":
        usage = (f"```python\nimport torch\nfrom diffusers import LCMScheduler, StableDiffusionXLPipeline\n\n"
                 f"pipe = StableDiffusionXLPipeline.from_pretrained('{teacher}', torch_dtype=torch.float16).to('cuda')\n"
                 f"pipe.load_lora_weights('PATH_OR_REPO'); pipe.scheduler = LCMScheduler.from_pretrained("
                 f"'PATH_OR_REPO', subfolder='scheduler')\n"
                 f"image = pipe('a photo of a cat', {steps}, guidance_scale=0).images[0]\n```")
    else:
        usage = ("```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
                 "pipe = DiffusionPipeline.from_pretrained('PATH_OR_REPO', torch_dtype=torch.float16).to('cuda')\n"
                 f"image = pipe('a photo of a cat', {steps}, guidance_scale=0).images[0]\n```")
    content = f"""---
library_name: diffusers
tags: [tfd, teacher-feature-drifting, one-step, distillation, text-to-image, stable-diffusion-xl{', lora' if args.train_mode == 'lora' else ''}]
base_model: {teacher}
---

# One-step TFD student of `{teacher}` ({args.train_mode})

Distilled with Teacher-Feature Drifting (`train_tfd_sdxl.py`) on {num_prompts} prompts from {data_desc},
{args.max_train_steps} updates, {args.resolution}px. One UNet evaluation per image (LCMScheduler, 1 step, no CFG).

![samples](samples.png)

## Use

{usage}

## Training settings

| setting | value |
|---|---|
{settings}
"""
    ModelCard(content).save(os.path.join(args.output_dir, "README.md"))


if __name__ == "__main__":
    main(parse_args())
