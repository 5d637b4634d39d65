"""The digits text-to-image demo pieces at toy sizes: data, both teacher layouts, evaluation.

What the TFD scripts rely on: the saved teachers load as real SDXL / SD3 pipelines, their tokenizers
behave as the pipelines expect, training saw exactly the unconditional input the pipelines feed, and
the fast SD3 path (one zero T5 token standing for 256) computes the pipeline's own function.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "digits"))

TINY = ["--text_widths", "16,16", "--projection_dim", "8", "--text_pretrain_steps", "3", "--vae_steps", "2",
        "--vae_batch_size", "8", "--max_train_steps", "2", "--batch_size", "4", "--lr_warmup_steps", "1",
        "--check_steps", "2", "--log_every", "1"]
TINY_LAYOUT = {"sdxl": ["--vae_channels", "8,8", "--channels", "8,16,16"],
               "sd3": ["--vae_channels", "8,8,8", "--channels", "32", "--num_layers", "1"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import prepare_text2image

    out = tmp_path_factory.mktemp("t2i") / "data"
    prepare_text2image.main(["--output_dir", str(out), "--num_test", "100"])
    return str(out)


@pytest.fixture(scope="module")
def teachers(data_dir, tmp_path_factory):
    import train_text2image_teacher

    out = {}
    for layout in ("sdxl", "sd3"):
        path = str(tmp_path_factory.mktemp("t2i") / layout)
        train_text2image_teacher.main(["--layout", layout, "--data_dir", data_dir, "--output_dir", path]
                                      + TINY + TINY_LAYOUT[layout])
        out[layout] = path
    return out


def test_data_matches_the_class_conditional_split_and_captions_name_the_label(data_dir):
    import datasets

    import prepare_data
    from prepare_text2image import HELDOUT_TEMPLATES, caption_digit, read_prompts

    ours = datasets.load_from_disk(data_dir)
    theirs = prepare_data.build_dataset(num_test=100)
    for split in ("train", "test"):
        assert ours[split]["label"] == theirs[split]["label"]
        assert all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(ours[split]["image"][:50], theirs[split]["image"][:50]))
        assert all(caption_digit(t) == y for t, y in zip(ours[split]["text"], ours[split]["label"]))
    counts = {}
    for t in ours["train"]["text"]:
        counts[t] = counts.get(t, 0) + 1
    assert set(counts) == set(read_prompts(data_dir, "train")) and min(counts.values()) >= 5
    heldout = read_prompts(data_dir, "heldout")
    assert len(heldout) == 10 * len(HELDOUT_TEMPLATES) and not set(heldout) & set(counts)
    assert [caption_digit(p) for p in heldout] == [i % 10 for i in range(len(heldout))]
    with pytest.raises(ValueError):
        caption_digit("a handwritten seven and a 3")


@pytest.mark.parametrize("layout", ["sdxl", "sd3"])
def test_tokenizers_load_and_behave_like_clip(teachers, layout):
    from transformers import AutoConfig, AutoTokenizer

    for sub, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tok = AutoTokenizer.from_pretrained(teachers[layout], subfolder=sub)
        cfg = AutoConfig.from_pretrained(teachers[layout], subfolder=enc)
        L = tok.model_max_length
        ids = tok(["A Handwritten seven", "the digit 7 " * 20], padding="max_length", max_length=L, truncation=True,
                  return_tensors="pt").input_ids
        assert ids.shape == (2, L)
        assert (ids[:, 0] == tok.bos_token_id).all() and (ids[1, -1] == tok.eos_token_id)  # truncation keeps eos
        assert ids[0, 4] == tok.eos_token_id and (ids[0, 5:] == tok.pad_token_id).all()
        assert tok.unk_token_id not in ids[0].tolist()  # every caption word is in the vocabulary
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                          tok.pad_token_id)
        assert cfg.eos_token_id != 2 and cfg.max_position_embeddings == L  # 2: CLIP's legacy argmax pooling
    tok2 = AutoTokenizer.from_pretrained(teachers[layout], subfolder="tokenizer_2")
    assert tok2.pad_token_id != tok2.eos_token_id  # like SDXL's OpenCLIP-bigG tokenizer


def test_sdxl_teacher_is_a_pipeline_trained_on_its_own_unconditional_input(teachers, data_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    import train_text2image_teacher as T

    pipe = StableDiffusionXLPipeline.from_pretrained(teachers["sdxl"])
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler) and pipe.config.force_zeros_for_empty_prompt
    _, _, uncond_pe, uncond_pooled = T.encode_captions(pipe, "sdxl", ["a handwritten seven"])
    assert not uncond_pe.any() and not uncond_pooled.any()  # zeros: what training drops captions to
    out = pipe(["a handwritten seven"], num_inference_steps=2, guidance_scale=1.5, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    info = json.load(open(os.path.join(teachers["sdxl"], T.COMPLETE)))
    assert info["latent_shape"] == [4, 8, 8] and info["shift_factor"] is None
    assert os.path.isfile(os.path.join(teachers["sdxl"], "samples.png"))


def test_teacher_rerun_is_skipped_and_training_is_deterministic(teachers, data_dir, tmp_path):
    from safetensors.torch import load_file

    import train_text2image_teacher as T

    argv = ["--layout", "sdxl", "--data_dir", data_dir] + TINY + TINY_LAYOUT["sdxl"]
    stamp = os.path.getmtime(os.path.join(teachers["sdxl"], T.COMPLETE))
    T.main(argv + ["--output_dir", teachers["sdxl"]])
    assert os.path.getmtime(os.path.join(teachers["sdxl"], T.COMPLETE)) == stamp
    again = str(tmp_path / "again")
    T.main(argv + ["--output_dir", again])
    for sub in ("unet", "vae", "text_encoder_2"):
        name = next(f for f in os.listdir(os.path.join(again, sub)) if f.endswith(".safetensors"))
        a = load_file(os.path.join(teachers["sdxl"], sub, name))
        b = load_file(os.path.join(again, sub, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_sd3_teacher_loads_without_t5_and_the_fast_path_is_the_pipeline(teachers):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    import train_text2image_teacher as T

    pipe = StableDiffusion3Pipeline.from_pretrained(teachers["sd3"], text_encoder_3=None, tokenizer_3=None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.vae.config.shift_factor is not None
    assert pipe.vae.config.latent_channels == 16
    torch.manual_seed(0)
    with torch.no_grad():  # move the near-identity AdaLN-zero init so the context tokens matter
        for p in pipe.transformer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    kw = dict(num_inference_steps=3, guidance_scale=2.0, output_type="latent")
    prompts = ["a handwritten seven", "the digit 3"]
    ref = pipe(prompts, generator=torch.Generator().manual_seed(1), **kw).images
    with T.collapsed_t5(pipe.transformer) as fast:
        got = pipe(prompts, generator=torch.Generator().manual_seed(1), **kw, **fast).images
    naive = pipe(prompts, generator=torch.Generator().manual_seed(1), max_sequence_length=1, **kw).images
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(naive, ref, atol=1e-2)  # without the log-count bias it is another function
    # The unconditional input training used: the pipeline's encoding of "" (T5 part zeros).
    with T.collapsed_t5(pipe.transformer):
        _, _, uncond_pe, uncond_pooled = T.encode_captions(pipe, "sd3", ["the digit 3"])
    ne, _, npooled, _ = pipe.encode_prompt([""], None, None, do_classifier_free_guidance=False)
    assert torch.allclose(uncond_pooled, npooled[0]) and torch.allclose(uncond_pe[:-1], ne[0, :-256])
    assert not ne[0, -256:].any() and not uncond_pe[-1].any()


def test_evaluation_reports_finite_metrics_for_every_row(teachers, data_dir, tmp_path):
    import evaluate_text2image as E

    for layout in ("sdxl", "sd3"):
        out = tmp_path / layout
        results = E.main(["--teacher_dir", teachers[layout], "--data_dir", data_dir, "--classifier_dir",
                          str(tmp_path / "clf"), "--num_samples", "100", "--steps", "2", "--output_dir", str(out),
                          "--seeds", "0,1", "--students", f"copy={teachers[layout]}"])
        assert [r["steps"] for r in results] == [2, 1, 1]
        for r in results:
            for key in ("train", "heldout"):
                assert np.isfinite(r[key]["fd"]) and 0 <= r[key]["acc"] <= 1
                per_seed = [s["fd"] for s in r[key]["per_seed"]]
                assert len(per_seed) == 2 and per_seed[0] != per_seed[1]  # each seed draws its own noise
                assert r[key]["fd"] == pytest.approx(np.mean(per_seed)) and r[key]["fd_std"] > 0
        assert " ± " in (out / "results.md").read_text()
        assert (out / "samples_train.png").is_file() and (out / "results.md").is_file()


def test_sdxl_teacher_in_one_step_takes_its_plain_call_at_the_given_timestep(teachers):
    import evaluate_text2image as E
    import train_text2image_teacher as T

    teacher = T.load_teacher(teachers["sdxl"])
    assert E.one_step_timesteps(E.one_step_pipeline(teacher)) == [999]
    assert E.one_step_timesteps(E.one_step_pipeline(teacher, 399)) == [399]


def test_sdxl_teacher_loss_floor_is_the_x0_loss_at_low_snr():
    """--snr_floor 1 at t = 999 (SNR 0.005) weights the ε error by 1/SNR: exactly the squared error of the
    x₀ it implies, which the plain ε loss (min-SNR weight 1 there) scales down 200×."""
    import train_text2image_teacher as T

    alphas = T.sdxl_alphas_cumprod()
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pred = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    unet = lambda x, t, **kw: (pred,)  # noqa: E731  a fixed ε prediction
    kw = dict(cond=None, cond_pooled=None, time_ids=None, alphas_cumprod=alphas, snr_gamma=5.0, high_fraction=1.0,
              high_min=999)
    floored = T.sdxl_loss(unet, x0, gen=torch.Generator().manual_seed(2), snr_floor=1.0, **kw)
    plain = T.sdxl_loss(unet, x0, gen=torch.Generator().manual_seed(2), snr_floor=0.0, **kw)
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(x0.shape, generator=gen)
    a = alphas[999]
    x0_hat = ((a.sqrt() * x0 + (1 - a).sqrt() * noise) - (1 - a).sqrt() * pred) / a.sqrt()
    assert floored.item() == pytest.approx(((x0_hat - x0) ** 2).mean().item(), rel=1e-5)
    assert plain.item() == pytest.approx(((pred - noise) ** 2).mean().item(), rel=1e-5)
    assert floored.item() / plain.item() == pytest.approx(((1 - a) / a).item(), rel=1e-4)


def test_students_are_sampled_at_the_timestep_they_were_trained_at(teachers, tmp_path):
    """A run's --conditioning_timestep (training_args.json) decides how evaluate_text2image samples it: the
    plain one-step call where the student's scheduler makes that timestep (train_tfd_sdxl.py's export), else
    [T] through the scheduler's custom timesteps (a student saved with an LCMScheduler, whose plain call is 999);
    both give the same images."""
    from diffusers import LCMScheduler

    import evaluate_text2image as E
    import train_text2image_teacher as T

    teacher = T.load_teacher(teachers["sdxl"])
    at_399 = E.one_step_pipeline(teacher, 399)
    lcm = type(teacher)(**{**teacher.components, "scheduler": LCMScheduler.from_config(teacher.scheduler.config)})
    lcm.set_progress_bar_config(disable=True)
    run = tmp_path / "run"
    run.mkdir()
    assert E.student_steps(str(run), lcm) == 1 and E.run_timestep(str(run)) == 999  # nothing recorded
    (run / "training_args.json").write_text(json.dumps({"conditioning_timestep": 999}))
    assert E.student_steps(str(run), lcm) == 1
    (run / "training_args.json").write_text(json.dumps({"conditioning_timestep": 399}))
    assert E.student_steps(str(run), at_399) == 1 and E.student_steps(str(run), lcm) == [399]

    prompts = ["the digit 3", "a handwritten seven"]
    plain = E.sample(at_399, prompts, 0, 1, 0.0)
    assert (E.sample(lcm, prompts, 0, [399], 0.0).int() - plain.int()).abs().max() <= 1
    assert not torch.equal(E.sample(lcm, prompts, 0, 1, 0.0), plain)  # the plain LCM call is 999


def test_a_lora_student_is_evaluated_with_its_adapters_loaded(teachers, tmp_path):
    """evaluate_text2image.load_student on a folder of LoRA weights (as train_tfd_sdxl.py exports them, with its
    scheduler/): its samples are the teacher's UNet with those adapters, not the teacher's (the adapters act:
    lora_B is not zero, as after training)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    import evaluate_text2image as E
    import train_text2image_teacher as T

    student = E.one_step_pipeline(T.load_teacher(teachers["sdxl"]), 399)
    student.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                        target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in student.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    run = tmp_path / "run"
    StableDiffusionXLPipeline.save_lora_weights(str(run), unet_lora_layers=get_peft_model_state_dict(student.unet))
    student.scheduler.save_pretrained(str(run / "scheduler"))
    (run / "training_args.json").write_text(json.dumps({"conditioning_timestep": 399}))

    prompts = ["the digit 3", "a handwritten seven"]
    loaded = E.load_student(str(run), teachers["sdxl"])
    got = E.sample(loaded, prompts, 0, 1, 0.0)
    torch.testing.assert_close(got, E.sample(student, prompts, 0, 1, 0.0), rtol=0, atol=1)
    teacher_only = E.sample(E.one_step_pipeline(T.load_teacher(teachers["sdxl"]), 399), prompts, 0, 1, 0.0)
    assert (got.int() - teacher_only.int()).abs().max() > 5
