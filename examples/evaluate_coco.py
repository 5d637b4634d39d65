#!/usr/bin/env python
# COCO-2014 FID + CLIP score of a one-step SDXL student (the paper's protocol):
#   10k val2014 images (seeded), one caption each → one-step 1024px samples (guidance 0);
#   generated and real images center-cropped and LANCZOS-resized to 512; clean-fid "clean" FID
#   between the two folders; CLIP score = mean raw cosine of open_clip ViT-g-14 (laion2b_s12b_b42k)
#   between "A photo depicts <caption>" and the generated image resized to 256.
#
#   accelerate launch examples/evaluate_coco.py --model tfd-sdxl \
#       --captions coco/annotations/captions_val2014.json --images coco/val2014 --output_dir eval/tfd-sdxl
#
# Prompt i is the caption of subset image i and uses noise seed (--seed + i): results do not depend
# on the number of processes, and a killed run resumes (PNGs already written are skipped).

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_utils  # noqa: E402
import tfd_fid  # noqa: E402
import tfd_training  # noqa: E402

COCO_URLS = ("http://images.cocodataset.org/annotations/annotations_trainval2014.zip (captions_val2014.json) and "
             "http://images.cocodataset.org/zips/val2014.zip")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="COCO-2014 FID and CLIP score of a one-step SDXL student.")
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="The student: a saved SDXL pipeline folder/repo (full), or a folder with "
                        "pytorch_lora_weights.safetensors (LoRA, needs --base_model).")
    g.add_argument("--base_model", default=None,
                   help="Base SDXL pipeline for a LoRA student (e.g. stabilityai/stable-diffusion-xl-base-1.0).")
    g.add_argument("--num_inference_steps", type=int, default=1, help="Sampling steps (the student: 1).")
    g.add_argument("--guidance_scale", type=float, default=0.0, help="Classifier-free guidance (the student: 0).")
    g.add_argument("--resolution", type=int, default=1024, help="Generation resolution (SDXL: 1024).")
    g.add_argument("--dtype", default="fp16", choices=("fp32", "fp16", "bf16"), help="Pipeline weights dtype.")
    g.add_argument("--batch_size", type=int, default=8, help="Prompts per pipeline call per process.")
    g = p.add_argument_group("data")
    g.add_argument("--captions", required=True, help="COCO captions_val2014.json.")
    g.add_argument("--images", required=True, help="COCO val2014 image folder (the files the captions name).")
    g.add_argument("--num_prompts", type=int, default=10_000, help="Images (one caption each) in the subset.")
    g.add_argument("--seed", type=int, default=0, help="Seed of the subset and caption choice; prompt i uses noise "
                                                       "seed seed + i.")
    g.add_argument("--eval_resolution", type=int, default=512,
                   help="Both image sets are center-cropped and LANCZOS-resized to this before FID.")
    g = p.add_argument_group("metrics")
    g.add_argument("--fid_mode", default="clean", choices=tfd_fid.MODES, help="Inception preprocessing (clean-fid).")
    g.add_argument("--fid_batch_size", type=int, default=64, help="Inception batch size.")
    g.add_argument("--clip_model", default="ViT-g-14", help="open_clip model name of the CLIP score.")
    g.add_argument("--clip_pretrained", default="laion2b_s12b_b42k",
                   help="open_clip pretrained tag or checkpoint path ('none': random weights, for tests only).")
    g.add_argument("--clip_model_config", default=None,
                   help="An open_clip model config JSON to register first (its file name is the model name).")
    g.add_argument("--clip_resolution", type=int, default=256, help="Images are resized to this before CLIP.")
    g.add_argument("--clip_prefix", default="A photo depicts ", help="Text prefix of every caption for CLIP.")
    g.add_argument("--clip_batch_size", type=int, default=64, help="CLIP batch size.")
    g.add_argument("--skip_clip", action="store_true", help="Only FID.")
    g.add_argument("--skip_fid", action="store_true", help="Only generate the images (no metrics).")
    g.add_argument("--output_dir", required=True,
                   help="prompts.json, generated/ and real/ (index-named PNGs, reused when present; the settings "
                        "they were made with in settings.json must match), results.json.")
    args = p.parse_args(argv)
    for path, what in ((args.captions, "captions file"), (args.images, "image folder")):
        if not os.path.exists(path):
            p.error(f"COCO {what} {path} not found. Get {COCO_URLS}.")
    if os.path.isfile(os.path.join(args.model, "pytorch_lora_weights.safetensors")) and args.base_model is None:
        p.error(f"{args.model} holds LoRA weights: pass --base_model (the SDXL pipeline it was trained on).")
    if args.num_prompts < 2:
        p.error("--num_prompts must be at least 2 (FID needs a covariance).")
    return args


