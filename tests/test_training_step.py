"""What each script's own training step trains, through its own build() and train_step() under its parsed flags:
the samples are the script's `generate` for each group's condition; every loss flag reaches the loss; one feature
noise level per group; an update is --gradient_accumulation_steps micro-steps; a non-finite loss skips the update
even when its gradient is finite. Tiny teachers, offline, CPU."""

import contextlib

import pytest
import torch
from accelerate import Accelerator

import tfd_text2image
import tfd_training
import tfd_utils
import train_tfd_imagenet64 as imagenet64
import train_tfd_sd3 as sd3
import train_tfd_sdxl as sdxl
from scaling_helpers import imagenet_args, read_jsonl, reset_accelerate, run_in_process, sdxl_args

# Every loss flag away from its default (each value distinct, so a swap of two shows).
LOSS_FLAGS = {"--feature_pool_size": "2", "--drift_radii": "0.03,0.3", "--drift_kernel": "meanshift",
              "--feature_noise_mean": "-1.5", "--feature_noise_std": "0.7", "--feature_noise_min": "0.04",
              "--feature_noise_max": "0.09", "--anchor_weight": "0.5", "--anchor_alpha": "0.3",
              "--anchor_temperature": "2.5", "--anchor_bandwidth": "7.0"}


def argv_for(name, paths, tmp_path, *extra):
    """The script's flags on its tiny teacher: 2 groups of 2 generated samples."""
    out, extra = tmp_path / "out", [str(e) for e in extra]
    if name == "imagenet64":
        return imagenet_args(paths["imagenet64"], out, "--num_generated", 2, *extra)
    argv = sdxl_args(paths[name], paths["prompts"], out, tmp_path / "cache", "--prompts_per_batch", 2,
                     "--num_positive_steps", 1, *extra)
    return argv + (["--feature_layers", "block:0 block:-1"] if name == "sd3" and "--feature_layers" not in extra
                   else [])


@pytest.fixture
def paths(tiny_sdxl_dir, tiny_sd3_dir, tiny_imagenet, prompts_file):
    return {"sdxl": tiny_sdxl_dir, "sd3": tiny_sd3_dir, "imagenet64": tiny_imagenet, "prompts": prompts_file}


SCRIPTS = {"sdxl": sdxl, "sd3": sd3, "imagenet64": imagenet64}


@contextlib.contextmanager
def built(name, argv):
    """(args, accelerator, run) of the script's own parse_args and build."""
    script = SCRIPTS[name]
    args = script.parse_args(argv)
    accelerator = Accelerator(mixed_precision="no")
    try:
        yield args, accelerator, script.build(args, accelerator)
    finally:
        reset_accelerate()


def first_batch(name, args, accelerator, run, step=1):
    """The batch and generator the loop makes at `step` (its first micro-step, process 0)."""
    shared, gen = tfd_training.step_generators(args.seed, step, 0, 0)
    if name == "imagenet64":
        return imagenet64.class_batch(run.sampler, run.data, args, run.image_shape, gen, accelerator.device), gen
    drawn = tfd_training.shared_draw(len(run.prompts), 0, args.prompts_per_batch, shared).tolist()
    entries = [run.positives.get(run.prompts[i]) for i in drawn]
    return tfd_text2image.prompt_batch(entries, args.num_generated, run.latent_shape, gen, accelerator.device,
                                       tfd_text2image.cond_dtype(args)), gen


class Recording:
    """Stands in front of the run's own TFDLoss: keeps what train_step hands it, then calls it."""

    def __init__(self, loss_fn):
        self.loss_fn, self.calls = loss_fn, []

    def __call__(self, forward, generated, positives, anchors=None, **kw):
        self.calls.append({"forward": forward, "generated": generated.detach().clone(), "positives": positives})
        return self.loss_fn(forward, generated, positives, anchors, **kw)


