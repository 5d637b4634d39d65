"""One step of train_tfd_imagenet64.py on the real ADM ImageNet-64 architecture (CPU, offline).

The teacher is a diffusers UNet2DModel with the openai consistency-models conversion's config
(benchmarks/real_arch.ADM_IMAGENET64: 296 M parameters, random weights), the recipe's five
layers (enc:6 enc:11 bottleneck dec:7 dec:12), 64 px labelled images, and the smallest batch with
groups: 2 classes x (N=2, P=2, M=2). It checks that the real layer names, shapes and memory work
together, which the tiny UNets of the other tests cannot. Its time and memory: docs/testing.md.
"""

import ctypes
import gc
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train_tfd_imagenet64 as script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["enc:6", "enc:11", "bottleneck", "dec:7", "dec:12"]


@pytest.fixture(autouse=True)
def give_memory_back():
    """glibc keeps the freed heap (~7 GB after this run) for the rest of the session: hand it back."""
    yield
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@pytest.fixture(scope="module")
def adm_teacher_and_data(tmp_path_factory):
    """The random-weight ADM teacher saved as a diffusers folder, and an imagefolder of 2 classes x 4 images."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from diffusers import UNet2DModel

    from real_arch import ADM_IMAGENET64

    root = tmp_path_factory.mktemp("adm64")
    torch.manual_seed(0)
    UNet2DModel(**ADM_IMAGENET64).save_pretrained(root / "teacher")
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(root / "data" / str(c))
        for i in range(4):
            image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            image.save(root / "data" / str(c) / f"{i}.png")
    yield root
    shutil.rmtree(root, ignore_errors=True)  # 1.2 GB; pytest keeps the last three runs' folders


def test_one_step_on_the_real_adm_imagenet64_unet(adm_teacher_and_data, tmp_path):
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from diffusers import UNet2DModel

    root, out = adm_teacher_and_data, tmp_path / "out"
    argv = ["--pretrained_teacher_model", str(root / "teacher"), "--train_data_dir", str(root / "data"),
            "--feature_layers", " ".join(LAYERS), "--classes_per_batch", "2", "--num_generated", "2",
            "--num_positives", "2", "--num_anchors", "2", "--lr_warmup_steps", "0", "--max_train_steps", "1",
            "--checkpointing_steps", "1000", "--validation_steps", "0", "--logging_steps", "1",
            "--num_validation_images", "2", "--report_to", "none", "--mixed_precision", "no",
            "--output_dir", str(out)]
    try:
        script.main(script.parse_args(argv))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()

    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["step"] for r in rows] == [1]
    row = rows[0]
    assert np.isfinite(row["loss/total"]) and row["train/bad_steps"] == 0 and np.isfinite(row["train/grad_norm"])
    for layer in LAYERS:  # every layer of the recipe gave a drifting loss, its forces and an anchor loss
        assert np.isfinite(row[f"drift/{layer}"]) and np.isfinite(row[f"anchor/{layer}"]), layer
        assert all(np.isfinite(row[f"force/{layer}/r{r}"]) for r in ("0.02", "0.05", "0.1", "0.2")), layer
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "samples.png", "README.md"):
        assert (out / name).exists(), name
    unet_config = UNet2DModel.load_config(out / "unet")
    assert tuple(unet_config["block_out_channels"]) == (192, 384, 576, 768) and unet_config["num_class_embeds"] == 1000
    shutil.rmtree(out)  # the 1.2 GB export
