#!/usr/bin/env python
# Teacher-Feature Drifting (TFD): distil a class-conditional EDM teacher (ImageNet-64 and the like)
# into a one-step student.
#
#   accelerate launch train_tfd_imagenet64.py --pretrained_model_name_or_path edm-imagenet-64x64-cond-adm.pkl \
#     --edm_repo edm --dataset_name datasets/imagenet-64x64.zip --output_dir tfd-imagenet64
#
# To fork, copy this file with tfd_utils.py (the method) and tfd_training.py (the loop's plumbing).
# `train_step` is the step; `main` reads top to bottom; what only this script uses (EDM pickles,
# labelled image sources, the class-grouped sampler) follows it.

import copy
import json
import math
import os
import pickle
import sys
import zipfile

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

import tfd_training
import tfd_utils

logger = get_logger(__name__, log_level="INFO")

IMAGENET64_LAYERS = "enc:6 enc:11 bottleneck dec:7 dec:12"
# Valid ranges of this script's numeric flags, checked at parse time (tfd_training.check_ranges).
RANGES = {"num_generated": tfd_training.NUM_GENERATED, "num_positives": ">= 1", "num_anchors": ">= 0",
          "classes_per_batch": ">= 1", "sigma_data": "> 0", "sigma_max": "> 0", "sigma_min": "> 0",
          "preload_max_gb": ">= 0", "dropout": "0..0.999999", "ema_decay": "0..1", "num_validation_images": ">= 1",
          "eval_fid_every": ">= 0", "fid_num_samples": ">= 2", "fid_batch_size": ">= 1", "max_bad_images": ">= 0",
          "dataloader_num_workers": ">= 0"}


