# Feature noise (σ sampling, VE → VP mapping) and the students (EDM preconditioning, the
# two one-step generators against the diffusers pipelines/schedulers they are saved as).
import math

import pytest
import torch
from diffusers import (
    CMStochasticIterativeScheduler,
    ConsistencyModelPipeline,
    DDPMScheduler,
    LCMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor
from scipy.stats import norm

from eval_utils import edm_heun_sample
from tfd_utils import (
    add_feature_noise,
    edm_c_noise,
    edm_denoise,
    edm_one_step,
    edm_scalings,
    sample_feature_sigmas,
    sdxl_one_step,
    vp_scale_input,
    vp_sigmas,
    vp_timestep_for_sigma,
    vp_x0_from_eps,
)

SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    timestep_spacing="leading", steps_offset=1,
)

# ----------------------------------------------------------------------------------------------
# Feature-noise levels.
# ----------------------------------------------------------------------------------------------


def test_sigmas_in_range_fixed_and_zero():
    g = torch.Generator().manual_seed(0)
    s = sample_feature_sigmas(1000, generator=g)
    assert s.shape == (1000,) and s.min() >= 0.02 and s.max() <= 0.1
    assert torch.equal(sample_feature_sigmas(5, sigma_min=0.1, sigma_max=0.1), torch.full((5,), 0.1))
    assert torch.equal(sample_feature_sigmas(3, sigma_min=0.0, sigma_max=0.0), torch.zeros(3))
    with pytest.raises(ValueError, match="above max"):
        sample_feature_sigmas(3, sigma_min=0.2, sigma_max=0.1)


def test_sigmas_are_deterministic_with_a_generator():
    a = sample_feature_sigmas(64, generator=torch.Generator().manual_seed(3))
    b = sample_feature_sigmas(64, generator=torch.Generator().manual_seed(3))
    c = sample_feature_sigmas(64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sigmas_follow_the_truncated_lognormal_with_redraws():
    """log σ ~ N(−1.2, 1.2²) on [0.02, 0.1], out-of-range draws redrawn 8 times, then clamped."""
    mean, std, lo, hi = -1.2, 1.2, 0.02, 0.1
    s = sample_feature_sigmas(40000, mean, std, lo, hi, generator=torch.Generator().manual_seed(0))
    a, b = norm.cdf((math.log(lo) - mean) / std), norm.cdf((math.log(hi) - mean) / std)
    p_in, p_below = b - a, a
    p_out = 1 - p_in
    stuck = p_out**9  # all nine draws out of range: clamped to the bound the last draw crossed
    at_lo, at_hi = stuck * p_below / p_out, stuck * (1 - b) / p_out
    assert abs((s == torch.tensor(hi)).double().mean().item() - at_hi) < 0.01
    assert abs((s == torch.tensor(lo)).double().mean().item() - at_lo) < 0.003
    for q in (0.03, 0.05, 0.07, 0.09):  # CDF inside the range: truncated normal in log σ
        inside = (norm.cdf((math.log(q) - mean) / std) - a) / p_in
        expected = at_lo + (1 - stuck) * inside
        assert abs((s <= q).double().mean().item() - expected) < 0.01, q
    assert lo < s.median().item() < hi


def test_add_feature_noise_one_sigma_per_group():
    x, xi = torch.zeros(3, 2, 4), torch.randn(3, 2, 4)
    out = add_feature_noise(x, torch.tensor([0.0, 0.1, 1.0]), xi)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.1, 1.0]).view(3, 1, 1) * xi)


# ----------------------------------------------------------------------------------------------
# VE → VP mapping for an SDXL-style (scaled-linear) DDPM schedule.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddpm():
    return DDPMScheduler(**SDXL_SCHEDULER)


def test_vp_timestep_at_integer_steps(ddpm):
    ac = ddpm.alphas_cumprod
    t = torch.tensor([0, 1, 10, 250, 500, 998, 999])
    sig = vp_sigmas(ac)[t]
    torch.testing.assert_close(vp_timestep_for_sigma(sig, ac), t.float(), rtol=0, atol=1e-5)
    # float32 σ (what training passes) lands within rounding of t
    torch.testing.assert_close(vp_timestep_for_sigma(sig.float(), ac), t.float(), rtol=0, atol=1e-3)


