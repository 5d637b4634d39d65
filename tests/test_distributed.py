"""Both training scripts under `accelerate launch` with 2 CPU processes (gloo, MULTI_CPU DDP).

What each launch proves, from per-rank records tests/instrument.py writes around the scripts' own functions
when TFD_DEBUG_DIR is set: ranks draw disjoint classes / prompts every step; the student weights are
bit-identical on both ranks after every step (DDP averaged the gradients) and equal the saved
checkpoint and export; a non-finite loss or gradient on ONE rank skips the update on both;
logging and saving happen once. The SDXL positive cache is filled by a 2-process
--prepare_positives_only launch and an independent run at the same time: every entry exactly once.
"""

import glob
import os
import re
import subprocess

import torch

import tfd_text2image
import tfd_training
import train_tfd_imagenet64
from instrument import state_digest
from scaling_helpers import (
    PROMPTS,
    ROOT,
    debug_records,
    env,
    env_cpu,
    imagenet_args,
    launch,
    launch_cmd,
    read_jsonl,
    sdxl_args,
)


def per_step(records, key):
    return {r["step"]: r[key] for r in records}


def assert_synchronised(dbg, steps, skipped):
    """Both ranks hold the same weights after every step; a skipped step leaves them unchanged."""
    s0, s1 = debug_records(dbg, "steps", 0), debug_records(dbg, "steps", 1)
    assert [r["step"] for r in s0] == [r["step"] for r in s1] == steps
    d0, d1 = per_step(s0, "digest"), per_step(s1, "digest")
    assert d0 == d1, "student weights differ between ranks"
    assert [r["ok"] for r in s0] == [r["ok"] for r in s1] == [s not in skipped for s in steps]
    for s in steps[1:]:
        assert (d0[s] == d0[s - 1]) == (s in skipped), s  # skipped: untouched; otherwise: updated
    return d0


def test_imagenet64_two_processes(tiny_imagenet, tmp_path):
    from diffusers import UNet2DModel

    out, dbg = tmp_path / "out", tmp_path / "debug"
    args = imagenet_args(tiny_imagenet, out, "--max_train_steps", 3, "--checkpointing_steps", 3,
                         "--report_to", "tensorboard")
    proc = launch("train_tfd_imagenet64.py", args, TFD_DEBUG_DIR=dbg, TFD_TEST_NONFINITE_STEPS="2@1")
    log = proc.stdout + proc.stderr

    # Disjoint classes per step (4 classes, 2 per rank: together all 4), exactly the sampler's draws of each rank.
    import datasets

    labels = torch.tensor(datasets.load_from_disk(str(tiny_imagenet / "data"))["label"])
    samplers = [train_tfd_imagenet64.ClassGroupedSampler(labels, [0, 1, 2, 3], 2, 5, seed=0, rank=r) for r in (0, 1)]
    draws = [debug_records(dbg, "draws", r) for r in (0, 1)]
    for d0, d1 in zip(*draws):
        assert d0["step"] == d1["step"]
        assert not set(d0["classes"]) & set(d1["classes"]) and set(d0["classes"]) | set(d1["classes"]) == {0, 1, 2, 3}
        for rank, d in enumerate((d0, d1)):
            classes, idx = samplers[rank]()
            assert d["classes"] == classes.tolist() and d["indices"] == idx.tolist()
    assert len(draws[0]) == 3

    # Gradients synchronised; the NaN injected on rank 1 at step 2 made BOTH ranks skip that update.
    digest = assert_synchronised(dbg, [1, 2, 3], skipped={2})
    assert digest[1] != state_digest(UNet2DModel.from_pretrained(tiny_imagenet / "teacher"))
    for saved in (out / "checkpoint-3" / "unet", out / "unet"):
        assert state_digest(UNet2DModel.from_pretrained(saved)) == digest[3], saved

    # Logged and saved once: one metrics line per step, one tracker, one checkpoint message.
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["train/bad_steps"] for r in rows] == [0, 1, 0]
    events = glob.glob(str(out / "logs" / "**" / "events.out.tfevents*"), recursive=True)
    assert events and len({e.split(".")[-2] for e in events}) == 1  # written by one process (its pid)
    assert log.count("Saved checkpoint") == 1 and log.count("update skipped") == 1
    assert "MULTI_CPU" in log and "Num processes: 2" in log
    assert sorted(os.listdir(out / "checkpoint-3")).count("unet") == 1