def parse_args(argv=None):
    p = tfd_training.argument_parser("TFD one-step distillation of a class-conditional EDM teacher.")
    g = p.add_argument_group("teacher")
    g.add_argument("--pretrained_model_name_or_path", "--pretrained_teacher_model", required=True,
                   dest="pretrained_model_name_or_path",
                   help="The teacher: a diffusers UNet2DModel with class embeddings (local folder, pipeline folder or "
                        "Hub id), or an NVlabs EDM network pickle (.pkl path or URL, {'ema': net}).")
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
    g.add_argument("--teacher_dtype", default="fp32", choices=tuple(tfd_training.DTYPES),
                   help="dtype of the frozen diffusers teacher for the feature pass (the recipe: fp32). An EDM "
                        "pickle's feature pass always runs in float32.")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="Labelled images: a Hub id or local path datasets.load_dataset takes, a save_to_disk folder, "
                        "or an EDM/StyleGAN dataset zip/folder (dataset.json labels).")
    g.add_argument("--dataset_config_name", default=None, help="Config name of --dataset_name.")
    g.add_argument("--train_data_dir", default=None,
                   help="An imagefolder (one sub-folder per class) or an EDM dataset folder; instead of "
                        "--dataset_name.")
    g.add_argument("--dataset_split", default="train",
                   help="Split, optionally sliced as datasets does it: 'train', 'train[:100000]'.")
    g.add_argument("--image_column", default="image", help="Image column of the data set.")
    g.add_argument("--label_column", default="label", help="Integer class-label column of the data set.")
    g.add_argument("--class_ids", default=None,
                   help="Classes to distil, e.g. '0-999' or '1,7,9'. Default: every class with images in the data "
                        "(teacher classes without images are reported). A named class without images is an error.")
    g.add_argument("--preload_max_gb", type=float, default=8.0,
                   help="Preprocess the whole data set into memory (uint8) when it takes at most this many GB per "
                        "process; larger ones (ImageNet-64: 15.7 GB) are decoded on the fly.")
    tfd_training.add_bad_images_argument(g)
    g.add_argument("--cache_dir", default=None, help="datasets/diffusers cache directory.")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="Threads decoding images (the in-memory preprocessing, or each step's images when decoded on "
                        "the fly); 0: the main thread. The images and their order are the same for any number.")

    g = p.add_argument_group("batch and student")
    g.add_argument("--classes_per_batch", type=int, default=10, help="Classes (groups) per step per process.")
    g.add_argument("--num_generated", type=int, default=4, help="Generated samples per class (N, at least 2).")
    g.add_argument("--num_positives", type=int, default=4, help="Real images per class as positives (P).")
    g.add_argument("--num_anchors", type=int, default=4,
                   help="Real images per class as anchors (M); 0 reuses the positives as anchors.")
    g.add_argument("--dropout", type=float, default=0.0,
                   help="Dropout probability in the student while training (replaces the teacher's own, e.g. ADM's "
                        "0.1); the exported one-step generator never drops out.")
    g.add_argument("--use_ema", action="store_true", help="Keep an EMA of the student (diffusers EMAModel).")
    g.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (with EMAModel's warm-up).")
    tfd_training.add_loss_arguments(p, layers=IMAGENET64_LAYERS, radii="0.02,0.05,0.1,0.2", sigma_min=0.02,
                                    sigma_max=0.1)
    g = tfd_training.add_training_arguments(p, output_dir="tfd-imagenet64", learning_rate=2e-6,
                                            max_train_steps=200_000, max_grad_norm=10.0, validation_steps=2000,
                                            checkpointing_steps=5000)
    g.add_argument("--num_validation_images", type=int, default=16, help="Images in the validation grid.")
    g.add_argument("--eval_fid_every", type=int, default=0, help="FID of one-step samples every N updates (0: off).")
    g.add_argument("--fid_reference_stats", default=None,
                   help="Reference statistics (.npz with mu, sigma; e.g. EDM's imagenet-64x64.npz) for FID.")
    g.add_argument("--fid_num_samples", type=int, default=50_000, help="Samples per FID (labels i mod classes).")
    g.add_argument("--fid_batch_size", type=int, default=250, help="Batch size of FID sampling and Inception.")
    g.add_argument("--fid_mode", default="legacy_tensorflow", choices=("legacy_tensorflow", "clean"),
                   help="Inception resizing: legacy_tensorflow matches EDM's reference stats, clean is clean-fid's.")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Bad settings fail here, before any model or data is loaded."""
    if not args.dataset_name and not args.train_data_dir:
        raise ValueError("Give the training images: --dataset_name or --train_data_dir.")
    tfd_training.check_common_args(args, RANGES)
    if args.sigma_min >= args.sigma_max:
        raise ValueError(f"--sigma_min {args.sigma_min} must be below --sigma_max {args.sigma_max}.")
    if args.eval_fid_every > 0 and (not args.fid_reference_stats or not os.path.isfile(args.fid_reference_stats)):
        raise FileNotFoundError(f"--eval_fid_every needs --fid_reference_stats pointing to an existing .npz; got "
                                f"{args.fid_reference_stats!r}.")
    tfd_training.split_and_slice(args.dataset_split)
    if args.class_ids is not None:
        parse_class_ids(args.class_ids)  # a typo fails here, before anything is loaded


def main(args):
    # 1. Accelerator, logging and the seed.
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        # DDP: the gradients are views into its all-reduce buckets, not a second float32 copy of the student
        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)])
    tfd_training.setup_logging()
    logger.info(accelerator.state, main_process_only=False)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    device = accelerator.device

    # 2. Nothing to do for a finished run; another run's output folder is continued only on request; a local path
    #    that does not exist is no Hub id; layer names (before any weight loads); the Hub repo exists before training.
    if tfd_training.check_finished_run(args, logger):
        return None
    tfd_training.check_sources(args, models=("pretrained_model_name_or_path",), data=("dataset_name",),
                               paths=("train_data_dir", "edm_repo"))
    resume = tfd_training.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint, logger)
    tfd_training.check_output_dir(args.output_dir, args.resume_from_checkpoint)
    check_layers(args)
    repo_id = tfd_training.create_hub_repo(args) if accelerator.is_main_process else None

    # 3. The teacher, the data in class groups, the student (EMA optional), the loss and the optimiser.
    run = build(args, accelerator)

    # 4. Resume, record the settings, start the trackers; fixed noise and classes for the grids.
    first_step, metrics_path = tfd_training.start_run(accelerator, args, resume, logger)
    if run.ema is not None:
        run.ema.to(device)
    n_val, classes = args.num_validation_images, run.classes
    val_labels = torch.tensor([classes[(i * len(classes)) // n_val] if n_val <= len(classes)
                               else classes[i % len(classes)] for i in range(n_val)], device=device)
    val_noise = torch.randn(n_val, *run.image_shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    fid_reference = None
    if args.eval_fid_every > 0:
        import tfd_fid

        fid_reference = tfd_fid.load_reference_stats(args.fid_reference_stats)

    def sample_grid():
        with averaged(accelerator.unwrap_model(run.student), run.ema) as model:
            with accelerator.autocast():
                return tfd_training.image_grid(generate(args, model, val_noise, val_labels, run.num_classes))

    # 5. Train! Each micro-step draws --classes_per_batch classes (disjoint across processes) with their real
    #    images and runs train_step.
    G, N, rank = args.classes_per_batch, args.num_generated, accelerator.process_index
    logger.info(f"***** TFD: {args.max_train_steps} updates, {G} classes x (N={N}, P={args.num_positives}, "
                f"M={args.num_anchors}) per process, {accelerator.num_processes} processes, layers "
                f"{run.loss_fn.layers} *****")
    params = [p for p in run.student.parameters() if p.requires_grad]  # FSDP clips the prepared model's own
    progress = tqdm(range(args.max_train_steps), initial=first_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    images_per_update = G * N * args.gradient_accumulation_steps * accelerator.num_processes
    monitor = tfd_training.TrainingMonitor(accelerator, args, progress, metrics_path, first_step, images_per_update,
                                           logger)
    with tfd_training.stop_on_interrupt(accelerator, args, logger):  # Ctrl-C: one line, how to resume
        for step in range(first_step + 1, args.max_train_steps + 1):
            loss_sum = 0.0
            for micro in range(args.gradient_accumulation_steps):
                _, gen = tfd_training.step_generators(args.seed, step, micro, rank)
                batch = class_batch(run.sampler, run.data, args, run.image_shape, gen, device)
                with accelerator.accumulate(run.student):
                    loss, logs = train_step(args, accelerator, run, batch, gen)
                    accelerator.backward(loss)
                    monitor.add(logs)
                    loss_sum = loss_sum + loss.detach()
                    if accelerator.sync_gradients:  # skips the update when the loss or gradient is not finite
                        ok, grad_norm = tfd_training.clip_and_step(accelerator, run.optimizer, run.lr_scheduler,
                                                                   params, loss_sum, args.max_grad_norm)
            if ok and run.ema is not None:
                run.ema.step(accelerator.unwrap_model(run.student).parameters())
            monitor.end_step(step, ok, grad_norm, lambda: {"train/lr": run.lr_scheduler.get_last_lr()[0],
                                                           "data/bad_images": len(run.data.bad)})
            if step % args.checkpointing_steps == 0 and monitor.can_checkpoint(step):
                tfd_training.save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, logger)
            if tfd_training.is_validation_step(accelerator, args, step):
                tfd_training.save_validation_grid(accelerator, args, sample_grid(), step)
            if fid_reference is not None and step % args.eval_fid_every == 0:
                fid = evaluate_fid(accelerator, run, fid_reference, args)
                if accelerator.is_main_process:
                    logger.info(f"Step {step}: FID {fid:.3f} ({args.fid_num_samples} samples)")
                    accelerator.log({"eval/fid": fid}, step=step)
                    tfd_training.append_metrics(metrics_path, {"step": step, "eval/fid": fid})
    progress.close()

    # 6. Export: the student (its EMA with --use_ema), a sample grid and a model card.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(run.student)
        if run.ema is not None:
            run.ema.copy_to(model.parameters())
        tfd_training.save_png(os.path.join(args.output_dir, "samples.png"), sample_grid())
        export_student(model, run.edm_net, args)
        write_model_card(args, repo_id or tfd_training.hub_repo_name(args), run.data_desc, len(run.classes),
                         run.edm_net)
        if args.push_to_hub:
            tfd_training.push_folder_to_hub(args.output_dir, repo_id, args.hub_token)
    accelerator.end_training()
    logger.info(tfd_training.saved_message(args.output_dir))


def build(args, accelerator, teacher=None):
    """What the loop needs, as a namespace: the frozen teacher (loaded unless given: the benchmark passes one
    built from a config), its classes and image shape, the labelled images and the class-grouped sampler, the
    float32 student (and its EMA), the loss, AdamW and its schedule, prepared by the accelerator."""
    from types import SimpleNamespace

    device = accelerator.device
    # a. The frozen teacher; bad layer names fail here with the valid ones listed.
    teacher = load_teacher(args) if teacher is None else teacher
    edm_net = tfd_utils.is_edm_network(teacher)
    num_classes = num_class_labels(teacher)
    if num_classes == 0:
        raise ValueError(f"{args.pretrained_model_name_or_path} has no class embeddings (num_class_embeds / label_dim "
                         "is unset): this script distils class-conditional teachers.")
    if edm_net and args.teacher_dtype != "fp32":
        raise ValueError("An EDM pickle's feature pass runs in float32 (its layers cast their weights to the input's "
                         "dtype): drop --teacher_dtype.")
    if args.precond == "edm" and not edm_net:
        raise ValueError("--precond edm needs an NVlabs EDM network pickle: diffusers' ConsistencyModelPipeline "
                         "always conditions a UNet2DModel on 250·ln σ (--precond cm).")
    if edm_net:
        channels, resolution = teacher.img_channels, teacher.img_resolution
        args.sigma_data = float(teacher.sigma_data)
    else:
        channels, size = teacher.config.in_channels, teacher.config.sample_size
        resolution = size if isinstance(size, int) else size[0]
    tfd_utils.resolve_layers(teacher, args.feature_layers)

    # b. Data: labelled images in the teacher's format, drawn in class groups.
    labels, fetch, data_desc = open_labelled_images(args.dataset_name, args.train_data_dir, args.dataset_split,
                                                    args.image_column, args.label_column, args.dataset_config_name,
                                                    args.cache_dir)
    classes = select_classes(labels, num_classes, args.class_ids)
    data = LabelledImages(labels, fetch, channels, resolution, args.preload_max_gb,
                          progress=accelerator.is_local_main_process, accelerator=accelerator,
                          workers=args.dataloader_num_workers)
    tfd_training.check_bad_images(data.bad, args.max_bad_images, len(labels), data_desc, logger)
    usable = labels.clone()
    usable[list(data.bad)] = -1  # bad images are in no class: never drawn
    if data.bad:
        classes = select_classes(usable[usable >= 0], num_classes, args.class_ids)
    sampler = ClassGroupedSampler(usable, classes, args.classes_per_batch, args.num_positives + args.num_anchors,
                                  args.seed, accelerator.process_index, logger)
    if args.classes_per_batch * accelerator.num_processes > len(classes):
        logger.warning(f"{accelerator.num_processes} processes x {args.classes_per_batch} classes per batch exceed "
                       f"the {len(classes)} classes: some classes are drawn by two processes in the same step.")
    logger.info(f"Data: {data_desc}: {len(labels)} images ({len(data.bad)} bad, skipped), {len(classes)} classes, "
                f"{channels}x{resolution}x{resolution}, "
                f"{'in memory' if data.data is not None else 'decoded on the fly'}.")

    # c. Student: a float32 copy of the teacher made on the CPU (EMA optional); the teacher frozen in
    #    --teacher_dtype, on the device before the student (never two float32 copies there).
    dtype = tfd_training.DTYPES[args.teacher_dtype]
    student, teacher = tfd_training.student_and_frozen_teacher(teacher, device, dtype)
    student.train()
    teacher.eval()
    set_dropout(student, args.dropout)
    if args.gradient_checkpointing and hasattr(student, "enable_gradient_checkpointing"):
        student.enable_gradient_checkpointing()
    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(student.parameters(), decay=args.ema_decay, model_cls=None if edm_net else type(student),
                       model_config=None if edm_net else student.config)
        ema.to(device)

    # d. The loss, the optimiser and its schedule; checkpoints hold the student as a diffusers folder.
    if edm_net and args.teacher_checkpointing:
        logger.warning("--teacher_checkpointing: an EDM network has no block checkpointing; its pass keeps its "
                       "activations.")
    loss_fn = tfd_utils.TFDLoss(teacher, **tfd_training.loss_kwargs(args),
                                checkpoint_teacher=args.teacher_checkpointing and not edm_net)
    register_checkpoint_hooks(accelerator, edm_net)
    optimizer = tfd_training.make_optimizer([p for p in student.parameters() if p.requires_grad], args)
    lr_scheduler = tfd_training.make_lr_scheduler(optimizer, args, accelerator.num_processes)
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    accelerator.register_for_checkpointing(sampler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    memory = tfd_training.log_memory(accelerator, [("student", student), ("teacher", teacher)] + (
        [("student EMA", ema.shadow_params)] if ema is not None else []), optimizer, logger)
    return SimpleNamespace(memory=memory, teacher=teacher, edm_net=edm_net, num_classes=num_classes, classes=classes,
                           image_shape=(channels, resolution, resolution), data=data, sampler=sampler,
                           data_desc=data_desc, student=student, ema=ema, loss_fn=loss_fn, optimizer=optimizer,
                           lr_scheduler=lr_scheduler)


def generate(args, model, noise, class_labels, num_classes):
    """The one-step student: x = D(σ_max·z; σ_max) with the consistency-model boundary scalings (a diffusers
    UNet2DModel) or the EDM network's own preconditioning. The saved pipeline (or EDM pickle) runs exactly this."""
    if tfd_utils.is_edm_network(getattr(model, "module", model)):
        return tfd_utils.edm_net_one_step(model, noise, class_labels, args.sigma_max, num_classes)
    return tfd_utils.edm_one_step(model, noise, class_labels, args.sigma_max, args.sigma_min, args.precond,
                                  args.sigma_data)


def train_step(args, accelerator, run, batch, generator):
    """One micro-step: N one-step samples per class, then the TFD loss in the teacher's features.

    batch: (classes [G], positives [G, P, C, H, W], anchors [G, M, C, H, W] or None, noise [G·N, C, H, W]).
    Returns (loss, logs); the caller runs the backward.
    """
    classes, positives, anchors, noise = batch
    G, N = classes.shape[0], noise.shape[0] // classes.shape[0]
    with accelerator.autocast():
        generated = generate(args, run.student, noise, classes.repeat_interleave(N), run.num_classes)
    generated = generated.float().reshape(G, N, *noise.shape[1:])
    forward = tfd_utils.edm_teacher_forward(run.teacher, classes, args.precond, args.sigma_data)
    return run.loss_fn(forward, generated, positives, anchors, generator=generator)


def class_batch(sampler, data, args, image_shape, generator, device):
    """The next draw of classes and their real images → (classes, positives, anchors or None, noise)."""
    classes, idx = sampler()
    real = uint8_to_model(data.get(idx), device)  # [G, P+M, C, H, W]
    anchors = real[:, args.num_positives:] if args.num_anchors > 0 else None
    noise = torch.randn(len(classes) * args.num_generated, *image_shape, generator=generator).to(device)
    return classes.to(device), real[:, :args.num_positives], anchors, noise


class averaged:
    """The unwrapped student in eval mode with its EMA weights swapped in (if any), restored on exit."""

    def __init__(self, model, ema):
        self.model, self.ema = model, ema

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train()
        if self.ema is not None:
            self.ema.restore(self.model.parameters())


@torch.no_grad()
def evaluate_fid(accelerator, run, reference, args):
    """FID of fid_num_samples one-step samples (labels i mod classes, fixed noise) against the reference."""
    import tfd_fid

    n, world, rank = args.fid_num_samples, accelerator.num_processes, accelerator.process_index
    per_rank = math.ceil(n / world)
    gen = torch.Generator().manual_seed(args.seed * 7919 + rank)
    chunks = []
    with averaged(accelerator.unwrap_model(run.student), run.ema) as model:
        for start in range(rank * per_rank, (rank + 1) * per_rank, args.fid_batch_size):
            idx = torch.arange(start, min(start + args.fid_batch_size, (rank + 1) * per_rank))
            labels = torch.as_tensor(run.classes)[idx % len(run.classes)].to(accelerator.device)
            noise = torch.randn(len(idx), *run.image_shape, generator=gen).to(accelerator.device)
            with accelerator.autocast():
                u8 = tfd_training.to_uint8(generate(args, model, noise, labels, run.num_classes).float())
            chunks.append(u8.expand(*u8.shape[:3], 3) if run.image_shape[0] == 1 else u8)
    feats = tfd_fid.inception_features(torch.cat(chunks).cpu(), args.fid_batch_size, accelerator.device, args.fid_mode)
    feats = accelerator.gather(torch.as_tensor(feats, device=accelerator.device))[:n]
    if not accelerator.is_main_process:
        return None
    mu, sigma = tfd_fid.feature_stats(feats.cpu().numpy())
    return float(tfd_fid.frechet_distance(mu, sigma, *reference))


def register_checkpoint_hooks(accelerator, edm_net):
    """Checkpoints hold a diffusers student as checkpoint-N/unet (an EDM network: accelerate's own file)."""
    def save_model_hook(models, weights, output_dir):
        if edm_net:
            return
        for model in models:
            full = tfd_training.consolidated_model(accelerator, model)  # every process: FSDP gathers the shards
            if accelerator.is_main_process:
                full.save_pretrained(os.path.join(output_dir, "unet"))
            if weights:  # empty under FSDP/DeepSpeed, which save their own (sharded) state next to it
                weights.pop()

    def load_model_hook(models, input_dir):
        if edm_net or accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
            return  # accelerate loads the engine's own state
        for _ in range(len(models)):
            model = accelerator.unwrap_model(models.pop())
            model.load_state_dict(type(model).from_pretrained(input_dir, subfolder="unet").state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def export_student(model, edm_net, args):
    """diffusers: a ConsistencyModelPipeline (one step). EDM: network-snapshot.pkl ({'ema': net}, EDM's own
    format, with the teacher's use_fp16 setting, so EDM's code loads it as it loads the teacher); its one step
    is the direct call net(z·σmax, σmax, labels) (EDM's edm_sampler cannot take one step)."""
    if edm_net:
        net = copy.deepcopy(model).eval().requires_grad_(False).cpu()

        def write(tmp):
            with open(tmp, "wb") as f:
                pickle.dump({"ema": net}, f)

        tfd_training.atomic_write(os.path.join(args.output_dir, "network-snapshot.pkl"), write)
        return
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    scheduler = CMStochasticIterativeScheduler(sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                                               sigma_data=args.sigma_data, clip_denoised=False)
    tfd_training.save_pipeline(ConsistencyModelPipeline(unet=model.float(), scheduler=scheduler), args.output_dir)


def write_model_card(args, repo_id, data_desc, num_classes, edm_net):
    teacher = args.pretrained_model_name_or_path
    if edm_net:
        usage = ("import pickle, torch  # with the NVlabs/edm code on sys.path\n"
                 "net = pickle.load(open('network-snapshot.pkl', 'rb'))['ema']\n"
                 "z = torch.randn(4, net.img_channels, net.img_resolution, net.img_resolution)\n"
                 "labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), net.label_dim).float()\n"
                 f"x = net(z * {args.sigma_max}, torch.full((4,), {args.sigma_max}), labels)  # one step, in [-1, 1]")
    else:
        usage = ("from diffusers import DiffusionPipeline\n\n"
                 f"pipe = DiffusionPipeline.from_pretrained('{repo_id}')\n"
                 "image = pipe(class_labels=[0], num_inference_steps=1).images[0]")
    data = tfd_training.public_name(args.dataset_name or args.train_data_dir)
    settings = {"data": f"{data}, {num_classes} classes", "updates": args.max_train_steps,
                "classes × (generated, positives, anchors) per process":
                f"{args.classes_per_batch} × ({args.num_generated}, {args.num_positives}, {args.num_anchors})",
                "teacher layers": " ".join(args.feature_layers), "feature noise σ": tfd_training.sigma_text(args),
                "radii": args.drift_radii, "learning rate": args.learning_rate,
                "EMA": args.ema_decay if args.use_ema else "none"}
    tfd_training.save_model_card(
        args, repo_id, teacher,
        ["diffusers" if not edm_net else "edm", "class-conditional", "image-generation", "one-step", "tfd"],
        f"One-step TFD student of {tfd_training.public_name(teacher)}",
        "Distilled with Teacher-Feature Drifting (`train_tfd_imagenet64.py`): one network evaluation per image.",
        usage, settings, library_name="pytorch" if edm_net else "diffusers")


# ----------------------------------------------------------------------------------------------
# What only this script uses: the teacher, its classes, labelled image sources, the sampler.
# ----------------------------------------------------------------------------------------------


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


def check_layers(args):
    """Unknown or out-of-range --feature_layers fail before any weight loads: a diffusers teacher's UNet2DModel
    is built from its config on the meta device (from the root or `unet`, as load_teacher reads it). An EDM
    pickle holds its architecture with its weights: its layers are checked once it is loaded (build)."""
    path = args.pretrained_model_name_or_path
    if path.endswith(".pkl") or os.path.isfile(path):  # an EDM pickle, as load_teacher tells them apart
        return
    from diffusers import UNet2DModel

    kw = dict(revision=args.revision, cache_dir=args.cache_dir)
    if args.teacher_subfolder is not None:
        config = UNet2DModel.load_config(path, subfolder=args.teacher_subfolder, **kw)
    else:
        try:
            config = UNet2DModel.load_config(path, **kw)
        except (OSError, EnvironmentError):
            config = UNet2DModel.load_config(path, subfolder="unet", **kw)  # a pipeline folder / repo
    with torch.device("meta"):
        tfd_utils.resolve_layers(UNet2DModel.from_config(config), args.feature_layers)


def load_teacher(args):
    """The frozen teacher: a diffusers UNet2DModel or an NVlabs EDM network (from its pickle)."""
    path = args.pretrained_model_name_or_path
    if path.endswith(".pkl") or os.path.isfile(path):
        return load_edm_pickle(path, args.edm_repo)
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


def load_edm_pickle(path, edm_repo=None):
    """The network of an NVlabs EDM pickle ({'ema': net}, a path or URL); its classes unpickle from
    an NVlabs/edm checkout put on sys.path (edm_repo)."""
    if edm_repo and os.path.abspath(edm_repo) not in sys.path:
        sys.path.insert(0, os.path.abspath(edm_repo))
    url = path.startswith(("http://", "https://"))
    if not url and not os.path.isfile(path):
        raise FileNotFoundError(f"EDM pickle {path} not found.")
    try:
        if url:
            import dnnlib  # from edm_repo

            with dnnlib.util.open_url(path) as f:
                data = pickle.load(f)
        else:
            with open(path, "rb") as f:
                data = pickle.load(f)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"Unpickling {path} needs the NVlabs EDM code ({e.name}): pass --edm_repo "
                                  "PATH_TO_EDM_CHECKOUT (git clone https://github.com/NVlabs/edm).") from e
    return data["ema"] if isinstance(data, dict) else data


def num_class_labels(model):
    """Number of class labels the network is conditioned on (0 for an unconditional one)."""
    if tfd_utils.is_edm_network(model):
        return int(model.label_dim or 0)
    return int(getattr(model.config, "num_class_embeds", None) or 0)


def set_dropout(model, p):
    """Set every dropout probability of a model: torch Dropout modules and float `dropout` attributes
    (NVlabs EDM's UNetBlock calls functional dropout with self.dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = p
        elif isinstance(vars(module).get("dropout"), float):  # an attribute of its own, not a config's
            module.dropout = p
    return model


def to_teacher_image(image, channels, resolution):
    """A PIL image → uint8 [C, H, W] with the teacher's channels (1: L, 3: RGB) and resolution
    (shorter side resized with bicubic filtering, then center-cropped)."""
    import numpy as np
    from PIL import Image

    image = tfd_training.decode_image(image, {1: "L", 3: "RGB"}[channels])
    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, channels)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class ClassGroupedSampler:
    """Draws, per step, `classes_per_batch` distinct classes and `per_class` image indices of each.

    Indices of a class are drawn without replacement; a class with fewer images is drawn with
    replacement (warned about once). Draw k of process `rank` depends only on (seed, rank, k), so
    the state is the draw counter: register the sampler with accelerator.register_for_checkpointing
    and a resumed run continues exactly (the counter is the same on every process). The classes of
    draw k come from one sequence shared by all processes, rank r taking positions [r·G, (r+1)·G):
    processes train disjoint classes while G·processes ≤ classes.
    """

    def __init__(self, labels, classes, classes_per_batch, per_class, seed=0, rank=0, logger=None):
        labels = torch.as_tensor(labels).reshape(-1)
        self.classes = torch.as_tensor(sorted(int(c) for c in classes), dtype=torch.long)
        if classes_per_batch > len(self.classes):
            raise ValueError(
                f"classes_per_batch={classes_per_batch} but only {len(self.classes)} classes are trained "
                f"({self.classes.tolist()[:20]}...): lower --classes_per_batch."
            )
        self.index = {int(c): (labels == c).nonzero().flatten() for c in self.classes}
        empty = [c for c, idx in self.index.items() if len(idx) == 0]
        if empty:
            raise ValueError(f"Classes {empty} have no images in the data set.")
        self.classes_per_batch, self.per_class = classes_per_batch, per_class
        self.seed, self.rank, self.draws = int(seed), int(rank), 0
        small = {c: len(i) for c, i in self.index.items() if len(i) < per_class}
        if small and logger is not None:
            logger.warning(
                f"{len(small)} classes have fewer than {per_class} images (e.g. {dict(list(small.items())[:5])}): "
                "they are drawn with replacement."
            )

    def __call__(self):
        """(classes [G], indices [G, per_class]) for the next step."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_033 + self.draws)
        shared = torch.Generator().manual_seed((self.seed * 1_000_003 - 1) * 1_000_033 + self.draws)
        self.draws += 1
        # Classes: positions [rank·G, (rank+1)·G) of a sequence shared by all processes (disjoint across them).
        G = self.classes_per_batch
        classes = self.classes[tfd_training.shared_draw(len(self.classes), self.rank * G, G, shared)]
        rows = []
        for c in classes.tolist():
            pool = self.index[c]
            if len(pool) >= self.per_class:
                rows.append(pool[torch.randperm(len(pool), generator=g)[: self.per_class]])
            else:
                rows.append(pool[torch.randint(len(pool), (self.per_class,), generator=g)])
        self.last_indices = torch.stack(rows)
        return classes, self.last_indices

    def state_dict(self):
        return {"draws": self.draws, "seed": self.seed}

    def load_state_dict(self, state):
        self.draws = int(state["draws"])


_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")


def _is_edm_dataset(path):
    """An NVlabs EDM/StyleGAN dataset: a .zip or a folder of images with dataset.json labels."""
    return bool(path) and (str(path).endswith(".zip") or os.path.isfile(os.path.join(path, "dataset.json")))


def _edm_dataset_source(path):
    """(labels [N], fetch: a tfd_training.ImageSource) of an EDM dataset zip or folder (dataset_tool.py); messages
    name an image by its file or zip member."""
    if os.path.isdir(path):
        names = [os.path.relpath(os.path.join(r, f), path).replace("\\", "/")
                 for r, _, fs in os.walk(path) for f in fs]
        read = lambda name: open(os.path.join(path, name), "rb").read()  # noqa: E731
    else:
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
        read = zf.read
    if "dataset.json" not in names:
        raise ValueError(f"{path} has no dataset.json: the EDM dataset format needs class labels in it.")
    meta = json.loads(read("dataset.json"))
    if not meta.get("labels"):
        raise ValueError(f"{path}/dataset.json has no labels: class-conditional distillation needs them.")
    table = {fname.replace("\\", "/"): int(label) for fname, label in meta["labels"]}
    images = sorted(n for n in names if n.lower().endswith(_IMAGE_EXTENSIONS))
    unlabelled = [n for n in images if n not in table]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} images of {path} have no label in dataset.json, e.g. {unlabelled[:3]}.")
    labels = torch.tensor([table[n] for n in images], dtype=torch.long)
    name = ((lambda i: os.path.join(path, images[i])) if os.path.isdir(path) else
            (lambda i: f"{images[i]} in {path}"))
    return labels, tfd_training.ImageSource(lambda idx: [read(images[i]) for i in idx], name)


