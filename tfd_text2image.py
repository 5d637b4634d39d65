# What the text-to-image scripts (train_tfd_sdxl.py, train_tfd_sd3.py) share: prompts and real images
# from `datasets` (Hub, local, streaming, webdataset shards), the on-disk positive cache and the
# positives it holds (prompt-matched real images first, then teacher samples), latent encode/decode,
# the student next to its frozen teacher (full copy or LoRA), exporting and loading the trained
# weights, the validation grid. Parametrised by the pipeline class and its denoiser's name
# ("unet" or "transformer"); the method is in tfd_utils.py, the loop plumbing in tfd_training.py.

import contextlib
import copy
import json
import os
import re

import torch

import tfd_training

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16}

# ----------------------------------------------------------------------------------------------
# 1. Prompts and real images.
# ----------------------------------------------------------------------------------------------

WEBDATASET_RECIPE = ("download the images first, e.g. with img2dataset into webdataset shards, then train with "
                     "--dataset_name webdataset --data_files 'shards/{00000..00099}.tar' --image_column jpg "
                     "--caption_column txt")


def normalize_caption(text):
    """Caption matching key: lowercase, whitespace collapsed, trailing periods stripped."""
    return " ".join(str(text).lower().split()).rstrip(" .")


def expand_braces(pattern):
    """'shards/{00000..00002}.tar' → ['shards/00000.tar', 'shards/00001.tar', 'shards/00002.tar']
    (img2dataset's shard ranges; zero padding kept). Several ranges expand as a product."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    return [p for i in range(lo, hi + 1)
            for p in expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])]


def open_dataset(args):
    """The captioned data set: a `save_to_disk` folder, a local data set or Hub id for
    `datasets.load_dataset` (with --data_files, e.g. webdataset shards), streamed with --streaming
    (only the first --max_train_samples rows are downloaded, kept in datasets' cache)."""
    import datasets

    path, (name, part) = args.dataset_name, tfd_training.split_and_slice(args.dataset_split)
    data_files = [f for pattern in args.data_files for f in expand_braces(pattern)] if args.data_files else None
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if name not in ds:
                raise ValueError(f"{path} has no split {name!r}; it has {list(ds)} (--dataset_split).")
            ds = ds[name]
        return ds.select(range(len(ds))[part]) if part is not None else ds
    kw = dict(data_files={name: data_files} if data_files else None, cache_dir=args.cache_dir)
    if not args.streaming:
        return datasets.load_dataset(path, args.dataset_config_name, split=args.dataset_split, **kw)
    stream = datasets.load_dataset(path, args.dataset_config_name, split=name, streaming=True, **kw)
    start = (part.start or 0) if part is not None else 0
    stop = min(x for x in (part.stop if part is not None else None, start + args.max_train_samples) if x is not None)
    rows = stream.skip(start).take(stop - start)
    return datasets.Dataset.from_generator(lambda: (yield from rows), features=stream.features,
                                           cache_dir=args.cache_dir)


def _check_image_column(ds, column, where):
    """A column of image URLs cannot be trained on: say how to get the images."""
    import datasets

    feature = ds.features.get(column)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        first = next((v for v in ds.select(range(min(len(ds), 100)))[column] if v), "")
        if str(first).startswith(("http://", "https://")):
            raise ValueError(f"--image_column {column!r} of {where} holds URLs ({first[:60]}...), not images: "
                             f"{WEBDATASET_RECIPE}.")


def load_prompts(args):
    """(prompts, real rows per prompt, data set or None, description).

    Prompts are the distinct captions (the first spelling of each normalised caption); with
    --image_column, real rows map a normalised caption to the rows whose caption matches it.
    """
    if args.prompts_file:
        with open(args.prompts_file) as f:
            captions = [[line.strip()] for line in f if line.strip()]
        ds, desc, rows, has_image = None, args.prompts_file, range(len(captions)), None
    else:
        ds = open_dataset(args)
        for kind in ("caption", "image"):
            col = getattr(args, f"{kind}_column")
            if col and col not in ds.column_names:
                raise ValueError(f"--{kind}_column {col!r} is not in {args.dataset_name}; its columns are "
                                 f"{ds.column_names}.")
        rows = range(len(ds))
        if args.max_train_samples is not None and args.max_train_samples < len(ds):
            perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))
            rows = sorted(perm[: args.max_train_samples].tolist())
        column = ds.select_columns([args.caption_column])[args.caption_column]
        captions = [c if isinstance(c, (list, tuple)) else [c] for c in (column[i] for i in rows)]
        has_image = None
        if args.image_column:  # rows without an image give prompts only; read from arrow, nothing decoded
            import pyarrow.compute as pc

            _check_image_column(ds, args.image_column, args.dataset_name)
            table = ds.select_columns([args.image_column]).with_format("arrow")[:]
            has_image = pc.is_valid(table[args.image_column]).to_pylist()
        desc = f"{args.dataset_name} ({args.dataset_split}, {len(rows)} rows)"
    prompts, real = [], {}
    for row, caps in zip(rows, captions):
        for cap in caps:
            if not isinstance(cap, str) or not cap.strip():
                continue
            key = normalize_caption(cap)
            if key not in real:
                real[key] = []
                prompts.append(cap.strip())
            if has_image is not None and has_image[row] and row not in real[key]:
                real[key].append(row)
    if not prompts:
        raise ValueError(f"No prompts: {desc} has no non-empty captions" +
                         ("" if args.prompts_file else f" in column {args.caption_column!r}") + ".")
    return prompts, real, ds, desc


