"""benchmarks/gpu_check.sh --device cpu --tiny: every stage of the GPU check that can run on a CPU runs at toy sizes
and the table and JSON report them (the FSDP row is recorded as skipped, with the reason: accelerate has no FSDP on
a CPU); a stage that fails or times out is recorded and the summary still written."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STAGES = ["bench_imagenet64", "bench_sdxl", "bench_sd3", "script_imagenet64", "script_sdxl", "script_sd35_large_lora",
          "script_sd35_large_fsdp"]


def gpu_check(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", SCRIPT, "--device", "cpu", "--tiny", "--out", str(out), "--python", sys.executable,
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=580)


def test_gpu_check_tiny_runs_every_stage(tmp_path):
    proc = gpu_check(tmp_path / "gc")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gc" / "summary.json").read_text())
    assert list(summary["stages"]) == STAGES
    fsdp = summary["stages"].pop("script_sd35_large_fsdp")
    assert fsdp["status"] == "skipped" and "no FSDP on a CPU" in fsdp["reason"], fsdp
    assert all(st["status"] == "ok" for st in summary["stages"].values()), {
        k: st.get("log_tail") for k, st in summary["stages"].items() if st["status"] != "ok"}

    configs = {name: [r["config"] for r in summary["stages"][name]["results"]] for name in STAGES[:3]}
    assert len(configs["bench_imagenet64"]) == 1 and configs["bench_imagenet64"][0].startswith("ImageNet-64 ADM")
    for name in ("bench_sdxl", "bench_sd3"):
        assert len(configs[name]) == 2 and "full FT" in configs[name][0] and "LoRA" in configs[name][1]
    scripts = {"bench_imagenet64": "train_tfd_imagenet64.py", "bench_sdxl": "train_tfd_sdxl.py",
               "bench_sd3": "train_tfd_sd3.py"}
    for name in STAGES[:3]:
        for r in summary["stages"][name]["results"]:  # each row timed its script's own step
            assert r["script"] == scripts[name], r
            assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0 and r["peak_bytes"] is not None, r
            assert not any(k.endswith("_error") for k in r), r

    imagenet, sdxl = summary["stages"]["script_imagenet64"], summary["stages"]["script_sdxl"]
    sd35 = summary["stages"]["script_sd35_large_lora"]
    assert [p["stage"] for p in imagenet["processes"]] == ["build-adm", "images", "train-imagenet64"]
    assert [p["stage"] for p in sdxl["processes"]] == ["build-sdxl", "train-sdxl", "infer-sdxl"]
    assert [p["stage"] for p in sd35["processes"]] == ["build-sd3", "train-sd3", "infer-sd3"]
    assert sd35["processes"][0]["model"] == "sd35-large"
    for st in (imagenet, sdxl, sd35):
        assert [m["step"] for m in st["metrics"]] == [1] and math.isfinite(st["metrics"][0]["loss/total"])
    for st in (sdxl, sd35):
        infer = st["processes"][-1]
        assert infer["image_size"] == [32, 32] and infer["latents_finite"] and infer["lora_vs_base_max_diff"] > 0

    table = (tmp_path / "gc" / "summary.md").read_text()
    header = "| stage | status | configuration | batch | step ms | peak memory | largest groups that fit | notes |"
    assert header in table
    assert sum(line.startswith("| bench_") or line.startswith("| script_") for line in table.splitlines()) == 9
    assert "| script_sd35_large_fsdp | skipped |" in table and "no FSDP on a CPU" in table
    assert table.strip() in proc.stdout
    assert not (tmp_path / "gc" / "work").exists()  # the random models are removed


def test_gpu_check_records_a_timed_out_stage_and_still_writes_the_summary(tmp_path):
    proc = gpu_check(tmp_path / "gc", "--skip", "bench_imagenet64,bench_sdxl,bench_sd3,script_sdxl,"
                     "script_sd35_large_lora",
                     "--time_scale", "0.012")  # script_imagenet64 gets 1 s
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = json.loads((tmp_path / "gc" / "summary.json").read_text())["stages"]
    assert [stages[n]["status"] for n in STAGES] == ["skipped"] * 3 + ["timeout"] + ["skipped"] * 3
    assert "| script_imagenet64 | timeout |" in (tmp_path / "gc" / "summary.md").read_text()
