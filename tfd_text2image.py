# What the text-to-image scripts (train_tfd_sdxl.py, train_tfd_sd3.py) share: prompts and real images
# from `datasets` (Hub, local, streaming, webdataset shards), the on-disk positive cache and the
# positives it holds (prompt-matched real images first, then teacher samples), latent encode/decode,
# the student next to its frozen teacher (full copy or LoRA), exporting and loading the trained
# weights, the validation grid. Parametrised by the pipeline class and its denoiser's name
# ("unet" or "transformer"); the method is in tfd_utils.py, the loop plumbing in tfd_training.py.

import contextlib
import json
import os
import re

import torch

import tfd_training
import tfd_utils

# ----------------------------------------------------------------------------------------------
# 0. The flags both text-to-image scripts have: prompts and real images, positives and their cache, the
#    batch and the student (the teacher's, the objective's and the training flags are the scripts' own).
# ----------------------------------------------------------------------------------------------


def add_arguments(parser, denoiser, positive_steps, positive_guidance, lora_targets, lora_targets_help,
                  positive_defaults_help=""):
    """The shared flags; positive_steps and positive_guidance: the teacher's default sampling settings (None:
    the script resolves them per checkpoint, as positive_defaults_help says)."""
    g = parser.add_argument_group(
        "prompts and real images", "Real images are decoded one cache entry at a time, next to the VAE encoding and "
        "the teacher's sampling of the entry's other positives, which take far longer: there is no "
        "--dataloader_num_workers here (the ImageNet script's decodes every training image).")
    g.add_argument("--dataset_name", default=None,
                   help="Captioned data set: a Hub id, a local path datasets.load_dataset takes (an imagefolder with "
                        "a metadata.jsonl of captions: what --train_data_dir is elsewhere), a save_to_disk folder, or "
                        "'webdataset' with --data_files.")
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
    g.add_argument("--prompts_file", default=None,
                   help="A text file of prompts, one per line (instead of a data set).")
    tfd_training.add_bad_images_argument(g)

    g = parser.add_argument_group("positives and their cache")
    g.add_argument("--positive_cache_dir", default=None,
                   help="On-disk cache of positives and text embeddings (default: OUTPUT_DIR/positive_cache). Share "
                        "it between runs: entries are keyed by every setting they depend on.")
    g.add_argument("--prepare_positives_only", action="store_true",
                   help="Fill the cache for the whole prompt set (sharded over all processes, resumable) and exit. "
                        "Run this first: a prompt missing from the cache is sampled inside a training step.")
    g.add_argument("--num_positive_steps", type=int, default=positive_steps,
                   help="Teacher sampling steps of a positive." + positive_defaults_help)
    g.add_argument("--positive_guidance_scale", type=float, default=positive_guidance,
                   help="CFG scale of teacher positives." + positive_defaults_help)
    g.add_argument("--positive_seed", type=int, default=0,
                   help="Base seed of teacher positives (each (prompt, slot) derives its own from it).")
    g.add_argument("--cache_dtype", default="float16", choices=("float16", "float32"),
                   help="Storage dtype of cached latents and text embeddings.")

    g = parser.add_argument_group(
        "batch and student", "No --use_ema here (the ImageNet script has it): an EMA of a full student is a second "
        "float32 copy of the denoiser next to the student, its teacher and AdamW's two moments (SDXL's UNet: 10 GB "
        "more), and a one-step student is exported from its last weights.")
    g.add_argument("--resolution", type=int, default=1024, help="Image resolution (pixels) of students and positives.")
    g.add_argument("--prompts_per_batch", type=int, default=1, help="Prompts (groups) per step per process.")
    g.add_argument("--num_generated", type=int, default=4, help="Student samples per prompt (N, at least 2).")
    g.add_argument("--num_positives", type=int, default=4,
                   help="Positives per prompt (P): matching real images first, then teacher samples. They are also "
                        "the anchors of the anchor-margin loss.")
    g.add_argument("--train_mode", default="full", choices=("full", "lora"),
                   help=f"full: train a copy of the teacher {denoiser}; lora: train LoRA adapters on it (the teacher "
                        f"is the same {denoiser} with adapters disabled: no second copy).")
    g.add_argument("--lora_rank", type=int, default=64, help="LoRA rank.")
    g.add_argument("--lora_alpha", type=float, default=64, help="LoRA alpha (scale = alpha / rank).")
    g.add_argument("--lora_target_modules", default=lora_targets, help=lora_targets_help)
    return g


# Valid ranges of the shared flags, checked at parse time (tfd_training.check_ranges).
RANGES = {"num_generated": tfd_training.NUM_GENERATED, "num_positives": ">= 1", "prompts_per_batch": ">= 1",
          "num_positive_steps": ">= 1", "positive_guidance_scale": ">= 0", "positive_seed": ">= 0",
          "resolution": "> 0", "lora_rank": ">= 1", "lora_alpha": "> 0", "max_train_samples": ">= 1",
          "max_bad_images": ">= 0"}