def test_vp_timestep_fractional_clamped_above_and_refused_below_the_schedule(ddpm):
    """σ inside the schedule maps to its fractional timestep, above it to 999; σ = 0 (clean features) to t = 0;
    0 < σ < σ(t=0) = 0.0292 has no timestep and is refused, naming both and the flag."""
    ac = ddpm.alphas_cumprod
    log_sig = vp_sigmas(ac).log()
    for t, frac in ((100, 0.5), (400, 0.3), (998, 0.9)):
        sigma = (log_sig[t] + frac * (log_sig[t + 1] - log_sig[t])).exp()
        assert abs(vp_timestep_for_sigma(sigma.view(1), ac).item() - (t + frac)) < 1e-4
    ts = vp_timestep_for_sigma(torch.tensor([0.0, 0.0292, 0.05, 0.1, 1.0, 1e4]), ac)
    assert ts[0] == 0 and ts[1] < 0.01 and ts[-1] == 999 and torch.all(ts[1:] >= ts[:-1])
    for low in (1e-6, 0.02, 0.029):
        with pytest.raises(ValueError, match=rf"σ = {low:g} is below .*σ\(t=0\) = 0\.02917.*--feature_noise_min"):
            vp_timestep_for_sigma(torch.tensor([0.05, low]), ac)


def test_vp_scaled_input_equals_ddpm_forward_process(ddpm):
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([3, 50, 400, 999])
    sigma = vp_sigmas(ddpm.alphas_cumprod)[t].float()
    x, xi = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    mapped = vp_scale_input(add_feature_noise(x, sigma, xi), sigma)
    ac = ddpm.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(mapped, ac.sqrt() * x + (1 - ac).sqrt() * xi, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mapped, ddpm.add_noise(x, xi, t), rtol=1e-5, atol=1e-5)
    # between two steps the effective ᾱ = 1/(1+σ²) lies between theirs
    sigma_mid = (vp_sigmas(ddpm.alphas_cumprod)[[400, 401]].log().mean()).exp().view(1)
    a_eff = 1 / (1 + sigma_mid**2)
    assert ddpm.alphas_cumprod[401] < a_eff < ddpm.alphas_cumprod[400]


# ----------------------------------------------------------------------------------------------
# EDM preconditioning and the ImageNet-64 student.
# ----------------------------------------------------------------------------------------------


def test_edm_scalings_identities():
    sigma = torch.tensor([0.002, 0.05, 0.5, 1.0, 80.0])
    sd = 0.5
    c_skip, c_out, c_in = edm_scalings(sigma, sd)
    torch.testing.assert_close(c_in, 1 / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_out**2, sigma**2 * c_skip)
    # the network's regression target (y − c_skip(y + n))/c_out has unit variance (EDM Eq. 8)
    torch.testing.assert_close(((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2, torch.ones(5))
    sched = CMStochasticIterativeScheduler()
    for ours, theirs in zip(edm_scalings(sigma, sd)[:2], sched.get_scalings(sigma)):
        torch.testing.assert_close(ours, theirs)
    for ours, theirs in zip(edm_scalings(sigma, sd, sigma_min=0.002)[:2],
                            sched.get_scalings_for_boundary_condition(sigma)):
        torch.testing.assert_close(ours, theirs)
    c_skip, c_out, _ = edm_scalings(torch.tensor(0.002), sd, sigma_min=0.002)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0


def test_edm_c_noise():
    sigma = torch.tensor([0.002, 1.0, 80.0])
    torch.testing.assert_close(edm_c_noise(sigma, "cm"),
                               torch.as_tensor(CMStochasticIterativeScheduler().sigma_to_t(sigma)).float())
    torch.testing.assert_close(edm_c_noise(sigma, "edm"), sigma.log() / 4)
    with pytest.raises(ValueError, match="cm"):
        edm_c_noise(sigma, "vp")


def tiny_cm_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"), attention_head_dim=8, norm_num_groups=8,
        resnet_time_scale_shift="scale_shift", upsample_type="resnet", downsample_type="resnet", num_class_embeds=10,
    ).eval()


def test_boundary_denoiser_is_identity_at_sigma_min():
    unet = tiny_cm_unet()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = edm_denoise(unet, x, 0.002, torch.tensor([1, 2]), sigma_min=0.002)
        plain = edm_denoise(unet, x, 0.002, torch.tensor([1, 2]))
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    assert (plain - x).abs().max() > 0  # the plain EDM scalings are not exactly the identity there


def test_edm_one_step_equals_consistency_model_pipeline():
    unet = tiny_cm_unet()
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0,
                                               clip_denoised=False)
    pipe = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([0, 3, 7])
    with torch.no_grad():
        ours = edm_one_step(unet, randn_tensor((3, 3, 16, 16), generator=torch.Generator().manual_seed(5)), labels)
        theirs = pipe(batch_size=3, class_labels=labels, num_inference_steps=1,
                      generator=torch.Generator().manual_seed(5), output_type="pt").images
    ours_pt = (ours / 2 + 0.5).clamp(0, 1)
    unclamped = ((ours_pt > 0) & (ours_pt < 1)).float().mean()
    assert unclamped > 0.5, "the comparison must not be decided by the [0, 1] clamp"
    assert (ours_pt - theirs).abs().max() == 0  # bit-identical: the same float32 operations


