"""Faults and records put into a real training run from outside its loop (the scripts have no test hooks):
library functions the loop calls are wrapped, as the environment asks.

    python tests/instrument.py train_tfd_sdxl.py ARGS...     # also under `accelerate launch`
    undo = instrument.install(script_module)                 # a forked or in-process run

TFD_TEST_PAUSE=checkpoint:N     after accelerator.save_state wrote checkpoint-N.incomplete (before its
                                completion marker), print "TFD_TEST_PAUSE checkpoint:N pid=..." to stderr and
                                sleep TFD_TEST_PAUSE_SECONDS (60), so a test can SIGKILL the process there
TFD_TEST_PAUSE=cache_entry:P    the same once the cache entry of prompt P is written to its temporary file
TFD_TEST_NONFINITE_STEPS=3,4    the training step's loss at steps 3 and 4 made non-finite ("3@1": rank 1 only),
TFD_TEST_NONFINITE_KIND=K       K = nan (default), inf, or grad (a finite loss with an infinite gradient), or
                                nanloss (a non-finite loss with a finite gradient)
TFD_DEBUG_DIR=DIR               every process appends the classes or prompts it drew (draws-rankR.jsonl) and
                                after each update a SHA-256 of its student's weights (steps-rankR.jsonl)
"""

import importlib.util
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def state_digest(model):
    """SHA-256 of a module's state dict: equal digests, equal weights."""
    import tfd_training

    return tfd_training.tensor_digest(dict(model.state_dict()))


def install(script, env=None):
    """Wrap what the environment asks for; returns a function that undoes every wrap."""
    import accelerate
    import safetensors.torch

    import tfd_training

    env = os.environ if env is None else env
    undo, where = [], {"step": 0, "rank": 0}

    def wrap(owner, name, make):
        original = getattr(owner, name)
        setattr(owner, name, make(original))
        undo.append(lambda: setattr(owner, name, original))

    def pause(point):
        print(f"TFD_TEST_PAUSE {point} pid={os.getpid()}", file=sys.stderr, flush=True)
        time.sleep(float(env.get("TFD_TEST_PAUSE_SECONDS", "60")))

    # The loop asks for each micro-step's generators: that tells the step and the rank.
    def step_generators(original):
        def wrapped(seed, step, micro=0, rank=0):
            where.update(step=step, rank=rank)
            return original(seed, step, micro, rank)
        return wrapped

    wrap(tfd_training, "step_generators", step_generators)

    want = env.get("TFD_TEST_PAUSE", "")
    if want.startswith("checkpoint:"):
        def save_state(original):
            def wrapped(self, output_dir=None, *a, **kw):
                out = original(self, output_dir, *a, **kw)
                if os.path.basename(os.path.normpath(str(output_dir))) == f"checkpoint-{want[11:]}.incomplete":
                    pause(want)
                return out
            return wrapped

        wrap(accelerate.Accelerator, "save_state", save_state)
    if want.startswith("cache_entry:"):
        def save_file(original):
            def wrapped(tensors, filename, metadata=None):
                original(tensors, filename, metadata=metadata)
                if (metadata or {}).get("prompt") == want[12:]:
                    pause(want)
            return wrapped

        wrap(safetensors.torch, "save_file", save_file)

    spec = env.get("TFD_TEST_NONFINITE_STEPS")
    if spec:
        steps, kind = set(spec.replace(" ", "").split(",")), env.get("TFD_TEST_NONFINITE_KIND", "nan")

        def train_step(original):
            def wrapped(*a, **kw):
                loss, logs = original(*a, **kw)
                if {str(where["step"]), f"{where['step']}@{where['rank']}"} & steps:
                    if kind == "grad":
                        loss = loss + (loss - loss.detach()) * float("inf")
                    elif kind == "nanloss":
                        loss = loss + (torch.full_like(loss, float("nan")) - loss.detach())
                    else:
                        loss = loss * float(kind)
                return loss, logs
            return wrapped

        wrap(script, "train_step", train_step)

    folder = env.get("TFD_DEBUG_DIR")
    if folder:
        os.makedirs(folder, exist_ok=True)

        def record(name, rank, entry):
            with open(os.path.join(folder, f"{name}-rank{rank}.jsonl"), "a") as f:
                f.write(json.dumps(entry) + "\n")

        if hasattr(script, "ClassGroupedSampler"):
            def draw(original):
                def wrapped(self):
                    classes, idx = original(self)
                    record("draws", self.rank, {"step": where["step"], "classes": classes.tolist(),
                                                "indices": idx.tolist()})
                    return classes, idx
                return wrapped

            wrap(script.ClassGroupedSampler, "__call__", draw)
        else:
            def shared_draw(original):
                def wrapped(n, start, count, generator, *a, **kw):
                    drawn = original(n, start, count, generator, *a, **kw)
                    record("draws", where["rank"], {"step": where["step"], "prompts": drawn.tolist()})
                    return drawn
                return wrapped

            wrap(tfd_training, "shared_draw", shared_draw)

        def end_step(original):
            def wrapped(self, step, ok, grad_norm, extra=None):
                out = original(self, step, ok, grad_norm, extra)
                model = self.accelerator.unwrap_model(self.accelerator._models[0])
                record("steps", self.accelerator.process_index, {"step": step, "ok": bool(ok),
                                                                 "digest": state_digest(model)})
                return out
            return wrapped

        wrap(tfd_training.TrainingMonitor, "end_step", end_step)

    def undo_all():
        for fn in reversed(undo):
            fn()

    return undo_all


def main(argv):
    """python tests/instrument.py SCRIPT.py ARGS...: the script's main under the wraps the environment asks for."""
    path = argv[0] if os.path.isabs(argv[0]) else os.path.join(ROOT, argv[0])
    sys.path.insert(0, os.path.dirname(path))
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    sys.modules[name] = script
    spec.loader.exec_module(script)
    install(script)
    script.main(script.parse_args(argv[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
