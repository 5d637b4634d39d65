"""The SDXL full fine-tune sharded by FSDP2 on 2 CPU processes (gloo), against one unsharded process.

tests/fsdp_runner.py runs train_tfd_sdxl.py's own main() under `accelerate launch --config_file
examples/accelerate_configs/fsdp_full_shard.yaml` (the shipped config; accelerate's FSDP2 on CPUs, see the
runner). This test checks that
1. the config's wrap policy made every BasicTransformerBlock and ResnetBlock2D of the student (and the root) an
   FSDP unit, and each rank holds only its half of every weight and of every AdamW moment;
2. after each of 2 updates the gathered student equals one unsharded process that runs both ranks' micro-batches
   (their own draws, noise and feature noise) with the gradients averaged as FSDP averages them, then the
   script's clipping and AdamW step; the gradient norms and losses agree too;
3. the checkpoint's consolidated unet/ and the exported pipeline (both via tfd_training.consolidated_model, i.e.
   accelerate's get_state_dict under FSDP2) load with diffusers and equal that reference.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from scaling_helpers import PROMPTS, ROOT, env_cpu, free_port, read_jsonl, reset_accelerate, sdxl_args

CONFIG = os.path.join(ROOT, "examples", "accelerate_configs", "fsdp_full_shard.yaml")
WORLD, STEPS = 2, 2
WRAPPED = ("BasicTransformerBlock", "ResnetBlock2D")  # the config's fsdp_transformer_layer_cls_to_wrap
# An AdamW step moves each weight by about --learning_rate (1e-3); rounding differences between the sharded and the
# unsharded arithmetic, in the few gradient elements near 0 that Adam's g/(|g|+eps) amplifies, moved a handful of
# weights by up to 1e-6 here. A lost or unaveraged gradient moves many by about 1e-3.
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def launch_fsdp(argv, record_dir, timeout=300):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG, "--num_processes",
           str(WORLD), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), os.path.join(ROOT, "tests", "fsdp_runner.py"), str(record_dir),
           *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_cpu(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def reference_run(argv):
    """One process, unsharded: per update, each rank's micro-batch exactly as the sharded loop draws it
    (tfd_training.step_generators(seed, step, 0, rank) seeds its prompts, noise and the feature noise), its loss
    backpropagated with weight 1/WORLD (FSDP's reduce-scatter averages the ranks' gradients; the TFD loss is
    already a mean over each rank's groups), then the script's clip_and_step. Fills the positive cache first, so
    both runs read the same positives. Returns ([state after each update], [grad norm], [mean loss])."""
    from accelerate import Accelerator

    import tfd_text2image
    import tfd_training
    import train_tfd_sdxl as script

    args = script.parse_args(argv)
    reset_accelerate()  # this process's own Accelerator: one process, no distributed engine
    try:
        accelerator = Accelerator(mixed_precision="no")
        run = script.build(args, accelerator)
        run.positives.prepare(accelerator, run.prompts)
        params = [p for p in run.student.parameters() if p.requires_grad]
        G, N = args.prompts_per_batch, args.num_generated
        states, norms, losses = [], [], []
        for step in range(1, STEPS + 1):
            loss_sum = 0.0
            for rank in range(WORLD):
                shared, gen = tfd_training.step_generators(args.seed, step, 0, rank)
                drawn = tfd_training.shared_draw(len(run.prompts), rank * G, G, shared).tolist()
                entries = [run.positives.get(run.prompts[i]) for i in drawn]
                batch = tfd_text2image.prompt_batch(entries, N, run.latent_shape, gen, accelerator.device,
                                                    tfd_text2image.cond_dtype(args))
                loss, _ = script.train_step(args, accelerator, run, batch, gen)
                (loss / WORLD).backward()
                loss_sum = loss_sum + loss.detach()
            ok, grad_norm = tfd_training.clip_and_step(accelerator, run.optimizer, run.lr_scheduler, params, loss_sum,
                                                       args.max_grad_norm)
            assert ok
            states.append({k: v.detach().clone() for k, v in run.student.state_dict().items()})
            norms.append(float(grad_norm))
            losses.append(float(loss_sum) / WORLD)
        return states, norms, losses
    finally:
        reset_accelerate()


def max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_close_states(got, want, what):
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {k}: {m}")


def check_sharding(layouts, shards, full, optim, module_names):
    """Every wanted module an FSDP unit on both ranks; every parameter a DTensor split in two along dim 0 whose
    halves (rank 0, then rank 1) are the full weight; each rank's AdamW moments the size of its half."""
    wanted = {""} | {n for n, cls in module_names.items() if cls in WRAPPED}
    for lay in layouts:
        units = set(lay["fsdp_modules"])
        assert wanted <= units, sorted(wanted - units)
        assert units - wanted <= {"conv_norm_out"}, sorted(units - wanted)  # accelerate's own unit: the final norm
    total, held = 0, [0] * WORLD
    for name, weight in full.items():
        for rank, lay in enumerate(layouts):
            p = lay["params"][name]
            assert p["placements"] == ["S(0)"] and p["mesh"] == WORLD, (name, p)
            assert p["global"] == list(weight.shape), name
            assert optim[rank][name] == p["local"], name
            held[rank] += shards[rank][name].numel()
        # dim 0 split as torch.chunk splits it: rank 0 the first ceil(n/2) rows, rank 1 the rest
        torch.testing.assert_close(torch.cat([shards[r][name] for r in range(WORLD)]), weight, rtol=0, atol=0)
        assert shards[0][name].shape[0] == -(-weight.shape[0] // WORLD), name
        total += weight.numel()
    assert sum(held) == total and max(held) <= 0.55 * total, (held, total)
    return held, total


def test_fsdp2_shards_the_student_and_matches_one_process(tiny_sdxl_dir, prompts, tmp_path):
    import safetensors.torch
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    import tfd_training

    cache, rec, out = tmp_path / "cache", tmp_path / "records", tmp_path / "fsdp"
    flags = ("--max_train_steps", STEPS, "--checkpointing_steps", STEPS, "--mixed_precision", "no")
    states, norms, losses = reference_run(sdxl_args(tiny_sdxl_dir, prompts, tmp_path / "ref", cache, *flags))
    log = launch_fsdp(sdxl_args(tiny_sdxl_dir, prompts, out, cache, *flags), rec)
    assert "Saved checkpoint" in log

    # 1. Sharded as the config says.
    teacher = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    module_names = {n: type(m).__name__ for n, m in teacher.named_modules()}
    assert sum(cls in WRAPPED for cls in module_names.values()) == 18  # 7 transformer blocks, 11 resnets
    layouts = [json.loads((rec / f"layout-rank{r}.json").read_text()) for r in range(WORLD)]
    shards = [safetensors.torch.load_file(rec / f"shards-rank{r}.safetensors") for r in range(WORLD)]
    optim = [json.loads((rec / f"optim-rank{r}.json").read_text()) for r in range(WORLD)]
    held, total = check_sharding(layouts, shards, teacher.state_dict(), optim, module_names)
    # The start-up memory line (rank 0's) counts the student's shard on this rank, not the whole UNet.
    shard = tfd_training.format_bytes(4 * held[0])
    assert f"unet (student): {shard} params (float32) + {shard} grads + " in log

    # 2. The same updates as one unsharded process: weights, gradient norms (before clipping), losses.
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["cache/misses"] == 0 for r in rows)  # both runs read the positives the reference cached
    diffs = []
    for step, want in enumerate(states, 1):
        got = safetensors.torch.load_file(rec / f"step-{step}.safetensors")
        diffs.append(max_diff(got, want))
        assert_close_states(got, want, f"update {step}")
    assert max_diff(states[0], teacher.state_dict()) > 1e-4  # the updates moved the weights
    # The norm is what sees summed instead of averaged gradients: clipping and AdamW hide their scale from the weights.
    got_norms = [r["train/grad_norm"] for r in rows]
    assert got_norms == pytest.approx(norms, rel=RTOL) and min(norms) > 2.0  # clipped at --max_grad_norm 2
    assert [r["loss/total"] for r in rows] == pytest.approx(losses, rel=RTOL)

    # 3. The consolidated checkpoint and the exported pipeline load and hold the reference's student.
    assert {"pytorch_model_fsdp_0", "optimizer_0", "unet"} <= set(os.listdir(out / f"checkpoint-{STEPS}"))
    saved = UNet2DConditionModel.from_pretrained(out / f"checkpoint-{STEPS}" / "unet")
    assert_close_states(saved.state_dict(), states[-1], "checkpoint unet")
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe.unet) is UNet2DConditionModel
    assert_close_states(pipe.unet.state_dict(), states[-1], "exported unet")
    print(f"\nFSDP2 vs one process: max |Δw| per update {diffs}; rank-local parameters {held} of {total}")


