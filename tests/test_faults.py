"""Faults: runs SIGKILLed while writing a checkpoint or a cache entry, then resumed; non-finite
losses and gradients (skipped, counted, and a stop naming the last good checkpoint); a write that fails
half-way through (the model card, the LoRA export, the one-step scheduler) leaves the previous file.

The scripts have no test hooks: tests/instrument.py wraps library functions the loop calls, as the
environment asks. TFD_TEST_PAUSE pauses a run after accelerator.save_state wrote checkpoint-N.incomplete
but before its completion marker, or after a cache entry's temporary file was written but before its
rename, so that the test can SIGKILL it there; TFD_TEST_NONFINITE_STEPS makes chosen steps' losses
non-finite.
"""

import json
import os
import time

import pytest

import tfd_text2image
import tfd_training
from instrument import state_digest
from scaling_helpers import (
    PROMPTS,
    debug_records,
    imagenet_args,
    read_jsonl,
    run_in_process,
    run_until_pause_then_kill,
    sdxl_args,
)

LOSS_KEYS = ("loss/total", "loss/drift", "sigma/mean", "train/grad_norm")
MARKER = tfd_training.CHECKPOINT_COMPLETE


def assert_killed_mid_checkpoint(out, step, last_good):
    """What the kill left: the previous checkpoint complete; checkpoint-`step` written but unmarked
    under its temporary name; no export."""
    assert (out / f"checkpoint-{last_good}" / MARKER).exists()
    tmp = out / f"checkpoint-{step}.incomplete"
    assert (tmp / "unet").is_dir() and (tmp / "optimizer.bin").exists() and not (tmp / MARKER).exists()
    assert not (out / f"checkpoint-{step}").exists() and not (out / "unet").exists()
    assert tfd_training.list_checkpoints(str(out)) == [(last_good, str(out / f"checkpoint-{last_good}"))]
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        tfd_training.resolve_resume_checkpoint(str(out), str(tmp))


def assert_resumed(out, caplog, killed, last_good, step):
    assert "Ignoring incomplete checkpoint" in caplog.text and f"checkpoint-{step}.incomplete" in caplog.text
    assert f"Resumed from {out / f'checkpoint-{last_good}'} at step {last_good}." in caplog.text
    resumed = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, step + 1))  # the killed run's lines replaced, once each
    for a, b in zip(killed[last_good:], resumed[last_good:]):
        for key in LOSS_KEYS:
            assert a[key] == b[key], (a["step"], key)  # the uninterrupted run's losses, exactly
    assert (out / f"checkpoint-{step}" / MARKER).exists() and not (out / f"checkpoint-{step}.incomplete").exists()


def test_imagenet64_killed_while_checkpointing_resumes_from_the_last_complete_one(tiny_imagenet, tmp_path, caplog):
    import train_tfd_imagenet64 as script

    out = tmp_path / "run"
    argv = imagenet_args(tiny_imagenet, out, "--max_train_steps", 4, "--checkpointing_steps", 2)
    run_until_pause_then_kill(script, argv, tmp_path / "killed.log", "checkpoint:4")
    assert_killed_mid_checkpoint(out, 4, 2)
    killed = read_jsonl(out / "metrics.jsonl")  # steps 1–4 of an uninterrupted run
    assert [r["step"] for r in killed] == [1, 2, 3, 4]

    caplog.set_level("INFO")
    run_in_process(script, argv + ["--resume_from_checkpoint", "latest"])
    assert_resumed(out, caplog, killed, 2, 4)
    assert (out / "unet").is_dir()


