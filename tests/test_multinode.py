"""Several machines: two `accelerate launch` commands as two machines on 127.0.0.1 (--num_machines 2,
--machine_rank 0 and 1, one CPU process each, gloo) train train_tfd_sdxl.py as one 2-process group
with ONE shared --positive_cache_dir and ONE shared --output_dir, then resume; and the shipped SLURM
example (examples/slurm/train_tfd_sdxl.sbatch) runs under stub srun / scontrol / accelerate commands
that record what each node would launch.

`--cpu` would not do here: with it each launcher runs alone (DistributedType.NO, 1 process) without an
error. The torchrun launcher (--multi_gpu) with ACCELERATE_USE_CPU=true forms the group (env_cpu).
"""

import importlib
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from scaling_helpers import PROMPTS, ROOT, env_cpu, free_port, read_jsonl, sdxl_args

SBATCH = os.path.join(ROOT, "examples", "slurm", "train_tfd_sdxl.sbatch")


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def machine_cmd(script, args, machine_rank, port):
    """One of two machines: 2 processes in all, so one on this machine."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--num_processes", "2", "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            os.path.join(ROOT, script), *map(str, args)]


def start_machines(args, log_dir):
    """Both machines of one run, side by side; each has its own log and its own scratch folder (TMPDIR)."""
    port, procs = free_port(), []
    for rank in (0, 1):
        scratch = log_dir / f"scratch-{rank}"
        scratch.mkdir(parents=True)
        with open(log_dir / f"machine{rank}.log", "w") as log:
            procs.append(subprocess.Popen(machine_cmd("train_tfd_sdxl.py", args, rank, port), cwd=ROOT,
                                          env=env_cpu(TMPDIR=scratch), stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    return procs


def wait_machines(runs, timeout=300):
    """Wait for every machine of every run [(procs, log_dir)]; when one fails, stop all (a machine left alone
    would wait for its peer until gloo's timeout). Returns each run's two logs."""
    procs = [p for ps, _ in runs for p in ps]
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher's own session: it and its worker
                p.wait()
    logs = [[(d / f"machine{r}.log").read_text() for r in (0, 1)] for _, d in runs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(procs), f"exit codes {codes}\n" + "\n".join(
        f"--- {d.name} machine {r}:\n{log[-3000:]}" for (_, d), two in zip(runs, logs) for r, log in enumerate(two))
    return logs


def assert_one_group(logs):
    """The two launchers formed ONE 2-process group: global ranks 0 and 1, each the only process on its machine."""
    for rank, log in enumerate(logs):
        assert "Distributed environment: DistributedType.MULTI_CPU  Backend: gloo" in log, log[-3000:]
        assert f"Num processes: 2\nProcess index: {rank}\nLocal process index: 0\n" in log, log[-3000:]


def test_two_machines_train_share_cache_and_output_then_resume(tiny_sdxl_dir, prompts, tmp_path):
    from diffusers import DDIMScheduler, DiffusionPipeline

    cache, out, straight = tmp_path / "shared" / "cache", tmp_path / "shared" / "out", tmp_path / "shared" / "straight"

    def args(folder, steps, *extra):
        return sdxl_args(tiny_sdxl_dir, prompts, folder, cache, "--max_train_steps", steps,
                         "--checkpointing_steps", 2, *extra)

    # 1. Steps 1-3 on two machines (checkpoint-2, then the export), and beside it an uninterrupted 2-machine
    #    run of steps 1-4 into another folder: the reference for the resumed steps. Both fill the one cache.
    first = (start_machines(args(out, 3), tmp_path / "first"), tmp_path / "first")
    ref = (start_machines(args(straight, 4), tmp_path / "straight"), tmp_path / "straight")
    logs, ref_logs = wait_machines([first, ref])
    assert_one_group(logs)
    assert_one_group(ref_logs)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # logged once (by global rank 0), one line per step
    assert sum("Saved checkpoint" in log for log in logs) == 1
    # A complete checkpoint: the student, the optimiser and schedule, and the RNG state of BOTH global ranks.
    assert sorted(os.listdir(out / "checkpoint-2")) == [
        "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin", "tfd_checkpoint_complete",
        "tfd_trainable.json", "unet"]
    assert not any(name.endswith(".incomplete") for name in os.listdir(out))

    # The exported one-step pipeline loads and runs.
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    image = pipe("a red cube", num_inference_steps=1, guidance_scale=0.0).images[0]
    assert image.size == (32, 32)

    # 2. Both machines again with --resume_from_checkpoint latest and more steps: from checkpoint-2, steps 3-4.
    resumed = (start_machines(args(out, 4, "--resume_from_checkpoint", "latest"), tmp_path / "resumed"),
               tmp_path / "resumed")
    (logs,) = wait_machines([resumed])
    assert_one_group(logs)
    assert f"Resumed from {out / 'checkpoint-2'} at step 2." in logs[0]  # (logged by global rank 0 only)
    for log in logs:  # each machine read that checkpoint from the shared folder: its progress bar starts at step 2
        first_bar = next(line for line in log.replace("\r", "\n").splitlines() if line.startswith("steps:"))
        assert " 2/4 " in first_bar, first_bar
    after = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in after] == [1, 2, 3, 4]  # the first run's step 3 replaced, once
    assert os.path.isfile(out / "checkpoint-4" / "tfd_checkpoint_complete")
    # (cache/hits and cache/misses: entries of all processes; 1 prompt per process per step)
    assert [(r["cache/hits"], r["cache/misses"]) for r in after[2:]] == [(2, 0), (2, 0)]  # the shared cache served all

    # Exact resume: the resumed steps equal the uninterrupted run's (and the first run's step 3).
    reference = {r["step"]: r for r in read_jsonl(straight / "metrics.jsonl")}
    assert sorted(reference) == [1, 2, 3, 4]
    assert sum(r["cache/misses"] for r in rows + list(reference.values())) >= 1  # the runs filled it on the fly
    for r in after:
        assert r["loss/total"] == reference[r["step"]]["loss/total"], r["step"]
        assert r["train/grad_norm"] == reference[r["step"]]["train/grad_norm"], r["step"]
    assert rows[2]["loss/total"] == reference[3]["loss/total"]
    assert all(math.isfinite(r["loss/total"]) for r in after)


# ---- the SLURM example ----------------------------------------------------------------------------------

STUB_SRUN = """#!{python}
# srun [options] COMMAND...: runs COMMAND once per node of the job, one after the other, with SLURM_NODEID set.
import json, os, subprocess, sys
argv, options = sys.argv[1:], []
while argv[0].startswith("-"):
    options.append(argv.pop(0))
    if "=" not in options[-1]:
        options.append(argv.pop(0))
with open(os.path.join(os.environ["STUB_RECORD"], "srun.jsonl"), "a") as f:
    f.write(json.dumps(options) + "\\n")
for node in range(int(os.environ["SLURM_NNODES"])):
    subprocess.run(argv, env={{**os.environ, "SLURM_NODEID": str(node)}}, check=True)
"""
STUB_SCONTROL = """#!/bin/bash
# scontrol show hostnames LIST: the job's nodes, one a line
[ "$1 $2" = "show hostnames" ] && [ "$3" = "$SLURM_JOB_NODELIST" ] && printf 'gpu-node-a\\ngpu-node-b\\n'
"""
STUB_ACCELERATE = """#!{python}
# accelerate ARGS...: records ARGS, the node and the working directory
import json, os, sys
with open(os.path.join(os.environ["STUB_RECORD"], "accelerate.jsonl"), "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "node": os.environ["SLURM_NODEID"], "cwd": os.getcwd()}}) + "\\n")
"""


def run_sbatch(tmp_path, nodes=2):
    """The sbatch script under bash with stub SLURM commands and a stub `accelerate` on PATH; returns
    (accelerate calls, srun option lists, the shared folder)."""
    stubs, record, shared = tmp_path / "bin", tmp_path / "record", tmp_path / "shared"
    for folder in (stubs, record, shared):
        folder.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL), ("accelerate", STUB_ACCELERATE)):
        (stubs / name).write_text(text.format(python=sys.executable))
        (stubs / name).chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environment.update(PATH=f"{stubs}:{os.environ['PATH']}", STUB_RECORD=str(record), SHARED=str(shared),
                       SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST="gpu-node-[a-b]", SLURM_JOB_ID="123456",
                       SLURM_SUBMIT_DIR=ROOT)
    proc = subprocess.run(["bash", SBATCH], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return read_jsonl(record / "accelerate.jsonl"), read_jsonl(record / "srun.jsonl"), shared


def test_sbatch_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", SBATCH], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = open(SBATCH).read()
    for directive in ("#SBATCH --requeue", "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=2"):
        assert directive in text


def test_sbatch_launches_every_node_with_flags_the_script_parses(tmp_path):
    """Both stages run on every node with that node's machine rank and the first node as the main process;
    accelerate's own launch parser and config merge take the launcher flags, and the training script's own
    parse_args takes the training flags."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    calls, sruns, shared = run_sbatch(tmp_path)
    assert [c["node"] for c in calls] == ["0", "1", "0", "1"]  # stage 1 on both nodes, then stage 2
    assert all("--ntasks-per-node" in options and "1" in options for options in sruns) and len(sruns) == 2
    parsed = []
    for call in calls:
        assert call["argv"][0] == "launch" and call["cwd"] == ROOT
        launch_args, _, _ = _validate_launch_command(launch_command_parser().parse_args(call["argv"][1:]))
        assert launch_args.config_file == os.path.join(ROOT, "examples", "accelerate_configs", "multinode_2x8gpu.yaml")
        assert launch_args.multi_gpu and launch_args.mixed_precision == "bf16"
        assert (int(launch_args.machine_rank), launch_args.num_machines, launch_args.num_processes) == (
            int(call["node"]), 2, 16)
        assert (launch_args.main_process_ip, launch_args.main_process_port) == ("gpu-node-a", 20000 + 123456 % 20000)
        script = launch_args.training_script
        assert script.startswith("train_tfd_") and os.path.isfile(os.path.join(ROOT, script))
        module = importlib.import_module(script.removesuffix(".py"))
        flags = launch_args.training_script_args
        if "--use_8bit_adam" in flags and importlib.util.find_spec("bitsandbytes") is None:
            # bitsandbytes is optional: without it the flag is refused at parse time, naming the package
            with pytest.raises(ValueError, match=r"--use_8bit_adam needs the bitsandbytes package"):
                module.parse_args(flags)
            flags = [f for f in flags if f != "--use_8bit_adam"]
        parsed.append(module.parse_args(flags))
    prepare, train = parsed[0], parsed[2]
    assert prepare.prepare_positives_only and not train.prepare_positives_only
    assert train.resume_from_checkpoint == "latest" and train.checkpointing_steps > 0
    # Both stages use one cache on the shared storage, keyed by the same teacher and data flags.
    for key in ("pretrained_model_name_or_path", "revision", "variant", "teacher_dtype", "resolution", "dataset_name",
                "caption_column", "streaming", "max_train_samples", "num_positive_steps", "positive_guidance_scale",
                "positive_seed", "cache_dtype", "positive_cache_dir"):
        assert getattr(prepare, key) == getattr(train, key), key
    assert train.positive_cache_dir.startswith(str(shared)) and train.output_dir.startswith(str(shared))


def test_sbatch_follows_the_node_count(tmp_path):
    """sbatch --nodes 8: 8 machines × 8 processes, ranks 0-7, the same main process on each."""
    from accelerate.commands.launch import launch_command_parser

    nodes = 8
    calls, _, _ = run_sbatch(tmp_path, nodes)
    assert [c["node"] for c in calls] == [str(n) for n in range(nodes)] * 2
    for call in calls:
        launch_args = launch_command_parser().parse_args(call["argv"][1:])
        assert (int(launch_args.machine_rank), launch_args.num_machines, launch_args.num_processes) == (
            int(call["node"]), nodes, nodes * 8)
        assert launch_args.main_process_ip == "gpu-node-a"
