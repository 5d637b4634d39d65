"""One LoRA step of train_tfd_sdxl.py on the real SDXL base architecture, then the exported LoRA in
the teacher pipeline (CPU, offline). Marked `slow`: not in `make test`; run it with `make test-slow`.

The pipeline: the SDXL base UNet config (2.57 B parameters), the real SDXL VAE config, CLIP text encoders of
the real widths (768; 1280 with a 1280 projection) with 2 layers each, the tiny tests' tokenizers; random
weights (benchmarks/real_arch.py). The run: LoRA r4 at 256 px, the default layers, --gradient_checkpointing,
1 prompt, N = 2, P = 2 teacher positives of 1 sampling step, one update. Then the teacher pipeline with
load_lora_weights and the saved one-step scheduler makes a 256 px image. Building, training and inference
are three processes, so the builder's copy of the weights never adds to the training run's memory. Time and
memory measured: docs/testing.md. It skips itself with less than 15 GB of memory available.
"""

import json
import os
import shutil

import numpy as np
import pytest

from scaling_helpers import mem_available_gb, real_arch_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDS_GB = 15  # peak RSS of the largest stage is ~14.5 GB


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_lora_step_on_the_real_sdxl_base_unet_and_load_lora_weights(tmp_path):
    if mem_available_gb() < NEEDS_GB:
        pytest.skip(f"needs {NEEDS_GB} GB of available memory, {mem_available_gb():.1f} GB available")
    pipe_dir, out = tmp_path / "sdxl-random", tmp_path / "lora"
    try:
        run_stages(pipe_dir, out, tmp_path)
    finally:
        shutil.rmtree(pipe_dir, ignore_errors=True)  # 10.6 GB; pytest keeps the last three runs' folders


def run_stages(pipe_dir, out, tmp_path):
    built = _last("build-sdxl", pipe_dir, timeout=1200)
    assert abs(built["params"]["unet"] - 2567.5e6) < 0.1e6
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red fox in the snow\n")
    trained = _last(
        "train-sdxl", "--pretrained_model_name_or_path", pipe_dir, "--prompts_file", prompts, "--resolution", 256,
        "--train_mode", "lora", "--lora_rank", 4, "--lora_alpha", 4, "--gradient_checkpointing",
        "--prompts_per_batch", 1, "--num_generated", 2, "--num_positives", 2, "--num_positive_steps", 1,
        "--max_train_steps", 1, "--learning_rate", "1e-4", "--lr_warmup_steps", 0, "--checkpointing_steps", 1000,
        "--validation_steps", 0, "--validation_prompts", "a cat", "--logging_steps", 1, "--report_to", "none",
        "--mixed_precision", "no", "--output_dir", out, timeout=1800)
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in rows] == [1]
    assert np.isfinite(rows[0]["loss/total"]) and rows[0]["train/bad_steps"] == 0
    for layer in ("down_blocks.2", "mid_block", "up_blocks.0"):  # the default layers
        assert np.isfinite(rows[0][f"drift/{layer}"]), layer
    assert (out / "pytorch_lora_weights.safetensors").exists() and not (out / "unet").exists()

    made = _last("infer-sdxl", pipe_dir, out, timeout=1200)
    assert made["image_size"] == [256, 256] and made["latents_finite"] and made["pixel_std"] > 0
    assert made["lora_vs_base_max_diff"] > 0  # the loaded adapters change the one-step generator
    print(json.dumps({"build": built, "train": trained, "infer": made}))


def _last(*argv, timeout):
    return real_arch_stages(*argv, timeout=timeout)[-1]