# ----------------------------------------------------------------------------------------------
# 2. The positive cache: per prompt, its positives' latents and its text embeddings.
# ----------------------------------------------------------------------------------------------


def _stable_hash(*parts):
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def positive_seed(prompt, slot, base_seed=0):
    """Seed of the teacher sample in (prompt, slot): the same on every machine and every rerun."""
    return int(_stable_hash("positive-seed", prompt, int(slot), int(base_seed))[:15], 16)


class CacheEntryError(Exception):
    """A cache file that exists but cannot be trusted (truncated, corrupted, other settings)."""


class PositiveCache:
    """On-disk cache of per-prompt positives and text embeddings.

    Layout: <root>/<settings key>/settings.json and entries/<ab>/<key>.safetensors. The settings key
    hashes everything the content depends on (teacher and revision, resolution, sampling steps,
    guidance, scheduler, ...): a cache made with other settings lives under another key and is never
    reused. An entry's key hashes (settings key, prompt, slot plan). Entries are written atomically
    and carry a SHA-256 of their tensors; one that fails to load or verify raises CacheEntryError.
    """

    def __init__(self, root, settings):
        self.settings = dict(settings)
        self.key = _stable_hash("tfd-positive-cache-v1", self.settings)[:16]
        self.dir = os.path.join(root, self.key)
        os.makedirs(os.path.join(self.dir, "entries"), exist_ok=True)
        self.other_settings = sorted(
            d for d in os.listdir(root) if d != self.key and os.path.isfile(os.path.join(root, d, "settings.json")))
        settings_path = os.path.join(self.dir, "settings.json")
        if not os.path.exists(settings_path):
            tfd_training.write_json(settings_path, self.settings)

    def path(self, prompt, slots):
        """slots: one source tag per positive slot, e.g. ["real:17", "teacher", ...]."""
        key = _stable_hash(self.key, prompt, list(slots))[:32]
        return os.path.join(self.dir, "entries", key[:2], key + ".safetensors")

    def exists(self, prompt, slots):
        return os.path.exists(self.path(prompt, slots))

    def save(self, prompt, slots, tensors, before_commit=None):
        """Write an entry atomically; before_commit(prompt) runs once its temporary file is written."""
        from safetensors.torch import save_file

        path = self.path(prompt, slots)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"prompt": prompt, "slots": json.dumps(list(slots)), "sha256": tfd_training.tensor_digest(tensors),
                "settings_key": self.key}

        def write(tmp):
            save_file(tensors, tmp, metadata=meta)
            if before_commit is not None:
                before_commit(prompt)

        tfd_training.atomic_write(path, write)
        return path

    def load(self, prompt, slots):
        """The entry's tensors, or None if absent; CacheEntryError if it is unreadable or wrong."""
        from safetensors import safe_open

        path = self.path(prompt, slots)
        if not os.path.exists(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for truncated/garbled files
            raise CacheEntryError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
        if meta.get("sha256") != tfd_training.tensor_digest(tensors):
            raise CacheEntryError(f"{path}: checksum mismatch (corrupted)")
        if meta.get("prompt") != prompt or json.loads(meta.get("slots", "null")) != list(slots):
            raise CacheEntryError(f"{path}: holds another prompt or slot plan")
        return tensors

    def discard(self, prompt, slots):
        path = self.path(prompt, slots)
        if os.path.exists(path):
            os.remove(path)


# ----------------------------------------------------------------------------------------------
# 3. Positives: prompt-matched real images first, then teacher samples; through the cache.
# ----------------------------------------------------------------------------------------------


class Positives:
    """Per-prompt entries {"positives" [P, C, h, w], "prompt_embeds", "pooled_prompt_embeds"} from the
    cache, made on a miss: real latents of the prompt's matching images, then teacher samples
    (`--num_positive_steps`, `--positive_guidance_scale`, the teacher's own scheduler, seeded per
    (prompt, slot)), stored in --cache_dtype.

    teacher_pipe: the teacher pipeline (its encode_prompt and __call__ are used); teacher_context():
    entered around teacher sampling (LoRA: adapters off); offload_modules: text encoders and VAE,
    parked on the CPU while the cache holds everything (moved back for a miss).
    """

    def __init__(self, args, cache, real_rows, dataset, teacher_pipe, device, teacher_context=None,
                 offload_modules=(), before_commit=None, logger=None):
        self.args, self.cache, self.real_rows, self.dataset = args, cache, real_rows, dataset
        self.pipe, self.device, self.logger = teacher_pipe, device, logger
        self.teacher_context = teacher_context or contextlib.nullcontext
        self.offload_modules, self.offloaded = list(offload_modules), False
        self.before_commit = before_commit
        self.stats = {"hits": 0, "generated": 0, "regenerated": 0}
        self._window = dict(self.stats)

    def slots(self, prompt):
        rows = self.real_rows.get(normalize_caption(prompt), [])[: self.args.num_positives]
        return [f"real:{r}" for r in rows] + ["teacher"] * (self.args.num_positives - len(rows))

    def missing(self, prompts):
        return [p for p in prompts if not self.cache.exists(p, self.slots(p))]

    def get(self, prompt):
        slots = self.slots(prompt)
        try:
            entry = self.cache.load(prompt, slots)
        except CacheEntryError as e:
            self.logger.warning(f"Positive cache: {e}; regenerating it.", main_process_only=False)
            self.cache.discard(prompt, slots)
            entry, self.stats["regenerated"] = None, self.stats["regenerated"] + 1
        if entry is not None:
            self.stats["hits"] += 1
            return entry
        entry = self.make(prompt, slots)
        self.cache.save(prompt, slots, entry, self.before_commit)
        self.stats["generated"] += 1
        return entry

    def window(self):
        """Cache hits and misses (generated on the fly inside training steps) since the last call."""
        out = {f"cache/{'misses' if k == 'generated' else k}": v - self._window[k] for k, v in self.stats.items()}
        self._window = dict(self.stats)
        return out

    def offload(self):
        """Park the text encoders and VAE on the CPU (a later miss brings them back for its entry)."""
        for m in self.offload_modules:
            m.to("cpu")
        self.offloaded = True

    @torch.no_grad()
    def make(self, prompt, slots):
        """Text embeddings and positives of one prompt."""
        args = self.args
        for m in self.offload_modules:
            m.to(self.device)
        pe, pooled = encode_prompts(self.pipe, [prompt], self.device)
        latents = [None] * len(slots)
        for i, tag in enumerate(slots):
            if tag.startswith("real:"):
                try:
                    image = self.dataset[int(tag[5:])][args.image_column]
                    latents[i] = encode_image(self.pipe.vae, image, args.resolution, self.device)
                except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for truncated/garbled files
                    raise ValueError(f"Row {tag[5:]} of {args.dataset_name}: its {args.image_column!r} image cannot be "
                                     f"decoded ({type(e).__name__}: {e}); remove or re-encode it.") from e
        teacher_slots = [i for i, tag in enumerate(slots) if tag == "teacher"]
        if teacher_slots:
            gens = [torch.Generator().manual_seed(positive_seed(prompt, i, args.positive_seed)) for i in teacher_slots]
            with self.teacher_context():
                out = self.pipe(prompt, height=args.resolution, width=args.resolution,
                                num_inference_steps=args.num_positive_steps, guidance_scale=args.positive_guidance_scale,
                                num_images_per_prompt=len(gens), generator=gens, output_type="latent").images
            for i, lat in zip(teacher_slots, out):
                latents[i] = lat.float()
        if self.offloaded:
            for m in self.offload_modules:
                m.to("cpu")
        cdt = DTYPES[args.cache_dtype]
        return {"positives": torch.stack(latents).to(cdt), "prompt_embeds": pe[0].to(cdt),
                "pooled_prompt_embeds": pooled[0].to(cdt)}

    def prepare(self, accelerator, prompts):
        """--prepare_positives_only: fill the cache for every prompt, sharded over the processes."""
        from tqdm.auto import tqdm

        mine = prompts[accelerator.process_index:: accelerator.num_processes]
        for prompt in tqdm(mine, desc=f"positives (process {accelerator.process_index})", unit="prompt"):
            self.get(prompt)
        accelerator.wait_for_everyone()
        s = self.stats
        self.logger.info(f"Positive cache ready: {self.cache.dir}; this process: {s['hits']} reused, {s['generated']} "
                         f"generated ({s['regenerated']} of them replaced unreadable entries).", main_process_only=False)
        return dict(s)


def encode_prompts(pipe, prompts, device):
    """(prompt_embeds, pooled_prompt_embeds) of prompts as the pipeline conditions its denoiser (no CFG)."""
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return pe, pooled


def open_positive_cache(args, teacher_scheduler, logger, **settings):
    """The positive cache under --positive_cache_dir for these settings, its stale temporary files removed."""
    cache = PositiveCache(args.positive_cache_dir, {
        "teacher": args.pretrained_model_name_or_path, "revision": args.revision, "variant": args.variant,
        "vae": args.pretrained_vae_model_name_or_path, "teacher_dtype": args.teacher_dtype,
        "resolution": args.resolution, "num_positive_steps": args.num_positive_steps,
        "positive_guidance_scale": args.positive_guidance_scale, "positive_seed": args.positive_seed,
        "scheduler": {k: v for k, v in teacher_scheduler.config.items() if not k.startswith("_")},
        "real_images": [args.dataset_name, args.dataset_config_name, args.dataset_split, args.data_files,
                        args.image_column] if args.image_column else None, "cache_dtype": args.cache_dtype,
        **settings})
    logger.info(f"Positive cache: {cache.dir}" + (f" ({len(cache.other_settings)} caches made with other settings in "
                                                   f"{args.positive_cache_dir} are not used)" if cache.other_settings else ""))
    removed = tfd_training.remove_stale_tmp_files(cache.dir)
    if removed:
        logger.info(f"Positive cache: removed {removed} temporary files of killed writers.")
    return cache


def warn_about_misses(positives, prompts, logger):
    """Report the cache's coverage of the prompt set before training: each miss is sampled by the
    teacher inside a training step while the other processes wait."""
    missing = len(positives.missing(prompts))
    if missing:
        a = positives.args
        logger.warning(f"Positive cache covers {len(prompts) - missing} of {len(prompts)} prompts "
                       f"({100 * (1 - missing / len(prompts)):.1f}%). Each miss is sampled by the teacher inside a "
                       f"training step ({a.num_positive_steps} steps x CFG x up to {a.num_positives} images) while "
                       "the other processes wait: run this command with --prepare_positives_only first.")
    return missing


# ----------------------------------------------------------------------------------------------
# 4. Latents.
# ----------------------------------------------------------------------------------------------


def latent_scale(vae):
    """(scaling_factor, shift_factor) of the VAE's latents: denoiser latents = (z − shift)·scale."""
    return vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0


def encode_image(vae, image, resolution, device):
    """A real positive: RGB, shorter side resized to the resolution (Lanczos), center-cropped, encoded
    to the posterior MEAN (a positive is a fixed point), then shifted and scaled like the pipeline's."""
    import numpy as np
    from PIL import Image

    if isinstance(image, str):
        image = Image.open(image)
    image = tfd_training.eight_bit(image).convert("RGB")  # any mode (L, RGBA, P, CMYK, 16-bit) → RGB
    scale = resolution / min(image.size)
    w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((w, h), Image.LANCZOS)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(device)
    mean = vae.encode(x.to(vae.dtype)).latent_dist.mean.float()
    factor, shift = latent_scale(vae)
    return ((mean - shift) * factor)[0]


@torch.no_grad()
def decode_latents(vae, latents):
    """Denoiser latents → images in [−1, 1], decoded in the VAE's dtype."""
    factor, shift = latent_scale(vae)
    z = latents.to(vae.device, torch.float32) / factor + shift
    return vae.decode(z.to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# 5. The student next to its frozen teacher; exporting and loading the trained weights.
# ----------------------------------------------------------------------------------------------


def student_and_teacher(model, train_mode, device, teacher_dtype, lora_rank=64, lora_alpha=64,
                        lora_target_modules=("to_k", "to_q", "to_v", "to_out.0")):
    """(student, teacher) from the teacher's denoiser (UNet or transformer), as loaded.

    full: a float32 copy is taken BEFORE the teacher is cast to teacher_dtype, so the student starts
    from the checkpoint's exact weights. lora: float32 LoRA adapters on the denoiser itself, which is
    then also the teacher with its adapters disabled (`teacher_mode`): no second copy.
    """
    model.requires_grad_(False).to(device)
    if train_mode == "full":
        student = copy.deepcopy(model).to(torch.float32).requires_grad_(True)
        return student, model.to(teacher_dtype)
    from peft import LoraConfig

    model.to(teacher_dtype)
    model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                 target_modules=list(lora_target_modules)))
    for prm in model.parameters():
        if prm.requires_grad:
            prm.data = prm.data.float()
    return model, model