def _hf_dataset_source(ds, image_column, label_column, where):
    """(labels [N], fetch: a tfd_training.ImageSource) of a datasets.Dataset."""
    for kind, col in (("image", image_column), ("label", label_column)):
        if col not in ds.column_names:
            raise ValueError(
                f"{where} has no {kind} column {col!r}; its columns are {ds.column_names}. "
                f"Pass --{kind}_column."
            )
    labels = torch.as_tensor(list(ds[label_column]))
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim != 1:
        raise ValueError(f"Column {label_column!r} of {where} must hold one integer class id per image.")
    return labels.long(), tfd_training.column_images(ds, image_column, where)


def open_labelled_images(dataset_name=None, train_data_dir=None, split="train", image_column="image",
                         label_column="label", dataset_config_name=None, cache_dir=None):
    """(labels [N], fetch(indices) → PIL images, description) of a labelled image data set; fetch is a
    tfd_training.ImageSource (it also reads images undecoded and names them).

    dataset_name: a Hub id or any local path `datasets.load_dataset` takes; a folder written by
    Dataset/DatasetDict.save_to_disk; or an EDM dataset zip/folder. train_data_dir: an imagefolder
    (class sub-folders) or an EDM dataset folder. The split may be sliced ('train[:1000]').
    """
    import datasets

    path = dataset_name or train_data_dir
    if _is_edm_dataset(path):
        labels, fetch = _edm_dataset_source(path)
        part = tfd_training.split_and_slice(split)[1]  # one split: only its slice applies
        if part is not None:
            keep = torch.arange(len(labels))[part]
            labels, whole = labels[keep], fetch
            fetch = tfd_training.ImageSource(lambda idx: whole.read([int(keep[i]) for i in idx]),
                                             lambda i: whole.name(int(keep[i])))
        return labels, fetch, f"EDM dataset {path} ({split})"
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
        name, part = tfd_training.split_and_slice(split)
        try:
            ds = datasets.load_from_disk(path)
        except IndexError:  # what datasets raises for a saved data set without rows (no shards)
            raise ValueError(f"{path} holds no images.") from None
        if isinstance(ds, datasets.DatasetDict):
            if name not in ds:
                raise ValueError(f"{path} has splits {list(ds)}, not {name!r}: pass --dataset_split.")
            ds = ds[name]
        if part is not None:
            ds = ds.select(range(len(ds))[part])
    elif dataset_name:
        ds = datasets.load_dataset(path, dataset_config_name, split=split, cache_dir=cache_dir)
    else:
        ds = datasets.load_dataset("imagefolder", data_dir=path, split=split, cache_dir=cache_dir)
    labels, fetch = _hf_dataset_source(ds, image_column, label_column, path)
    if len(labels) == 0:
        raise ValueError(f"{path} ({split}) holds no images.")
    return labels, fetch, f"{path} ({split})"


