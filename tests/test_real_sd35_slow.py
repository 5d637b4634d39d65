"""One LoRA step of train_tfd_sd3.py on the published SD3.5-medium transformer, then the exported LoRA in the
teacher pipeline (CPU, offline). The real-size test is marked `slow`: not in `make test`; run it with
`make test-slow`. `make test` runs the same three stages on toy-width models of the same layouts (--tiny), and
checks the parameter counts of the three published SD3 configs (built on the meta device).

The pipeline (benchmarks/real_arch.py build-sd3 --model sd35-medium): SD3.5-medium's transformer config as
published (24 joint blocks of 24 heads x 64, the first 13 with a second image-only attention, RMS q/k norm:
2.24 B parameters and the 226 M position table), the SD3 VAE config, CLIP-L/G text encoders of the real widths
(768; 1280, both with projections) with 2 layers each, no T5, the tiny tests' tokenizers; random weights. The run:
LoRA r4 at 256 px, the default layer (block:1/2, transformer_blocks.11: a dual-attention block),
--gradient_checkpointing, --drop_t5, 1 prompt, N = 2, P = 2 teacher positives of 1 sampling step, one update.
Then the user's lines: the teacher pipeline without T5, load_lora_weights, one step with guidance 1.0, a 256 px
image. Building, training and inference are three processes, so the builder's copy of the weights never adds to
the training run's memory. Time and memory measured: docs/testing.md. It skips itself with less than NEEDS_GB GB
of memory available.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from safetensors import safe_open

from scaling_helpers import mem_available_gb, real_arch_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS_GB = 13  # peak RSS of the largest stage (the training run) is 11.8 GB
PROMPT = "a photo of a red fox in the snow"


def train_args(pipe_dir, prompts, out, resolution):
    return ["--pretrained_model_name_or_path", pipe_dir, "--prompts_file", prompts, "--resolution", resolution,
            "--drop_t5", "--train_mode", "lora", "--lora_rank", 4, "--lora_alpha", 4, "--gradient_checkpointing",
            "--prompts_per_batch", 1, "--num_generated", 2, "--num_positives", 2, "--num_positive_steps", 1,
            "--max_train_steps", 1, "--learning_rate", "1e-4", "--lr_warmup_steps", 0, "--checkpointing_steps", 1000,
            "--validation_steps", 0, "--validation_prompts", "a cat", "--logging_steps", 1, "--report_to", "none",
            "--mixed_precision", "no", "--output_dir", out]


def check_run(out, made, resolution):
    """One finite update at the default layer; LoRA weights only, with adapters on the second attention of the
    dual-attention blocks; the loaded adapters change the one-step image."""
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in rows] == [1]
    assert np.isfinite(rows[0]["loss/total"]) and rows[0]["train/bad_steps"] == 0
    assert np.isfinite(rows[0]["drift/block:1/2"])  # the default layer
    assert (out / "pytorch_lora_weights.safetensors").exists() and not (out / "transformer").exists()
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(".attn2.to_q.lora_A" in k for k in keys) and any(".attn.add_q_proj.lora_B" in k for k in keys)
    assert made["image_size"] == [resolution, resolution] and made["latents_finite"] and made["pixel_std"] > 0
    assert made["lora_vs_base_max_diff"] > 0  # the loaded adapters change the one-step generator


def test_published_sd3_configs_have_the_model_cards_parameter_counts():
    """SD3 medium ~2.0 B, SD3.5 medium ~2.5 B, SD3.5 large ~8.1 B: the checkpoints' tensors (the parameters and
    the fixed sin-cos position table, a buffer, which the checkpoints store too)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import real_arch

    counts = {name: real_arch.sd3_param_counts(cfg) for name, cfg in real_arch.SD3_MODELS.items()}
    print({name: (p / 1e9, t / 1e9) for name, (p, t) in counts.items()})
    expected = {"sd3-medium": (2028.3e6, 2085.0e6, 2.0), "sd35-medium": (2243.2e6, 2469.7e6, 2.5),
                "sd35-large": (8056.6e6, 8146.3e6, 8.1)}
    for name, (params, tensors, card_b) in expected.items():
        assert abs(counts[name][0] - params) < 0.1e6 and abs(counts[name][1] - tensors) < 0.1e6, (name, counts[name])
        assert abs(counts[name][1] / 1e9 - card_b) < 0.1, name
    # The position table is pos_embed_max_size² tokens of the inner width.
    for name, cfg in real_arch.SD3_MODELS.items():
        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        assert counts[name][1] - counts[name][0] == cfg["pos_embed_max_size"] ** 2 * width
    assert real_arch.SD35_MEDIUM["dual_attention_layers"] == tuple(range(13))


def test_tiny_sd35_lora_step_and_load_lora_weights(tmp_path):
    """The stages of the slow test at toy width in one process (build-sd3 --tiny, train-sd3, infer-sd3)."""
    pipe_dir, out, prompts = tmp_path / "sd35-tiny", tmp_path / "lora", tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    built, trained, made = real_arch_stages("chain", "build-sd3", pipe_dir, "--model", "sd35-medium", "--tiny",
                                  "--", "train-sd3", *train_args(pipe_dir, prompts, out, 32),
                                  "--", "infer-sd3", pipe_dir, out, "--resolution", 32, timeout=300)
    assert [built["stage"], trained["stage"], made["stage"]] == ["build-sd3", "train-sd3", "infer-sd3"]
    config = json.loads((pipe_dir / "transformer" / "config.json").read_text())
    assert config["qk_norm"] == "rms_norm" and config["dual_attention_layers"] == [0, 1]
    assert not (pipe_dir / "text_encoder_3").exists()
    check_run(out, made, 32)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_lora_step_on_the_real_sd35_medium_transformer_and_load_lora_weights(tmp_path):
    if mem_available_gb() < NEEDS_GB:
        pytest.skip(f"needs {NEEDS_GB} GB of available memory, {mem_available_gb():.1f} GB available")
    pipe_dir, out = tmp_path / "sd35-medium-random", tmp_path / "lora"
    try:
        run_stages(pipe_dir, out, tmp_path)
    finally:
        shutil.rmtree(pipe_dir, ignore_errors=True)  # 10.9 GB; pytest keeps the last three runs' folders


def run_stages(pipe_dir, out, tmp_path):
    [built] = real_arch_stages("build-sd3", pipe_dir, "--model", "sd35-medium", timeout=1200)
    assert abs(built["params"]["transformer"] - 2243.2e6) < 0.1e6
    assert abs(built["transformer_checkpoint_numel"] - 2469.7e6) < 0.1e6
    assert built["params"]["vae"] > 80e6 and not (pipe_dir / "text_encoder_3").exists()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    [trained] = real_arch_stages("train-sd3", *train_args(pipe_dir, prompts, out, 256), timeout=1800)
    [made] = real_arch_stages("infer-sd3", pipe_dir, out, "--resolution", 256, timeout=1200)
    check_run(out, made, 256)
    print(json.dumps({"build": built, "train": trained, "infer": made}))
