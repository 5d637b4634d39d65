# Shared pieces of the scaling / fault / bad-input tests (test_distributed.py, test_faults.py,
# test_bad_inputs.py): tiny fixtures, argument lists, `accelerate launch` with 2 CPU processes,
# forked runs that a test can SIGKILL at a pause point tests/instrument.py puts into the run.
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red cube", "a blue sphere", "a green cone", "a yellow star", "a white cat", "a black dog"]
IMAGENET_LAYERS = "down_blocks.0 mid_block"
WORLD_PROMPTS = ["a red cube", "a blue sphere", "a green cone"]  # the `world` fixture's prompt file
LICENSED_README = "---\nlicense: openrail++\nlibrary_name: diffusers\n---\n\n# A tiny teacher\n"


def imagenet_args(tiny, out, *extra):
    return ["--pretrained_teacher_model", str(tiny / "teacher"), "--dataset_name", str(tiny / "data"),
            "--feature_layers", IMAGENET_LAYERS, "--feature_pool_size", "2", "--classes_per_batch", "2",
            "--num_generated", "3", "--num_positives", "3", "--num_anchors", "2", "--learning_rate", "1e-3",
            "--lr_warmup_steps", "0", "--validation_steps", "0", "--logging_steps", "1", "--num_validation_images",
            "4", "--report_to", "none", "--mixed_precision", "no", "--output_dir", str(out), *map(str, extra)]


def sdxl_args(teacher_dir, prompts, out, cache, *extra):
    return ["--pretrained_model_name_or_path", teacher_dir, "--prompts_file", prompts, "--resolution", "32",
            "--num_positive_steps", "2", "--num_generated", "2", "--num_positives", "2", "--prompts_per_batch", "1",
            "--output_dir", str(out), "--positive_cache_dir", str(cache), "--cache_dtype", "float32",
            "--report_to", "none", "--lr_warmup_steps", "0", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--validation_steps", "0", "--validation_prompts", "a cat", *map(str, extra)]


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_in_process(script, argv):
    """script.main(parse_args(argv)) in this process, with the faults and records the environment asks for
    (tests/instrument.py)."""
    import instrument

    undo = instrument.install(script)
    try:
        return script.main(script.parse_args(argv))
    finally:
        undo()
        reset_accelerate()


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT,
            **{k: str(v) for k, v in extra.items()}}


def free_port():
    with socket.socket() as s:  # other test sessions launch on this machine too: never the default 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(script, args, num_processes=2):
    """2 CPU processes: `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is
    installed (its multi-CPU launcher is MPI), so use the torchrun launcher (--multi_gpu) with
    ACCELERATE_USE_CPU=true (see env_cpu): accelerate then runs MULTI_CPU over gloo. Each process runs the
    script through tests/instrument.py (faults and records only where the environment asks for them)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--mixed_precision", "no", "--num_machines", "1", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), os.path.join(ROOT, "tests", "instrument.py"),
            os.path.join(ROOT, script), *args]


def env_cpu(**extra):
    return env(ACCELERATE_USE_CPU="true", **extra)


def launch(script, args, timeout=400, **env_extra):
    """2 processes on the CPU (gloo); returns the finished process (stdout, stderr)."""
    proc = subprocess.run(launch_cmd(script, args), cwd=ROOT, env=env_cpu(**env_extra), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def debug_records(folder, name, rank):
    return read_jsonl(os.path.join(folder, f"{name}-rank{rank}.jsonl"))


def _forked_main(script, argv, log_path, env_extra):
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.update({k: str(v) for k, v in env_extra.items()})
    import instrument

    instrument.install(script)
    script.main(script.parse_args(argv))


def run_until_pause_then_kill(script, argv, log_path, pause, timeout=300, **env_extra):
    """Fork a training run (already-imported modules: no start-up cost), wait until it reports the
    pause point `pause` (TFD_TEST_PAUSE, tests/instrument.py), SIGKILL it there. Returns its log text."""
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_forked_main, args=(script, argv, str(log_path),
                                                   {"TFD_TEST_PAUSE": pause, "TFD_TEST_PAUSE_SECONDS": 600,
                                                    **env_extra}))
    child.start()
    deadline = time.time() + timeout
    try:
        while True:
            text = open(log_path).read() if os.path.exists(log_path) else ""
            if f"TFD_TEST_PAUSE {pause}" in text:
                break
            if not child.is_alive():
                raise AssertionError(f"run ended (exit {child.exitcode}) before pausing at {pause}:\n{text[-3000:]}")
            if time.time() > deadline:
                raise AssertionError(f"no pause at {pause} within {timeout}s:\n{text[-3000:]}")
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
    finally:
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)
    return open(log_path).read()


# The three scripts on the `world` fixture's tiny teachers (tests/conftest.py).


def t2i_argv(world, script, out, *extra):
    argv = ["--pretrained_model_name_or_path", str(world / f"{script}_teacher"), "--prompts_file",
            str(world / "prompts.txt"), "--resolution", "32", "--num_positive_steps", "1", "--num_generated", "2",
            "--num_positives", "2", "--prompts_per_batch", "1", "--cache_dtype", "float32", "--lr_warmup_steps", "0",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--validation_prompts", "a cat",
            "--output_dir", str(out)]
    if script == "sd3":
        argv += ["--feature_layers", "block:0 block:-1"]
    return argv + [str(e) for e in extra]


def imagenet64_argv(world, out, *extra):
    return ["--pretrained_teacher_model", str(world / "imagenet64_teacher"), "--dataset_name",
            str(world / "labelled"), "--feature_layers", IMAGENET_LAYERS, "--feature_pool_size", "2",
            "--classes_per_batch", "2", "--num_generated", "2", "--num_positives", "2", "--num_anchors", "2",
            "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--logging_steps", "1", "--num_validation_images",
            "4", "--output_dir", str(out), *map(str, extra)]


def argv_of(world, script, out, *extra):
    if script == "imagenet64":
        return imagenet64_argv(world, out, *extra)
    return t2i_argv(world, script, out, *extra)


def script_parser(script):
    """The script's own ArgumentParser, as parse_args builds it."""
    import argparse

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, argv=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        script.parse_args([])
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


def mem_available_gb():
    """MemAvailable of /proc/meminfo in GB (infinite where there is none)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def real_arch_stages(*argv, timeout):
    """Run benchmarks/real_arch.py (one stage, or `chain` of several) in its own process (a builder's copy of the
    weights never adds to a training run's memory); the RESULT jsons, printed."""
    helper = os.path.join(ROOT, "benchmarks", "real_arch.py")
    proc = subprocess.run([sys.executable, helper, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{argv[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    results = [json.loads(ln[len("RESULT "):]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert results, proc.stdout[-3000:]
    for r in results:
        print(f"{r['stage']}: {r}")
    return results
