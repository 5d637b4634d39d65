# benchmarks/bench_losses.py --tiny: the script runs end to end and prints its tables.
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_losses_tiny_prints_the_table():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_losses.py"), "--tiny"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "| setting | layer: dim | loss | ms |" in text
    rows = re.findall(r"^\| (ImageNet|SDXL) [^|]+\| ([^|]+) \| (drifting|meanshift|anchor) \| ([0-9.]+) \|$",
                      text, re.M)
    assert len(rows) == 5 * 3 + 3 + 2 * 3  # five layers, their totals, two SDXL dims; three losses each
    assert all(float(ms) > 0 for *_, ms in rows)
    layers = {label.split(": ")[0] for _, label, _, _ in rows if ": " in label}
    assert layers == {"enc:6", "enc:11", "bottleneck", "dec:7", "dec:12"}
    assert re.search(r"\| drifting \+ anchor losses, fwd\+bwd \| [0-9.]+ \| [0-9.e+-]+ \|", text)
    assert "scaled linearly" in text  # a CPU teacher batch below 840 must say so
