# Smoke test of benchmarks/bench_train_step.py: the --tiny table runs end to end on the CPU and
# reports finite numbers for every configuration (speed is measured by the script, not asserted).
import json
import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_train_step.py")


def test_tiny_table_has_finite_numbers_for_every_configuration(tmp_path):
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--config", "all", "--repeats", "1",
                           "--output_json", str(out_json)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Main table: one row per configuration, every cell after the batch a finite number.
    lines = proc.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("| configuration | params"))
    cols = [c.strip() for c in lines[header].strip("|").split("|")]
    assert cols[3:] == ["step ms", "img/s", "peak mem", "floor ms", "step/floor", "no-stop ms", "no-stop/floor",
                        "early stop saves", "losses+pool", "DMD2 ms", "TFD/DMD2"]
    rows = []
    for ln in lines[header + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip("|").split("|")])
    names = [r[0] for r in rows]
    assert len(rows) == 3, names  # ImageNet-64 (fp32 teacher on a CPU), SDXL full and LoRA at 1 prompt
    assert names[0].startswith("ImageNet-64 ADM") and "full FT" in names[1] and "LoRA" in names[2]
    for r in rows:
        assert len(r) == len(cols)
        for cell in r[3:]:
            value = float(re.sub(r"[^0-9.eE+-]", "", cell.replace("GiB", "")))
            assert math.isfinite(value), (r[0], cell)

    # Split table: the same rows, each part finite and non-negative.
    split = next(i for i, ln in enumerate(lines) if ln.startswith("| configuration | student fwd+bwd"))
    split_rows = [ln for ln in lines[split + 2:split + 2 + len(rows)]]
    assert [ln.strip("|").split("|")[0].strip() for ln in split_rows] == names

    # JSON: the split adds up to the step, ratios agree with the times, the networks are built.
    res = json.loads(out_json.read_text())["results"]
    assert [r["config"] for r in res] == names
    for r in res:
        s = r["split"]
        parts = sum(s[k] for k in ("data", "student", "teacher_gen", "teacher_ref", "losses", "optim"))
        assert abs(parts - s["total"]) <= 1e-6 * max(s["total"], 1) + 1e-3, (r["config"], s)
        assert all(s[k] >= 0 for k in s), s
        assert r["step_ms"] > 0 and r["floor_ms"] > 0 and r["dmd2_ms"] > 0 and r["nostop_ms"] > 0
        assert math.isclose(r["step_over_floor"], r["step_ms"] / r["floor_ms"])
        assert math.isclose(r["tfd_over_dmd2"], r["step_ms"] / r["dmd2_ms"])
        # (timings of toy networks on a loaded CPU are noisy: the early-stop share is checked as derived)
        ns = r["nostop_split"]
        saves = 1 - (s["teacher_gen"] + s["teacher_ref"]) / (ns["teacher_gen"] + ns["teacher_ref"])
        assert math.isclose(r["early_stop_saves"], saves) and r["early_stop_saves"] < 1
        assert 0 <= r["loss_pool_share"] < 1
        assert r["images_per_step"] == r["groups"] * 2 and r["params"] > 0
        assert not any(k.endswith("_error") for k in r), r


def test_real_configs_have_the_published_parameter_counts():
    """The full-size networks are the real layouts: ADM ImageNet-64 ~296M, SDXL base ~2.57B parameters."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch
    from diffusers import UNet2DConditionModel, UNet2DModel

    import tfd_utils
    from bench_train_step import ADM_IMAGENET64, SDXL_BASE, count_params

    with torch.device("meta"):
        adm, sdxl = UNet2DModel(**ADM_IMAGENET64), UNet2DConditionModel(**SDXL_BASE)
    assert abs(count_params(adm) - 295.9e6) < 0.1e6
    assert abs(count_params(sdxl) - 2567.5e6) < 0.1e6
    # The recipe's layers exist in both (enc:6 ... dec:12 need the 16-unit ADM encoder).
    assert tfd_utils.resolve_layers(adm, ["enc:6", "enc:11", "bottleneck", "dec:7", "dec:12"])[2] == "down_blocks.3.attentions.2"
    assert tfd_utils.resolve_layers(sdxl, ["down_blocks.2", "mid_block", "up_blocks.0"])
