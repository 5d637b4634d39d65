# Runs and flags as diffusers' examples have them: nothing the user has is lost (a finished run resumed with
# --resume_from_checkpoint latest is left alone), the conventions they know from diffusers' examples (checkpoint
# names, --help defaults, trackers and 8-bit Adam, warm-up, resuming with other settings, a typo in a path, an
# offline Hub id, the same flag names), the positive cache saying why it starts over, decoding threads, Ctrl-C.
# Tiny teachers, offline, CPU.
import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch

import tfd_text2image
import tfd_training
import train_tfd_imagenet64 as imagenet64
import train_tfd_sd3 as sd3
import train_tfd_sdxl as sdxl
from scaling_helpers import argv_of, read_jsonl, run_in_process, script_parser

SCRIPTS = {"sdxl": sdxl, "sd3": sd3, "imagenet64": imagenet64}
QUIET = ("--validation_steps", "0", "--report_to", "none", "--mixed_precision", "no")


def snapshot(folder):
    """{relative path: (mtime_ns, size, SHA-256)} of every file under folder, and the folders themselves."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.stat(path)
            digest = None
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, folder)] = (st.st_mtime_ns, st.st_size, digest)
    return out


# ----------------------------------------------------------------------------------------------
# 1. Nothing the user has is lost: a finished run resumed with --resume_from_checkpoint latest.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_resume_latest_on_a_finished_run_touches_nothing_and_says_where_the_student_is(world, tmp_path, caplog,
                                                                                       script):
    out = tmp_path / "out"
    argv = argv_of(world, script, out, "--max_train_steps", 2, "--checkpointing_steps", 1, *QUIET)
    run_in_process(SCRIPTS[script], argv)
    before = snapshot(out)
    assert "metrics.jsonl" in before and "checkpoint-2" in before and "README.md" in before
    caplog.set_level(logging.INFO)
    assert run_in_process(SCRIPTS[script], argv + ["--resume_from_checkpoint", "latest"]) is None
    assert snapshot(out) == before  # every file's mtime and bytes, and no new file
    assert (f"{out} holds a finished run of 2 steps; nothing was changed. Its student: "
            f"DiffusionPipeline.from_pretrained('{out}')") in caplog.text
    assert "Resumed from" not in caplog.text and "starting a new run" not in caplog.text


def test_a_finished_run_continues_from_its_newest_checkpoint_only_when_asked_for_more_steps(world, tmp_path,
                                                                                           caplog):
    caplog.set_level(logging.INFO)
    # Kept checkpoints: --max_train_steps raised continues from the newest one, as any resume does.
    out = tmp_path / "kept"
    argv = argv_of(world, "imagenet64", out, "--checkpointing_steps", 1, *QUIET)
    run_in_process(imagenet64, argv + ["--max_train_steps", "2"])
    run_in_process(imagenet64, argv + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    assert f"Resumed from {out / 'checkpoint-2'} at step 2." in caplog.text
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    # A continuation to 4 steps (its training_args.json says so) killed after checkpoint-3, before its export: the
    # export there is the 3-step run's, so the run is not finished and resumes.
    settings = json.loads((out / "training_args.json").read_text())
    (out / "training_args.json").write_text(json.dumps({**settings, "max_train_steps": 4}))
    caplog.clear()
    run_in_process(imagenet64, argv + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    assert f"Resumed from {out / 'checkpoint-3'} at step 3." in caplog.text

    # No checkpoint: the same steps are nothing to do; more steps cannot be had, and nothing is overwritten.
    out = tmp_path / "no_checkpoint"
    argv = argv_of(world, "imagenet64", out, "--checkpointing_steps", 100, *QUIET)
    run_in_process(imagenet64, argv + ["--max_train_steps", "2"])
    before = snapshot(out)
    assert not tfd_training.list_checkpoints(str(out))
    caplog.clear()
    run_in_process(imagenet64, argv + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"])
    assert f"{out} holds a finished run of 2 steps; nothing was changed" in caplog.text
    with pytest.raises(FileExistsError, match=rf"{out} holds a finished run of 2 steps without a checkpoint: it "
                                              r"cannot be continued to --max_train_steps 5\. Choose a new "
                                              r"--output_dir"):
        run_in_process(imagenet64, argv + ["--max_train_steps", "5", "--resume_from_checkpoint", "latest"])
    assert snapshot(out) == before


# ----------------------------------------------------------------------------------------------
# 2. Conventions.
# ----------------------------------------------------------------------------------------------


def test_resume_from_a_checkpoint_name_inside_the_output_dir(tmp_path, monkeypatch):
    out = tmp_path / "out"
    for step in (3, 5):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / tfd_training.CHECKPOINT_COMPLETE).write_text(f"{step}\n")
    monkeypatch.chdir(tmp_path)  # the name is looked up in --output_dir, not the working folder
    assert tfd_training.resolve_resume_checkpoint(str(out), "checkpoint-3") == str(out / "checkpoint-3")
    assert tfd_training.resolve_resume_checkpoint(str(out), "latest") == str(out / "checkpoint-5")
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint 'checkpoint-4' does not exist"):
        tfd_training.resolve_resume_checkpoint(str(out), "checkpoint-4")


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_help_shows_the_default_of_every_flag(script, capsys):
    parser = script_parser(SCRIPTS[script])
    formatter = parser._get_formatter()
    text = "".join(parser.format_help().split())  # without the line breaks of wrapping (also after hyphens)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 60
    for action in flags:
        assert "%(default)" in formatter._get_help_string(action), action.option_strings
        shown = formatter._expand_help(action)
        assert shown.endswith(f"(default: {action.default})"), action.option_strings
        assert "".join(shown.split()) in text, action.option_strings


ABSENT_TRACKERS = [t for t in ("wandb", "comet_ml", "mlflow") if importlib.util.find_spec(t) is None]


@pytest.mark.skipif(not ABSENT_TRACKERS, reason="every tracker is installed here")
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_tracker_or_bitsandbytes_that_is_not_installed_fails_at_parse_time_with_the_pip_command(world, tmp_path,
                                                                                                  script):
    for tracker in ABSENT_TRACKERS:
        with pytest.raises(ValueError, match=rf"--report_to {tracker} needs the {tracker} package, which is not "
                                             rf"installed: `pip install {tracker}`\."):
            SCRIPTS[script].parse_args(argv_of(world, script, tmp_path, "--report_to", tracker))
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match=r"--use_8bit_adam needs the bitsandbytes package, which is not "
                                             r"installed: `pip install bitsandbytes`\."):
            SCRIPTS[script].parse_args(argv_of(world, script, tmp_path, "--use_8bit_adam"))


def test_a_warm_up_longer_than_the_run_warns(world, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="tfd_training")
    sdxl.parse_args(argv_of(world, "sdxl", tmp_path, "--lr_warmup_steps", 50, "--max_train_steps", 10))
    assert ("--lr_warmup_steps 50 is longer than the run (--max_train_steps 10): the learning rate never reaches "
            "--learning_rate 0.001.") in caplog.text
    caplog.clear()
    sdxl.parse_args(argv_of(world, "sdxl", tmp_path, "--lr_warmup_steps", 50, "--max_train_steps", 10,
                            "--lr_scheduler", "constant"))  # no warm-up in this schedule
    sdxl.parse_args(argv_of(world, "sdxl", tmp_path, "--lr_warmup_steps", 10, "--max_train_steps", 10))
    assert "--lr_warmup_steps" not in caplog.text


@pytest.mark.parametrize("script", ["sdxl", "sd3"])
def test_resuming_with_another_train_mode_or_lora_shape_fails_before_any_weight_loads(world, tmp_path, monkeypatch,
                                                                                      script):
    module = SCRIPTS[script]

    def run(out, *extra):
        return run_in_process(module, argv_of(world, script, out, "--checkpointing_steps", 1, *QUIET, *extra))

    full, lora = tmp_path / "full", tmp_path / "lora"
    run(full, "--max_train_steps", 1)
    run(lora, "--max_train_steps", 1, "--train_mode", "lora", "--lora_rank", 4)
    assert json.loads((lora / "checkpoint-1" / tfd_text2image.TRAINABLE_FILE).read_text())["lora_rank"] == 4
    loaded = []
    monkeypatch.setattr(tfd_text2image, "load_pipeline", lambda *a, **kw: loaded.append(a) or 1 / 0)
    resume = ("--max_train_steps", 2, "--resume_from_checkpoint", "latest")
    with pytest.raises(ValueError, match=rf"--resume_from_checkpoint {full / 'checkpoint-1'} holds --train_mode full; "
                                         r"this run asks for --train_mode lora\. Resume with the checkpoint's "
                                         r"settings, or start a new run in a new --output_dir\."):
        run(full, *resume, "--train_mode", "lora")
    with pytest.raises(ValueError, match=r"holds --train_mode lora; this run asks for --train_mode full"):
        run(lora, *resume)
    with pytest.raises(ValueError, match=r"holds --lora_rank 4; this run asks for --lora_rank 8\."):
        run(lora, *resume, "--train_mode", "lora", "--lora_rank", 8)
    with pytest.raises(ValueError, match=r"holds --lora_rank 4 --lora_target_modules \S+; this run asks for "
                                         r"--lora_rank 8 --lora_target_modules to_q\."):
        run(lora, *resume, "--train_mode", "lora", "--lora_rank", 8, "--lora_target_modules", "to_q")
    # A checkpoint of a run before checkpoints recorded it: the run's training_args.json tells.
    (full / "checkpoint-1" / tfd_text2image.TRAINABLE_FILE).unlink()
    with pytest.raises(ValueError, match=r"holds --train_mode full; this run asks for --train_mode lora"):
        run(full, *resume, "--train_mode", "lora")
    assert not loaded


def test_a_new_positive_cache_names_the_settings_that_differ_from_the_caches_there(tmp_path, caplog):
    from diffusers import EulerDiscreteScheduler

    args = SimpleNamespace(pretrained_model_name_or_path="org/teacher", revision=None, variant=None,
                           pretrained_vae_model_name_or_path=None, teacher_dtype="fp32", resolution=32,
                           num_positive_steps=50, positive_guidance_scale=6.0, positive_seed=0, image_column=None,
                           cache_dtype="float16", positive_cache_dir=str(tmp_path / "cache"))
    logger = logging.getLogger("test_positive_cache")
    caplog.set_level(logging.INFO, logger="test_positive_cache")
    scheduler = EulerDiscreteScheduler()
    first = tfd_text2image.open_positive_cache(args, scheduler, logger)
    first.save("a cat", ["teacher"], {"positives": torch.zeros(1, 4, 2, 2)})
    assert "differ" not in caplog.text and "other settings" not in caplog.text
    args.resolution, args.num_positive_steps = 64, 4
    other = EulerDiscreteScheduler(beta_end=0.03)
    second = tfd_text2image.open_positive_cache(args, other, logger)
    assert second.dir != first.dir and second.new
    assert (f"Positive cache: new for these settings; {first.dir} was made with other num_positive_steps: 50 there, "
            "4 here; resolution: 32 there, 64 here; scheduler.beta_end: 0.02 there, 0.03 here. Its entries are not "
            "reused.") in caplog.text
    second.save("a cat", ["teacher"], {"positives": torch.zeros(1, 4, 2, 2)})
    caplog.clear()
    again = tfd_text2image.open_positive_cache(args, other, logger)  # reused: nothing is rebuilt, nothing to explain
    assert again.dir == second.dir and not again.new and "was made with other" not in caplog.text


FAST = 5.0  # seconds: a bad teacher or data path fails before anything loads


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_local_path_that_does_not_exist_is_not_taken_for_a_hub_id(world, tmp_path, monkeypatch, script):
    module = SCRIPTS[script]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    data_flag = "--dataset_name" if script == "imagenet64" else "--prompts_file"
    for flag, value in (("--pretrained_model_name_or_path", str(tmp_path / "teacher-typo")),
                        ("--pretrained_model_name_or_path", "./teacher-typo"),
                        ("--pretrained_model_name_or_path", "models/teacher-typo"),  # `models` is a folder here
                        ("--pretrained_model_name_or_path", "a/b/c"),
                        ("--pretrained_vae_model_name_or_path", "../vae-typo"),
                        ("--dataset_name", str(tmp_path / "data-typo")),
                        ("--train_data_dir", "images")):
        if flag == "--pretrained_vae_model_name_or_path" and script == "imagenet64":
            continue
        if flag == "--train_data_dir" and script != "imagenet64":
            continue
        argv = argv_of(world, script, tmp_path / "out", *QUIET)
        if flag == "--dataset_name" and script != "imagenet64":
            i = argv.index(data_flag)
            argv[i:i + 2] = []
        argv += [flag, value]
        start = time.perf_counter()
        with pytest.raises(FileNotFoundError, match=rf"{flag} \S*{value.lstrip('./')}: no such file or folder \(a "
                                                    r"local path, relative to .*; a Hub id is NAME or ORG/NAME\)\."):
            run_in_process(module, argv)
        assert time.perf_counter() - start < FAST, (flag, value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_an_offline_hub_id_not_in_the_cache_fails_fast_and_says_so(world, tmp_path, monkeypatch, script):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, as conftest.py sets it
    for flag in ("--pretrained_model_name_or_path", "--pretrained_vae_model_name_or_path"):
        if flag != "--pretrained_model_name_or_path" and script == "imagenet64":
            continue
        argv = argv_of(world, script, tmp_path / "out", *QUIET, flag, "someone-else/not-downloaded")
        start = time.perf_counter()
        with pytest.raises(OSError, match=rf"{flag} someone-else/not-downloaded: not in the local Hub cache \(.*\), "
                                          r"and HF_HUB_OFFLINE is set: download it first \(`hf download "
                                          r"someone-else/not-downloaded`\), unset HF_HUB_OFFLINE, or pass a local "
                                          r"folder\."):
            run_in_process(SCRIPTS[script], argv + ["--cache_dir", str(tmp_path / "hub")])
        assert time.perf_counter() - start < FAST
    assert not (tmp_path / "out").exists()
    url = SimpleNamespace(pretrained_model_name_or_path="https://example.org/edm-imagenet-64x64-cond-adm.pkl")
    tfd_training.check_sources(url, models=("pretrained_model_name_or_path",))  # a URL is no Hub id: not checked


DIFFUSERS_ONLY_IN_IMAGENET = {"num_validation_images": "--validation_prompts", "use_ema": "No --use_ema here",
                              "train_data_dir": "--dataset_name", "dataloader_num_workers": "--dataloader_num_workers"}
OWN_DEFAULTS = {  # shared flags whose default is each script's recipe, or whose column holds other things
    "output_dir", "tracker_project_name", "learning_rate", "max_train_steps", "max_grad_norm", "validation_steps",
    "checkpointing_steps", "feature_layers", "drift_radii", "feature_noise_min",
    "image_column"}  # ImageNet: the training images ("image"); text-to-image: optional real positives (none)


def test_flags_the_scripts_share_have_one_name_and_default_and_the_others_say_why(capsys):
    parsers = {name: script_parser(module) for name, module in SCRIPTS.items()}
    flags = {name: {a.dest: a for a in p._actions if a.option_strings and a.dest != "help"}
             for name, p in parsers.items()}
    t2i = set(flags["sdxl"]) & set(flags["sd3"])
    assert set(flags["sdxl"]) - t2i == {"conditioning_timestep"} and set(flags["sd3"]) - t2i == {"drop_t5"}
    shared = t2i & set(flags["imagenet64"])
    assert OWN_DEFAULTS <= shared and len(shared) > 40
    for dest in sorted(shared - OWN_DEFAULTS):  # the same meaning: the same name, spelling and default
        a, b, c = (flags[n][dest] for n in ("imagenet64", "sdxl", "sd3"))
        assert all(f"--{dest}" in x.option_strings for x in (a, b, c)), dest  # (ImageNet: and an alias)
        assert a.default == b.default == c.default, dest
    # diffusers' flags only the ImageNet script has: the text-to-image --help says what to use instead, or why not.
    for dest, where in DIFFUSERS_ONLY_IN_IMAGENET.items():
        assert dest in flags["imagenet64"] and dest not in t2i
        for name in ("sdxl", "sd3"):
            text = " ".join(parsers[name].format_help().split())
            assert f"--{dest}" in text and where in text, (name, dest)
    text = " ".join(parsers["sdxl"].format_help().split())
    assert ("repeat it: each position has its own seed (what the ImageNet script's --num_validation_images sets)"
            in text)
    assert "an imagefolder with a metadata.jsonl of captions: what --train_data_dir is elsewhere" in text
    assert "No --use_ema here (the ImageNet script has it): an EMA of a full student is a second float32 copy" in text


@pytest.mark.parametrize("preload_max_gb", [8.0, 0.0])  # preloaded into memory / decoded on the fly
def test_decoding_threads_give_the_same_images_in_the_same_order(tmp_path, preload_max_gb):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / str(c)).mkdir()
        for i in range(70):  # more than one preloading chunk per thread
            size = tuple(int(v) for v in rng.integers(10, 40, 2))
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / str(c) / f"{i}.png")
    labels, fetch, _ = imagenet64.open_labelled_images(train_data_dir=str(tmp_path))
    serial = imagenet64.LabelledImages(labels, fetch, 3, 16, preload_max_gb, progress=False)
    threads = imagenet64.LabelledImages(labels, fetch, 3, 16, preload_max_gb, progress=False, workers=2)
    assert threads.pool is not None and serial.pool is None
    if preload_max_gb:
        assert torch.equal(serial.data, threads.data) and serial.data.shape == (210, 3, 16, 16)
    idx = torch.tensor([[5, 200, 7, 7], [0, 209, 100, 3]])
    assert torch.equal(serial.get(idx), threads.get(idx)) and serial.get(idx).shape == (2, 4, 3, 16, 16)
    assert not torch.equal(serial.get(idx)[0, 0], serial.get(idx)[0, 1])


def test_dataloader_num_workers_reaches_the_images(world, tmp_path, monkeypatch):
    seen = []
    original = imagenet64.LabelledImages.__init__

    def record(self, *a, **kw):
        seen.append(kw.get("workers"))
        original(self, *a, **kw)

    monkeypatch.setattr(imagenet64.LabelledImages, "__init__", record)
    run_in_process(imagenet64, argv_of(world, "imagenet64", tmp_path / "out", "--max_train_steps", 1, *QUIET,
                                       "--dataloader_num_workers", 2))
    assert seen == [2]
    with pytest.raises(ValueError, match="--dataloader_num_workers -1: must be >= 0"):
        imagenet64.parse_args(argv_of(world, "imagenet64", tmp_path / "o", "--dataloader_num_workers", -1))


# ----------------------------------------------------------------------------------------------
# 3. Ctrl-C: one line naming the last checkpoint, no traceback, the trackers closed.
# ----------------------------------------------------------------------------------------------


def _interrupted_main(module, argv, log_path):
    """The run in a forked process whose whole output goes to log_path (pytest's log capture taken off: the
    script's own logging set-up writes to stderr), pausing while checkpoint-2 is written."""
    import sys

    import accelerate

    from scaling_helpers import _forked_main

    for handler in logging.getLogger().handlers[:]:
        logging.getLogger().removeHandler(handler)
    end_training = accelerate.Accelerator.end_training

    def recorded(self):
        print("END_TRAINING", file=sys.stderr, flush=True)
        end_training(self)

    accelerate.Accelerator.end_training = recorded  # the forked process's own copy
    _forked_main(module, argv, log_path, {"TFD_TEST_PAUSE": "checkpoint:2", "TFD_TEST_PAUSE_SECONDS": 600})


@pytest.mark.parametrize("script", ["sdxl", "imagenet64"])
def test_ctrl_c_during_training_prints_one_line_with_the_last_checkpoint_and_no_traceback(world, tmp_path, script):
    """A real SIGINT while checkpoint-2 is being written (tests/instrument.py pauses there)."""
    out, log = tmp_path / "out", tmp_path / "run.log"
    argv = argv_of(world, script, out, "--max_train_steps", 4, "--checkpointing_steps", 1, "--validation_steps", 0,
                   "--report_to", "tensorboard", "--mixed_precision", "no")
    child = multiprocessing.get_context("fork").Process(target=_interrupted_main,
                                                        args=(SCRIPTS[script], argv, str(log)))
    child.start()
    deadline = time.time() + 300
    while "TFD_TEST_PAUSE checkpoint:2" not in (log.read_text() if log.exists() else ""):
        assert child.is_alive() and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGINT)
    child.join(120)
    text = log.read_text()
    assert child.exitcode == 130, text[-3000:]
    lines = [ln for ln in text.splitlines() if "interrupted" in ln.lower()]
    assert len(lines) == 1, lines
    assert lines[0].endswith(f"Training interrupted: the last checkpoint is {out / 'checkpoint-1'}. Run the same "
                             "command with --resume_from_checkpoint latest to continue.")
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert text.count("END_TRAINING") == 1  # accelerator.end_training ran (the trackers closed), once
    assert not (out / "samples.png").exists() and not (out / "README.md").exists()
