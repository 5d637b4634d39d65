"""What the scripts' build() puts on the accelerator device, when and in which dtype, and the start-up memory lines.

On a machine without a GPU the accelerator's device is the CPU, where a move to the device and a move back to the
CPU look alike. These tests name the accelerator's device `cpu:0` (Accelerator.device): torch accepts it as a
target (the tensors stay in the same memory and report `cpu`), so every move the code makes to the accelerator
(`.to(accelerator.device)`) and every move back (`.to("cpu")`) differ in the record a `Ledger` keeps: each
torch.nn.Module.to call (diffusers', transformers' and tfd_training.cast end in it, and so does accelerate's
prepare) with its target and the module's parameter dtypes after it, and each copy.deepcopy of a module (a copy
is made where its original is). From it, event by event: which modules the device holds, in which dtypes.
Tiny random teachers, offline, CPU."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

import tfd_text2image
import tfd_training
import train_tfd_imagenet64 as imagenet64
import train_tfd_sd3 as sd3
import train_tfd_sdxl as sdxl
from scaling_helpers import imagenet_args, reset_accelerate, run_in_process, sdxl_args

DEVICE = torch.device("cpu", 0)  # the accelerator's device in the placement tests (module docstring)
SCRIPTS = {"sdxl": sdxl, "sd3": sd3, "imagenet64": imagenet64}
DENOISERS = {"sdxl": "UNet2DConditionModel", "sd3": "SD3Transformer2DModel", "imagenet64": "UNet2DModel"}
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


def dtypes(module):
    return frozenset(p.dtype for p in module.parameters())


class Ledger:
    """The modules the device holds, event by event (module docstring). events: SimpleNamespace(module, target,
    dtypes, held) with target a torch.device, None (a dtype cast) or "copy", and held: [(class name, dtypes)] of
    the modules on the device after the event."""

    def __init__(self, monkeypatch):
        self.on, self.events = {}, []
        original_to, original_deepcopy = torch.nn.Module.to, copy.deepcopy

        def to(module, *args, **kwargs):
            out = original_to(module, *args, **kwargs)
            target = torch._C._nn._parse_to(*args, **kwargs)[0]
            if target is not None:
                if target == DEVICE:
                    self.on[id(module)] = module
                else:
                    self.on.pop(id(module), None)
            self.record(module, target)
            return out

        def deepcopy(x, memo=None):
            out = original_deepcopy(x, memo)
            if memo is None and isinstance(x, torch.nn.Module):
                if id(x) in self.on:
                    self.on[id(out)] = out
                self.record(out, "copy")
            return out

        monkeypatch.setattr(torch.nn.Module, "to", to)
        monkeypatch.setattr(copy, "deepcopy", deepcopy)

    def record(self, module, target):
        held = [(type(m).__name__, dtypes(m)) for m in self.on.values()]
        self.events.append(SimpleNamespace(module=module, target=target, dtypes=dtypes(module), held=held))

    def holds(self, module):
        return id(module) in self.on

    def moves_to_device(self, module, events=None):
        return [e for e in (self.events if events is None else events) if e.module is module and e.target == DEVICE]

    def most_float32(self, class_name, events=None):
        """The most float32 modules of this class the device held at once."""
        return max(sum(name == class_name and d == {torch.float32} for name, d in e.held)
                   for e in (self.events if events is None else events))


@pytest.fixture
def ledger(monkeypatch):
    monkeypatch.setattr(Accelerator, "device", property(lambda self: DEVICE))
    return Ledger(monkeypatch)


@pytest.fixture(scope="module")
def tiny_sd3_t5_dir(tmp_path_factory):
    """A tiny SD3 pipeline saved WITH a T5 encoder (tests/tiny_sd3.py, t5=True)."""
    from tiny_sd3 import make_tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny_sd3_t5") / "pipeline"
    make_tiny_sd3_pipeline(save_dir=str(path), seed=0, t5=True)
    return str(path)


@pytest.fixture
def teachers(tiny_sdxl_dir, tiny_sd3_dir, tiny_sd3_t5_dir, tiny_imagenet, prompts_file):
    return {"sdxl": tiny_sdxl_dir, "sd3": tiny_sd3_dir, "sd3_t5": tiny_sd3_t5_dir, "imagenet64": tiny_imagenet,
            "prompts": prompts_file}


def argv(name, teachers, tmp_path, *extra):
    out = tmp_path / "out"
    if name == "imagenet64":
        return imagenet_args(teachers["imagenet64"], out, "--num_generated", 2, *extra)
    teacher = teachers["sd3_t5" if name == "sd3" and "--t5" in extra else name]
    extra = [str(e) for e in extra if e != "--t5"]
    return sdxl_args(teacher, teachers["prompts"], out, tmp_path / "cache", "--num_positive_steps", 1, *extra) + (
        ["--feature_layers", "block:0 block:-1"] if name == "sd3" else [])


def build(name, args, **kw):
    accelerator = Accelerator(mixed_precision="no")
    try:
        return accelerator, SCRIPTS[name].build(args, accelerator, **kw)
    finally:
        reset_accelerate()


def side_modules(run):
    """The pipeline's text encoders and VAE."""
    return [m for k, m in run.pipe.components.items()
            if m is not None and (k.startswith("text_encoder") or k == "vae")]


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_full_student_is_copied_off_the_device_then_the_teacher_arrives_in_bf16_then_the_student(
        name, teachers, tmp_path, ledger):
    """--teacher_dtype bf16, full fine-tune: the device never holds two float32 denoisers (the student is copied on
    the CPU from the denoiser as loaded), the teacher reaches it already in bfloat16 and before the student, and
    while a denoiser is there no text encoder or VAE is (SD3: with its T5)."""
    args = SCRIPTS[name].parse_args(argv(name, teachers, tmp_path, "--teacher_dtype", "bf16", "--t5"))
    _, run = build(name, args)
    teacher, student = run.teacher, run.student
    assert dtypes(teacher) == {torch.bfloat16} and dtypes(student) == {torch.float32}
    assert ledger.holds(teacher) and ledger.holds(student)
    moves = ledger.moves_to_device(teacher)
    assert moves and all(e.dtypes == {torch.bfloat16} for e in moves)  # never a float32 teacher there
    assert ledger.most_float32(DENOISERS[name]) == 1
    first = ledger.events.index(moves[0])
    assert not any(e.module is student for e in ledger.events[:first] if e.target == DEVICE)  # the teacher first
    copied = [e for e in ledger.events if e.module is student and e.target == "copy"]
    assert len(copied) == 1 and ledger.events.index(copied[0]) < first  # copied before the teacher moved or cast
    with_denoiser = [e for e in ledger.events if any(n == DENOISERS[name] for n, _ in e.held)]
    assert with_denoiser and not any(n in TEXT_ENCODERS or n == "AutoencoderKL" for e in with_denoiser
                                     for n, _ in e.held)
    if name == "sd3":
        assert type(run.pipe.text_encoder_3).__name__ == "T5EncoderModel"


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_text_encoders_and_vae_encode_the_validation_prompts_then_come_back_only_for_a_cache_miss(
        name, teachers, tmp_path, ledger):
    """After build() (an empty positive cache) the text encoders and VAE are off the device, the denoisers on it;
    the text encoders were there for the validation prompts, before any denoiser; a cache miss brings the text
    encoders and VAE for its entry and sends them back."""
    args = SCRIPTS[name].parse_args(argv(name, teachers, tmp_path, "--t5"))
    _, run = build(name, args)
    sides = side_modules(run)
    assert len(sides) == (4 if name == "sd3" else 3)
    assert not any(ledger.holds(m) for m in sides) and ledger.holds(run.student) and ledger.holds(run.teacher)
    encoders = [m for m in sides if type(m).__name__ in TEXT_ENCODERS]
    denoiser_first = min(i for i, e in enumerate(ledger.events) if e.target == DEVICE
                         and type(e.module).__name__ == DENOISERS[name])
    assert all(ledger.moves_to_device(m, ledger.events[:denoiser_first]) for m in encoders)
    assert run.val_embeds[0].shape[0] == len(args.validation_prompts)

    start = len(ledger.events)
    assert run.positives.missing(run.prompts[:1])
    run.positives.get(run.prompts[0])
    assert run.positives.stats["generated"] == 1
    during = ledger.events[start:]
    for m in sides:
        moves = [e.target for e in during if e.module is m]
        assert moves == [DEVICE, torch.device("cpu")], (type(m).__name__, moves)
    assert not any(ledger.holds(m) for m in sides) and ledger.holds(run.student)


