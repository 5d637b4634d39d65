"""train_tfd_sdxl.py's own main() under accelerate's FSDP2 in CPU processes (gloo). tests/test_fsdp.py launches it as

    ACCELERATE_USE_CPU=true accelerate launch --config_file examples/accelerate_configs/fsdp_full_shard.yaml \\
        --num_processes 2 --mixed_precision no tests/fsdp_runner.py RECORD_DIR SCRIPT_ARGS...

The launch turns the shipped config into accelerate's FSDP_* variables, as on GPUs. But accelerate picks FSDP only
for GPU-like devices (accelerate/state.py): on CPUs its state stays MULTI_CPU and the FSDP plugin is dropped,
silently. Before the script's build() (where its accelerator.prepare shards the student) this runner hands that
plugin back, built by accelerate from the same variables. From there on accelerate's own FSDP2 code runs: the
config's wrap policy and fully_shard, the optimiser moved onto the DTensor shards, DTensor-aware clipping,
get_state_dict, save_state; and the script's own loop, checkpoint and export.

Records in RECORD_DIR (library functions wrapped as tests/instrument.py does; the script is untouched):
  layout-rankR.json         after build: the modules fully_shard wrapped, each parameter's global and local shape
  shards-rankR.safetensors  after build: this rank's local shard of every parameter
  optim-rankR.json          after update 1: the local shape of each parameter's AdamW exp_avg
  step-N.safetensors        after update N: the full student, gathered by accelerator.get_state_dict (rank 0)
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def promote_to_fsdp(accelerator):
    """What accelerate would have decided on GPUs from the launch's FSDP_* variables."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "launch with an FSDP config"
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* as accelerate does
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as state.py ends its set-up
    assert accelerator.is_fsdp2, "the shipped config should select FSDP2 (fsdp_version: 2)"


def layout(model):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    params = {}
    for name, p in model.named_parameters():
        sharded = isinstance(p, DTensor)
        params[name] = {"global": list(p.shape), "local": list(p.to_local().shape if sharded else p.shape),
                        "placements": [str(x) for x in p.placements] if sharded else None,
                        "mesh": p.device_mesh.size() if sharded else None}
    return {"fsdp_modules": [n for n, m in model.named_modules() if isinstance(m, FSDPModule)], "params": params}


def install(script, folder):
    import safetensors.torch
    from torch.distributed.tensor import DTensor

    import tfd_training

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    def write_json(name, obj):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(obj, f, indent=1)

    build = script.build

    def wrapped_build(args, accelerator, pipe=None):
        promote_to_fsdp(accelerator)
        run = build(args, accelerator, pipe)
        rank, student = accelerator.process_index, accelerator.unwrap_model(run.student)  # FSDP2: the module itself
        write_json(f"layout-rank{rank}.json", layout(student))
        safetensors.torch.save_file({n: local(p).detach().contiguous() for n, p in student.named_parameters()},
                                    os.path.join(folder, f"shards-rank{rank}.safetensors"))
        return run

    script.build = wrapped_build

    end_step = tfd_training.TrainingMonitor.end_step

    def wrapped_end_step(self, step, ok, grad_norm, extra=None):
        out = end_step(self, step, ok, grad_norm, extra)
        accelerator = self.accelerator
        model, optimizer = accelerator._models[0], accelerator._optimizers[0].optimizer
        if step == 1:
            write_json(f"optim-rank{accelerator.process_index}.json", {
                n: list(local(optimizer.state[p]["exp_avg"]).shape)
                for n, p in accelerator.unwrap_model(model).named_parameters()})
        full = accelerator.get_state_dict(model)  # a collective: every rank; the weights land on rank 0
        if accelerator.is_main_process:
            safetensors.torch.save_file({k: v.contiguous() for k, v in full.items()},
                                        os.path.join(folder, f"step-{step}.safetensors"))
        return out

    tfd_training.TrainingMonitor.end_step = wrapped_end_step


def main(argv):
    import train_tfd_sdxl

    folder = argv[0]
    os.makedirs(folder, exist_ok=True)
    install(train_tfd_sdxl, folder)
    train_tfd_sdxl.main(train_tfd_sdxl.parse_args(argv[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
