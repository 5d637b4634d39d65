"""A script's imports are its copy list: each training script, copied with the project modules it imports
(and nothing else: no tests/, no examples/), runs from a fresh folder. docs/forking.md names the same
files."""

import ast
import os
import shutil
import subprocess
import sys

import pytest

from scaling_helpers import ROOT, imagenet_args, sdxl_args

COPY_LIST = {
    "train_tfd_imagenet64.py": ["tfd_utils.py", "tfd_training.py", "tfd_fid.py"],
    "train_tfd_sdxl.py": ["tfd_utils.py", "tfd_training.py", "tfd_text2image.py"],
    "train_tfd_sd3.py": ["tfd_utils.py", "tfd_training.py", "tfd_text2image.py"],
}


def project_imports(path, seen=None):
    """Project modules (files next to the scripts) a file imports, directly or through each other."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(open(path).read())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            file = name.split(".")[0] + ".py"
            if os.path.isfile(os.path.join(ROOT, file)) and file not in seen:
                seen.add(file)
                project_imports(os.path.join(ROOT, file), seen)
    return seen


@pytest.mark.parametrize("script", sorted(COPY_LIST))
def test_copy_list_is_what_the_script_imports_and_the_forking_page_names_it(script):
    assert project_imports(os.path.join(ROOT, script)) == set(COPY_LIST[script])
    assert f"cp {script} {' '.join(COPY_LIST[script])} " in open(os.path.join(ROOT, "docs", "forking.md")).read()
    for other in COPY_LIST:  # scripts never import each other
        assert other not in project_imports(os.path.join(ROOT, script))


def run_fresh(tmp_path, script, argv):
    fresh = tmp_path / "fork"
    fresh.mkdir()
    for name in [script, *COPY_LIST[script]]:
        shutil.copy(os.path.join(ROOT, name), fresh / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, script, *argv], cwd=fresh, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_imagenet64_runs_from_a_fresh_folder(tiny_imagenet, tmp_path):
    out = tmp_path / "out"
    run_fresh(tmp_path, "train_tfd_imagenet64.py", imagenet_args(tiny_imagenet, out, "--max_train_steps", 1))
    assert (out / "model_index.json").is_file()


def test_sdxl_runs_from_a_fresh_folder(tiny_sdxl_dir, prompts_file, tmp_path):
    out = tmp_path / "out"
    run_fresh(tmp_path, "train_tfd_sdxl.py", sdxl_args(tiny_sdxl_dir, prompts_file, out, tmp_path / "c",
                                                       "--max_train_steps", 1))
    assert (out / "model_index.json").is_file()


def test_sd3_runs_from_a_fresh_folder(prompts_file, tmp_path):
    from tiny_sd3 import make_tiny_sd3_pipeline

    make_tiny_sd3_pipeline(save_dir=str(tmp_path / "sd3"), seed=0)
    out = tmp_path / "out"
    run_fresh(tmp_path, "train_tfd_sd3.py", sdxl_args(str(tmp_path / "sd3"), prompts_file, out, tmp_path / "c",
                                                      "--max_train_steps", 1, "--feature_layers", "block:0"))
    assert (out / "model_index.json").is_file()