def test_prepare_positives_only_keeps_the_text_encoders_and_vae_on_the_device(teachers, tmp_path, ledger):
    """--prepare_positives_only: the teacher (in --teacher_dtype) and the text encoders and VAE stay on the device
    for every entry; no student is made."""
    args = sdxl.parse_args(argv("sdxl", teachers, tmp_path, "--prepare_positives_only", "--teacher_dtype", "bf16"))
    _, run = build("sdxl", args)
    assert run.student is None and ledger.holds(run.teacher) and dtypes(run.teacher) == {torch.bfloat16}
    assert all(e.dtypes == {torch.bfloat16} for e in ledger.moves_to_device(run.teacher))
    sides = side_modules(run)
    assert all(ledger.holds(m) for m in sides)
    start = len(ledger.events)
    for prompt in run.prompts[:2]:
        run.positives.get(prompt)
    assert run.positives.stats["generated"] == 2
    assert all(ledger.holds(m) for m in sides)
    assert not [e for e in ledger.events[start:] if e.target is not None and e.target != DEVICE]


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_lora_base_reaches_the_device_only_in_the_teacher_dtype(name, teachers, tmp_path, ledger):
    """LoRA with --teacher_dtype bf16: the denoiser (student = teacher with adapters off) goes to the device in
    bfloat16 directly, never in float32; its adapters are float32."""
    args = SCRIPTS[name].parse_args(argv(name, teachers, tmp_path, "--train_mode", "lora", "--lora_rank", 2,
                                         "--teacher_dtype", "bf16"))
    _, run = build(name, args)
    model = run.teacher
    assert model is run.pipe.components["unet" if name == "sdxl" else "transformer"]
    moves = ledger.moves_to_device(model)
    assert moves and moves[0].dtypes == {torch.bfloat16}  # the first move, before the adapters exist
    assert ledger.most_float32(DENOISERS[name]) == 0
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trainable == {torch.float32} and ledger.holds(model)