@contextlib.contextmanager
def teacher_mode(model):
    """Run a LoRA student's denoiser as its frozen teacher: adapters disabled, its own gradient
    checkpointing off (a block recomputed in backward would run after the adapters are back on and
    differentiate the student). A model without adapters only has checkpointing off for the block."""
    has_adapters = bool(getattr(model, "peft_config", None))
    checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
    if has_adapters:
        model.disable_adapters()
    if checkpointing:
        model.disable_gradient_checkpointing()
    try:
        yield model
    finally:
        if has_adapters:
            model.enable_adapters()
        if checkpointing:
            model.enable_gradient_checkpointing()


def export_trainable(model, output_dir, lora, pipeline_cls, component):
    """The trained weights: `<component>/` (full) or pytorch_lora_weights.safetensors (LoRA, with its
    adapter config), loadable with `pipe.load_lora_weights`."""
    if not lora:
        model.save_pretrained(os.path.join(output_dir, component))
        return
    from peft.utils import get_peft_model_state_dict

    pipeline_cls.save_lora_weights(output_dir, **{
        f"{component}_lora_layers": get_peft_model_state_dict(model),
        f"{component}_lora_adapter_metadata": model.peft_config["default"].to_dict()})


def import_trainable(model, input_dir, lora, pipeline_cls, component):
    """Load what export_trainable wrote into `model` (a checkpoint's student)."""
    if not lora:
        loaded = type(model).from_pretrained(input_dir, subfolder=component)
        model.load_state_dict(loaded.state_dict())
        return
    from peft.utils import set_peft_model_state_dict

    state, _ = pipeline_cls.lora_state_dict(input_dir)
    prefix = component + "."
    result = set_peft_model_state_dict(model, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                       adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"LoRA checkpoint {input_dir} does not fit this {component}: {result.unexpected_keys[:5]}")