def test_edm_heun_sampler_on_gaussian_data_with_exact_denoiser():
    """Data N(μ, s²): the exact denoiser is (s²x + σ²μ)/(s² + σ²) and the probability-flow ODE
    maps x(σmax) to μ + (x(σmax) − μ)·s/sqrt(s² + σmax²)."""
    mu, s = 0.3, 0.5

    def denoise(x, sigma):
        return (s**2 * x + sigma**2 * mu) / (s**2 + sigma**2)

    z = torch.randn(20000, generator=torch.Generator().manual_seed(0)).double()
    exact = mu + (80.0 * z - mu) * s / math.sqrt(s**2 + 80.0**2)
    errs = [(edm_heun_sample(denoise, z, num_steps=n).double() - exact).abs().max().item() for n in (18, 36, 72)]
    assert errs[0] < 0.2 and errs[2] < 0.01, errs
    assert errs[1] < errs[0] / 3.5 and errs[2] < errs[1] / 3.5, errs  # second order in the step count
    x = edm_heun_sample(denoise, z, num_steps=72)
    assert abs(x.mean().item() - mu) < 0.015 and abs(x.std().item() - s) < 0.015


# ----------------------------------------------------------------------------------------------
# SDXL student: x₀ from ε̂ at t = 999 equals LCMScheduler with one step.
# ----------------------------------------------------------------------------------------------


def test_vp_x0_from_eps_inverts_the_forward_process():
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a = torch.tensor(0.3)
    torch.testing.assert_close(vp_x0_from_eps(a.sqrt() * z0 + (1 - a).sqrt() * eps, eps, a), z0, rtol=1e-5, atol=1e-5)


def test_sdxl_one_step_equals_lcm_scheduler_step():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, norm_num_groups=8, cross_attention_dim=24, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
    ).eval()
    lcm = LCMScheduler(**SDXL_SCHEDULER)
    lcm.set_timesteps(1)
    assert lcm.timesteps.tolist() == [999]
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, 24, generator=g)
    cond = {"text_embeds": torch.randn(2, 16, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        ours = sdxl_one_step(unet, z, 999, lcm.alphas_cumprod[999], ctx, cond)
        eps = unet(z, 999, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample
    theirs = lcm.step(eps, 999, z, generator=torch.Generator().manual_seed(0)).prev_sample
    assert ours.dtype == torch.float32
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t", [399, 999])
def test_vp_x0_is_the_one_step_ddim_scheduler_step(prediction_type, t):
    """vp_x0 for each prediction type equals the step of the exported one-step scheduler (DDIMScheduler, one
    step [t], final ᾱ = 1, eta 0), and inverts the forward process for an exact prediction."""
    from tfd_text2image import vp_one_step_scheduler
    from tfd_utils import vp_x0

    ddim = vp_one_step_scheduler(DDPMScheduler(**SDXL_SCHEDULER, prediction_type=prediction_type).config, t)
    ddim.set_timesteps(1)
    assert ddim.timesteps.tolist() == [t]
    g = torch.Generator().manual_seed(t)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a = ddim.alphas_cumprod[t].double()
    z = (a.sqrt() * x0 + (1 - a).sqrt() * eps).float()
    exact = {"epsilon": eps, "v_prediction": (a.sqrt() * eps - (1 - a).sqrt() * x0).float(), "sample": x0}
    out = exact[prediction_type] + 0.1 * torch.randn(2, 4, 8, 8, generator=g)  # an imperfect model output
    torch.testing.assert_close(vp_x0(z, exact[prediction_type], a, prediction_type), x0, rtol=1e-4, atol=1e-4)
    theirs = ddim.step(out, t, z).prev_sample
    torch.testing.assert_close(vp_x0(z, out, a, prediction_type), theirs, rtol=1e-5, atol=1e-5)