def test_sdxl_killed_mid_cache_entry_and_mid_checkpoint(tiny_sdxl_dir, prompts_file, tmp_path, caplog):
    import train_tfd_sdxl as script

    cache, out = tmp_path / "cache", tmp_path / "run"
    # 1. Killed while writing the second cache entry: the first is complete, the second only a temporary file.
    prepare = sdxl_args(tiny_sdxl_dir, prompts_file, tmp_path / "prep", cache, "--prepare_positives_only")
    run_until_pause_then_kill(script, prepare, tmp_path / "cache_kill.log", f"cache_entry:{PROMPTS[1]}")
    (settings_dir,) = [p for p in cache.iterdir() if p.is_dir()]
    store = tfd_text2image.PositiveCache(str(cache), json.loads((settings_dir / "settings.json").read_text()))
    slots = ["teacher", "teacher"]
    entries = sorted(settings_dir.glob("entries/*/*"))
    (leftover,) = [p for p in entries if ".tmp-" in p.name]
    assert leftover.name.startswith(os.path.basename(store.path(PROMPTS[1], slots)) + ".tmp-")
    assert [p for p in entries if p != leftover] == [__import__("pathlib").Path(store.path(PROMPTS[0], slots))]
    assert store.load(PROMPTS[0], slots) is not None
    assert store.load(PROMPTS[1], slots) is None and not store.exists(PROMPTS[1], slots)  # the leftover is ignored
    old = time.time() - 2 * tfd_training.STALE_TMP_SECONDS  # as if the kill happened a while ago
    os.utime(leftover, (old, old))

    # 2. A training run on that cache (it cleans the leftover, fills misses on the fly), killed mid-checkpoint.
    argv = sdxl_args(tiny_sdxl_dir, prompts_file, out, cache, "--max_train_steps", 4, "--checkpointing_steps", 2)
    run_until_pause_then_kill(script, argv, tmp_path / "killed.log", "checkpoint:4")
    assert not leftover.exists()
    assert_killed_mid_checkpoint(out, 4, 2)
    killed = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in killed] == [1, 2, 3, 4]

    # 3. Resumed: from checkpoint-2, the same losses; the cache holds complete, valid entries only.
    caplog.set_level("INFO")
    run_in_process(script, argv + ["--resume_from_checkpoint", "latest"])
    assert_resumed(out, caplog, killed, 2, 4)
    files = sorted(settings_dir.glob("entries/*/*"))
    assert files and all(p.suffix == ".safetensors" for p in files)
    for p in PROMPTS:
        if store.exists(p, slots):
            assert store.load(p, slots)["positives"].shape == (2, 4, 8, 8)  # checksum verified


def test_imagenet64_nonfinite_losses_are_skipped_counted_then_stop(tiny_imagenet, tmp_path, monkeypatch):
    from diffusers import UNet2DModel

    import train_tfd_imagenet64 as script

    out, dbg = tmp_path / "run", tmp_path / "debug"
    monkeypatch.setenv("TFD_DEBUG_DIR", str(dbg))
    monkeypatch.setenv("TFD_TEST_NONFINITE_STEPS", "3,4,5")
    monkeypatch.setenv("TFD_TEST_NONFINITE_KIND", "inf")
    with pytest.raises(RuntimeError, match=r"3 consecutive non-finite steps: stopping\. Last good checkpoint: "
                                           r".*checkpoint-2\. "):
        run_in_process(script, imagenet_args(tiny_imagenet, out, "--max_train_steps", 8, "--checkpointing_steps", 2,
                                             "--max_bad_steps", 3))
    assert_stopped_with_nothing_overwritten(out, dbg, UNet2DModel)


def test_sdxl_infinite_gradients_are_skipped_counted_then_stop(tiny_sdxl_dir, prompts_file, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    import train_tfd_sdxl as script

    out, dbg = tmp_path / "run", tmp_path / "debug"
    monkeypatch.setenv("TFD_DEBUG_DIR", str(dbg))
    monkeypatch.setenv("TFD_TEST_NONFINITE_STEPS", "3,4,5")
    monkeypatch.setenv("TFD_TEST_NONFINITE_KIND", "grad")  # the loss stays finite: the gradient check catches it
    with pytest.raises(RuntimeError, match=r"3 consecutive non-finite steps: stopping\. Last good checkpoint: "
                                           r".*checkpoint-2\. "):
        run_in_process(script, sdxl_args(tiny_sdxl_dir, prompts_file, out, tmp_path / "cache", "--max_train_steps", 8,
                                         "--checkpointing_steps", 2, "--max_bad_steps", 3))
    assert_stopped_with_nothing_overwritten(out, dbg, UNet2DConditionModel)


def assert_stopped_with_nothing_overwritten(out, dbg, model_cls):
    steps = debug_records(dbg, "steps", 0)
    # (the stop at step 5 comes before its record)
    assert [(r["step"], r["ok"]) for r in steps] == [(1, True), (2, True), (3, False), (4, False)]
    digest = {r["step"]: r["digest"] for r in steps}
    assert digest[2] != digest[1] and digest[3] == digest[4] == digest[2]  # skipped: weights untouched
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["train/bad_steps"]) for r in rows] == [(1, 0), (2, 0), (3, 1), (4, 2)]  # counted
    # No checkpoint inside the bad run, the good one holds the step-2 weights, nothing exported.
    assert tfd_training.list_checkpoints(str(out)) == [(2, str(out / "checkpoint-2"))]
    assert not [p for p in os.listdir(out) if p.endswith(".incomplete")]
    assert state_digest(model_cls.from_pretrained(out / "checkpoint-2" / "unet")) == digest[2]
    assert not (out / "unet").exists() and not (out / "model_index.json").exists()