def register_checkpoint_hooks(accelerator, lora, pipeline_cls, component):
    """Checkpoints hold the trainable weights as export_trainable writes them (FSDP/DeepSpeed save
    their own sharded state next to it)."""
    def save_model_hook(models, weights, output_dir):
        for model in models:
            full = tfd_training.consolidated_model(accelerator, model)  # every process: FSDP gathers the shards
            if accelerator.is_main_process:
                export_trainable(full, output_dir, lora, pipeline_cls, component)
            if weights:
                weights.pop()

    def load_model_hook(models, input_dir):
        if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
            return  # accelerate loads the engine's own state
        for _ in range(len(models)):
            import_trainable(accelerator.unwrap_model(models.pop()), input_dir, lora, pipeline_cls, component)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


# ----------------------------------------------------------------------------------------------
# 6. Validation grids and the model card.
# ----------------------------------------------------------------------------------------------


def save_grid(accelerator, grid, output_dir, step):
    """validation/step-N.png and the trackers."""
    os.makedirs(os.path.join(output_dir, "validation"), exist_ok=True)
    tfd_training.save_png(os.path.join(output_dir, "validation", f"step-{step}.png"), grid)
    tfd_training.log_image(accelerator, grid, step)


def card_settings(args, num_prompts, data_desc):
    """The settings a text-to-image model card shows (no local paths, no secrets)."""
    source = args.dataset_name if args.dataset_name and not os.path.exists(args.dataset_name) else "a local data set"
    if args.prompts_file:
        source = "a prompt file"
    return {"prompts": f"{num_prompts} from {source}", "training mode": args.train_mode +
            (f" (rank {args.lora_rank})" if args.train_mode == "lora" else ""), "resolution": args.resolution,
            "updates": args.max_train_steps, "prompts × (generated, positives) per process":
            f"{args.prompts_per_batch} × ({args.num_generated}, {args.num_positives})",
            "teacher layers": " ".join(args.feature_layers), "feature noise σ":
            f"[{args.feature_noise_min}, {args.feature_noise_max}]", "radii": args.drift_radii,
            "learning rate": args.learning_rate, "positives": f"real images where captions match, else teacher "
            f"samples ({args.num_positive_steps} steps, CFG {args.positive_guidance_scale})"}
