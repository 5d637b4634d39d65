#!/usr/bin/env python
# Teacher-Feature Drifting (TFD): distil a class-conditional EDM teacher into a one-step student.
#
#   accelerate launch train_tfd_imagenet64.py \
#     --pretrained_teacher_model openai/diffusers-cd_imagenet64_l2 --dataset_name PATH_OR_HUB_ID \
#     --output_dir tfd-imagenet64
#
# Defaults follow SPEC.md §2–§4 (ImageNet-64 column). The method lives in tfd_utils.py; this file
# is the training loop around it: data, sampler, student, optimiser, logging, checkpoints, export.

import argparse
import copy
import logging
import math
import os
import pickle

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

import tfd_utils

logger = get_logger(__name__, log_level="INFO")

IMAGENET64_LAYERS = "enc:6 enc:11 bottleneck dec:7 dec:12"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="TFD one-step distillation of a class-conditional EDM teacher.")
    g = p.add_argument_group("teacher")
    g.add_argument("--pretrained_teacher_model", required=True,
                   help="diffusers UNet2DModel with class embeddings (local folder, pipeline folder or Hub id), or "
                        "an NVlabs EDM network pickle (.pkl path or URL, {'ema': net}).")
    g.add_argument("--teacher_subfolder", default=None,
                   help="Subfolder of the teacher repo holding the UNet (default: the root, else 'unet').")
    g.add_argument("--revision", default=None, help="Hub revision of the teacher.")
    g.add_argument("--edm_repo", default=None,
                   help="Path to an NVlabs/edm checkout, put on sys.path so an EDM pickle's classes unpickle.")
    g.add_argument("--precond", default="cm", choices=tfd_utils.PRECONDS,
                   help="Noise conditioning of a diffusers teacher: cm = 250·ln σ (openai/diffusers ADM checkpoints; "
                        "the only one ConsistencyModelPipeline runs), edm = ln(σ)/4. EDM pickles bring their own.")
    g.add_argument("--sigma_data", type=float, default=0.5, help="EDM σ_data of the teacher's data.")
    g.add_argument("--sigma_max", type=float, default=80.0, help="σ_max: the student maps σ_max·z to an image.")
    g.add_argument("--sigma_min", type=float, default=0.002,
                   help="σ_min of the consistency-model boundary scalings (diffusers students).")
    g.add_argument("--teacher_dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="dtype of the frozen teacher for the feature pass (the recipe: fp32).")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="Hub id or local path of a labelled image data set: anything datasets.load_dataset takes, a "
                        "folder written by save_to_disk, or an EDM/StyleGAN dataset zip/folder (dataset.json labels).")
    g.add_argument("--dataset_config_name", default=None, help="Config name of --dataset_name.")
    g.add_argument("--train_data_dir", default=None,
                   help="An imagefolder (one sub-folder per class) or an EDM dataset folder; instead of --dataset_name.")
    g.add_argument("--dataset_split", default="train", help="Split to train on.")
    g.add_argument("--image_column", default="image", help="Image column of the data set.")
    g.add_argument("--label_column", default="label", help="Integer class-label column of the data set.")
    g.add_argument("--class_ids", default=None,
                   help="Classes to distil, e.g. '0-999' or '1,7,9'. Default: every class with images in the data "
                        "(teacher classes without images are reported). A named class without images is an error.")
    g.add_argument("--preload_max_gb", type=float, default=8.0,
                   help="Preprocess the whole data set into memory (uint8) when it takes at most this many GB per "
                        "process; larger ones (ImageNet-64: 15.7 GB) are decoded on the fly.")
    g.add_argument("--cache_dir", default=None, help="datasets/diffusers cache directory.")

    g = p.add_argument_group("TFD objective (SPEC §1–§2)")
    g.add_argument("--feature_layers", default=IMAGENET64_LAYERS,
                   help="Teacher layers (enc:K, dec:K, bottleneck, input, or module names), spaces or commas.")
    g.add_argument("--feature_pool_size", type=int, default=4, help="Average-pool kernel/stride of feature maps.")
    g.add_argument("--drift_radii", default="0.02,0.05,0.1,0.2", help="Kernel radii R, summed over.")
    g.add_argument("--drift_kernel", default="drifting", choices=tfd_utils.DRIFT_KERNELS,
                   help="drifting = the authors' double-softmax kernel; meanshift = the paper's Eq. (2)-(4).")
    g.add_argument("--feature_noise_mean", type=float, default=-1.2, help="Mean of log σ of the feature noise.")
    g.add_argument("--feature_noise_std", type=float, default=1.2, help="Std of log σ of the feature noise.")
    g.add_argument("--feature_noise_min", type=float, default=0.02,
                   help="Lower truncation of σ (min == max fixes σ; 0 and 0: clean features).")
    g.add_argument("--feature_noise_max", type=float, default=0.1, help="Upper truncation of σ.")
    g.add_argument("--classes_per_batch", type=int, default=10, help="Classes (groups) per step per process.")
    g.add_argument("--num_generated", type=int, default=4, help="Generated samples per class (N, at least 2).")
    g.add_argument("--num_positives", type=int, default=4, help="Real images per class as positives (P).")
    g.add_argument("--num_anchors", type=int, default=4,
                   help="Real images per class as anchors (M); 0 reuses the positives as anchors.")
    g.add_argument("--anchor_weight", type=float, default=1.0, help="λ of the anchor-margin loss (0 disables it).")
    g.add_argument("--anchor_alpha", type=float, default=0.5, help="Margin α of the anchor-margin loss.")
    g.add_argument("--anchor_temperature", type=float, default=1.0, help="τ: bandwidth = median distance × τ.")
    g.add_argument("--anchor_bandwidth", type=float, default=None, help="A fixed anchor bandwidth instead of τ.")

    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=2e-6, help="AdamW learning rate.")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW β1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW β2.")
    g.add_argument("--adam_weight_decay", type=float, default=0.01, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW ε.")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    g.add_argument("--lr_scheduler", default="constant_with_warmup",
                   help="diffusers.optimization.get_scheduler name (constant, constant_with_warmup, cosine, ...).")
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="Warm-up steps of the learning rate.")
    g.add_argument("--max_train_steps", type=int, default=200_000, help="Optimiser updates (the paper: 200k).")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per update.")
    g.add_argument("--max_grad_norm", type=float, default=10.0, help="Gradient clipping norm.")
    g.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"),
                   help="Student autocast precision (default: bf16 on GPU, no on CPU; the recipe: bf16).")
    g.add_argument("--dropout", type=float, default=0.0,
                   help="Dropout probability in the student while training (replaces the teacher's own, e.g. ADM's "
                        "0.1); the exported one-step generator never drops out.")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Gradient checkpointing in the student.")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the student (diffusers EMAModel).")
    g.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (with EMAModel's warm-up).")
    g.add_argument("--max_bad_steps", type=int, default=10,
                   help="Stop after this many consecutive updates with a non-finite loss or gradient (skipped).")
    g.add_argument("--seed", type=int, default=0, help="Seed (each process adds its rank).")

    g = p.add_argument_group("logging, validation, checkpoints, output")
    g.add_argument("--output_dir", default="tfd-imagenet64", help="Where checkpoints, logs and the student go.")
    g.add_argument("--logging_dir", default="logs", help="Tracker log folder, relative to --output_dir.")
    g.add_argument("--report_to", default="tensorboard", help="Trackers: tensorboard, wandb, all or none.")
    g.add_argument("--tracker_project_name", default="tfd-imagenet64", help="Tracker project name.")
    g.add_argument("--logging_steps", type=int, default=10, help="Log (trackers, metrics.jsonl) every N updates.")
    g.add_argument("--validation_steps", type=int, default=2000, help="Sample grid every N updates (0: never).")
    g.add_argument("--num_validation_images", type=int, default=16, help="Images in the validation grid.")
    g.add_argument("--checkpointing_steps", type=int, default=5000, help="Save a checkpoint every N updates.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (the newest complete checkpoint in --output_dir) or a checkpoint-N path.")
    g.add_argument("--eval_fid_every", type=int, default=0, help="FID of one-step samples every N updates (0: off).")
    g.add_argument("--fid_reference_stats", default=None,
                   help="Reference statistics (.npz with mu, sigma; e.g. EDM's imagenet-64x64.npz) for FID.")
    g.add_argument("--fid_num_samples", type=int, default=50_000, help="Samples per FID (labels i mod classes).")
    g.add_argument("--fid_batch_size", type=int, default=250, help="Batch size of FID sampling and Inception.")
    g.add_argument("--fid_mode", default="legacy_tensorflow", choices=("legacy_tensorflow", "clean"),
                   help="Inception resizing: legacy_tensorflow matches EDM's reference stats, clean is clean-fid's.")
    g.add_argument("--push_to_hub", action="store_true", help="Upload --output_dir to the Hub at the end.")
    g.add_argument("--hub_model_id", default=None, help="Hub repo id (default: the output folder's name).")
    g.add_argument("--hub_token", default=None, help="Hub token (default: the cached login).")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Bad settings fail here, before any model or data is loaded."""
    if args.num_generated < 2:
        raise ValueError("--num_generated must be at least 2: with one generated sample per class the drifting "
                         "self-mask leaves no negatives.")
    if args.num_positives < 1 or args.num_anchors < 0 or args.classes_per_batch < 1:
        raise ValueError("--num_positives and --classes_per_batch must be >= 1 and --num_anchors >= 0.")
    if args.feature_noise_min > args.feature_noise_max or args.feature_noise_min < 0:
        raise ValueError("Need 0 <= --feature_noise_min <= --feature_noise_max.")
    if not args.dataset_name and not args.train_data_dir:
        raise ValueError("Give the training images: --dataset_name or --train_data_dir.")
    if args.eval_fid_every > 0:
        if not args.fid_reference_stats or not os.path.isfile(args.fid_reference_stats):
            raise FileNotFoundError(f"--eval_fid_every needs --fid_reference_stats pointing to an existing .npz; got "
                                    f"{args.fid_reference_stats!r}.")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError("Do not pass --hub_token together with --report_to wandb (it would be logged); "
                         "use `hf auth login` instead.")
    args.feature_layers = args.feature_layers.replace(",", " ").split()
    args.drift_radii = tfd_utils.parse_floats(args.drift_radii)
    if args.class_ids is not None:
        parse_class_ids(args.class_ids)  # a typo fails here, before anything is loaded


def parse_class_ids(text):
    """'0-3,7' → [0, 1, 2, 3, 7]."""
    ids = []
    try:
        for part in str(text).replace(" ", ",").split(","):
            if "-" in part:
                lo, hi = part.split("-")
                ids += range(int(lo), int(hi) + 1)
            elif part:
                ids.append(int(part))
    except ValueError:
        raise ValueError(f"--class_ids {text!r}: give class ids and ranges, e.g. '0-99' or '1,7,9'.") from None
    return sorted(set(ids))


def load_teacher(args):
    """The frozen teacher: a diffusers UNet2DModel or an NVlabs EDM network (from its pickle)."""
    path = args.pretrained_teacher_model
    if path.endswith(".pkl") or os.path.isfile(path):
        return tfd_utils.load_edm_pickle(path, args.edm_repo)
    from diffusers import UNet2DModel

    kw = dict(revision=args.revision, cache_dir=args.cache_dir)
    if args.teacher_subfolder is not None:
        return UNet2DModel.from_pretrained(path, subfolder=args.teacher_subfolder, **kw)
    try:
        return UNet2DModel.from_pretrained(path, **kw)
    except (OSError, EnvironmentError):
        return UNet2DModel.from_pretrained(path, subfolder="unet", **kw)  # a pipeline folder / repo


def select_classes(labels, num_teacher_classes, class_ids):
    """The classes to distil; errors name classes the teacher lacks or that have no images."""
    present = sorted(set(labels.tolist()))
    outside = [c for c in present if not 0 <= c < num_teacher_classes]
    if outside:
        raise ValueError(f"The data has labels {outside[:10]} outside the teacher's {num_teacher_classes} classes "
                         f"(0..{num_teacher_classes - 1}).")
    if class_ids is None:
        missing = [c for c in range(num_teacher_classes) if c not in set(present)]
        if missing:
            logger.info(f"{len(missing)} of the teacher's {num_teacher_classes} classes have no images and are not "
                        f"trained: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        return present
    classes = parse_class_ids(class_ids)
    outside = [c for c in classes if not 0 <= c < num_teacher_classes]
    empty = [c for c in classes if c not in set(present)]
    if outside:
        raise ValueError(f"--class_ids {outside[:10]} are outside the teacher's classes 0..{num_teacher_classes - 1}.")
    if empty:
        raise ValueError(f"Classes {empty[:20]} named by --class_ids have no images in the data set.")
    return classes


def main(args):
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    mixed = args.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    device = accelerator.device

    # An output folder with checkpoints is another run's: continue it only on request.
    resume = tfd_utils.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint, logger)
    tfd_utils.check_output_dir(args.output_dir, args.resume_from_checkpoint)
    set_seed(args.seed, device_specific=True)

    # Teacher (frozen) and its feature hooks; bad layer names fail here with the valid ones listed.
    teacher = load_teacher(args)
    edm_net = tfd_utils.is_edm_network(teacher)
    num_teacher_classes = tfd_utils.num_class_labels(teacher)
    if num_teacher_classes == 0:
        raise ValueError(f"{args.pretrained_teacher_model} has no class embeddings (num_class_embeds / label_dim is "
                         "unset): this script distils class-conditional teachers.")
    if args.precond == "edm" and not edm_net:
        raise ValueError("--precond edm needs an NVlabs EDM network pickle: diffusers' ConsistencyModelPipeline always "
                         "conditions a UNet2DModel on 250·ln σ (--precond cm).")
    if edm_net:
        channels, resolution = teacher.img_channels, teacher.img_resolution
        args.sigma_data = float(teacher.sigma_data)
    else:
        channels, size = teacher.config.in_channels, teacher.config.sample_size
        resolution = size if isinstance(size, int) else size[0]
    extractor = tfd_utils.FeatureExtractor(teacher, args.feature_layers, args.feature_pool_size)
    teacher_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.teacher_dtype]

    # Data: labelled images in the teacher's format, and the class-grouped sampler.
    labels, fetch, data_desc = tfd_utils.open_labelled_images(
        args.dataset_name, args.train_data_dir, args.dataset_split, args.image_column, args.label_column,
        args.dataset_config_name, args.cache_dir)
    classes = select_classes(labels, num_teacher_classes, args.class_ids)
    data = tfd_utils.LabelledImages(labels, fetch, channels, resolution, args.preload_max_gb,
                                    progress=accelerator.is_local_main_process)
    per_class = args.num_positives + args.num_anchors
    sampler = tfd_utils.ClassGroupedSampler(labels, classes, args.classes_per_batch, per_class, args.seed,
                                            accelerator.process_index, logger)
    if args.classes_per_batch * accelerator.num_processes > len(classes):
        logger.warning(f"{accelerator.num_processes} processes x {args.classes_per_batch} classes per batch exceed the "
                       f"{len(classes)} classes: some classes are drawn by two processes in the same step.")
    logger.info(f"Data: {data_desc}: {len(labels)} images, {len(classes)} classes, {channels}x{resolution}x"
                f"{resolution}, {'in memory' if data.data is not None else 'decoded on the fly'}.")

    # Student: a trainable copy of the teacher.
    student = copy.deepcopy(teacher).to(device).float().train().requires_grad_(True)
    teacher.to(device).eval().requires_grad_(False)
    if teacher_dtype != torch.float32:
        teacher.to(teacher_dtype)
    tfd_utils.set_dropout(student, args.dropout)
    if args.gradient_checkpointing and hasattr(student, "enable_gradient_checkpointing"):
        student.enable_gradient_checkpointing()
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(student.parameters(), decay=args.ema_decay, model_cls=None if edm_net else type(student),
                       model_config=None if edm_net else student.config)
        ema.to(device)

    # Checkpoints hold the student as a diffusers folder (checkpoint-N/unet) when it is one.
    def save_model_hook(models, weights, output_dir):
        if edm_net:
            return
        for model in models:
            full = tfd_utils.consolidated_model(accelerator, model)  # every process: FSDP gathers the shards
            if accelerator.is_main_process:
                full.save_pretrained(os.path.join(output_dir, "unet"))
            if weights:  # empty under FSDP/DeepSpeed, which save their own (sharded) state next to it
                weights.pop()

    def load_model_hook(models, input_dir):
        if edm_net or accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
            return  # accelerate loads the engine's own state
        for _ in range(len(models)):
            model = models.pop()
            loaded = type(accelerator.unwrap_model(model)).from_pretrained(input_dir, subfolder="unet")
            accelerator.unwrap_model(model).load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    from diffusers.optimization import get_scheduler

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = tfd_utils.make_optimizer(params, args.learning_rate, (args.adam_beta1, args.adam_beta2),
                                         args.adam_weight_decay, args.adam_epsilon, args.use_8bit_adam)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    params = [p for p in student.parameters() if p.requires_grad]  # FSDP clips the prepared model's own
    accelerator.register_for_checkpointing(sampler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    label_dim = num_teacher_classes

    def generate(model, noise, class_labels):
        """The student's one-step sample: the exact function the saved pipeline/pickle runs."""
        if edm_net:
            return tfd_utils.edm_net_one_step(model, noise, class_labels, args.sigma_max, label_dim)
        return tfd_utils.edm_one_step(model, noise, class_labels, args.sigma_max, args.sigma_min, args.precond,
                                      args.sigma_data)

    first_step, metrics_path = tfd_utils.start_run(accelerator, args, resume, logger)
    if ema is not None:
        ema.to(device)

    # Fixed noise and classes for the validation grid.
    n_val = args.num_validation_images
    val_labels = torch.tensor([classes[(i * len(classes)) // n_val] if n_val <= len(classes)
                               else classes[i % len(classes)] for i in range(n_val)], device=device)
    val_noise = torch.randn(n_val, channels, resolution, resolution,
                            generator=torch.Generator().manual_seed(args.seed)).to(device)

    @torch.no_grad()
    def sample_grid(step):
        model = accelerator.unwrap_model(student)
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        model.eval()
        with accelerator.autocast():
            images = generate(model, val_noise, val_labels)
        model.train()
        if ema is not None:
            ema.restore(model.parameters())
        grid = tfd_utils.image_grid(images)
        if step is not None:
            os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
            grid.save(os.path.join(args.output_dir, "validation", f"step-{step}.png"))
            tfd_utils.log_image(accelerator, grid, step)
        return grid

    fid_reference = None
    if args.eval_fid_every > 0:
        import tfd_fid

        fid_reference = tfd_fid.load_reference_stats(args.fid_reference_stats)

    # Training.
    group_shape = (args.classes_per_batch, args.num_generated, channels, resolution, resolution)
    images_per_update = math.prod(group_shape[:2]) * args.gradient_accumulation_steps * accelerator.num_processes
    logger.info(f"***** TFD: {args.max_train_steps} updates, {args.classes_per_batch} classes x (N={args.num_generated}, "
                f"P={args.num_positives}, M={args.num_anchors}) per process, {accelerator.num_processes} processes, "
                f"layers {extractor.names} *****")
    progress = tqdm(range(args.max_train_steps), initial=first_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    monitor = tfd_utils.TrainingMonitor(accelerator, args, progress, metrics_path, first_step, images_per_update, logger)
    with extractor:
        for step in range(first_step + 1, args.max_train_steps + 1):
            loss_sum = 0.0
            for _ in range(args.gradient_accumulation_steps):
                with accelerator.accumulate(student):
                    step_classes, idx = sampler()
                    tfd_utils.debug_record(accelerator, "draws", lambda: {"step": step, "classes": step_classes.tolist(),
                                                                          "indices": idx.tolist()})
                    real = tfd_utils.uint8_to_model(data.get(idx), device)  # [G, P+M, C, H, W]
                    positives, anchors = real[:, :args.num_positives], real[:, args.num_positives:]
                    step_classes = step_classes.to(device)
                    noise = torch.randn(math.prod(group_shape[:2]), *group_shape[2:], device=device)
                    with accelerator.autocast():
                        generated = generate(student, noise, step_classes.repeat_interleave(args.num_generated))
                    generated = generated.float().reshape(group_shape)
                    sigma = tfd_utils.sample_feature_sigmas(
                        args.classes_per_batch, args.feature_noise_mean, args.feature_noise_std,
                        args.feature_noise_min, args.feature_noise_max, device=device)
                    forward = tfd_utils.edm_teacher_forward(teacher, step_classes, args.precond, args.sigma_data)
                    loss, logs = tfd_utils.tfd_step_loss(
                        extractor, forward, generated, positives, anchors if args.num_anchors > 0 else None, sigma,
                        args.drift_radii, args.drift_kernel, args.anchor_weight, args.anchor_alpha,
                        args.anchor_temperature, args.anchor_bandwidth)
                    loss = tfd_utils.inject_test_fault(loss, step, accelerator.process_index)  # no-op outside tests
                    accelerator.backward(loss)
                    logs.update({"sigma/mean": sigma.mean(), "sigma/min": sigma.min(), "sigma/max": sigma.max()})
                    monitor.add(logs)
                    loss_sum = loss_sum + loss.detach()
                    if accelerator.sync_gradients:  # skips the update when the loss or gradient is not finite
                        ok, grad_norm = tfd_utils.clip_and_step(accelerator, optimizer, lr_scheduler, params,
                                                                loss_sum, args.max_grad_norm)
            if ok and ema is not None:
                ema.step(accelerator.unwrap_model(student).parameters())
            monitor.end_step(step, ok, grad_norm, {"train/lr": lr_scheduler.get_last_lr()[0]})
            tfd_utils.debug_record(accelerator, "steps", lambda: {
                "step": step, "ok": ok, "digest": tfd_utils.state_digest(accelerator.unwrap_model(student))})
            if args.validation_steps > 0 and step % args.validation_steps == 0 and accelerator.is_main_process:
                sample_grid(step)
            if fid_reference is not None and step % args.eval_fid_every == 0:
                fid = evaluate_fid(accelerator, student, ema, generate, classes, (channels, resolution), fid_reference,
                                   args)
                if accelerator.is_main_process:
                    logger.info(f"Step {step}: FID {fid:.3f} ({args.fid_num_samples} samples)")
                    accelerator.log({"eval/fid": fid}, step=step)
                    tfd_utils.append_metrics(metrics_path, {"step": step, "eval/fid": fid})

    # Export: the student (its EMA with --use_ema), a sample grid and a model card.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(student)
        if ema is not None:
            ema.copy_to(model.parameters())
        grid = sample_grid(None)
        grid.save(os.path.join(args.output_dir, "samples.png"))
        export_student(model, edm_net, args)
        write_model_card(args, data_desc, len(classes), edm_net)
        if args.push_to_hub:
            tfd_utils.push_folder_to_hub(args.output_dir, args.hub_model_id, args.hub_token)
        logger.info(f"Saved the one-step student to {args.output_dir}")
    accelerator.end_training()


@torch.no_grad()
def evaluate_fid(accelerator, student, ema, generate, classes, shape, reference, args):
    """FID of fid_num_samples one-step samples (labels i mod classes, fixed noise) vs the reference."""
    import tfd_fid

    channels, resolution = shape
    model = accelerator.unwrap_model(student)
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    n, world, rank = args.fid_num_samples, accelerator.num_processes, accelerator.process_index
    per_rank = math.ceil(n / world)
    gen = torch.Generator().manual_seed(args.seed * 7919 + rank)
    chunks = []
    for start in range(rank * per_rank, (rank + 1) * per_rank, args.fid_batch_size):
        idx = torch.arange(start, min(start + args.fid_batch_size, (rank + 1) * per_rank))
        labels = torch.as_tensor(classes)[idx % len(classes)].to(accelerator.device)
        noise = torch.randn(len(idx), channels, resolution, resolution, generator=gen).to(accelerator.device)
        with accelerator.autocast():
            x = generate(model, noise, labels).float()
        u8 = tfd_utils.to_uint8(x)  # the evaluation protocol's conversion (SPEC §5)
        chunks.append(u8.expand(*u8.shape[:3], 3) if channels == 1 else u8)
    model.train()
    if ema is not None:
        ema.restore(model.parameters())
    feats = tfd_fid.inception_features(torch.cat(chunks).cpu(), args.fid_batch_size, accelerator.device, args.fid_mode)
    feats = accelerator.gather(torch.as_tensor(feats, device=accelerator.device))[:n]
    if not accelerator.is_main_process:
        return None
    mu, sigma = tfd_fid.feature_stats(feats.cpu().numpy())
    return float(tfd_fid.frechet_distance(mu, sigma, *reference))


def export_student(model, edm_net, args):
    """diffusers: a ConsistencyModelPipeline (one step); EDM: network-snapshot.pkl ({'ema': net}, EDM's format)."""
    if edm_net:
        net = copy.deepcopy(model).eval().requires_grad_(False).cpu()
        path = os.path.join(args.output_dir, "network-snapshot.pkl")
        def write(tmp):
            with open(tmp, "wb") as f:
                pickle.dump({"ema": net}, f)

        tfd_utils.atomic_write(path, write)
        return
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    scheduler = CMStochasticIterativeScheduler(sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                                               sigma_data=args.sigma_data, clip_denoised=False)
    pipe = ConsistencyModelPipeline(unet=model.float(), scheduler=scheduler)
    tfd_utils.save_pipeline(pipe, args.output_dir)


def write_model_card(args, data_desc, num_classes, edm_net):
    from huggingface_hub import ModelCard

    settings = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(vars(args).items()) if k != "hub_token")
    usage = (
        "```python\nimport pickle, torch\nnet = pickle.load(open('network-snapshot.pkl', 'rb'))['ema']  # NVlabs EDM "
        "code on sys.path\nz = torch.randn(4, net.img_channels, net.img_resolution, net.img_resolution)\nlabels = "
        f"torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), net.label_dim).float()\nx = net(z * {args.sigma_max}, "
        f"torch.full((4,), {args.sigma_max}), labels)  # one step, in [-1, 1]\n```"
        if edm_net else
        "```python\nfrom diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained('PATH_OR_REPO')\n"
        "image = pipe(class_labels=[0], num_inference_steps=1).images[0]\n```"
    )
    content = f"""---
library_name: {'pytorch' if edm_net else 'diffusers'}
tags: [tfd, teacher-feature-drifting, one-step, distillation, class-conditional, image-generation]
base_model: {args.pretrained_teacher_model}
---

# One-step TFD student of `{args.pretrained_teacher_model}`

Distilled with Teacher-Feature Drifting (`train_tfd_imagenet64.py`) on {data_desc}, {num_classes} classes,
{args.max_train_steps} updates. One forward pass per image.

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