# ----------------------------------------------------------------------------------------------
# The prompt subset.
# ----------------------------------------------------------------------------------------------


def coco_subset(captions_path, num_prompts, seed):
    """[{index, image_id, file_name, caption}]: num_prompts seeded images, one seeded caption each."""
    with open(captions_path) as f:
        data = json.load(f)
    if "images" not in data or "annotations" not in data:
        raise ValueError(f"{captions_path} is not a COCO captions file (needs 'images' and 'annotations').")
    captions = {}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    images = sorted((im for im in data["images"] if im["id"] in captions), key=lambda im: im["id"])
    if len(images) < num_prompts:
        raise ValueError(f"{captions_path} has {len(images)} captioned images, fewer than --num_prompts "
                         f"{num_prompts}.")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(images))[:num_prompts]
    subset = []
    for i, j in enumerate(chosen):
        im = images[j]
        caps = captions[im["id"]]
        caption = " ".join(caps[int(rng.integers(len(caps)))].split())
        subset.append({"index": i, "image_id": im["id"], "file_name": im["file_name"], "caption": caption})
    return subset


def load_or_make_subset(args):
    """prompts.json in --output_dir (written once, checked on resume)."""
    path = os.path.join(args.output_dir, "prompts.json")
    subset = coco_subset(args.captions, args.num_prompts, args.seed)
    if os.path.isfile(path):
        with open(path) as f:
            if json.load(f) != subset:
                raise ValueError(f"{path} is from another subset (captions/--num_prompts/--seed); use a new "
                                 "--output_dir or delete it.")
    else:
        tfd_training.write_json(path, subset)
    missing = [s["file_name"] for s in subset if not os.path.isfile(os.path.join(args.images, s["file_name"]))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} subset images are missing from {args.images} (e.g. {missing[0]}).")
    return subset


# ----------------------------------------------------------------------------------------------
# Images.
# ----------------------------------------------------------------------------------------------


def center_crop_resize(image, size):
    """Center square crop, then LANCZOS resize to size × size (both generated and real images)."""
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.convert("RGB").crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)


def png(folder, i):
    return os.path.join(folder, f"{i:05d}.png")


def trained_timestep(model):
    """The --conditioning_timestep an SDXL student was trained at (its training_args.json), else None."""
    path = os.path.join(model, "training_args.json")
    return json.load(open(path)).get("conditioning_timestep") if os.path.isfile(path) else None


