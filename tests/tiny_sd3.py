# A tiny, randomly initialised StableDiffusion3Pipeline built offline, for tests.
#
# Same component classes and wiring as Stable Diffusion 3 (two CLIP text encoders, both with a
# projection; an MMDiT SD3Transformer2DModel whose last joint block is `context_pre_only`; a
# 16-channel VAE with SD3's scaling and shift factors; the SD3 flow-matching scheduler config),
# without T5 by default (`text_encoder_3=None`: the pipeline then feeds zeros in its place; t5=True
# adds a one-layer T5 encoder of the joint attention's width with a letters-only Unigram tokenizer), at toy sizes:
# resolution 32 (latents 16×8×8, a 4×4 token grid with patch size 2). The tokenizers are the
# ones of tests/tiny_sdxl.py (the real CLIP BPE vocabulary).

import torch

from tiny_sdxl import make_tokenizers

RESOLUTION = 32  # pixels; the VAE downsamples by 4, so latents are 8×8
LATENT_CHANNELS = 16
TEXT_HIDDEN = (32, 48)  # hidden sizes (= projection sizes) of the CLIP-L-like and CLIP-G-like encoders
JOINT_ATTENTION_DIM = 96  # T5's width in SD3 (4096); the CLIP states [.., 32 + 48] are zero-padded to it
NUM_LAYERS = 3  # joint blocks; the last is context_pre_only
NUM_HEADS, HEAD_DIM = 2, 16  # inner width 32
PATCH_SIZE = 2
POS_EMBED_MAX_SIZE = 8  # token grids up to 8×8 (latents up to 16×16, images up to 64×64)

SD3_VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)


def tiny_sd3_transformer(variant="sd3", seed=0):
    """A small SD3Transformer2DModel. variant "sd35" adds SD3.5-medium's traits: RMS q/k norm and a
    second (image-only) attention in the first blocks (`dual_attention_layers`)."""
    from diffusers import SD3Transformer2DModel

    extra = {}
    if variant == "sd35":
        extra = dict(qk_norm="rms_norm", dual_attention_layers=tuple(range(NUM_LAYERS - 1)))
    elif variant != "sd3":
        raise ValueError(f"Unknown tiny SD3 variant {variant!r}; choose sd3 or sd35.")
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=RESOLUTION // 4,
        patch_size=PATCH_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=NUM_LAYERS,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=NUM_HEADS,
        joint_attention_dim=JOINT_ATTENTION_DIM,
        caption_projection_dim=NUM_HEADS * HEAD_DIM,  # must equal the inner width (SD3: 1536 = 24·64)
        pooled_projection_dim=sum(TEXT_HIDDEN),  # CLIP-L and CLIP-G pooled projections, concatenated
        pos_embed_max_size=POS_EMBED_MAX_SIZE,
        **extra,
    )


def tiny_t5(seed=0):
    """(T5EncoderModel, T5 tokenizer) of SD3's third text encoder at toy size: one layer of width
    JOINT_ATTENTION_DIM (SD3 pads the CLIP states to T5's width), a Unigram vocabulary of the letters."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(vocab), d_model=JOINT_ATTENTION_DIM, d_kv=16, d_ff=64, num_layers=1,
                      num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config), tokenizer


def make_tiny_sd3_pipeline(save_dir=None, seed=0, variant="sd3", t5=False):
    """A tiny random StableDiffusion3Pipeline (float32, CPU, no T5 unless t5), saved to save_dir if given.

    Deterministic for a given seed. Load the saved copy without T5 with
    `StableDiffusion3Pipeline.from_pretrained(save_dir, text_encoder_3=None, tokenizer_3=None)`.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    transformer = tiny_sd3_transformer(variant, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        use_quant_conv=False,  # SD3's VAE has neither quant conv
        use_post_quant_conv=False,
        **SD3_VAE_FACTORS,
    )

    def text_encoder(hidden):
        config = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            projection_dim=hidden,
            num_hidden_layers=2,  # SD3 reads the penultimate layer
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
            hidden_act="gelu",
        )
        return CLIPTextModelWithProjection(config)

    torch.manual_seed(seed + 2)
    text_encoder_1 = text_encoder(TEXT_HIDDEN[0])
    torch.manual_seed(seed + 3)
    text_encoder_2 = text_encoder(TEXT_HIDDEN[1])
    tokenizer, tokenizer_2 = make_tokenizers()
    text_encoder_3, tokenizer_3 = tiny_t5(seed + 4) if t5 else (None, None)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder_1,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    if save_dir is not None:
        pipe.save_pretrained(save_dir)
    return pipe