# ----------------------------------------------------------------------------------------------
# A write that fails half-way through: the files a run ends with go to a temporary name first.
# ----------------------------------------------------------------------------------------------


def fail_half_way(path, data=b"partial"):
    """What a writer killed mid-file leaves: some bytes at `path`, then an error."""
    with open(path, "wb") as f:
        f.write(data)
    raise OSError("disk full (injected)")


def test_a_write_that_fails_half_way_leaves_the_previous_card_lora_weights_and_scheduler(tiny_sdxl_dir, tmp_path,
                                                                                          monkeypatch):
    from types import SimpleNamespace

    import safetensors.torch
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from huggingface_hub.repocard import RepoCard
    from peft import LoraConfig

    out = tmp_path / "out"
    out.mkdir()
    args = SimpleNamespace(hub_token=None, push_to_hub=False, output_dir=str(out))

    def card(title):
        tfd_training.save_model_card(args, "me/student", str(tmp_path), ["tfd"], title, "text", "pass", {"a": 1})

    card("first")
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]))
    tfd_text2image.export_trainable(unet, str(out), True, StableDiffusionXLPipeline, "unet")
    scheduler = tfd_text2image.vp_one_step_scheduler(DDIMScheduler().config, 399)
    tfd_training.save_into(str(out), lambda tmp: scheduler.save_pretrained(os.path.join(tmp, "scheduler")))
    before = {p: p.read_bytes() for p in (out / "README.md", out / "pytorch_lora_weights.safetensors",
                                          out / "scheduler" / "scheduler_config.json")}

    monkeypatch.setattr(RepoCard, "save", lambda self, path: fail_half_way(path))
    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, metadata=None: fail_half_way(path))
    monkeypatch.setattr(DDIMScheduler, "to_json_file", lambda self, path: fail_half_way(path))
    with pytest.raises(OSError, match="injected"):
        card("second")
    with pytest.raises(OSError, match="injected"):
        tfd_text2image.export_trainable(unet, str(out), True, StableDiffusionXLPipeline, "unet")
    with pytest.raises(OSError, match="injected"):
        tfd_training.save_into(str(out), lambda tmp: scheduler.save_pretrained(os.path.join(tmp, "scheduler")))
    for path, data in before.items():
        assert path.read_bytes() == data, path  # the previous file, whole: the partial one went elsewhere
    assert "first" in (out / "README.md").read_text() and b"partial" not in b"".join(before.values())

    monkeypatch.undo()  # the next saves clear the leftovers and move their files in
    card("third")
    tfd_text2image.export_trainable(unet, str(out), True, StableDiffusionXLPipeline, "unet")
    tfd_training.save_into(str(out), lambda tmp: scheduler.save_pretrained(os.path.join(tmp, "scheduler")))
    assert "third" in (out / "README.md").read_text()
    assert sorted(os.listdir(out)) == ["README.md", "pytorch_lora_weights.safetensors", "scheduler"]


def test_an_export_killed_while_moving_in_leaves_no_finished_run(tmp_path, monkeypatch):
    """The export moves its folders in first and model_index.json last, after removing the old one: a kill in
    between leaves no folder half-written and no run that counts as finished, so the same command with
    --resume_from_checkpoint latest exports again; a whole export is finished."""
    out = tmp_path / "out"

    def export(version):
        def write(tmp):
            for part in ("unet", "scheduler"):
                os.makedirs(os.path.join(tmp, part))
                with open(os.path.join(tmp, part, "config.json"), "w") as f:
                    f.write(version)
            with open(os.path.join(tmp, "model_index.json"), "w") as f:
                f.write(version)
        tfd_training.save_into(str(out), write, "pipeline")

    out.mkdir()
    (out / "training_args.json").write_text(json.dumps({"max_train_steps": 2}))
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    export("old")
    assert tfd_training.finished_steps(str(out)) == 2

    replace, moved = os.replace, []

    def killed_after_one(src, dst):
        if moved:
            raise KeyboardInterrupt  # the kill, after the first entry moved in
        moved.append(os.path.basename(dst))
        replace(src, dst)

    monkeypatch.setattr(tfd_training.os, "replace", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        export("new")
    monkeypatch.undo()
    assert moved == ["scheduler"] and not (out / "model_index.json").exists()
    assert tfd_training.finished_steps(str(out)) is None  # not finished: it is exported again
    assert all(open(p).read() in ("old", "new") for p in glob_configs(out))  # whole folders only
    export("new")
    assert tfd_training.finished_steps(str(out)) == 2
    assert (out / "model_index.json").read_text() == "new" and {open(p).read() for p in glob_configs(out)} == {"new"}


def glob_configs(out):
    return [str(p) for p in out.glob("*/config.json")]