def load_pipeline(args, device):
    """Full student: DiffusionPipeline.from_pretrained, with the scheduler it was saved with; LoRA: base +
    load_lora_weights + the student's saved one-step scheduler (an SD3 student has none: the base's flow
    scheduler makes the one step; an SDXL one without it gets the one-step DDIMScheduler at its timestep)."""
    import diffusers
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    import tfd_text2image

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    lora_file = os.path.join(args.model, "pytorch_lora_weights.safetensors")
    source = args.base_model if os.path.isfile(lora_file) else args.model
    absent = absent_components(source)
    trained = os.path.join(args.model, "training_args.json")
    if os.path.isfile(trained) and json.load(open(trained)).get("drop_t5"):  # an SD3 student trained without T5
        absent.update(text_encoder_3=None, tokenizer_3=None)
    pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, **absent)
    if os.path.isfile(lora_file):
        pipe.load_lora_weights(args.model)
        saved = os.path.join(args.model, "scheduler", "scheduler_config.json")
        if os.path.isfile(saved):
            cls = getattr(diffusers, json.load(open(saved))["_class_name"])
            pipe.scheduler = cls.from_pretrained(args.model, subfolder="scheduler")
        elif not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            pipe.scheduler = tfd_text2image.vp_one_step_scheduler(pipe.scheduler.config,
                                                                  trained_timestep(args.model) or 999)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sampling_steps(args, pipe):
    """The call's steps: --num_inference_steps; for a one-step student trained at timestep T, the plain
    one-step call where its scheduler's one step is T, else timesteps=[T] (a student saved with a scheduler
    whose one step is another timestep, e.g. LCMScheduler's 999)."""
    t = trained_timestep(args.model)
    if args.num_inference_steps != 1 or t is None:
        return {"num_inference_steps": args.num_inference_steps}
    pipe.scheduler.set_timesteps(1)
    return {"num_inference_steps": 1} if pipe.scheduler.timesteps.tolist() == [t] else {"timesteps": [t]}


def absent_components(path):
    """Components a saved pipeline has none of (an SD3 pipeline saved without T5): given as None."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(path)
    return {k: None for k, v in index.items() if isinstance(v, (list, tuple)) and v and v[0] is None}


def generate_missing(args, state, subset, gen_dir):
    """This process's generated PNGs that are not there yet (one-step, eval_resolution)."""
    todo = [i for i in eval_utils.shard(len(subset), state.process_index, state.num_processes)
            if not os.path.isfile(png(gen_dir, i))]
    if not todo:
        return 0
    pipe = load_pipeline(args, state.device)
    steps = sampling_steps(args, pipe)
    from tqdm.auto import tqdm

    for s in tqdm(range(0, len(todo), args.batch_size), desc=f"generating (rank {state.process_index})"):
        idx = todo[s:s + args.batch_size]
        gens = [torch.Generator().manual_seed(args.seed + i) for i in idx]
        out = pipe(prompt=[subset[i]["caption"] for i in idx], guidance_scale=args.guidance_scale,
                   height=args.resolution, width=args.resolution, generator=gens, output_type="pil", **steps)
        for i, im in zip(idx, out.images):
            tfd_training.save_png(png(gen_dir, i), center_crop_resize(im, args.eval_resolution))
    return len(todo)


def prepare_real(args, state, subset, real_dir):
    """The matching real images, center-cropped and resized like the generated ones."""
    for i in eval_utils.shard(len(subset), state.process_index, state.num_processes):
        if not os.path.isfile(png(real_dir, i)):
            with Image.open(os.path.join(args.images, subset[i]["file_name"])) as im:
                tfd_training.save_png(png(real_dir, i), center_crop_resize(im, args.eval_resolution))


# ----------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------


def files_features(paths, args, device):
    feats = [tfd_fid.inception_features([tfd_fid.load_image(p) for p in paths[s:s + args.fid_batch_size]],
                                        args.fid_batch_size, device, args.fid_mode)
             for s in range(0, len(paths), args.fid_batch_size)]
    return np.concatenate(feats)


def load_clip(args, device):
    import open_clip

    if args.clip_model_config:
        open_clip.add_model_config(args.clip_model_config)
    pretrained = None if args.clip_pretrained.lower() in ("", "none") else args.clip_pretrained
    if pretrained is None:
        print(f"warning: CLIP {args.clip_model} has RANDOM weights (--clip_pretrained none): the score is "
              "meaningless except as a test.")
        torch.manual_seed(0)  # the same random weights on every run
    model, _, preprocess = open_clip.create_model_and_transforms(args.clip_model, pretrained=pretrained, device=device)
    return model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(args.clip_model)


