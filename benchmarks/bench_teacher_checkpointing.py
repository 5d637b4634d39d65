#!/usr/bin/env python
# Peak memory saved by --teacher_checkpointing (the generated samples' teacher pass recomputed in backward
# instead of keeping its activations), and what it costs in step time: train_tfd_sdxl.py's step on an
# SDXL-shaped UNet, LoRA and full fine-tune, with the flag on and off. Each row is one run of
# bench_train_step.py in its own process (a clean peak), the table compares on with off.
#
#   python benchmarks/bench_teacher_checkpointing.py                          # SDXL-shaped reduced, 256 px, CPU
#   python benchmarks/bench_teacher_checkpointing.py --unet full --modes lora --batch 2,2   # the real UNet (LoRA)
#   python benchmarks/bench_teacher_checkpointing.py --device cuda --unet full --resolution 1024
#
# Columns: peak = the process's peak RSS (CPU; ru_maxrss) or torch.cuda.max_memory_allocated (GPU);
# step peak = the step's peak above the memory before the networks were built (bench_train_step's
# "peak mem"); step = median step time (on a CPU the process's CPU time, 1 thread).
#
# Measured tables: benchmarks/RESULTS.md ("Teacher checkpointing").

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--unet", default="reduced", choices=("full", "reduced", "tiny"),
                   help="bench_train_step's --sdxl_unet.")
    p.add_argument("--modes", default="lora,full", help="lora and/or full.")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", default="4,4", help="N,P per prompt (1 prompt).")
    p.add_argument("--precision", default=None, help="fp32 (CPU default) or bf16 (GPU default).")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--glibc_cache", action="store_true",
                   help="CPU: keep glibc's default heap caching. By default the runs set "
                        "MALLOC_MMAP_THRESHOLD_=65536, so every large tensor is its own mapping, returned when freed, "
                        "and the peak RSS is the peak of live memory rather than of the heap glibc keeps.")
    p.add_argument("--output_json", default=None)
    return p.parse_args(argv)


def run_row(args, mode, setting):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        bench = os.path.join(HERE, "bench_train_step.py")
        # bench_train_step.py as __main__, then its own peak RSS
        wrapper = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__'); "
                   "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        cmd = [sys.executable, "-c", wrapper, bench, "--device", args.device, "--config", "sdxl",
               "--sdxl_unet", args.unet, "--sdxl_resolution", str(args.resolution), "--sdxl_modes", mode,
               "--sdxl_prompts", "1", "--sdxl_batch", args.batch, "--measure", "step", "--warmup", str(args.warmup),
               "--repeats", str(args.repeats), "--teacher_checkpointing", setting, "--output_json", out]
        if args.precision:
            cmd += ["--sdxl_precision", args.precision]
        env = dict(os.environ)
        if not args.device.startswith("cuda") and not args.glibc_cache:
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"bench_train_step.py failed for {mode}, teacher checkpointing {setting}")
        row = json.load(open(out))["results"][0]
        env = json.load(open(out))["environment"]
    maxrss = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("MAXRSS_KB ")]
    row["process_peak_rss"] = int(maxrss[-1]) * 1024 if maxrss else None
    row["mode"], row["teacher_checkpointing"], row["environment"] = mode, setting, env
    print(f"   {row['config']}: step {row.get('step_ms', float('nan')):.0f} ms, step peak "
          f"{(row.get('peak_bytes') or 0) / 2**30:.2f} GiB", flush=True)
    return row


def gib(b):
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def main(args):
    rows = []
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        for setting in ("off", "on"):
            rows.append(run_row(args, mode, setting))
    env = rows[0]["environment"]
    cuda = args.device.startswith("cuda")
    lines = [f"Device: {env['device_name']}; torch {env['torch']}; {env['when']}; load average {env['loadavg']}; "
             f"SDXL UNet {args.unet}, {args.resolution} px, 1 prompt x ({args.batch}); "
             f"{'wall time' if cuda else 'process CPU time, 1 thread'}; warmup {args.warmup}, repeats {args.repeats}.",
             "", "| mode | teacher ckpt | peak (process) | step peak | saved by ckpt | step ms | ckpt costs |",
             "|---|---|---|---|---|---|---|"]
    for mode in modes:
        off, on = (next(r for r in rows if r["mode"] == mode and r["teacher_checkpointing"] == s)
                   for s in ("off", "on"))
        for r in (off, on):
            peak = r.get("peak_bytes") if cuda else r.get("process_peak_rss")
            saved = cost = ""
            if r is on and off.get("peak_bytes") and on.get("peak_bytes"):
                saved = f"{(off['peak_bytes'] - on['peak_bytes']) / 2**30:.2f} GiB " \
                        f"({100 * (1 - on['peak_bytes'] / off['peak_bytes']):.0f}% of the step peak)"
            if r is on and off.get("step_ms") and on.get("step_ms"):
                cost = f"{100 * (on['step_ms'] / off['step_ms'] - 1):+.0f}%"
            lines.append(f"| {mode} ({r['trainable'] / 1e6:.1f}M trainable of {r['params'] / 1e6:.1f}M) | "
                         f"{r['teacher_checkpointing']} | {gib(peak)} | {gib(r.get('peak_bytes'))} | {saved} | "
                         f"{r.get('step_ms', float('nan')):.0f} | {cost} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "table": table}, f, indent=2)
    return rows


if __name__ == "__main__":
    main(parse_args())