def test_imagenet64_teacher_handed_over_on_the_device_leaves_it_before_the_student_is_copied(teachers, tmp_path,
                                                                                            ledger):
    """A teacher given to build() on the device (as the benchmark builds it there): it goes to the CPU, the float32
    student is copied there, the teacher comes back in bfloat16, then the student: never two float32 UNets on the
    device."""
    from diffusers import UNet2DModel

    teacher = UNet2DModel.from_pretrained(str(teachers["imagenet64"] / "teacher")).to(DEVICE)
    start = len(ledger.events)
    args = imagenet64.parse_args(argv("imagenet64", teachers, tmp_path, "--teacher_dtype", "bf16"))
    _, run = build("imagenet64", args, teacher=teacher)
    during = ledger.events[start:]
    assert ledger.most_float32("UNet2DModel", during) == 1
    assert all(e.dtypes == {torch.bfloat16} for e in ledger.moves_to_device(teacher, during))
    assert ledger.holds(run.teacher) and ledger.holds(run.student)


def test_drop_t5_never_builds_a_t5_encoder(teachers, tmp_path, monkeypatch):
    """A teacher saved WITH T5: --drop_t5 trains and exports without ever constructing a T5EncoderModel (nor
    reading its weights); without the flag the same run builds one (the count sees it)."""
    from transformers import T5EncoderModel

    built = []
    original = T5EncoderModel.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "__init__", counting_init)
    base = argv("sd3", teachers, tmp_path, "--t5", "--max_train_steps", 1, "--checkpointing_steps", 100)
    run_in_process(sd3, [*base, "--drop_t5", "--output_dir", str(tmp_path / "dropped")])
    assert built == []
    index = json.loads((tmp_path / "dropped" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and not (tmp_path / "dropped" / "text_encoder_3").exists()
    run_in_process(sd3, [*base, "--output_dir", str(tmp_path / "with_t5"), "--positive_cache_dir",
                         str(tmp_path / "cache_t5")])
    assert built and (tmp_path / "with_t5" / "text_encoder_3").is_dir()


def measured_step(name, args, accelerator, run):
    """One micro-step of the script's loop: (gradient bytes per parameter after the backward, optimiser state bytes
    per parameter after the update)."""
    shared, gen = tfd_training.step_generators(args.seed, 1, 0, 0)
    script = SCRIPTS[name]
    if name == "imagenet64":
        batch = imagenet64.class_batch(run.sampler, run.data, args, run.image_shape, gen, accelerator.device)
    else:
        entries = [run.positives.get(p) for p in run.prompts[:args.prompts_per_batch]]
        batch = tfd_text2image.prompt_batch(entries, args.num_generated, run.latent_shape, gen, accelerator.device,
                                            tfd_text2image.cond_dtype(args))
    loss, _ = script.train_step(args, accelerator, run, batch, gen)
    accelerator.backward(loss)
    grads = {id(p): p.grad.numel() * p.grad.element_size() for p in run.student.parameters() if p.grad is not None}
    run.optimizer.step()
    states = {id(p): sum(t.numel() * t.element_size() for t in s.values() if torch.is_tensor(t))
              for p, s in run.optimizer.state.items()}
    return grads, states


@pytest.mark.parametrize("name, extra", [("sdxl", ()), ("sdxl", ("--train_mode", "lora", "--lora_rank", 2)),
                                         ("sd3", ("--teacher_dtype", "bf16")), ("imagenet64", ("--use_ema",))])
def test_logged_memory_of_each_component_equals_the_bytes_after_one_step(name, extra, teachers, tmp_path, caplog):
    """The start-up report (one log line per component): parameter bytes on the device as measured, gradient and
    AdamW state bytes as predicted before the first step equal to what that step allocates (moments like the
    parameter, a float32 step count each)."""
    args = SCRIPTS[name].parse_args(argv(name, teachers, tmp_path, *extra))
    accelerator = Accelerator(mixed_precision="no")
    try:
        with caplog.at_level("INFO"):
            run = SCRIPTS[name].build(args, accelerator)
        report = run.memory
        grads, states = measured_step(name, args, accelerator, run)
    finally:
        reset_accelerate()
    if name == "imagenet64":
        parts = [("student", run.student), ("teacher", run.teacher), ("student EMA", run.ema.shadow_params)]
    else:
        component = "unet" if name == "sdxl" else "transformer"
        parts = ([(f"{component} (student)", run.student), (f"{component} (teacher)", run.teacher)]
                 if args.train_mode == "full" else [(f"{component} (teacher base + LoRA student)", run.student)])
        parts += [(k, m) for k, m in run.pipe.components.items() if isinstance(m, torch.nn.Module) and k != component]
    assert list(report)[:len(parts)] == [label for label, _ in parts]
    seen = set()
    for label, thing in parts:
        params = [p for p in (thing.parameters() if isinstance(thing, torch.nn.Module) else thing)
                  if id(p) not in seen]
        seen.update(id(p) for p in params)
        row = report[label]
        assert row["params"] == sum(p.numel() * p.element_size() for p in params) > 0, label
        assert row["grads"] == sum(grads.get(id(p), 0) for p in params), label
        assert row["optimizer"] == sum(states.get(id(p), 0) for p in params), label
        assert row["trainable"] == sum(p.numel() * p.element_size() for p in params if p.requires_grad), label
        assert row["ddp_buckets"] == 0
        if isinstance(thing, torch.nn.Module):
            assert row["buffers"] == sum(b.numel() * b.element_size() for b in thing.buffers()), label
        line = [r.getMessage() for r in caplog.records if f"  {label}: " in r.getMessage()]
        assert len(line) == 1, (label, line)
    trained = report[parts[0][0]]
    assert trained["grads"] > 0 and trained["optimizer"] >= 2 * trained["grads"]
    if name == "sd3":
        assert report["text_encoder_3 (not loaded)"]["params"] == 0
    assert any("Memory on cpu (this process" in r.getMessage() for r in caplog.records)