class LabelledImages:
    """Labelled images in the teacher's format: `labels` int64 [N], `get(indices)` → uint8 [..., C, H, W].

    Preloaded once into one uint8 tensor when it takes at most preload_max_gb, otherwise decoded
    on the fly (ImageNet-64 is 15.7 GB per process in memory) after one up-front pass that decodes every
    image once (sharded over the accelerator's processes). Either way `bad` ({index: (name, reason)}, the
    same on every process) holds the images that cannot be decoded, for the caller to leave out.
    fetch: indices → PIL images; a tfd_training.ImageSource also reads them undecoded and names them.
    """

    def __init__(self, labels, fetch, channels, resolution, preload_max_gb=8.0, progress=True, accelerator=None,
                 workers=0):
        self.labels, self._fetch = labels, fetch
        self._read, self._name = getattr(fetch, "read", fetch), getattr(fetch, "name", lambda i: f"image {i}")
        self.channels, self.resolution = channels, resolution
        self.data, self.bad = None, {}
        # workers > 0: threads decode chunks of images (PIL releases the GIL while decoding); map keeps the order.
        self.workers, self.pool = workers, None
        if workers > 0:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
        nbytes = len(labels) * channels * resolution * resolution
        if nbytes <= preload_max_gb * 2**30:
            self.data = torch.empty(len(labels), channels, resolution, resolution, dtype=torch.uint8)
            chunk = 1024 if self.pool is None else 64
            chunks = [list(range(start, min(start + chunk, len(labels)))) for start in range(0, len(labels), chunk)]
            decode = lambda idx: self._decode(idx, self.bad)  # noqa: E731
            decoded = map(decode, chunks) if self.pool is None else self.pool.map(decode, chunks)
            for idx, images in tqdm(zip(chunks, decoded), total=len(chunks), desc="preprocessing images",
                                    disable=not progress):
                self.data[idx[0]:idx[0] + len(idx)] = images
        else:
            self.bad = tfd_training.find_bad_images(range(len(labels)), self._read, self._decode_one, self._name,
                                                    accelerator, progress, "checking images")

    def _decode_one(self, value):
        if isinstance(value, Exception):
            raise value
        return to_teacher_image(tfd_training.open_image(value), self.channels, self.resolution)

    def _decode(self, idx, bad=None):
        """uint8 [len(idx), C, H, W]. An image that cannot be decoded raises naming it, or with `bad` (a dict)
        is recorded there and left black."""
        out = torch.zeros(len(idx), self.channels, self.resolution, self.resolution, dtype=torch.uint8)
        for k, (i, value) in enumerate(zip(idx, tfd_training.read_each(self._read, idx))):
            try:
                out[k] = self._decode_one(value)
            except Exception as e:
                if bad is None:
                    raise ValueError(f"{self._name(i)} cannot be decoded ({tfd_training.image_error(e)}): remove or "
                                     "re-encode it.") from e
                bad[i] = (self._name(i), tfd_training.image_error(e))
        return out

    def _decode_all(self, idx):
        """_decode, split over the worker threads (the same images in the same order)."""
        if self.pool is None or len(idx) < 2:
            return self._decode(idx)
        k = math.ceil(len(idx) / min(self.workers, len(idx)))
        return torch.cat(list(self.pool.map(self._decode, [idx[i:i + k] for i in range(0, len(idx), k)])))

    def get(self, indices):
        indices = torch.as_tensor(indices)
        flat = indices.reshape(-1)
        out = self.data[flat] if self.data is not None else self._decode_all(flat.tolist())
        return out.reshape(*indices.shape, *out.shape[1:])


def uint8_to_model(images, device, dtype=torch.float32):
    """uint8 images → [−1, 1] in `dtype` on `device`."""
    return images.to(device, non_blocking=True).to(dtype) / 127.5 - 1


if __name__ == "__main__":
    main(parse_args())
