"""Train a tiny text-to-image teacher on the captioned digits, as a real diffusers pipeline (CPU, minutes).

    python examples/digits/train_text2image_teacher.py --layout sdxl --data_dir outputs/digits/data_t2i \
        --output_dir outputs/digits/teacher_t2i_sdxl
    python examples/digits/train_text2image_teacher.py --layout sd3 --data_dir outputs/digits/data_t2i \
        --output_dir outputs/digits/teacher_t2i_sd3

Both layouts share:
- a word-level tokenizer over every word of the data's captions and held-out prompts (saved as
  tokenizer/ and tokenizer_2/), loadable with AutoTokenizer and used by the pipelines as they use
  CLIP's: "<|startoftext|> words <|endoftext|>" padded to model_max_length (16);
- two small CLIP text encoders (the pipelines read their penultimate hidden states; the pooled
  projection gives the pooled embedding), briefly taught which digit a training caption names,
  then frozen;
- an AutoencoderKL fitted first, on RGB copies of the gray digits, with `scaling_factor` (and, SD3,
  `shift_factor`) measured so that the pipeline's latents have unit std.
Then:
- sdxl: a `UNet2DConditionModel` with SDXL's added conditioning (pooled text + 6 time ids) on 4×8×8
  latents, ε-prediction on SDXL's noise schedule (min-SNR-5 weights, floored at the x₀ loss where
  SNR < 1, a quarter of the draws at t ≥ 900: with the plain ε loss this small teacher's one-step
  output at t = 999, a TFD student's start, passes its input noise through), saved as a
  StableDiffusionXLPipeline (EulerDiscreteScheduler). Dropped captions are ZERO prompt and pooled embeddings: what the
  pipeline feeds as the unconditional input (force_zeros_for_empty_prompt) without a negative prompt.
- sd3: an `SD3Transformer2DModel` on 16×4×4 latents trained with rectified flow (x_s = (1−s)x₀ + sε,
  velocity ε − x₀, timestep 1000·s), saved as a StableDiffusion3Pipeline without T5 (load it with
  text_encoder_3=None, tokenizer_3=None). Dropped captions are the pipeline's encoding of the empty
  negative prompt (CLIP of "", T5 part zeros).
Text embeddings come from the pipeline's own encode_prompt, once per caption, so training sees what
sampling feeds. The EMA weights are saved; a samples.png check grid is drawn from the reloaded
pipeline; the completion marker is written last, and a rerun with a finished teacher of the same
settings returns at once.
"""

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from prepare_text2image import load_split_text, read_prompts  # noqa: E402
from tfd_training import save_png, write_json  # noqa: E402

COMPLETE = "teacher_complete.json"

# SDXL base 1.0's scheduler config (the one tests/tiny_sdxl.py uses).
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    use_karras_sigmas=False,
)

PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"


