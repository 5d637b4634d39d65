import os
import shutil
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


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory):
    """A tiny class-conditional teacher (5 classes) and 4 classes × 12 images (save_to_disk), built with
    test_train_imagenet64's own constructors."""
    import datasets
    from PIL import Image

    from tiny_imagenet import class_images, tiny_teacher

    root = tmp_path_factory.mktemp("scaling_imagenet")
    tiny_teacher().save_pretrained(root / "teacher")
    images, labels = class_images()
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images], "label": labels}, features=feats)
    ds.save_to_disk(str(root / "data"))
    return root


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scaling_prompts") / "prompts.txt"
    from scaling_helpers import PROMPTS

    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def world(tmp_path_factory, tiny_sdxl_dir):
    """The three scripts' tiny teachers, each a folder with a README.md naming its licence; a prompt file;
    labelled images (arguments for them: scaling_helpers.argv_of)."""
    import datasets
    from PIL import Image

    from scaling_helpers import LICENSED_README, WORLD_PROMPTS
    from tiny_imagenet import class_images, tiny_teacher
    from tiny_sd3 import make_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_sdxl_dir, root / "sdxl_teacher")
    make_tiny_sd3_pipeline(save_dir=str(root / "sd3_teacher"), seed=0)
    tiny_teacher().save_pretrained(root / "imagenet64_teacher")
    for name in ("sdxl_teacher", "sd3_teacher", "imagenet64_teacher"):
        (root / name / "README.md").write_text(LICENSED_README)
    (root / "prompts.txt").write_text("\n".join(WORLD_PROMPTS) + "\n")
    images, labels = class_images()
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images], "label": labels},
                               features=feats).save_to_disk(str(root / "labelled"))
    return root


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny random StableDiffusion3Pipeline without T5 (tests/tiny_sd3.py), saved once per test session."""
    from tiny_sd3 import make_tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny_sd3") / "pipeline"
    make_tiny_sd3_pipeline(save_dir=str(path), seed=0)
    return str(path)