def generate_per_group(name, args, run, batch):
    """The script's own generate, called once per group with that group's condition only."""
    out = []
    if name == "imagenet64":
        classes, _, _, noise = batch
        for g, noise_g in enumerate(noise.chunk(len(classes))):
            out.append(imagenet64.generate(args, run.student, noise_g, classes[g].repeat(len(noise_g)),
                                           run.num_classes))
        return torch.stack(out)
    _, prompt_embeds, pooled, noise = batch
    for g, noise_g in enumerate(noise.chunk(len(prompt_embeds))):
        n = len(noise_g)
        cond = (prompt_embeds[g:g + 1].expand(n, *prompt_embeds.shape[1:]), pooled[g:g + 1].expand(n, -1))
        if name == "sdxl":
            out.append(sdxl.generate(args, run.student, noise_g, *cond, run.scheduler))
        else:
            out.append(sd3.generate(args, run.student, noise_g, *cond))
    return torch.stack(out)


@pytest.mark.parametrize("name, extra", [("sdxl", ()), ("sdxl", ("--conditioning_timestep", 399)), ("sd3", ()),
                                         ("imagenet64", ()), ("imagenet64", ("--sigma_max", 40))])
def test_train_step_trains_the_scripts_generate_of_each_groups_condition(name, extra, paths, tmp_path):
    with built(name, argv_for(name, paths, tmp_path, *extra)) as (args, accelerator, run):
        batch, gen = first_batch(name, args, accelerator, run)
        run.loss_fn = recording = Recording(run.loss_fn)
        with torch.no_grad():
            SCRIPTS[name].train_step(args, accelerator, run, batch, gen)
            expected = generate_per_group(name, args, run, batch)
        (call,) = recording.calls
        assert call["generated"].shape == expected.shape and expected.shape[:2] == (2, args.num_generated)
        torch.testing.assert_close(call["generated"], expected.float(), rtol=1e-5, atol=1e-5)
        # The two groups' conditions differ: the same noise under the other group's condition is another sample.
        other = generate_per_group(name, args, run, swap_conditions(name, batch))
        assert (other[0] - expected[0]).abs().max() > 1e-4


def swap_conditions(name, batch):
    if name == "imagenet64":
        classes, pos, anc, noise = batch
        return classes.flip(0), pos, anc, noise
    pos, pe, pooled, noise = batch
    return pos, pe.flip(0), pooled.flip(0), noise


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_loss_flag_reaches_the_runs_loss(name, paths, tmp_path):
    flags = [v for kv in LOSS_FLAGS.items() for v in kv]
    layers = {"sdxl": "down_blocks.1 mid_block", "sd3": "block:0 block:-1", "imagenet64": "down_blocks.0"}[name]
    with built(name, argv_for(name, paths, tmp_path, *flags, "--feature_layers", layers)) as (args, _, run):
        loss = run.loss_fn
        assert loss.extractor.selectors == layers.split() and loss.extractor.pool_size == 2
        assert loss.radii == [0.03, 0.3] and loss.kernel == "meanshift"
        assert loss.sigma_law == (-1.5, 0.7, 0.04, 0.09)
        assert (loss.anchor_weight, loss.anchor_alpha, loss.anchor_temperature, loss.anchor_bandwidth) == \
            (0.5, 0.3, 2.5, 7.0)