def check_args(args, ranges):
    """Bad settings fail here, before any model or data is loaded (ranges: the script's own)."""
    check_data_args(args)
    tfd_training.check_common_args(args, {**RANGES, **ranges})
    args.lora_target_modules = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    if args.positive_cache_dir is None:
        args.positive_cache_dir = os.path.join(args.output_dir, "positive_cache")


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


def check_data_args(args):
    """The prompt-source flags, before anything loads: one source, images only with a data set, a split
    name with an optional slice (counted from the start when streaming), --streaming with a row budget."""
    if bool(args.dataset_name) == bool(args.prompts_file):
        raise ValueError("Give exactly one prompt source: --dataset_name (captions) or --prompts_file.")
    if args.prompts_file and args.image_column:
        raise ValueError("--image_column needs --dataset_name: a --prompts_file has no images.")
    if args.prompts_file and not os.path.isfile(args.prompts_file):
        raise FileNotFoundError(f"--prompts_file {args.prompts_file} does not exist.")
    part = tfd_training.split_and_slice(args.dataset_split)[1]
    if args.streaming:
        if args.max_train_samples is None:
            raise ValueError("--streaming reads the first --max_train_samples rows: give --max_train_samples.")
        if part is not None and any(x is not None and x < 0 for x in (part.start, part.stop)):
            raise ValueError(f"--dataset_split {args.dataset_split!r}: with --streaming a slice counts from the "
                             "start (e.g. 'train[1000:]'); a stream has no end to count back from.")


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
    image_feature = isinstance(stream.features and stream.features.get(args.image_column), datasets.Image)
    if image_feature:  # copied undecoded: a bad image is found (and named) with the others, not here
        stream = stream.cast_column(args.image_column, datasets.Image(decode=False))
    start = (part.start or 0) if part is not None else 0
    stop = min(x for x in (part.stop if part is not None else None, start + args.max_train_samples) if x is not None)
    rows = stream.skip(start).take(stop - start)
    ds = datasets.Dataset.from_generator(lambda: (yield from rows), features=stream.features, cache_dir=args.cache_dir)
    return ds.cast_column(args.image_column, datasets.Image()) if image_feature else ds


def _check_image_column(ds, column, where):
    """A column of image URLs cannot be trained on: say how to get the images."""
    import datasets

    feature = ds.features.get(column)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        first = next((v for v in ds.select(range(min(len(ds), 100)))[column] if v), "")
        if str(first).startswith(("http://", "https://")):
            raise ValueError(f"--image_column {column!r} of {where} holds URLs ({first[:60]}...), not images: "
                             f"{WEBDATASET_RECIPE}.")