def test_sharding_check_refuses_replicated_or_misplaced_weights(tiny_sdxl_dir):
    """check_sharding on records built from the teacher: the layout FSDP2 makes passes; what each rank holds
    without fully_shard (the whole weight, as under DDP), a wrap that missed the transformer blocks, and both
    ranks holding the same half fail."""
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    full = teacher.state_dict()
    module_names = {n: type(m).__name__ for n, m in teacher.named_modules()}
    units = [""] + [n for n, cls in module_names.items() if cls in WRAPPED]

    def records(halves, placements=("S(0)",), mesh=WORLD, modules=units):
        shards = [{k: halves(v)[r].clone() for k, v in full.items()} for r in range(WORLD)]
        layouts = [{"fsdp_modules": list(modules), "params": {
            k: {"global": list(v.shape), "local": list(shards[r][k].shape), "mesh": mesh,
                "placements": list(placements) if placements else None} for k, v in full.items()}}
            for r in range(WORLD)]
        optim = [{k: list(shards[r][k].shape) for k in full} for r in range(WORLD)]
        return layouts, shards, full, optim, module_names

    check_sharding(*records(lambda v: torch.chunk(v, WORLD)))
    broken = {"replicated": records(lambda v: [v] * WORLD, placements=None, mesh=None),
              "replicated, labelled as shards": records(lambda v: [v] * WORLD),
              "transformer blocks not wrapped": records(lambda v: torch.chunk(v, WORLD), modules=[
                  n for n in units if module_names.get(n) != "BasicTransformerBlock"]),
              "the same half on both ranks": records(lambda v: [torch.chunk(v, WORLD)[0]] * WORLD)}
    for what, rec in broken.items():
        with pytest.raises(AssertionError):
            check_sharding(*rec)
            pytest.fail(f"check_sharding passed {what}")