def features(g, k, d, seed):
    return torch.randn(g, k, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("anchor_weight", [0.0, 0.5])
@pytest.mark.parametrize("kernel", ["drifting", "meanshift"])
def test_tfd_loss_total_is_the_drift_plus_the_weighted_anchor_term_summed_over_layers(anchor_weight, kernel):
    """loss(gen, pos, anchors) = Σ_layers mean_groups drift + λ·Σ_layers mean_groups anchor, each term computed
    with the loss's own settings (α and τ distinct, so a swap shows)."""
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    loss_fn = tfd_utils.TFDLoss(teacher, ["0", "1"], 1, drift_radii=[0.05, 0.2], drift_kernel=kernel,
                                anchor_weight=anchor_weight, anchor_alpha=0.9, anchor_temperature=0.4)
    gen = {"0": features(3, 4, 16, 0), "1": features(3, 4, 8, 1)}
    pos = {"0": features(3, 5, 16, 2), "1": features(3, 5, 8, 3)}
    anc = {"0": features(3, 2, 16, 4) * 3, "1": features(3, 2, 8, 5) * 3}
    total, logs = loss_fn.loss(gen, pos, anc, torch.full((3,), 0.1))
    drift = sum(tfd_utils.drifting_loss(gen[k], pos[k], [0.05, 0.2], kernel).mean() for k in gen)
    anchor = sum(tfd_utils.anchor_margin_loss(gen[k], anc[k], alpha=0.9, temperature=0.4).mean() for k in gen)
    assert anchor > 1e-3  # the anchors are far: the term is not vacuous
    torch.testing.assert_close(total, drift + anchor_weight * anchor)
    torch.testing.assert_close(logs["loss/drift"], drift)
    swapped = sum(tfd_utils.anchor_margin_loss(gen[k], anc[k], alpha=0.4, temperature=0.9).mean() for k in gen)
    assert not torch.allclose(anchor, swapped)


def test_one_feature_noise_level_per_group_shared_by_its_generated_positives_and_anchors():
    """The forward sees σ per sample: within a group every generated sample, positive and anchor has the group's σ;
    the groups' σ differ (drawn from the log-normal law)."""
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    loss_fn = tfd_utils.TFDLoss(teacher, ["1"], 1, drift_radii=[0.1], feature_noise_min=0.01, feature_noise_max=1.0)
    seen = []

    def forward(sample, sigma):
        seen.append((sample.shape[0], sigma.clone()))
        return teacher(sample)

    G, N, P, M = 3, 4, 2, 3
    gen = torch.randn(G, N, 3, 4, requires_grad=True)
    loss, logs = loss_fn(forward, gen, torch.randn(G, P, 3, 4), torch.randn(G, M, 3, 4),
                         generator=torch.Generator().manual_seed(0))
    (n_gen, sig_gen), (n_ref, sig_ref) = seen
    assert (n_gen, n_ref) == (G * N, G * (P + M))
    per_group = sig_gen.view(G, N)
    assert torch.equal(per_group, per_group[:, :1].expand(G, N))
    assert torch.equal(sig_ref.view(G, P + M), per_group[:, :1].expand(G, P + M))
    assert len(set(per_group[:, 0].tolist())) == G


class CountingAdamW:
    """Counts the optimiser updates a run makes (torch.optim.AdamW.step, wrapped, still called)."""

    def __init__(self, monkeypatch):
        self.count, original = 0, torch.optim.AdamW.step

        def step(opt, *a, **kw):
            self.count += 1
            return original(opt, *a, **kw)

        monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_an_update_is_gradient_accumulation_steps_micro_steps(name, paths, tmp_path, monkeypatch):
    script, micro_steps = SCRIPTS[name], []
    original = script.train_step

    def counting_train_step(*a, **kw):
        micro_steps.append(1)
        return original(*a, **kw)

    monkeypatch.setattr(script, "train_step", counting_train_step)
    updates = CountingAdamW(monkeypatch)
    run_in_process(script, argv_for(name, paths, tmp_path, "--max_train_steps", 2, "--gradient_accumulation_steps",
                                    3, "--checkpointing_steps", 100))
    assert (updates.count, len(micro_steps)) == (2, 6)
    assert [r["step"] for r in read_jsonl(tmp_path / "out" / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("name", ["sdxl", "imagenet64"])
def test_a_non_finite_loss_with_a_finite_gradient_skips_the_update(name, paths, tmp_path, monkeypatch):
    monkeypatch.setenv("TFD_TEST_NONFINITE_STEPS", "2")
    monkeypatch.setenv("TFD_TEST_NONFINITE_KIND", "nanloss")  # NaN value, the gradient of the finite loss
    monkeypatch.setenv("TFD_DEBUG_DIR", str(tmp_path / "debug"))
    run_in_process(SCRIPTS[name], argv_for(name, paths, tmp_path, "--max_train_steps", 3, "--checkpointing_steps",
                                           100))
    steps = read_jsonl(tmp_path / "debug" / "steps-rank0.jsonl")
    assert [(r["step"], r["ok"]) for r in steps] == [(1, True), (2, False), (3, True)]
    assert steps[1]["digest"] == steps[0]["digest"] != steps[2]["digest"]  # step 2 left the weights alone
    rows = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [r["train/bad_steps"] for r in rows] == [0, 1, 0]