def load_prompts(args, logger=None):
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
    if logger is not None:
        logger.info(f"Prompts: {len(prompts)} from {desc}" + (f"; {sum(bool(v) for v in real.values())} have matching "
                                                              "real images." if args.image_column else "."))
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
        self.new = not os.listdir(os.path.join(self.dir, "entries"))  # no entry yet (one per <ab> sub-folder)
        settings_path = os.path.join(self.dir, "settings.json")
        if not os.path.exists(settings_path):
            tfd_training.write_json(settings_path, self.settings)

    def differences(self):
        """[(other cache folder, {setting: (its value, this cache's)})] of the other settings' caches under the root,
        fewest differences first (nested settings as dotted names, e.g. scheduler.beta_end)."""
        def flat(d, prefix=""):
            return {k2: v2 for k, v in d.items()
                    for k2, v2 in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}).items()}

        ours, out = flat(json.loads(json.dumps(self.settings, default=str))), []
        for key in self.other_settings:
            folder = os.path.join(os.path.dirname(self.dir), key)
            try:
                with open(os.path.join(folder, "settings.json")) as f:
                    theirs = flat(json.load(f))
            except (OSError, ValueError):
                continue
            out.append((folder, {k: (theirs.get(k), ours.get(k)) for k in sorted(set(ours) | set(theirs))
                                 if theirs.get(k) != ours.get(k)}))
        return sorted(out, key=lambda item: len(item[1]))

    def path(self, prompt, slots):
        """slots: one source tag per positive slot, e.g. ["real:17", "teacher", ...]."""
        key = _stable_hash(self.key, prompt, list(slots))[:32]
        return os.path.join(self.dir, "entries", key[:2], key + ".safetensors")

    def exists(self, prompt, slots):
        return os.path.exists(self.path(prompt, slots))

    def save(self, prompt, slots, tensors):
        """Write an entry atomically (a temporary file, then a rename)."""
        from safetensors.torch import save_file

        path = self.path(prompt, slots)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"prompt": prompt, "slots": json.dumps(list(slots)), "sha256": tfd_training.tensor_digest(tensors),
                "settings_key": self.key}

        tfd_training.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
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
    entered around teacher sampling (LoRA: adapters off); offload_modules: text encoders and VAE, which
    live on the CPU and come to the device for a miss's entry only (for every entry after
    `keep_on_device`: --prepare_positives_only). Real images that cannot be decoded (found by
    check_real_images) are left out of the slot plans.
    """

    def __init__(self, args, cache, real_rows, dataset, teacher_pipe, device, teacher_context=None,
                 offload_modules=(), logger=None):
        self.args, self.cache, self.real_rows, self.dataset = args, cache, real_rows, dataset
        self.pipe, self.device, self.logger = teacher_pipe, device, logger
        self.teacher_context = teacher_context or contextlib.nullcontext
        self.offload_modules, self.resident = list(offload_modules), False
        self.stats = {"hits": 0, "generated": 0, "regenerated": 0}
        self._window = dict(self.stats)
        self.bad = {}  # row → (name, reason) of real images that cannot be decoded
        self.images = (tfd_training.column_images(dataset, args.image_column, args.dataset_name)
                       if dataset is not None and args.image_column else None)

    def slots(self, prompt):
        """The slot plan: the first --num_positives matching real images that decode, then teacher samples."""
        import itertools

        rows = self.real_rows.get(normalize_caption(prompt), [])
        rows = list(itertools.islice((r for r in rows if r not in self.bad), self.args.num_positives))
        return [f"real:{r}" for r in rows] + ["teacher"] * (self.args.num_positives - len(rows))

    def check_real_images(self, accelerator, prompts, progress=True):
        """Before any teacher sampling and the first update: decode the real images in the slot plans of the
        prompts missing from the cache. A bad one is named in a warning and leaves the plan (the next matching
        image, else a teacher sample, takes its slot); more than --max_bad_images stop the run. The decoding
        is sharded over the processes and the bad rows gathered, so every process ends with the same plans
        (and cache keys); a resumed run finds the same bad images again (their prompts' first plans are missing)."""
        from accelerate.utils import broadcast_object_list

        if self.images is None:
            return
        checked = set()
        while True:  # a bad image's replacement needs checking too: rounds until no new bad image is found
            todo = [None]
            if accelerator.is_main_process:  # one list for all: every process runs the same rounds
                with_real = [p for p in prompts if self.real_rows.get(normalize_caption(p))]
                rows = {int(t[5:]) for p in self.missing(with_real) for t in self.slots(p) if t.startswith("real:")}
                todo = [sorted(rows - checked)]
            todo = broadcast_object_list(todo)[0]
            if not todo:
                break
            bad = tfd_training.find_bad_images(
                todo, self.images.read, lambda v: tfd_training.decode_image(tfd_training.open_image(v), "RGB"),
                self.images.name, accelerator, progress and accelerator.is_local_main_process, "real images")
            self.bad.update(bad)
            checked.update(todo)
            if not bad:
                break
        if checked:
            tfd_training.check_bad_images(self.bad, self.args.max_bad_images, len(checked),
                                          f"{self.args.dataset_name} (prompts missing from the positive cache)",
                                          self.logger)

    def counts(self, prompts):
        """{"real": R, "teacher": T}: the positives of the prompt set by source (their slot plans)."""
        slots = [tag for p in prompts for tag in self.slots(p)]
        return {"real": sum(tag.startswith("real:") for tag in slots), "teacher": slots.count("teacher")}

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
        self.cache.save(prompt, slots, entry)
        self.stats["generated"] += 1
        return entry

    def window(self, accelerator=None):
        """Cache hits and misses (entries made inside training steps) since the last call, summed over all
        processes when given the accelerator (then call it on every process)."""
        keys = list(self.stats)
        counts = torch.tensor([float(self.stats[k] - self._window[k]) for k in keys])
        if accelerator is not None and accelerator.num_processes > 1:
            counts = accelerator.reduce(counts.to(accelerator.device), "sum").cpu()
        self._window = dict(self.stats)
        return {**{f"cache/{'misses' if k == 'generated' else k}": v for k, v in zip(keys, counts.tolist())},
                "cache/bad_images": float(len(self.bad))}  # the same on every process: found before training

    def keep_on_device(self):
        """Text encoders and VAE on the device from now on (--prepare_positives_only: every entry uses them), not
        brought there and back for each entry."""
        for m in self.offload_modules:
            tfd_training.cast(m, self.device)
        self.resident = True

    def make(self, prompt, slots):
        """Text embeddings and positives of one prompt; the text encoders and VAE on the device meanwhile."""
        with torch.no_grad(), contextlib.nullcontext() if self.resident else on_device(self.offload_modules,
                                                                                       self.device):
            return self._make(prompt, slots)

    def _make(self, prompt, slots):
        args = self.args
        pe, pooled = encode_prompts(self.pipe, [prompt], self.device)
        latents = [None] * len(slots)
        for i, tag in enumerate(slots):
            if tag.startswith("real:"):
                row = int(tag[5:])
                try:  # checked before training (check_real_images): this fails only for a file changed since
                    image = tfd_training.decode_image(tfd_training.open_image(self.images.read([row])[0]), "RGB")
                except Exception as e:
                    raise ValueError(f"{self.images.name(row)} cannot be decoded ({tfd_training.image_error(e)}): "
                                     "remove or re-encode it.") from e
                latents[i] = encode_image(self.pipe.vae, image, args.resolution, self.device)
        teacher_slots = [i for i, tag in enumerate(slots) if tag == "teacher"]
        if teacher_slots:
            gens = [torch.Generator().manual_seed(positive_seed(prompt, i, args.positive_seed)) for i in teacher_slots]
            with self.teacher_context():
                out = self.pipe(prompt, height=args.resolution, width=args.resolution,
                                num_inference_steps=args.num_positive_steps,
                                guidance_scale=args.positive_guidance_scale, num_images_per_prompt=len(gens),
                                generator=gens, output_type="latent").images
            for i, lat in zip(teacher_slots, out):
                latents[i] = lat.float()
        cdt = getattr(torch, args.cache_dtype)
        return {"positives": torch.stack(latents).to(cdt), "prompt_embeds": pe[0].to(cdt),
                "pooled_prompt_embeds": pooled[0].to(cdt)}

    def prepare(self, accelerator, prompts):
        """--prepare_positives_only: fill the cache for every prompt, sharded over the processes; ends the run."""
        from tqdm.auto import tqdm

        mine = prompts[accelerator.process_index:: accelerator.num_processes]
        for prompt in tqdm(mine, desc=f"positives (process {accelerator.process_index})", unit="prompt"):
            self.get(prompt)
        accelerator.wait_for_everyone()
        s = self.stats
        self.logger.info(f"Positive cache ready: {self.cache.dir}; this process: {s['hits']} reused, "
                         f"{s['generated']} generated ({s['regenerated']} of them replaced unreadable entries); "
                         f"{len(self.bad)} bad real images skipped.", main_process_only=False)
        accelerator.end_training()
        return dict(s)


@contextlib.contextmanager
def on_device(modules, device):
    """The modules on `device` inside the block, then back where they were: the text encoders and VAE live on the
    CPU and come to the device only to encode prompts or real images, sample positives or decode a grid."""
    modules = [m for m in modules if m is not None]
    homes = [next(m.parameters()).device for m in modules]
    for m in modules:
        tfd_training.cast(m, device)
    try:
        yield
    finally:
        for m, home in zip(modules, homes):
            tfd_training.cast(m, home)


def text_encoders(pipe):
    return [m for k, m in pipe.components.items() if k.startswith("text_encoder") and m is not None]


def encode_prompts(pipe, prompts, device):
    """(prompt_embeds, pooled_prompt_embeds) of prompts as the pipeline conditions its denoiser (no CFG)."""
    import inspect

    others = {"prompt_2": None, "prompt_3": None}  # SD3: the same prompt for every encoder
    others = {k: v for k, v in others.items() if k in inspect.signature(pipe.encode_prompt).parameters}
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(list(prompts), **others, device=device, num_images_per_prompt=1,
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
    others = (f" ({len(cache.other_settings)} caches made with other settings in {args.positive_cache_dir} are not "
              "used)" if cache.other_settings else "")
    logger.info(f"Positive cache: {cache.dir}{others}")
    if cache.new:  # a new cache: its teacher sampling starts from scratch; say why the others do not fit
        for folder, diff in cache.differences()[:3]:
            logger.warning(f"Positive cache: new for these settings; {folder} was made with other " +
                           "; ".join(f"{k}: {theirs!r} there, {ours!r} here" for k, (theirs, ours) in diff.items()) +
                           ". Its entries are not reused.")
    removed = tfd_training.remove_stale_tmp_files(cache.dir)
    if removed:
        logger.info(f"Positive cache: removed {removed} temporary files of killed writers.")
    return cache


def open_positives(args, pipe, real_rows, dataset, device, teacher_context, logger, **settings):
    """Positives through the cache under --positive_cache_dir (settings: what else the entries depend on)."""
    cache = open_positive_cache(args, pipe.scheduler, logger, **settings)
    modules = [m for k, m in pipe.components.items() if m is not None and (k.startswith("text_encoder") or k == "vae")]
    return Positives(args, cache, real_rows, dataset, pipe, device, teacher_context, modules, logger=logger)


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
    """(scale, shift) of the VAE's latents: denoiser latents = (z − shift)·scale. scaling_factor and
    shift_factor (SD3), or, for a VAE whose config has latents_mean and latents_std (Playground v2.5 style),
    per channel [C, 1, 1]: shift = mean, scale = scaling_factor/std, as StableDiffusionXLPipeline decodes."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (mean, std))
        return config.scaling_factor / std, mean
    return config.scaling_factor, getattr(config, "shift_factor", None) or 0.0


def to_latents(vae, z):
    """VAE latents z [..., C, h, w] → denoiser latents (z − shift)·scale (`latent_scale`), float32."""
    scale, shift = (torch.as_tensor(v, device=z.device) for v in latent_scale(vae))
    return (z.float() - shift) * scale


def from_latents(vae, latents):
    """Denoiser latents → VAE latents latents/scale + shift, float32 (the inverse of `to_latents`)."""
    scale, shift = (torch.as_tensor(v, device=latents.device) for v in latent_scale(vae))
    return latents.float() / scale + shift


def encode_image(vae, image, resolution, device):
    """A real positive: RGB, shorter side resized to the resolution (Lanczos), center-cropped, encoded
    to the posterior MEAN (a positive is a fixed point), then shifted and scaled like the pipeline's."""
    import numpy as np
    from PIL import Image

    image = tfd_training.decode_image(tfd_training.open_image(image), "RGB")  # any mode (L, RGBA, P, CMYK, 16-bit)
    scale = resolution / min(image.size)
    w, h = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((w, h), Image.LANCZOS)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(device)
    return to_latents(vae, vae.encode(x.to(vae.dtype)).latent_dist.mean)[0]


@torch.no_grad()
def decode_latents(vae, latents):
    """Denoiser latents → images in [−1, 1], decoded in the VAE's dtype."""
    z = from_latents(vae, latents.to(vae.device))
    return vae.decode(z.to(vae.dtype), return_dict=False)[0].float().clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# 5. The student next to its frozen teacher; exporting and loading the trained weights.
# ----------------------------------------------------------------------------------------------


def check_run(accelerator, args, model_cls, component, logger):
    """What fails before any weight loads: another run's output folder (continued only with
    --resume_from_checkpoint), layer names (on the denoiser built from its config on the meta device).
    Returns the checkpoint to resume from, or None."""
    tfd_training.check_sources(args, models=("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path"),
                               data=("dataset_name",))
    resume = None
    if not args.prepare_positives_only:
        resume = tfd_training.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint, logger)
        tfd_training.check_output_dir(args.output_dir, args.resume_from_checkpoint)
        check_trainable(resume, args)
    config = model_cls.load_config(args.pretrained_model_name_or_path, subfolder=component, revision=args.revision,
                                   cache_dir=args.cache_dir)
    with torch.device("meta"):
        tfd_utils.resolve_layers(model_cls.from_config(config), args.feature_layers)
    if accelerator.distributed_type.value == "FSDP" and args.train_mode == "lora":
        raise ValueError("--train_mode lora under FSDP is not supported: LoRA weights are small, use DDP "
                         "(examples/accelerate_configs/8gpu_ddp.yaml).")
    return resume


TRAINABLE_FILE = "tfd_trainable.json"  # in each checkpoint: what its trainable weights are (trainable_settings)


def trainable_settings(args):
    """What a checkpoint's trainable weights are: the training mode and, for LoRA, the adapters' shape and scale."""
    settings = {"train_mode": args.train_mode}
    if args.train_mode == "lora":
        modules = args.lora_target_modules
        settings.update(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_target_modules=modules if isinstance(modules, str) else ",".join(modules))
    return settings


def check_trainable(resume, args):
    """A checkpoint resumed with another --train_mode, --lora_rank, --lora_alpha or --lora_target_modules is an
    error before any weight loads. What it holds: its TRAINABLE_FILE, else the run's training_args.json."""
    if resume is None:
        return
    from types import SimpleNamespace

    for path in (os.path.join(resume, TRAINABLE_FILE), os.path.join(os.path.dirname(resume), "training_args.json")):
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            break
    else:
        return
    held = trainable_settings(SimpleNamespace(**{**vars(args), **saved}))
    asked = trainable_settings(args)
    if held["train_mode"] != asked["train_mode"]:
        held, asked = {"train_mode": held["train_mode"]}, {"train_mode": asked["train_mode"]}
    diff = [k for k in held if held[k] != asked.get(k)]
    if diff:
        raise ValueError(f"--resume_from_checkpoint {resume} holds " +
                         " ".join(f"--{k} {held[k]}" for k in diff) + "; this run asks for " +
                         " ".join(f"--{k} {asked[k]}" for k in diff) + ". Resume with the checkpoint's settings, or "
                         "start a new run in a new --output_dir.")


def load_pipeline(pipeline_cls, args, teacher_dtype, **components):
    """The frozen teacher pipeline on the CPU: the denoiser and VAE in float32 (the student is copied from the
    denoiser as loaded), the text encoders in the teacher's dtype. make_student puts the denoiser on the device;
    the text encoders and VAE go there only while they are used (`on_device`)."""
    from diffusers import AutoencoderKL

    if args.pretrained_vae_model_name_or_path:
        components["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path,
                                                          cache_dir=args.cache_dir)
    dtypes = {"default": teacher_dtype, "vae": torch.float32, "unet": torch.float32, "transformer": torch.float32}
    pipe = pipeline_cls.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                        variant=args.variant, cache_dir=args.cache_dir, dtype=dtypes,
                                        **{**absent_components(pipeline_cls, args), **components})
    pipe.set_progress_bar_config(disable=True)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval()
    return pipe


