# Smoke test of benchmarks/bench_train_step.py: the --tiny table runs end to end on the CPU, reports finite numbers
# for every configuration, and each row times its script's own train_step (speed is measured, not asserted).
import json
import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_train_step.py")
SCRIPTS = ("train_tfd_imagenet64", "train_tfd_sdxl", "train_tfd_sd3")
BUSY_S = 0.3

# Runs the benchmark with every script's train_step replaced by a wrapper that counts its calls and then keeps the
# CPU busy for BUSY_S: the bench looks the step up on the script's module, so the wrapper must be what it times.
WRAPPER = f"""
import json, runpy, sys, time
import {", ".join(SCRIPTS)}
calls = {{}}
def counted(module):
    step = module.train_step
    def train_step(*args, **kwargs):
        calls[module.__name__] = calls.get(module.__name__, 0) + 1
        start = time.process_time()
        while time.process_time() - start < {BUSY_S}:
            pass
        return step(*args, **kwargs)
    module.train_step = train_step
for module in ({", ".join(SCRIPTS)},):
    counted(module)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print("TRAIN_STEP_CALLS " + json.dumps(calls))
"""


def test_tiny_table_times_each_scripts_own_step(tmp_path):
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", WRAPPER, SCRIPT, "--tiny", "--config", "all", "--warmup", "0",
                           "--repeats", "2", "--output_json", str(out_json)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The table: one row per configuration, naming its script; every cell after the batch a finite number.
    lines = proc.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("| configuration | script"))
    cols = [c.strip() for c in lines[header].strip("|").split("|")]
    assert cols == ["configuration", "script", "params", "trainable", "batch", "step ms", "img/s", "peak mem",
                    "DMD2 ms", "TFD/DMD2"]
    rows = []
    for ln in lines[header + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    names, scripts = [r[0] for r in rows], [r[1] for r in rows]
    assert len(rows) == 5, names  # ImageNet-64 (fp32 teacher on a CPU); SDXL and SD3.5 full and LoRA at 1 prompt
    assert names[0].startswith("ImageNet-64 ADM") and scripts[0] == "train_tfd_imagenet64.py"
    for i, (model, script) in enumerate([("SDXL", "train_tfd_sdxl.py")] * 2 + [("SD3.5", "train_tfd_sd3.py")] * 2):
        assert names[1 + i].startswith(model) and scripts[1 + i] == script, (names, scripts)
        assert ("full FT" if i % 2 == 0 else "LoRA") in names[1 + i], names
    for r in rows:
        assert len(r) == len(cols)
        for cell in r[5:]:
            value = float(re.sub(r"[^0-9.eE+-]", "", cell.replace("GiB", "")))
            assert math.isfinite(value), (r[0], cell)

    # Each row called its script's train_step once per timed step (warmup 0, repeats 2) and the time includes it.
    calls = json.loads(next(ln for ln in lines if ln.startswith("TRAIN_STEP_CALLS "))[len("TRAIN_STEP_CALLS "):])
    assert calls == {"train_tfd_imagenet64": 2, "train_tfd_sdxl": 4, "train_tfd_sd3": 4}

    # JSON: the same rows, ratios agree with the times, the networks are built.
    res = json.loads(out_json.read_text())["results"]
    assert [r["config"] for r in res] == names and [r["script"] for r in res] == scripts
    for r in res:
        assert r["step_ms"] >= BUSY_S * 1e3 and len(r["step_all"]) == 2, r
        assert r["dmd2_ms"] > 0 and r["peak_bytes"] is not None
        assert math.isclose(r["tfd_over_dmd2"], r["step_ms"] / r["dmd2_ms"])
        assert r["images_per_step"] == r["groups"] * 2 and r["params"] >= r["trainable"] > 0
        assert not any(k.endswith("_error") for k in r), r


def test_real_configs_have_the_published_parameter_counts():
    """The full-size networks are the real layouts: ADM ImageNet-64 ~296M, SDXL base ~2.57B parameters."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch
    from diffusers import UNet2DConditionModel, UNet2DModel

    import tfd_utils
    from real_arch import ADM_IMAGENET64, SDXL_BASE

    with torch.device("meta"):
        adm, sdxl = UNet2DModel(**ADM_IMAGENET64), UNet2DConditionModel(**SDXL_BASE)
    assert abs(sum(p.numel() for p in adm.parameters()) - 295.9e6) < 0.1e6
    assert abs(sum(p.numel() for p in sdxl.parameters()) - 2567.5e6) < 0.1e6
    # The recipe's layers exist in both (enc:6 ... dec:12 need the 16-unit ADM encoder).
    layers = tfd_utils.resolve_layers(adm, ["enc:6", "enc:11", "bottleneck", "dec:7", "dec:12"])
    assert layers[2] == "down_blocks.3.attentions.2"
    assert tfd_utils.resolve_layers(sdxl, ["down_blocks.2", "mid_block", "up_blocks.0"])