@torch.no_grad()
def clip_score(paths, captions, args, device):
    """Mean raw cosine between CLIP(prefix + caption) and CLIP(image resized to clip_resolution)."""
    model, preprocess, tokenizer = load_clip(args, device)
    scores = []
    for s in range(0, len(paths), args.clip_batch_size):
        ims = []
        for p in paths[s:s + args.clip_batch_size]:
            with Image.open(p) as im:
                ims.append(preprocess(im.convert("RGB").resize((args.clip_resolution,) * 2, Image.BICUBIC)))
        text = tokenizer([args.clip_prefix + c for c in captions[s:s + args.clip_batch_size]]).to(device)
        img_emb = torch.nn.functional.normalize(model.encode_image(torch.stack(ims).to(device)).float(), dim=-1)
        txt_emb = torch.nn.functional.normalize(model.encode_text(text).float(), dim=-1)
        scores.append((img_emb * txt_emb).sum(-1).cpu())
    return float(torch.cat(scores).double().mean())


def main(args):
    from accelerate import PartialState

    # cpu=True where there is no GPU: lets `accelerate launch --cpu` / torchrun shard over CPU processes
    state = PartialState(cpu=not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") == "1")
    os.makedirs(args.output_dir, exist_ok=True)
    gen_dir, real_dir = (os.path.join(args.output_dir, d) for d in ("generated", "real"))
    keys = ("model", "base_model", "num_inference_steps", "guidance_scale", "resolution", "dtype", "seed",
            "eval_resolution")
    if state.is_main_process:
        load_or_make_subset(args)  # writes prompts.json once; fails early on missing images
        eval_utils.check_run_settings(os.path.join(args.output_dir, "settings.json"),
                                      {k: getattr(args, k) for k in keys})
    state.wait_for_everyone()
    subset = load_or_make_subset(args)
    for d in (gen_dir, real_dir):
        os.makedirs(d, exist_ok=True)
    t0 = time.time()
    written = eval_utils.total_over_processes(generate_missing(args, state, subset, gen_dir), state)
    prepare_real(args, state, subset, real_dir)
    state.wait_for_everyone()
    if not state.is_main_process or args.skip_fid:
        return None
    idx = range(len(subset))
    gen_feats = files_features([png(gen_dir, i) for i in idx], args, state.device)
    real_mu, real_sigma = tfd_fid.feature_stats(files_features([png(real_dir, i) for i in idx], args, state.device))
    fid = tfd_fid.fid_from_features(gen_feats, real_mu, real_sigma)
    clip = None if args.skip_clip else clip_score([png(gen_dir, i) for i in idx], [s["caption"] for s in subset],
                                                 args, state.device)
    result = {
        "fid": fid, "clip_score": clip, "num_prompts": len(subset), "model": args.model, "base_model": args.base_model,
        "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
        "resolution": args.resolution, "eval_resolution": args.eval_resolution, "fid_mode": args.fid_mode,
        "inception": tfd_fid.inception_path(), "clip_model": args.clip_model, "clip_pretrained": args.clip_pretrained,
        "clip_resolution": args.clip_resolution, "clip_prefix": args.clip_prefix, "seed": args.seed,
        "generated_now": written, "num_processes": state.num_processes, "seconds": round(time.time() - t0, 1),
    }
    tfd_training.write_json(os.path.join(args.output_dir, "results.json"), result)
    n = len(subset)
    clip_text = "" if clip is None else f", CLIP score {clip:.4f} ({args.clip_model} {args.clip_pretrained})"
    print(f"COCO-2014 FID-{f'{n // 1000}k' if n % 1000 == 0 else n} {fid:.4f}{clip_text} "
          f"({args.model}, {args.num_inference_steps} step(s), {args.resolution}px → {args.eval_resolution}px)")
    return result


if __name__ == "__main__":
    main(parse_args())