def absent_components(pipeline_cls, args):
    """Components the saved pipeline has none of (e.g. an SD3 pipeline saved without T5): from_pretrained
    wants them given as None."""
    index = pipeline_cls.load_config(args.pretrained_model_name_or_path, revision=args.revision,
                                     cache_dir=args.cache_dir)
    return {k: None for k, v in index.items() if isinstance(v, (list, tuple)) and v and v[0] is None}


def make_student(pipe, component, args, device):
    """(student, teacher, teacher_context) from the pipeline's denoiser; the pipeline keeps the teacher.
    teacher_context: the factory TFDLoss and the positives enter around teacher passes (LoRA: adapters off)."""
    teacher_dtype = tfd_training.DTYPES[args.teacher_dtype]
    if args.prepare_positives_only:
        return None, tfd_training.cast(getattr(pipe, component), device, teacher_dtype), None
    student, teacher = student_and_teacher(getattr(pipe, component), args.train_mode, device, teacher_dtype,
                                           args.lora_rank, args.lora_alpha, args.lora_target_modules)
    setattr(pipe, component, teacher)
    return student, teacher, (lambda: teacher_mode(teacher)) if args.train_mode == "lora" else None


def cond_dtype(args):
    """dtype of the text conditioning the student gets: LoRA adapters sit on the teacher's base weights."""
    return tfd_training.DTYPES[args.teacher_dtype] if args.train_mode == "lora" else torch.float32