def test_sdxl_cache_by_concurrent_writers_then_two_process_training(tiny_sdxl_dir, prompts_file, tmp_path):
    from diffusers import UNet2DConditionModel

    cache, out, dbg = tmp_path / "cache", tmp_path / "out", tmp_path / "debug"
    prepare = sdxl_args(tiny_sdxl_dir, prompts_file, tmp_path / "prep", cache, "--prepare_positives_only")
    # A 2-process --prepare_positives_only launch and two independent single-process ones, all at the same time.
    single = [os.sys.executable, os.path.join(ROOT, "train_tfd_sdxl.py"), *prepare]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, e in ((launch_cmd("train_tfd_sdxl.py", prepare), env_cpu()), (single, env()), (single, env()))]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(log[-2000:] for log in logs)
    done = [tuple(map(int, m)) for log in logs
            for m in re.findall(r"this process: (\d+) reused, (\d+) generated", log)]
    assert len(done) == 4 and sorted(sum(d) for d in done) == [3, 3, 6, 6]  # ranks: half each; the others: all

    (settings_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    files = sorted(glob.glob(str(settings_dir / "entries" / "*" / "*")))
    assert all(f.endswith(".safetensors") for f in files), files  # no temporary file left behind
    settings = __import__("json").loads((settings_dir / "settings.json").read_text())
    store = tfd_text2image.PositiveCache(str(cache), settings)
    assert store.dir == str(settings_dir)
    assert sorted(files) == sorted(store.path(p, ["teacher", "teacher"]) for p in PROMPTS)  # each exactly once
    for p in PROMPTS:
        entry = store.load(p, ["teacher", "teacher"])  # checksum verified
        assert entry["positives"].shape == (2, 4, 8, 8) and torch.isfinite(entry["positives"]).all()

    # Training on 2 processes from that cache; a gradient made infinite on rank 0 at step 2 skips both.
    args = sdxl_args(tiny_sdxl_dir, prompts_file, out, cache, "--max_train_steps", 3, "--checkpointing_steps", 3)
    proc = launch("train_tfd_sdxl.py", args, TFD_DEBUG_DIR=dbg, TFD_TEST_NONFINITE_STEPS="2@0",
                  TFD_TEST_NONFINITE_KIND="grad")
    log = proc.stdout + proc.stderr
    d0, d1 = debug_records(dbg, "draws", 0), debug_records(dbg, "draws", 1)
    assert [r["step"] for r in d0] == [r["step"] for r in d1] == [1, 2, 3]
    for a, b in zip(d0, d1):
        assert len(a["prompts"]) == 1 and a["prompts"] != b["prompts"]  # different prompts on each rank
        g = torch.Generator().manual_seed(((0 * 1_000_003 + a["step"]) * 1009 + 0) * 4099 - 1)
        assert tfd_training.shared_draw(len(PROMPTS), 0, 2, g).tolist() == a["prompts"] + b["prompts"]
    digest = assert_synchronised(dbg, [1, 2, 3], skipped={2})
    for saved in (out / "checkpoint-3" / "unet", out / "unet"):
        assert state_digest(UNet2DConditionModel.from_pretrained(saved)) == digest[3], saved
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["train/bad_steps"] for r in rows] == [0, 1, 0]
    assert rows[-1]["cache/misses"] == 0 and rows[-1]["cache/hits"] >= 1  # the prepared cache served it
    assert log.count("Saved checkpoint") == 1 and log.count("update skipped") == 1
    assert "Every prompt is cached" in log
    # The scripts' DDP has gradient_as_bucket_view: the gradients are its buckets, no second flat copy (the memory
    # line would count one next to them).
    assert re.search(r"unet \(student\): (\S+ \S+) params \(float32\) \+ \1 grads \+ \S+ \S+ AdamW states", log)
    assert "DDP gradient buckets" not in log


def test_sd3_two_process_training_with_lora(prompts_file, tmp_path):
    """train_tfd_sd3.py on 2 processes (LoRA on a tiny SD3 pipeline without T5): disjoint prompts, identical
    adapters on both ranks after every step, one export."""
    from tiny_sd3 import make_tiny_sd3_pipeline

    teacher, out, dbg = tmp_path / "sd3", tmp_path / "out", tmp_path / "debug"
    make_tiny_sd3_pipeline(save_dir=str(teacher), seed=0)
    args = sdxl_args(str(teacher), prompts_file, out, tmp_path / "cache", "--max_train_steps", 2,
                     "--checkpointing_steps", 2, "--feature_layers", "block:0 block:-1", "--train_mode", "lora",
                     "--lora_rank", 4, "--lora_alpha", 4)
    launch("train_tfd_sd3.py", args, TFD_DEBUG_DIR=dbg)
    d0, d1 = debug_records(dbg, "draws", 0), debug_records(dbg, "draws", 1)
    assert all(a["prompts"] != b["prompts"] for a, b in zip(d0, d1))
    assert_synchronised(dbg, [1, 2], skipped=set())
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and os.path.isfile(out / "pytorch_lora_weights.safetensors")


def test_accelerate_configs_load():
    """The shipped configs (examples/accelerate_configs/) are accelerate config files with the engines they name."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = os.path.join(ROOT, "examples", "accelerate_configs")
    want = {"1gpu.yaml": ("NO", 1), "8gpu_ddp.yaml": ("MULTI_GPU", 8), "fsdp_full_shard.yaml": ("FSDP", 8),
            "deepspeed_zero2.yaml": ("DEEPSPEED", 8), "multinode_2x8gpu.yaml": ("MULTI_GPU", 16)}
    assert sorted(os.listdir(folder)) == sorted(want)
    for name, (engine, processes) in want.items():
        config = load_config_from_file(os.path.join(folder, name))
        assert (config.distributed_type.value, config.num_processes, config.mixed_precision) == (engine, processes,
                                                                                                   "bf16"), name
    fsdp = load_config_from_file(os.path.join(folder, "fsdp_full_shard.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # FSDP2, fully sharded
    assert load_config_from_file(os.path.join(folder, "deepspeed_zero2.yaml")).deepspeed_config["zero_stage"] == 2
    multinode = load_config_from_file(os.path.join(folder, "multinode_2x8gpu.yaml"))  # 2 machines x 8 GPUs
    assert (multinode.num_machines, multinode.machine_rank, multinode.rdzv_backend) == (2, 0, "static")
    assert multinode.main_process_ip and multinode.main_process_port  # placeholders: the launch command overrides them
