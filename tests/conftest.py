import os
import sys

# Offline by construction: no hub look-ups from any library under test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))  # eval_utils, the evaluation examples

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny random StableDiffusionXLPipeline saved once per test session (tests/tiny_sdxl.py).

    Pass it as --pretrained_model_name_or_path or load it with from_pretrained; do not write into it.
    """
    from tiny_sdxl import make_tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp("tiny_sdxl") / "pipeline"
    make_tiny_sdxl_pipeline(save_dir=str(path), seed=0)
    return str(path)