def student_and_teacher(model, train_mode, device, teacher_dtype, lora_rank=64, lora_alpha=64,
                        lora_target_modules=("to_k", "to_q", "to_v", "to_out.0")):
    """(student, teacher) on the device from the teacher's denoiser (UNet or transformer), as loaded.

    full: a float32 copy made on the CPU BEFORE the teacher is cast, so the student starts from the
    checkpoint's exact weights; the teacher goes to the device already in teacher_dtype, then the student
    (tfd_training.student_and_frozen_teacher: never two float32 copies on the device). lora: the denoiser
    goes to the device in teacher_dtype and gets float32 LoRA adapters; it is also the teacher with its
    adapters disabled (`teacher_mode`): no second copy.
    """
    if train_mode == "full":
        return tfd_training.student_and_frozen_teacher(model, device, teacher_dtype)
    from peft import LoraConfig

    tfd_training.cast(model.requires_grad_(False), device, teacher_dtype)
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
    adapter config, written to a temporary name first: tfd_training.save_into), loadable with
    `pipe.load_lora_weights`."""
    if not lora:
        model.save_pretrained(os.path.join(output_dir, component))
        return
    from peft.utils import get_peft_model_state_dict

    state, metadata = get_peft_model_state_dict(model), model.peft_config["default"].to_dict()
    tfd_training.save_into(output_dir, lambda tmp: pipeline_cls.save_lora_weights(tmp, **{
        f"{component}_lora_layers": state, f"{component}_lora_adapter_metadata": metadata}), "lora")


def import_trainable(model, input_dir, lora, pipeline_cls, component):
    """Load what export_trainable wrote into `model` (a checkpoint's student)."""
    if not lora:
        loaded = type(model).from_pretrained(input_dir, subfolder=component)
        model.load_state_dict(loaded.state_dict())
        return
    from peft.utils import set_peft_model_state_dict

    state = pipeline_cls.lora_state_dict(input_dir)
    state = state[0] if isinstance(state, tuple) else state  # SDXL also returns its network alphas
    prefix = component + "."
    result = set_peft_model_state_dict(model, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                       adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"LoRA checkpoint {input_dir} does not fit this {component}: {result.unexpected_keys[:5]}")


def register_checkpoint_hooks(accelerator, lora, pipeline_cls, component, trainable=None):
    """Checkpoints hold the trainable weights as export_trainable writes them (FSDP/DeepSpeed save
    their own sharded state next to it), and TRAINABLE_FILE: `trainable` (trainable_settings)."""
    def save_model_hook(models, weights, output_dir):
        if trainable is not None and accelerator.is_main_process:
            tfd_training.write_json(os.path.join(output_dir, TRAINABLE_FILE), trainable)
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
# 6. The model card's settings.
# ----------------------------------------------------------------------------------------------


def card_settings(args, num_prompts, positive_counts=None):
    """The settings a text-to-image model card shows (no local paths, no secrets). positive_counts: {"real": R,
    "teacher": T} positives over the prompt set (Positives.counts); without it, what the flags tell."""
    source = "a prompt file" if args.prompts_file else tfd_training.public_name(args.dataset_name)
    teacher = f"teacher samples ({args.num_positive_steps} steps, CFG {args.positive_guidance_scale})"
    if positive_counts is None and not args.image_column:  # no images: every positive is a teacher sample
        positive_counts = {"real": 0, "teacher": num_prompts * args.num_positives}
    if positive_counts is None:
        positives = f"real images where captions match, else {teacher}"
    else:
        positives = ", ".join([f"{positive_counts['real']} real images (matching captions)"] * bool(
            positive_counts["real"]) + [f"{positive_counts['teacher']} {teacher}"] * bool(positive_counts["teacher"]))
    return {"prompts": f"{num_prompts} from {source}", "training mode": args.train_mode +
            (f" (rank {args.lora_rank})" if args.train_mode == "lora" else ""), "resolution": args.resolution,
            "updates": args.max_train_steps, "prompts × (generated, positives) per process":
            f"{args.prompts_per_batch} × ({args.num_generated}, {args.num_positives})",
            "teacher layers": " ".join(args.feature_layers), "feature noise σ": tfd_training.sigma_text(args),
            "radii": args.drift_radii, "learning rate": args.learning_rate, "positives": positives}


# ----------------------------------------------------------------------------------------------
# 7. Set-up, the batch, the validation grid and the export: the same for every text-to-image teacher.
# ----------------------------------------------------------------------------------------------


def setup(args, accelerator, pipeline_cls, component, logger, pipe=None, components=None, cache_settings=None):
    """What a text-to-image script's loop needs, as a namespace: prompts (and the data set and its
    description), the teacher pipeline (loaded unless `pipe` is given: the benchmark passes one built from a
    config; components: what it is loaded with, e.g. no T5), the validation prompts' embeddings, student,
    teacher and teacher_context, the positives (their cache; cache_settings: what else its entries depend on);
    then the loss (TFDLoss from its flags), AdamW and its schedule, prepared by the accelerator, and the memory
    each component takes on the device (logged). With --prepare_positives_only: the teacher and positives only.

    On the device: the text encoders while they encode the validation prompts (before anything else is there),
    then the teacher and the student (student_and_teacher), the text encoders and VAE again only for a cache miss
    or a validation grid; with --prepare_positives_only the teacher, text encoders and VAE."""
    components, cache_settings = components or {}, cache_settings or {}
    from types import SimpleNamespace

    device, teacher_dtype = accelerator.device, tfd_training.DTYPES[args.teacher_dtype]
    # a. Prompts, and the real images whose captions match them.
    prompts, real_rows, dataset, data_desc = load_prompts(args, logger)
    # b. The teacher pipeline, on the CPU: the text encoders in the teacher's dtype, the VAE in float32.
    pipe = pipe if pipe is not None else load_pipeline(pipeline_cls, args, teacher_dtype, **components)
    val_embeds = None
    if not args.prepare_positives_only:  # encoded once, while the device holds nothing else
        with on_device(text_encoders(pipe), device):
            val_embeds = encode_prompts(pipe, args.validation_prompts, device)
    # c. Student and teacher; the positives (the cache, filled up front with --prepare_positives_only).
    student, teacher, teacher_context = make_student(pipe, component, args, device)
    positives = open_positives(args, pipe, real_rows, dataset, device, teacher_context, logger, **cache_settings)
    positives.check_real_images(accelerator, prompts)  # bad images: named, skipped or refused before any sampling
    run = SimpleNamespace(prompts=prompts, dataset=dataset, data_desc=data_desc, pipe=pipe, student=student,
                          teacher=teacher, teacher_context=teacher_context, positives=positives, val_embeds=val_embeds)
    if args.prepare_positives_only:
        positives.keep_on_device()
        return run
    if not warn_about_misses(positives, prompts, logger):
        logger.info("Every prompt is cached: the text encoders and VAE stay on the CPU (the VAE comes to the device "
                    "for validation grids).")
    # d. The loss, the optimiser and its schedule; checkpoints hold the trainable weights as exported.
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    run.loss_fn = tfd_utils.TFDLoss(teacher, **tfd_training.loss_kwargs(args), teacher_context=teacher_context,
                                    checkpoint_teacher=args.teacher_checkpointing)
    optimizer = tfd_training.make_optimizer([prm for prm in student.parameters() if prm.requires_grad], args)
    lr_scheduler = tfd_training.make_lr_scheduler(optimizer, args, accelerator.num_processes)
    register_checkpoint_hooks(accelerator, args.train_mode == "lora", pipeline_cls, component,
                              trainable_settings(args))
    run.student, run.optimizer, run.lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    parts = ([(f"{component} (student)", run.student), (f"{component} (teacher)", teacher)]
             if args.train_mode == "full" else [(f"{component} (teacher base + LoRA student)", run.student)])
    parts += [(name if m is not None else f"{name} (not loaded)", m if m is not None else [])
              for name, m in pipe.components.items()
              if name != component and (isinstance(m, torch.nn.Module) or name.startswith("text_encoder"))]
    run.memory = tfd_training.log_memory(accelerator, parts, run.optimizer, logger)
    return run


def prompt_batch(entries, num_generated, latent_shape, generator, device, dtype):
    """Cache entries of a step's prompts → (positives [G, P, ...], prompt_embeds [G, ...], pooled [G, ...],
    noise [G·N, *latent_shape]) on the device; the text conditioning in `dtype`."""
    positives = torch.stack([e["positives"] for e in entries]).to(device, torch.float32)
    prompt_embeds = torch.stack([e["prompt_embeds"] for e in entries]).to(device, dtype)
    pooled = torch.stack([e["pooled_prompt_embeds"] for e in entries]).to(device, dtype)
    noise = torch.randn(len(entries) * num_generated, *latent_shape, generator=generator).to(device)
    return positives, prompt_embeds, pooled, noise


@torch.no_grad()
def sample_grid(pipe, component, model, scheduler, embeds, args, accelerator, **call_kw):
    """One step per validation prompt through the real pipeline with `model` as its denoiser (fixed
    seeds; the prompts pre-encoded, so the text encoders are left out)."""
    val = type(pipe)(**{**pipe.components, **{k: None for k in pipe.components if k.startswith("text_encoder")},
                        component: model, "scheduler": scheduler})
    val.set_progress_bar_config(disable=True)
    pe, pooled = (e.to(model.device, model.dtype) for e in embeds)
    gens = [torch.Generator().manual_seed(args.seed + i) for i in range(len(pe))]
    with on_device([pipe.vae], accelerator.device):  # the VAE lives on the CPU
        with accelerator.autocast():
            latents = val(prompt_embeds=pe, pooled_prompt_embeds=pooled, num_inference_steps=1,
                          height=args.resolution, width=args.resolution, generator=gens, output_type="latent",
                          **call_kw).images
        images = decode_latents(pipe.vae, latents)
    return tfd_training.image_grid(images)


def vp_one_step_scheduler(teacher_config, timestep):
    """The variance-preserving student's sampler: a DDIMScheduler with the teacher's noise schedule and
    prediction type whose one step (num_inference_steps=1) is timestep [T] ("leading" spacing, steps_offset T)
    and returns x₀ exactly (final ᾱ = 1, eta 0, no clipping or thresholding): tfd_utils.vp_x0 at ᾱ_T."""
    import inspect

    from diffusers import DDIMScheduler

    keys = inspect.signature(DDIMScheduler.__init__).parameters
    config = {k: v for k, v in teacher_config.items() if k in keys}
    config.update(timestep_spacing="leading", steps_offset=int(timestep), set_alpha_to_one=True, clip_sample=False,
                  thresholding=False)
    return DDIMScheduler.from_config(config)


def export(accelerator, args, student, pipe, component, scheduler, grid_fn, write_card, repo_id, **components):
    """samples.png, then the one-step pipeline (full: the student in float32 with the teacher's other
    components as published, reloaded in float32; users pick the dtype with from_pretrained(dtype=...))
    or the LoRA weights (and `scheduler` when the teacher's own does not make the one step), the model card
    and the Hub upload. components: overrides the teacher was loaded with (e.g. no T5). Returns the student."""
    accelerator.wait_for_everyone()
    model = tfd_training.consolidated_model(accelerator, student)  # every process: FSDP gathers the shards
    if accelerator.is_main_process:
        tfd_training.save_png(os.path.join(args.output_dir, "samples.png"), grid_fn(model.to(accelerator.device)))
        if args.train_mode == "lora":
            def write_lora(tmp):  # the weights and the scheduler, moved in together (the weights last)
                export_trainable(model, tmp, True, type(pipe), component)
                if scheduler is not None:
                    scheduler.save_pretrained(os.path.join(tmp, "scheduler"))

            tfd_training.save_into(args.output_dir, write_lora, "lora_export")
        else:
            if args.pretrained_vae_model_name_or_path:
                components["vae"] = tfd_training.cast(pipe.vae, "cpu", torch.float32)
            final = type(pipe).from_pretrained(
                args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                cache_dir=args.cache_dir, dtype=torch.float32, **{**absent_components(type(pipe), args), **components},
                **{component: tfd_training.cast(model, "cpu", torch.float32),
                   "scheduler": scheduler or pipe.scheduler})
            tfd_training.save_pipeline(final, args.output_dir)
        write_card()
        if args.push_to_hub:
            tfd_training.push_folder_to_hub(args.output_dir, repo_id, args.hub_token,
                                            f"TFD one-step student of {args.pretrained_model_name_or_path}")
    accelerator.end_training()
    return model