# Per-layout defaults, sized for about 3 (sdxl) and 3.5 (sd3) minutes on one CPU core.
LAYOUT_DEFAULTS = {
    # sdxl: the x₀-space floor and the extra draws near t = 999 teach the one-step start (see --snr_floor).
    "sdxl": dict(vae_channels="16,32", vae_steps=200, vae_learning_rate=5e-3, channels="32,64,64",
                 max_train_steps=1200, snr_gamma=5.0, snr_floor=1.0, high_timestep_fraction=0.25, flow_shift=None,
                 patch_size=None, check_guidance_scale=1.5),
    # 16 channels at 8×8 (4× more latent numbers than pixels) were far harder for a tiny transformer than
    # 16 at 4×4; there patch size 1 keeps 16 image tokens.
    "sd3": dict(vae_channels="16,32,32", vae_steps=300, vae_learning_rate=3e-3, channels="96",
                max_train_steps=1200, snr_gamma=None, snr_floor=0.0, high_timestep_fraction=0.0, flow_shift=3.0,
                patch_size=1, check_guidance_scale=1.25),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a tiny SDXL- or SD3-layout text-to-image teacher on the digits.")
    p.add_argument("--layout", default="sdxl", choices=("sdxl", "sd3"), help="Pipeline layout of the teacher.")
    p.add_argument("--data_dir", default="outputs/digits/data_t2i", help="Folder written by prepare_text2image.py.")
    p.add_argument("--output_dir", default=None, help="Where the pipeline is saved (default outputs/digits/"
                                                      "teacher_t2i_<layout>).")
    p.add_argument("--seed", type=int, default=0, help="Seed of initialisation, batches and noise.")
    g = p.add_argument_group("text encoders")
    g.add_argument("--max_length", type=int, default=16, help="Tokenizer model_max_length (bos + words + eos).")
    g.add_argument("--text_widths", default="32,64", help="Hidden sizes of text_encoder and text_encoder_2.")
    g.add_argument("--text_layers", type=int, default=2, help="Transformer layers of each text encoder.")
    g.add_argument("--projection_dim", type=int, default=32, help="Pooled projection width of the text encoders.")
    g.add_argument("--embedding_std", type=float, default=1.0,
                   help="Std of the random token and position embeddings (CLIP's init uses 0.02).")
    g.add_argument("--text_pretrain_steps", type=int, default=100,
                   help="Full-batch steps teaching each text encoder which digit a training caption names "
                        "(0: random encoders).")
    g.add_argument("--text_pretrain_lr", type=float, default=3e-3, help="Adam learning rate of that pretraining.")
    g = p.add_argument_group("autoencoder (defaults per layout: LAYOUT_DEFAULTS)")
    g.add_argument("--vae_channels", default=None,
                   help="block_out_channels of the VAE; each level past the first halves the side "
                        "(sdxl 16,32: 16 px → 4×8×8 latents; sd3 16,32,32: → 16×4×4).")
    g.add_argument("--vae_steps", type=int, default=None, help="VAE optimiser steps (sdxl 200, sd3 300).")
    g.add_argument("--vae_batch_size", type=int, default=64, help="Images per VAE step.")
    g.add_argument("--vae_learning_rate", type=float, default=None,
                   help="Adam learning rate of the VAE, cosine-decayed (sdxl 5e-3, sd3 3e-3).")
    g.add_argument("--vae_kl_weight", type=float, default=1e-4, help="Weight of the KL term (per latent element).")
    g = p.add_argument_group("denoiser (defaults per layout: LAYOUT_DEFAULTS)")
    g.add_argument("--channels", default=None,
                   help="sdxl: UNet block_out_channels (32,64,64); sd3: transformer width (96).")
    g.add_argument("--num_layers", type=int, default=4, help="sd3: transformer blocks.")
    g.add_argument("--patch_size", type=int, default=None, help="sd3: transformer patch size (1).")
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimiser steps (sdxl 1200, sd3 1200).")
    g.add_argument("--batch_size", type=int, default=64, help="Images per step.")
    g.add_argument("--learning_rate", type=float, default=2e-3, help="AdamW learning rate after warm-up.")
    g.add_argument("--lr_warmup_steps", type=int, default=100, help="Linear learning-rate warm-up steps.")
    g.add_argument("--lr_scheduler", default="cosine", choices=("constant", "cosine"),
                   help="Learning rate after warm-up: constant, or cosine decay to zero.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    g.add_argument("--ema_max_decay", type=float, default=0.995, help="EMA decay cap; decay = min(cap, (1+t)/(10+t)).")
    g.add_argument("--caption_dropout", type=float, default=0.1,
                   help="Probability a caption is replaced by the pipeline's unconditional input (for CFG).")
    g.add_argument("--high_timestep_fraction", type=float, default=None,
                   help="sdxl: fraction of the samples whose timestep is uniform in [--high_timestep_min, 999] "
                        "instead of uniform over all 1,000, so the one-step start (t = 999) is trained more (0.25).")
    g.add_argument("--high_timestep_min", type=int, default=900, help="sdxl: lower end of those timesteps.")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="sdxl: min-SNR-γ weight min(SNR, γ)/SNR of the ε loss (5; 0: plain MSE).")
    g.add_argument("--snr_floor", type=float, default=None,
                   help="sdxl: weight the ε loss by at least SNR_FLOOR/SNR, i.e. at least SNR_FLOOR in x₀ terms (1, "
                        "the default: the x₀ loss wherever SNR < 1. The plain ε loss barely sees x₀ at t = 999, where "
                        "one-step sampling starts, so the teacher's one-step output leaks its input noise; 0: off).")
    g.add_argument("--flow_time_sampling", default="mixed", choices=("logit_normal", "uniform", "mixed"),
                   help="sd3: distribution of the training flow time s. Logit-normal(0, 1) alone leaves s near 1 "
                        "(where sampling starts) almost untrained at this budget; mixed = half logit-normal, half "
                        "uniform.")
    g.add_argument("--flow_shift", type=float, default=None,
                   help="sd3: shift of the saved FlowMatchEulerDiscreteScheduler (3.0, SD3's; it only moves the "
                        "sampling sigmas, and 0.5–3 gave the same FD here).")
    g = p.add_argument_group("check and logging")
    g.add_argument("--check_guidance_scale", type=float, default=None,
                   help="CFG scale of the samples.png check grid (sdxl 1.5, sd3 1.25).")
    g.add_argument("--check_steps", type=int, default=25, help="Sampling steps of the check grid.")
    g.add_argument("--log_every", type=int, default=100, help="Steps between loss lines in the log.")
    g.add_argument("--overwrite", action="store_true", help="Retrain even if a finished teacher exists.")
    args = p.parse_args(argv)
    for key, value in LAYOUT_DEFAULTS[args.layout].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.layout == "sd3" and (args.snr_floor or args.high_timestep_fraction):
        p.error("--snr_floor and --high_timestep_fraction belong to the sdxl layout's ε loss.")
    if args.output_dir is None:
        args.output_dir = f"outputs/digits/teacher_t2i_{args.layout}"
    return args


def ints(text):
    return [int(v) for v in str(text).split(",")]


# ----------------------------------------------------------------------------------------------
# Tokenizers and text encoders.
# ----------------------------------------------------------------------------------------------


def caption_words(captions):
    """The lower-cased words and punctuation of the captions, as the tokenizer splits them."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    return sorted({w for c in captions for w, _ in split.pre_tokenize_str(c.lower())})


def build_tokenizer(words, max_length, pad_with_eos):
    """A word-level fast tokenizer with CLIP's conventions: "<|startoftext|> w1 … <|endoftext|>", padded.

    Ids: 0 = pad, 1 = unk, the words, then bos and eos last (as in CLIP's vocabulary): eos is
    never 2, the id transformers' CLIPTextModel treats as a legacy config (argmax pooling).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([PAD, UNK] + list(words) + [BOS, EOS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    # Like SDXL: CLIP-L's tokenizer pads with eos, OpenCLIP-bigG's (tokenizer_2) with another token.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=EOS if pad_with_eos else PAD, model_max_length=max_length)


def build_text_encoder(tokenizer, width, layers, projection_dim, embedding_std, with_projection, seed):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=max(1, width // 16), max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    # With CLIP's 0.02-std embeddings the random layers' mixing dominates each token's state; unit-std
    # embeddings keep a word's state mostly its own, so the digit word reads the same in every template.
    emb = getattr(model, "text_model", model).embeddings  # transformers 5: CLIPTextModel has no text_model
    with torch.no_grad():
        emb.token_embedding.weight.normal_(0, embedding_std)
        emb.position_embedding.weight.normal_(0, embedding_std)
    return model.eval().requires_grad_(False)


def pretrain_text_encoder(model, tokenizer, captions, digits, steps, lr, seed):
    """A stand-in for CLIP's pretraining: the encoder learns, from the data set's (caption, digit of its
    images) pairs, to tell digits apart: a linear head on its pooled output (the projection when it
    has one) predicts the digit. Random encoders pool nearly the same vector for every caption; a
    denoiser then has only the per-token states to go on (a transformer's joint attention barely
    picks them up at this budget). Returns the final training loss."""
    if steps <= 0:
        return None
    torch.manual_seed(seed)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    target = torch.as_tensor(digits)
    model.requires_grad_(True).train()
    width = model.config.projection_dim if hasattr(model, "text_projection") else model.config.hidden_size
    head = torch.nn.Linear(width, 10)
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=lr)
    for _ in range(steps):
        out = model(ids)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        loss = F.cross_entropy(head(pooled), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    return loss.item()


# ----------------------------------------------------------------------------------------------
# Autoencoder.
# ----------------------------------------------------------------------------------------------


def vae_config(channels, latent_channels, resolution, sd3):
    n = len(channels)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(channels), layers_per_block=1,
                latent_channels=latent_channels, norm_num_groups=min(16, min(channels)), sample_size=resolution,
                use_quant_conv=not sd3, use_post_quant_conv=not sd3)  # SD3's VAE has no quant convs


def to_rgb(gray_u8):
    """uint8 [N, R, R] → float [N, 3, R, R] in [−1, 1] (the gray channel replicated)."""
    x = torch.from_numpy(gray_u8).float()[:, None] / 127.5 - 1
    return x.expand(-1, 3, -1, -1).contiguous()


def train_vae(images, args, sd3, log):
    """AutoencoderKL fitted to the digits (MSE + small KL), with scaling (and shift) set from its latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed + 10)
    gen = torch.Generator().manual_seed(args.seed + 11)
    vae = AutoencoderKL(**vae_config(ints(args.vae_channels), 16 if sd3 else 4, images.shape[-1], sd3))
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (
        1 + math.cos(math.pi * min(s, args.vae_steps) / max(args.vae_steps, 1))))
    start, running = time.time(), None
    bar = tqdm(range(args.vae_steps), desc="vae", dynamic_ncols=True)
    for step in bar:
        x = images[torch.randint(len(images), (args.vae_batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        loss = mse + args.vae_kl_weight * post.kl().mean() / z[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        running = mse.item() if running is None else 0.95 * running + 0.05 * mse.item()
        bar.set_postfix(mse=f"{running:.4f}")
        if (step + 1) % args.log_every == 0 or step + 1 == args.vae_steps:
            log(f"vae step {step + 1}: reconstruction MSE {running:.4f} ({time.time() - start:.0f} s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    # The pipelines decode latents / scaling_factor (+ shift_factor for SD3): unit-std scaled latents.
    shift = mean.mean().item() if sd3 else None
    scale = 1.0 / (mean - (shift or 0.0)).std().item()
    vae.register_to_config(scaling_factor=round(scale, 5), shift_factor=None if shift is None else round(shift, 5))
    info = {"vae_seconds": round(time.time() - start, 1), "vae_mse": running,
            "scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor,
            "latent_shape": list(mean.shape[1:])}
    log(f"VAE: latents {tuple(mean.shape[1:])}, scaling_factor {vae.config.scaling_factor}, shift_factor "
        f"{vae.config.shift_factor} ({info['vae_seconds']} s)")
    return vae, mean, info


# ----------------------------------------------------------------------------------------------
# Denoisers.
# ----------------------------------------------------------------------------------------------


def unet_config(channels, latent_channels, latent_size, cross_attention_dim, pooled_dim):
    """SDXL's block layout (plain down block, then cross-attention blocks) at toy widths."""
    n = len(channels)
    return dict(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",), block_out_channels=tuple(channels),
        layers_per_block=1, transformer_layers_per_block=1,
        attention_head_dim=tuple(max(1, c // 16) for c in channels),
        norm_num_groups=min(16, min(channels)), use_linear_projection=True, cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + pooled_dim,
    )


def transformer_config(width, num_layers, latent_channels, latent_size, joint_attention_dim, pooled_dim, patch_size):
    """SD3-medium's block (joint attention, AdaLN-zero) at toy sizes."""
    heads = max(1, width // 16)
    return dict(sample_size=latent_size, patch_size=patch_size, in_channels=latent_channels,
                out_channels=latent_channels,
                num_layers=num_layers, attention_head_dim=width // heads, num_attention_heads=heads,
                joint_attention_dim=joint_attention_dim, caption_projection_dim=width,
                pooled_projection_dim=pooled_dim, pos_embed_max_size=latent_size // patch_size, qk_norm="rms_norm")


class RepeatedLastTokenAttention:
    """SD3 joint attention in which the last context token stands for `count` identical copies.

    Without T5 the SD3 pipeline appends max_sequence_length (default 256) identical zero tokens to the
    CLIP tokens. Identical keys act as one key with its logit raised by log(count), and identical
    queries get identical outputs, so a single zero token with this bias computes the same function
    at a fraction of the cost (16 image tokens vs 272 context tokens here). Used with
    encode_prompt(..., max_sequence_length=1); see `collapsed_t5`.
    """

    def __init__(self, count):
        self.log_count = math.log(count)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n = hidden_states.shape[:2]

        def split(x, norm):
            x = x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return x if norm is None else norm(x)

        c = encoder_hidden_states
        q = torch.cat([split(attn.to_q(hidden_states), attn.norm_q), split(attn.add_q_proj(c), attn.norm_added_q)], 2)
        k = torch.cat([split(attn.to_k(hidden_states), attn.norm_k), split(attn.add_k_proj(c), attn.norm_added_k)], 2)
        v = torch.cat([split(attn.to_v(hidden_states), None), split(attn.add_v_proj(c), None)], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_count
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        image, context = out[:, :n], out[:, n:]
        image = attn.to_out[1](attn.to_out[0](image))
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return image, context


SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length


class collapsed_t5:
    """Context manager: the T5-less SD3 transformer runs with one zero T5 token standing for
    `count` of them (RepeatedLastTokenAttention); pass `max_sequence_length=1` to the pipeline (or
    encode_prompt) inside. `pipe(..., max_sequence_length=1)` inside equals `pipe(...)` outside."""

    def __init__(self, transformer, count=SD3_T5_TOKENS):
        self.transformer, self.count = transformer, count

    def __enter__(self):
        self.saved = dict(self.transformer.attn_processors)
        self.transformer.set_attn_processor(RepeatedLastTokenAttention(self.count))
        return {"max_sequence_length": 1}

    def __exit__(self, *exc):
        self.transformer.set_attn_processor(self.saved)
        return False


def build_pipeline(layout, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, denoiser, flow_shift):
    from diffusers import (
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        StableDiffusion3Pipeline,
        StableDiffusionXLPipeline,
    )

    if layout == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=denoiser,
                                         scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG))
    return StableDiffusion3Pipeline(transformer=denoiser, scheduler=FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=flow_shift), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None)


@torch.no_grad()
def encode_captions(pipe, layout, captions):
    """(prompt embeds [K, L, D], pooled [K, P], unconditional prompt [L, D], unconditional pooled [P])
    exactly as the pipeline computes them (SDXL: zeros; SD3: the empty negative prompt). SD3: with
    one zero T5 token standing for 256 (run the transformer inside `collapsed_t5`)."""
    if layout == "sdxl":
        pe, ne, pooled, npooled = pipe.encode_prompt(captions, device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=True)
    else:
        pe, ne, pooled, npooled = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None, device="cpu",
                                                     num_images_per_prompt=1, do_classifier_free_guidance=True,
                                                     max_sequence_length=1)
    return pe, pooled, ne[0], npooled[0]


def sdxl_time_ids(resolution, n):
    """SDXL's add_time_ids at the default size: original (H, W), crop (0, 0), target (H, W)."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32).expand(n, -1)


def flow_times(n, kind, gen):
    """Flow times s ∈ (0, 1): logit-normal(0, 1) (SD3's), uniform, or half of each ("mixed")."""
    logit_normal = torch.sigmoid(torch.randn(n, generator=gen))
    uniform = torch.rand(n, generator=gen)
    if kind == "logit_normal":
        return logit_normal
    if kind == "uniform":
        return uniform
    return torch.where(torch.arange(n) % 2 == 0, logit_normal, uniform)


def lr_factor(step, args):
    """Linear warm-up, then constant or cosine decay to zero at the last step."""
    warm = min(1.0, (step + 1) / max(args.lr_warmup_steps, 1))
    if args.lr_scheduler == "constant":
        return warm
    done = min(1.0, max(0, step - args.lr_warmup_steps) / max(1, args.max_train_steps - args.lr_warmup_steps))
    return warm * 0.5 * (1 + math.cos(math.pi * done))


def sdxl_alphas_cumprod():
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    return DDPMScheduler(**{k: SDXL_SCHEDULER_CONFIG[k] for k in keys}).alphas_cumprod


def sdxl_loss(unet, x0, cond, cond_pooled, time_ids, alphas_cumprod, snr_gamma, gen, high_fraction=0.0, high_min=900,
              snr_floor=0.0):
    """ε-prediction loss at t ~ U{0, …, 999} on SDXL's schedule, min-SNR-γ weighted when γ > 0; with
    high_fraction > 0 that fraction of the samples draws t ~ U{high_min, …, 999} instead."""
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=gen)
    if high_fraction > 0:
        pick = torch.rand(x0.shape[0], generator=gen) < high_fraction
        t = torch.where(pick, torch.randint(high_min, len(alphas_cumprod), (x0.shape[0],), generator=gen), t)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=cond,
                added_cond_kwargs={"text_embeds": cond_pooled, "time_ids": time_ids}, return_dict=False)[0]
    snr = a / (1 - a)
    weight = snr.clamp(max=snr_gamma) / snr if snr_gamma else torch.ones_like(snr)
    if snr_floor:  # x₀-space weight at least snr_floor: ε errors at low SNR cost what they do to x₀
        weight = weight.clamp(min=snr_floor / snr)
    return (weight * (pred - noise) ** 2).mean()


def flow_loss(transformer, x0, cond, cond_pooled, time_sampling, gen):
    """Rectified flow: x_s = (1 − s)·x₀ + s·ε at timestep 1000·s, target velocity ε − x₀."""
    noise = torch.randn(x0.shape, generator=gen)
    s = flow_times(x0.shape[0], time_sampling, gen).view(-1, 1, 1, 1)
    pred = transformer(hidden_states=(1 - s) * x0 + s * noise, timestep=1000 * s.flatten(), encoder_hidden_states=cond,
                       pooled_projections=cond_pooled, return_dict=False)[0]
    return F.mse_loss(pred, noise - x0)


def train_denoiser(denoiser, args, x0_all, cap_index, cond, uncond, resolution):
    """AdamW on the layout's loss with caption dropout to the pipeline's unconditional input.

    x0_all: scaled latents of the training images; cap_index: each image's caption row in
    cond = (prompt embeds, pooled); uncond = the unconditional (prompt embed, pooled).
    Returns (EMA copy, seconds, final smoothed loss).
    """
    sd3 = args.layout == "sd3"
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    denoiser.train()
    opt = torch.optim.AdamW(denoiser.parameters(), lr=args.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args))
    gen = torch.Generator().manual_seed(args.seed + 4)
    if not sd3:
        alphas_cumprod, time_ids = sdxl_alphas_cumprod(), sdxl_time_ids(resolution, args.batch_size)
    start, running = time.time(), None
    bar = tqdm(range(args.max_train_steps), desc=f"{args.layout} teacher", dynamic_ncols=True)
    with collapsed_t5(denoiser) if sd3 else contextlib.nullcontext():
        for step in bar:
            idx = torch.randint(len(x0_all), (args.batch_size,), generator=gen)
            drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
            pe = torch.where(drop[:, None, None], uncond[0], cond[0][cap_index[idx]])
            pooled = torch.where(drop[:, None], uncond[1], cond[1][cap_index[idx]])
            if sd3:
                loss = flow_loss(denoiser, x0_all[idx], pe, pooled, args.flow_time_sampling, gen)
            else:
                loss = sdxl_loss(denoiser, x0_all[idx], pe, pooled, time_ids, alphas_cumprod, args.snr_gamma, gen,
                                 args.high_timestep_fraction, args.high_timestep_min, args.snr_floor)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(denoiser.parameters(), args.max_grad_norm)
            opt.step()
            sched.step()
            decay = min(args.ema_max_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe_, p in zip(ema.parameters(), denoiser.parameters()):
                    pe_.lerp_(p, 1 - decay)
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}")
            if (step + 1) % args.log_every == 0 or step + 1 == args.max_train_steps:
                bar.write(f"step {step + 1}: loss {running:.4f} ({time.time() - start:.0f} s)")
    return ema.eval(), round(time.time() - start, 1), running


# ----------------------------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------------------------

# Settings that define the teacher: a finished teacher trained with others is retrained.
IDENTITY = ("layout", "data_dir", "seed", "max_length", "text_widths", "text_layers", "projection_dim",
            "embedding_std",
            "text_pretrain_steps", "text_pretrain_lr", "vae_channels", "vae_steps", "vae_batch_size",
            "vae_learning_rate", "vae_kl_weight", "channels", "num_layers", "patch_size", "max_train_steps",
            "batch_size", "learning_rate", "lr_warmup_steps", "lr_scheduler", "max_grad_norm", "ema_max_decay",
            "caption_dropout", "high_timestep_fraction", "high_timestep_min", "snr_gamma", "snr_floor",
            "flow_time_sampling", "flow_shift")


def is_finished(output_dir, args):
    path = os.path.join(output_dir, COMPLETE)
    if not os.path.exists(path):
        return False
    saved = json.load(open(path)).get("config", {})
    return all(saved.get(k) == getattr(args, k) for k in IDENTITY)


def load_teacher(path, layout=None):
    """The saved teacher pipeline (SD3 without T5), progress bar off."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    if layout is None:
        layout = "sd3" if json.load(open(os.path.join(path, "model_index.json")))["_class_name"].startswith(
            "StableDiffusion3") else "sdxl"
    if layout == "sd3":
        pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gray_uint8(images):
    """Pipeline output (output_type="pt", [N, 3, H, W] in [0, 1]) → uint8 gray [N, 1, H, W]."""
    return (images.float().mean(1, keepdim=True).clamp(0, 1) * 255).round().to(torch.uint8)


def grid_image(images_u8, cols):
    """uint8 [N, 1, H, W] → one PIL grid, `cols` per row, 1 px white gaps, 3× nearest upscale."""
    from PIL import Image

    n, _, h, w = images_u8.shape
    rows = -(-n // cols)
    canvas = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), 255, np.uint8)
    for i, im in enumerate(images_u8[:, 0].numpy()):
        r, c = divmod(i, cols)
        canvas[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = im
    img = Image.fromarray(canvas, mode="L")
    return img.resize((img.width * 3, img.height * 3), Image.NEAREST)


def fast_t5_zeros(pipe):
    """`collapsed_t5` for a T5-less SD3 pipeline (then pass its kwargs to the call), else a no-op."""
    if getattr(pipe, "transformer", None) is not None and getattr(pipe, "text_encoder_3", None) is None:
        return collapsed_t5(pipe.transformer)
    return contextlib.nullcontext({})


def check_grid(pipe, prompts, steps, guidance_scale, seed):
    """One 25-step CFG sample per prompt, through the pipeline itself."""
    with fast_t5_zeros(pipe) as kw:
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
                   generator=torch.Generator().manual_seed(seed), **kw).images
    return gray_uint8(out)


def main(argv=None):
    args = parse_args(argv)
    args.data_dir = os.path.abspath(args.data_dir)
    sd3 = args.layout == "sd3"
    if is_finished(args.output_dir, args) and not args.overwrite:
        print(f"Text-to-image teacher already trained: {args.output_dir} (pass --overwrite to retrain).")
        return args.output_dir
    if not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"No data at {args.data_dir}: run examples/digits/prepare_text2image.py first.")
    torch.manual_seed(args.seed)
    start = time.time()
    gray, texts, labels = load_split_text(args.data_dir, "train")
    images = to_rgb(gray)
    resolution = images.shape[-1]
    heldout = read_prompts(args.data_dir, "heldout")
    bar_write = tqdm.write

    # Text side: tokenizers over every caption word; small CLIPs, pretrained briefly, then frozen.
    words = caption_words(read_prompts(args.data_dir, "train") + heldout + texts)
    tokenizer = build_tokenizer(words, args.max_length, pad_with_eos=True)
    tokenizer_2 = build_tokenizer(words, args.max_length, pad_with_eos=False)
    widths = ints(args.text_widths)
    # SDXL: text_encoder is a plain CLIPTextModel; SD3: both carry projections (pooled = both concatenated).
    text_encoder = build_text_encoder(tokenizer, widths[0], args.text_layers, args.projection_dim, args.embedding_std,
                                      sd3, args.seed + 1)
    text_encoder_2 = build_text_encoder(tokenizer_2, widths[1], args.text_layers, args.projection_dim,
                                        args.embedding_std, True, args.seed + 2)
    pooled_dim = args.projection_dim * (2 if sd3 else 1)
    captions = sorted(set(texts))
    cap_digits = [int(labels[texts.index(c)]) for c in captions]
    t_text = time.time()
    text_losses = [pretrain_text_encoder(m, t, captions, cap_digits, args.text_pretrain_steps, args.text_pretrain_lr,
                                         args.seed + 5 + i)
                   for i, (m, t) in enumerate(((text_encoder, tokenizer), (text_encoder_2, tokenizer_2)))]
    if args.text_pretrain_steps > 0:
        bar_write(f"Text encoders pretrained ({args.text_pretrain_steps} steps, final losses "
                  f"{text_losses[0]:.4f} / {text_losses[1]:.4f}, {time.time() - t_text:.0f} s)")

    vae, latent_means, info = train_vae(images, args, sd3, bar_write)
    latent_channels, latent_size = latent_means.shape[1], latent_means.shape[-1]

    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    torch.manual_seed(args.seed + 3)
    if sd3:
        denoiser = SD3Transformer2DModel(**transformer_config(int(args.channels), args.num_layers, latent_channels,
                                                              latent_size, sum(widths), pooled_dim, args.patch_size))
    else:
        denoiser = UNet2DConditionModel(**unet_config(ints(args.channels), latent_channels, latent_size, sum(widths),
                                                      pooled_dim))
    pipe = build_pipeline(args.layout, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, denoiser,
                          args.flow_shift)
    pipe.set_progress_bar_config(disable=True)

    # Every distinct caption encoded once by the pipeline; each image indexes its caption.
    cap_index = torch.tensor([captions.index(t) for t in texts])
    pe, pooled, uncond_pe, uncond_pooled = encode_captions(pipe, args.layout, captions)
    same, other = cosine_by_digit(pooled, cap_digits)
    bar_write(f"Text: {len(tokenizer)} tokens, prompt embeddings {tuple(pe.shape[1:])}, pooled {pooled.shape[1]}; "
              f"{len(captions)} training captions; mean pooled cosine {same:.3f} between captions of the same digit, "
              f"{other:.3f} of different digits")

    bar_write(f"{'Transformer' if sd3 else 'UNet'}: {sum(p.numel() for p in denoiser.parameters()) / 1e6:.2f} M "
              f"parameters, latents {latent_channels}×{latent_size}×{latent_size}, {len(images)} training digits, "
              f"{args.max_train_steps} steps of {args.batch_size}.")
    x0_all = (latent_means - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor  # posterior means
    ema, info["denoiser_seconds"], info["final_loss"] = train_denoiser(
        denoiser, args, x0_all, cap_index, (pe, pooled), (uncond_pe, uncond_pooled), resolution)

    # Save the EMA pipeline, reload it, write the check grid, then the completion marker.
    final = build_pipeline(args.layout, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, ema,
                           args.flow_shift)
    tmp = args.output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    final.save_pretrained(tmp)
    if os.path.isdir(args.output_dir):
        shutil.rmtree(args.output_dir)
    os.replace(tmp, args.output_dir)
    t_check = time.time()
    reloaded = load_teacher(args.output_dir, args.layout)
    check_prompts = read_prompts(args.data_dir, "train")[:10] + heldout[:10]
    samples = check_grid(reloaded, check_prompts, args.check_steps, args.check_guidance_scale, args.seed)
    save_png(os.path.join(args.output_dir, "samples.png"), grid_image(samples, 10))
    info.update(check_seconds=round(time.time() - t_check, 1), seconds=round(time.time() - start, 1),
                check_prompts=check_prompts, config=vars(args))
    write_json(os.path.join(args.output_dir, COMPLETE), info)
    print(f"Saved the EMA {args.layout} teacher to {args.output_dir} ({info['seconds']} s: VAE "
          f"{info['vae_seconds']} s, denoiser {info['denoiser_seconds']} s, check {info['check_seconds']} s); "
          f"check grid "
          f"{os.path.join(args.output_dir, 'samples.png')} (rows: first training template, first held-out ones).")
    return args.output_dir


def cosine_by_digit(v, digits):
    """Mean cosine between distinct rows naming the same digit, and between rows naming different ones."""
    v = F.normalize(v.float(), dim=1)
    sim = v @ v.T
    d = torch.as_tensor(digits)
    same = (d[:, None] == d[None]) & ~torch.eye(len(d), dtype=torch.bool)
    return sim[same].mean().item(), sim[d[:, None] != d[None]].mean().item()


if __name__ == "__main__":
    main()
