# A tiny, randomly initialised StableDiffusionXLPipeline built offline, for tests.
#
# Same component classes and wiring as SDXL base 1.0 (two CLIP text encoders, the second with a
# projection; a "text_time" UNet with SDXL's block names; the SDXL scheduler config), at toy
# sizes: resolution 32 (latents 4×8×8), UNet channels (16, 32, 32). The tokenizer uses the real
# CLIP BPE vocabulary that open_clip ships (49,408 tokens), so prompts tokenize as in SDXL.

import gzip
import importlib.util
import os

import torch

RESOLUTION = 32  # pixels; the VAE downsamples by 4, so latents are 8×8
TEXT_HIDDEN = (32, 32)  # hidden sizes of text_encoder and text_encoder_2
PROJECTION_DIM = 32  # text_encoder_2's pooled projection
ADDITION_TIME_EMBED_DIM = 8

SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)


def _bytes_to_unicode():
    """GPT-2/CLIP byte → printable-unicode table (the one CLIPTokenizer's vocab is written in)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
          list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_bpe_vocab_and_merges():
    """(vocab dict, merges list) of OpenAI CLIP's tokenizer, from open_clip's shipped BPE file.

    Mirrors open_clip.tokenizer.SimpleTokenizer: 256 bytes, the same with `</w>`, 48,894 merges,
    then the two special tokens (49,408 entries). open_clip is located without importing it
    (its import pulls in torchvision, which is slow).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("tests need open_clip_torch for the CLIP BPE vocabulary (see requirements.txt).")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    merges = [tuple(m.split()) for m in merges]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def make_tokenizers():
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
    # SDXL's tokenizer_2 (OpenCLIP bigG) pads with "!" (id 0) instead of <|endoftext|>.
    tok_2 = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token="!")
    return tok, tok_2


def make_tiny_sdxl_pipeline(save_dir=None, seed=0):
    """A tiny random StableDiffusionXLPipeline (float32, CPU), saved to save_dir if given.

    Deterministic for a given seed. Load the saved copy with
    `StableDiffusionXLPipeline.from_pretrained(save_dir)` or pass the folder to a script as
    `--pretrained_model_name_or_path`.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        transformer_layers_per_block=1,
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        use_linear_projection=True,
        cross_attention_dim=sum(TEXT_HIDDEN),
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + PROJECTION_DIM,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        scaling_factor=0.13025,  # SDXL's
    )

    def text_config(hidden, **kw):
        return CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,  # SDXL reads the penultimate layer
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
            hidden_act="gelu",
            **kw,
        )

    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(text_config(TEXT_HIDDEN[0]))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(TEXT_HIDDEN[1], projection_dim=PROJECTION_DIM))
    tokenizer, tokenizer_2 = make_tokenizers()
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    if save_dir is not None:
        pipe.save_pretrained(save_dir)
    return pipe
