# Teacher-Feature Drifting (TFD): the method, one short function per equation.
#
# Section numbers (§) refer to SPEC.md; equation numbers to the paper
# ("Teacher-Feature Drifting: One-Step Diffusion Distillation with Pretrained Diffusion
# Representations"). Both training scripts import from here; nothing here depends on them.

import difflib
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# §1a Drifting loss (attraction to positives, repulsion from the generated samples themselves).
# ----------------------------------------------------------------------------------------------

DRIFT_KERNELS = ("drifting", "meanshift")


def pairwise_distance(a, b):
    """Euclidean distances [G, A, B] between the rows of a [G, A, D] and b [G, B, D].

    Equals sqrt(max(d², 1e-8)): the clamp keeps the gradient finite at coincident points.
    """
    # the direct (difference-based) kernel: the matmul form loses precision for close points
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").clamp_min(1e-4)


def drifting_weights(logits, num_generated):
    """Authors' kernel (§1a.5): double softmax, then the attraction/repulsion coupling.

    logits: [G, N, N+P] = -d̂/R. Returns c [G, N, N+P], whose first N columns (negatives)
    carry -A⁻·ΣA⁺ and whose last P columns (positives) carry A⁺·ΣA⁻.
    """
    a = (logits.softmax(dim=-1) * logits.softmax(dim=-2)).clamp_min(1e-6).sqrt()
    a_neg, a_pos = a[..., :num_generated], a[..., num_generated:]
    c_neg = -a_neg * a_pos.sum(dim=-1, keepdim=True)
    c_pos = a_pos * a_neg.sum(dim=-1, keepdim=True)
    return torch.cat([c_neg, c_pos], dim=-1)


def meanshift_weights(logits, num_generated):
    """Paper Eq. (2)–(4): V = V⁺ − V⁻ with separately normalised Laplace-kernel means.

    The same c-form as `drifting_weights`: each row's positive weights sum to 1 and its
    negative weights to −1, so Σ_j c_ij Y_j − (Σ_j c_ij) x_i = V⁺(x_i) − V⁻(x_i).
    """
    w_neg = logits[..., :num_generated].softmax(dim=-1)
    w_pos = logits[..., num_generated:].softmax(dim=-1)
    return torch.cat([-w_neg, w_pos], dim=-1)


def drifting_field(generated, positives, radii, kernel="drifting"):
    """The drift F of §1a.5–6 (so that the frozen target is t = x/s_in + F), computed in float32
    without gradient.

    generated: [G, N, D], positives: [G, P, D]. Returns (force [G, N, D], s_in, stats); stats
    holds the diagnostics: `scale` (s, the mean distance) and `force_norms` (raw RMS force per
    radius, before the per-radius normalisation: the progress signal, since the normalised loss
    stays flat). Every radius works on [G, N, N+P] weights; the D-sized data is read once per
    radius (its RMS) and once for F, and [x; y] is never concatenated.
    """
    if kernel not in DRIFT_KERNELS:
        raise ValueError(f"Unknown drift kernel {kernel!r}; choose one of {DRIFT_KERNELS}.")
    with torch.no_grad(), torch.autocast(generated.device.type, enabled=False):
        x = generated.detach().float()
        y = positives.detach().float()
        num_gen, dim = x.shape[1], x.shape[2]
        # targets [x; y]: the generated samples are their own negatives
        dist = torch.cat([pairwise_distance(x, x), pairwise_distance(x, y)], dim=-1)  # [G, N, N+P]
        scale = dist.mean()  # one scalar over every group of the batch
        s_in = (scale / math.sqrt(dim)).clamp_min(1e-3)
        dist_s = dist / scale.clamp_min(1e-3)
        self_mask = torch.eye(num_gen, dist.shape[-1], device=x.device, dtype=x.dtype)
        dist_s = dist_s + 1e6 * self_mask
        weights_fn = drifting_weights if kernel == "drifting" else meanshift_weights
        combined = torch.zeros_like(dist)
        force_norms = []
        for radius in radii:
            w = _force_matrix(weights_fn(-dist_s / radius, num_gen)) / s_in
            f = _apply_weights(w, x, y)  # F_R in scaled coordinates
            norm = _rms(f).clamp_min(1e-4)
            force_norms.append(norm)
            combined = combined + w / norm
        force = _apply_weights(combined, x, y)  # Σ_R F_R / ‖F_R‖: linear in the weights
    stats = {"scale": scale, "force_norms": torch.stack(force_norms)}
    return force, s_in, stats


def _rms(t):
    """sqrt(mean(t²)) without a temporary; per-row norms first (one float32 norm over many
    millions of elements loses ~1e-4)."""
    return (torch.linalg.vector_norm(t.flatten(1), dim=1).square().sum() / t.numel()).sqrt()


def _force_matrix(c):
    """c [G, N, N+P] → w with F_i = Σ_j w_ij Y_j: the −(Σ_j c_ij) x_i term moves onto column i."""
    num_gen = c.shape[1]
    eye = torch.eye(num_gen, c.shape[-1], device=c.device, dtype=c.dtype)
    return c - c.sum(dim=-1, keepdim=True) * eye


def _apply_weights(w, x, y):
    """w [G, N, N+P] applied to the rows of [x; y]: w[:, :, :N] @ x + w[:, :, N:] @ y."""
    num_gen = x.shape[1]
    return torch.bmm(w[..., num_gen:], y).baddbmm_(w[..., :num_gen], x)


class _FrozenTargetRegression(torch.autograd.Function):
    """mean over (N, D) of (x/s_in − sg(x/s_in + F))² per group, i.e. the value mean(F²) and the
    gradient −2F/(s_in·N·D) w.r.t. x, without materialising the target (Eq. 11)."""

    @staticmethod
    def forward(ctx, generated, force, s_in):
        ctx.save_for_backward(force, s_in)
        ctx.input_dtype = generated.dtype
        return force.square().mean(dim=(1, 2))

    @staticmethod
    def backward(ctx, grad_loss):
        force, s_in = ctx.saved_tensors
        scale = grad_loss.float().view(-1, 1, 1) * (-2.0 / (force.shape[1] * force.shape[2])) / s_in
        return (force * scale).to(ctx.input_dtype), None, None


def drifting_loss(generated, positives, radii, kernel="drifting", return_stats=False):
    """Per-group drifting loss [G] of §1a (Eq. 7/11): mean over (N, D) of (x/s_in − sg(target))².

    generated [G, N, D] carries the gradient; positives [G, P, D] are constants. Vectorised over
    groups. With return_stats=True also returns the diagnostics of `drifting_field`.
    """
    force, s_in, stats = drifting_field(generated, positives, radii, kernel)
    with torch.autocast(generated.device.type, enabled=False):
        loss = _FrozenTargetRegression.apply(generated, force, s_in)
    return (loss, stats) if return_stats else loss


# ----------------------------------------------------------------------------------------------
# §1b Anchor-margin coverage loss (Eq. 12–14).
# ----------------------------------------------------------------------------------------------


def anchor_margin_loss(generated, anchors, alpha=0.5, bandwidth=None, temperature=1.0, return_stats=False):
    """Per-group anchor-margin loss [G] on raw features: generated [G, N, D], anchors [G, M, D].

    s_m = mean_j exp(−‖a_m − x_j‖/h) (Eq. 12), s̄_m = mean_{k≠m} exp(−‖a_m − a_k‖/2h) (Eq. 13),
    loss = mean_m relu(α s̄_m − s_m) (Eq. 14); h = median distance (detached) × temperature
    per group unless `bandwidth` fixes it. With return_stats=True also returns the fraction of
    anchors whose support already meets the margin (`covered`) and the bandwidths.
    """
    with torch.autocast(generated.device.type, enabled=False):
        x = generated.float()
        a = anchors.detach().float()
        dist = pairwise_distance(a, x)  # [G, M, N], gradient flows through x
        if bandwidth is None:
            h = _median(dist.detach().flatten(1)) * temperature
        else:
            h = torch.full((x.shape[0],), float(bandwidth), device=x.device)
        h = h.clamp_min(1e-8)[:, None, None]
        support = torch.exp(-dist / h).mean(dim=2)  # [G, M]
        self_support = _anchor_self_support(a, h)
        deficit = alpha * self_support - support
        loss = deficit.clamp_min(0).mean(dim=1)
    if not return_stats:
        return loss
    return loss, {"covered": (deficit <= 0).float().mean(), "bandwidth": h.flatten()}


def _median(values):
    """Row-wise median [G] of values [G, K]; the mean of the two middle values when K is even
    (torch.median returns the lower one)."""
    v = values.sort(dim=1).values
    k = v.shape[1]
    return (v[:, (k - 1) // 2] + v[:, k // 2]) / 2


def _anchor_self_support(anchors, h):
    """s̄_m of Eq. 13: [G, M]; zero when there is a single anchor."""
    num_anchors = anchors.shape[1]
    if num_anchors < 2:
        return anchors.new_zeros(anchors.shape[:2])
    k = torch.exp(-pairwise_distance(anchors, anchors) / (2 * h))
    k = k * (1 - torch.eye(num_anchors, device=anchors.device, dtype=k.dtype))
    return k.sum(dim=2) / (num_anchors - 1)


# ----------------------------------------------------------------------------------------------
# §2 Teacher features: forward hooks, pooling, early stop, layer selectors.
# ----------------------------------------------------------------------------------------------

INPUT_SELECTOR = "input"


class _StopForward(Exception):
    """Raised by the hook of the last selected module: nothing after it is computed."""


def pool_feature(feature, pool_size):
    """Average-pool a feature map (kernel = stride = pool_size) and flatten it to [B, D].

    Tuple outputs contribute their first element. Maps smaller than the pool are pooled over
    their whole extent; non-spatial outputs are only flattened.
    """
    if isinstance(feature, (tuple, list)):
        feature = feature[0]
    if feature.ndim == 4 and pool_size > 1:
        k = (min(pool_size, feature.shape[-2]), min(pool_size, feature.shape[-1]))
        feature = F.avg_pool2d(feature, kernel_size=k, stride=k)
    return feature.flatten(1)


def _find_edm_core(model):
    """The submodule holding NVlabs-EDM-style `enc`/`dec` ModuleDicts, with its name, or None."""
    for name, module in model.named_modules():
        enc, dec = getattr(module, "enc", None), getattr(module, "dec", None)
        if isinstance(enc, torch.nn.ModuleDict) and isinstance(dec, torch.nn.ModuleDict):
            return name, module
    return None


def _block_units(prefix, block):
    """Units of one diffusers block in forward order: each resnet (or the attention that follows
    it), then its down/up-sampler."""
    units = []
    resnets = getattr(block, "resnets", None) or []
    attentions = getattr(block, "attentions", None) or []
    for k in range(len(resnets)):
        has_attn = k < len(attentions) and attentions[k] is not None
        units.append(f"{prefix}.attentions.{k}" if has_attn else f"{prefix}.resnets.{k}")
    for attr in ("downsamplers", "upsamplers"):
        samplers = getattr(block, attr, None)
        if samplers:
            units.append(f"{prefix}.{attr}.0")
    return units


def unet_units(model):
    """(encoder units, decoder units) in forward order, as module names of `model` (§2).

    NVlabs EDM (DhariwalUNet/SongUNet): the keys of `enc` and `dec`. diffusers UNet2DModel /
    UNet2DConditionModel: conv_in and the down blocks' units, then the mid block's and the up
    blocks' units. The bottleneck is the last encoder unit.
    """
    edm = _find_edm_core(model)
    if edm is not None:
        prefix = edm[0] + "." if edm[0] else ""
        return ([f"{prefix}enc.{k}" for k in edm[1].enc], [f"{prefix}dec.{k}" for k in edm[1].dec])
    if not hasattr(model, "down_blocks") or not hasattr(model, "up_blocks"):
        return [], []
    enc = ["conv_in"]
    for i, block in enumerate(model.down_blocks):
        enc += _block_units(f"down_blocks.{i}", block)
    dec = _block_units("mid_block", model.mid_block) if getattr(model, "mid_block", None) else []
    for i, block in enumerate(model.up_blocks):
        dec += _block_units(f"up_blocks.{i}", block)
    return enc, dec


def resolve_layers(model, selectors):
    """Map selectors (`enc:K`, `dec:K`, `bottleneck`, `input`, or raw module names) to module names.

    `input` stays `input`. Unknown names raise a ValueError that lists what is valid.
    """
    modules = dict(model.named_modules())
    enc, dec = unet_units(model)
    resolved = []
    for sel in selectors:
        name = sel
        if sel == INPUT_SELECTOR:
            pass
        elif sel == "bottleneck" and enc:
            name = enc[-1]
        elif sel.startswith(("enc:", "dec:")) and (enc or dec):
            units = enc if sel.startswith("enc:") else dec
            idx = sel[4:]
            if not idx.isdigit() or int(idx) >= len(units):
                raise ValueError(
                    f"Layer selector {sel!r} is out of range: this model has enc:0..enc:{len(enc) - 1} "
                    f"and dec:0..dec:{len(dec) - 1}."
                )
            name = units[int(idx)]
        elif sel not in modules or sel == "":
            raise ValueError(_unknown_layer_message(sel, modules, enc, dec))
        resolved.append(name)
    return resolved


def _unknown_layer_message(sel, modules, enc, dec):
    shallow = [n for n in modules if n and n.count(".") <= 1]
    valid = [INPUT_SELECTOR]
    if enc:
        valid += [f"enc:0..enc:{len(enc) - 1}", f"dec:0..dec:{len(dec) - 1}", "bottleneck"]
    close = difflib.get_close_matches(sel, list(modules), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"Unknown teacher layer {sel!r}.{hint} Valid selectors: {', '.join(valid)}; or any module name "
        f"of the teacher (model.named_modules()), e.g. {', '.join(shallow)}."
    )


class FeatureExtractor:
    """Hooks named modules of a frozen teacher and returns their pooled, flattened outputs.

        with FeatureExtractor(teacher, ["enc:6", "bottleneck", "dec:7"], pool_size=4) as fx:
            feats = fx(lambda x: teacher_forward(x), noisy_sample)   # {selector: [B, D]}

    The forward stops right after the last selected module has run (nothing after it is
    computed), so `fn`'s own return value is never used. Hooks are removed on exit, also
    when the forward raises. The selector `input` returns the pooled sample given to `fn`.
    """

    def __init__(self, model, layers, pool_size=4, stop_early=True):
        self.model = model
        self.selectors = list(layers)
        if not self.selectors:
            raise ValueError("FeatureExtractor needs at least one layer.")
        self.names = resolve_layers(model, self.selectors)
        self.pool_size = pool_size
        self.stop_early = stop_early
        self._handles = []
        self._features = {}

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for sel, name in zip(self.selectors, self.names):
            if name != INPUT_SELECTOR:
                self._handles.append(modules[name].register_forward_hook(self._hook(sel)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._features = {}
        return False

    def _hook(self, selector):
        def hook(module, args, output):
            self._features[selector] = pool_feature(output, self.pool_size)
            if self.stop_early and len(self._features) == len(self.selectors):
                raise _StopForward

        return hook

    def __call__(self, fn, sample):
        if not self._handles and any(n != INPUT_SELECTOR for n in self.names):
            raise RuntimeError("Use FeatureExtractor as a context manager: `with FeatureExtractor(...) as fx:`.")
        self._features = {}
        if INPUT_SELECTOR in self.selectors:
            self._features[INPUT_SELECTOR] = pool_feature(sample, self.pool_size)
        if len(self._features) < len(self.selectors):
            try:
                fn(sample)
            except _StopForward:
                pass
        missing = [s for s in self.selectors if s not in self._features]
        if missing:
            raise RuntimeError(f"Teacher layers {missing} did not run in the forward pass.")
        features, self._features = self._features, {}
        return {s: features[s] for s in self.selectors}


# ----------------------------------------------------------------------------------------------
# §2 Feature noise: one σ per group (truncated lognormal, fixed, or 0), VE → VP mapping.
# ----------------------------------------------------------------------------------------------


def sample_feature_sigmas(num_groups, mean=-1.2, std=1.2, sigma_min=0.02, sigma_max=0.1, generator=None, device="cpu"):
    """One feature-noise level per group [G]: log σ ~ N(mean, std²) truncated to [σ_min, σ_max].

    Out-of-range draws are redrawn up to 8 times, then clamped. σ_min == σ_max gives that fixed
    level (σ = 0: clean features).
    """
    if sigma_min > sigma_max:
        raise ValueError(f"feature noise min {sigma_min} is above max {sigma_max}.")
    if sigma_min == sigma_max:
        return torch.full((num_groups,), float(sigma_min), device=device)

    def draw():
        z = torch.randn(num_groups, generator=generator, device=generator.device if generator else "cpu")
        return (mean + std * z).exp()

    sigma = draw()
    for _ in range(8):
        bad = (sigma < sigma_min) | (sigma > sigma_max)
        sigma = torch.where(bad, draw(), sigma)
    return sigma.clamp(sigma_min, sigma_max).to(device)


def add_feature_noise(x, sigma, noise=None):
    """x + σ ξ (Eq. 9) with one σ per group: x [G, K, ...], sigma [G]; ξ fresh per sample."""
    if noise is None:
        noise = torch.randn_like(x)
    return x + sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) * noise


def vp_sigmas(alphas_cumprod):
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) of a variance-preserving schedule."""
    a = alphas_cumprod.double()
    return ((1 - a) / a).sqrt()


def vp_timestep_for_sigma(sigma, alphas_cumprod):
    """Fractional timestep t with σ_t = σ, interpolating log σ_t linearly over t (§2).

    σ below σ_0 maps to t = 0; above σ_T−1 to the last timestep.
    """
    log_sig = vp_sigmas(alphas_cumprod).log()
    q = sigma.double().clamp_min(1e-20).log().clamp(log_sig[0], log_sig[-1])
    idx = torch.searchsorted(log_sig, q).clamp(1, len(log_sig) - 1)
    lo, hi = log_sig[idx - 1], log_sig[idx]
    frac = (q - lo) / (hi - lo)
    return (idx - 1 + frac).to(torch.float32)


def vp_scale_input(x_noisy, sigma):
    """A VE-noised sample x + σξ as a VP model input: (x + σξ)/sqrt(1 + σ²), σ per group."""
    sigma = sigma.to(torch.float32).view(-1, *([1] * (x_noisy.ndim - 1)))
    return (x_noisy.float() / (1 + sigma**2).sqrt()).to(x_noisy.dtype)


# ----------------------------------------------------------------------------------------------
# §3 Students: EDM preconditioning and the two one-step generators.
# ----------------------------------------------------------------------------------------------

PRECONDS = ("cm", "edm")


def edm_scalings(sigma, sigma_data=0.5, sigma_min=None):
    """(c_skip, c_out, c_in) of EDM. With sigma_min set: the consistency-model boundary variant
    c_skip = σd²/((σ−σmin)² + σd²), c_out = (σ−σmin)σd/sqrt(σ² + σd²) (diffusers'
    CMStochasticIterativeScheduler), so that D(x, σmin) = x."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    shift = 0.0 if sigma_min is None else sigma_min
    c_skip = sigma_data**2 / ((sigma - shift) ** 2 + sigma_data**2)
    c_out = (sigma - shift) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


def edm_c_noise(sigma, precond="cm"):
    """Noise conditioning: 250·ln σ (openai/diffusers ADM checkpoints) or ln(σ)/4 (NVlabs EDM)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    if precond == "cm":
        return 250.0 * torch.log(sigma + 1e-44)
    if precond == "edm":
        return sigma.log() / 4
    raise ValueError(f"Unknown preconditioning {precond!r}; choose one of {PRECONDS}.")


def edm_denoise(unet, x, sigma, class_labels, precond="cm", sigma_data=0.5, sigma_min=None):
    """D(x; σ) = c_skip x + c_out F(c_in x, c_noise(σ), class) for a diffusers UNet2DModel.

    sigma: a scalar or one value per sample. Computed in float32 around the network call.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sig = sigma.reshape(-1) if sigma.ndim else sigma.expand(x.shape[0])
    c_skip, c_out, c_in = (c.view(-1, 1, 1, 1) for c in edm_scalings(sig, sigma_data, sigma_min))
    c_noise = edm_c_noise(sig, precond)
    # x / sqrt(σ² + σd²) rather than c_in·x: bit-identical to the pipeline's scale_model_input
    model_in = (x.float() / (sig**2 + sigma_data**2).sqrt().view(-1, 1, 1, 1)).to(x.dtype)
    out = unet(model_in, c_noise, class_labels=class_labels, return_dict=False)[0]
    return c_skip * x.float() + c_out * out.float()


def edm_one_step(unet, noise, class_labels, sigma_max=80.0, sigma_min=0.002, precond="cm", sigma_data=0.5):
    """The ImageNet-64 student (§3): x = D_boundary(σmax·z; σmax) for a diffusers UNet2DModel,
    the exact step diffusers' ConsistencyModelPipeline runs with num_inference_steps=1 (its
    scheduler saved with clip_denoised=False)."""
    return edm_denoise(unet, sigma_max * noise, sigma_max, class_labels, precond, sigma_data, sigma_min)


def vp_x0_from_eps(z, eps, alpha_cumprod):
    """x₀ = (z − sqrt(1 − ᾱ) ε̂)/sqrt(ᾱ), computed in float64 and returned as float32."""
    a = torch.as_tensor(alpha_cumprod, dtype=torch.float64, device=z.device)
    x0 = (z.double() - (1 - a).sqrt() * eps.double()) / a.sqrt()
    return x0.float()


def sdxl_one_step(unet, noise, timestep, alpha_cumprod, encoder_hidden_states, added_cond_kwargs):
    """The SDXL student (§3): ε̂ = UNet(z, t) from pure noise z at timestep t (999), then x₀."""
    t = torch.full((noise.shape[0],), int(timestep), device=noise.device, dtype=torch.long)
    eps = unet(
        noise, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, return_dict=False
    )[0]
    return vp_x0_from_eps(noise, eps, alpha_cumprod)


def karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM time steps σ_0 = σmax > … > σ_{n−1} = σmin, then 0 (Karras et al. 2022, Eq. 5)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    ramp = i / max(num_steps - 1, 1)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def edm_heun_sample(denoise, noise, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Deterministic EDM sampler (Heun, 2·num_steps − 1 evaluations): the multi-step teacher row.

    denoise(x, sigma) → D(x; σ) in float32; noise ~ N(0, I).
    """
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    x = noise.float() * sigmas[0]
    for cur, nxt in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoise(x, cur)) / cur
        x_next = x + (nxt - cur) * d
        if nxt > 0:
            x_next = x + (nxt - cur) * 0.5 * (d + (x_next - denoise(x_next, nxt)) / nxt)
        x = x_next
    return x


# ----------------------------------------------------------------------------------------------
# §1c/§2 One TFD step: noised teacher features of generated / positive / anchor samples, the total.
# ----------------------------------------------------------------------------------------------


def group_features(extractor, forward, x, sigma, noise=None):
    """Teacher features of grouped samples x [G, K, C, H, W] noised at their group's σ [G].

    Feeds x + σ_g ξ (ξ fresh per sample, Eq. 9) to `forward(sample [G·K, ...], sigma [G·K])`
    inside `extractor`. Returns {layer: [G, K, D]}; gradient flows to x only if x requires it.
    """
    g, k = x.shape[:2]
    flat = x.reshape(g * k, *x.shape[2:])
    sig = sigma.to(flat.device).repeat_interleave(k)
    noisy = add_feature_noise(flat, sig, None if noise is None else noise.reshape_as(flat))
    feats = extractor(lambda s: forward(s, sig), noisy)
    return {name: f.reshape(g, k, -1) for name, f in feats.items()}


def tfd_loss(gen_feats, pos_feats, anchor_feats, radii, kernel="drifting", anchor_weight=1.0,
             anchor_alpha=0.5, anchor_temperature=1.0, anchor_bandwidth=None):
    """L = Σ_layers mean_groups(drift) + λ Σ_layers mean_groups(anchor) (§1c).

    *_feats: {layer: [G, K, D]}; anchor_feats may be None (no anchor term). Returns
    (loss, logs); logs holds per-layer losses and diagnostics as tensors (no host sync here).
    """
    drift_total, anchor_total = 0.0, 0.0
    logs = {}
    for layer, gen in gen_feats.items():
        drift, stats = drifting_loss(gen, pos_feats[layer], radii, kernel, return_stats=True)
        drift_total = drift_total + drift.mean()
        logs[f"drift/{layer}"] = drift.mean().detach()
        logs[f"scale/{layer}"] = stats["scale"]
        for r, norm in zip(radii, stats["force_norms"]):
            logs[f"force/{layer}/r{r:g}"] = norm
        if anchor_feats is not None and anchor_weight > 0:
            anchor, astats = anchor_margin_loss(
                gen, anchor_feats[layer], anchor_alpha, anchor_bandwidth, anchor_temperature, return_stats=True
            )
            anchor_total = anchor_total + anchor.mean()
            logs[f"anchor/{layer}"] = anchor.mean().detach()
            logs[f"covered/{layer}"] = astats["covered"]
    total = drift_total + anchor_weight * anchor_total
    logs["loss/drift"] = torch.as_tensor(drift_total).detach()
    logs["loss/anchor"] = torch.as_tensor(anchor_total).detach()
    logs["loss/total"] = total.detach()
    return total, logs


def tfd_step_loss(extractor, teacher_forward, generated, positives, anchors, sigma, radii, kernel="drifting",
                  anchor_weight=1.0, anchor_alpha=0.5, anchor_temperature=1.0, anchor_bandwidth=None):
    """The TFD objective of one step (Algorithm 1, lines 4–10) for grouped samples.

    generated [G, N, ...] (carries the student's graph), positives [G, P, ...], anchors
    [G, M, ...] or None to reuse the positives as anchors (the SDXL recipe); sigma [G].
    The generated samples take one teacher pass with gradient; positives and anchors share one
    pass under no-grad. Returns tfd_loss's (loss, logs).
    """
    num_pos = positives.shape[1]
    gen_feats = group_features(extractor, teacher_forward, generated, sigma)
    with torch.no_grad():
        refs = positives if anchors is None else torch.cat([positives, anchors.to(positives.dtype)], dim=1)
        ref_feats = group_features(extractor, teacher_forward, refs, sigma)
    pos_feats = {k: v[:, :num_pos] for k, v in ref_feats.items()}
    anchor_feats = pos_feats if anchors is None else {k: v[:, num_pos:] for k, v in ref_feats.items()}
    return tfd_loss(gen_feats, pos_feats, anchor_feats if anchor_weight > 0 else None, radii, kernel,
                    anchor_weight, anchor_alpha, anchor_temperature, anchor_bandwidth)


# ----------------------------------------------------------------------------------------------
# Training plumbing shared by both scripts: atomic writes, checkpoints, optimiser, logging.
# ----------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_COMPLETE = "tfd_checkpoint_complete"  # written last: a folder without it is incomplete


def atomic_write(path, write_fn):
    """Run write_fn(tmp_path), fsync, then rename onto `path`: readers see the old file or the
    whole new one, never a partial one."""
    import os
    import uuid

    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """Atomically write obj as indented JSON (non-JSON values via str)."""
    import json

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")

    atomic_write(path, write)


def check_run_settings(path, settings):
    """Record the settings a resumable output folder is made with (first run), or require a
    resumed run to match them: images made with other settings are never mixed."""
    import json
    import os

    if not os.path.isfile(path):
        write_json(path, settings)
        return
    with open(path) as f:
        old = json.load(f)
    changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if changed:
        raise ValueError(f"The images next to {path} were made with other settings {changed} (old, new): use a "
                         "new --output_dir, or delete that folder.")


def load_edm_pickle(path, edm_repo=None):
    """The network of an NVlabs EDM pickle ({'ema': net}, a path or URL); its classes unpickle from
    an NVlabs/edm checkout put on sys.path (edm_repo)."""
    import os
    import pickle
    import sys

    if edm_repo and os.path.abspath(edm_repo) not in sys.path:
        sys.path.insert(0, os.path.abspath(edm_repo))
    url = path.startswith(("http://", "https://"))
    if not url and not os.path.isfile(path):
        raise FileNotFoundError(f"EDM pickle {path} not found.")
    try:
        if url:
            import dnnlib  # from edm_repo

            with dnnlib.util.open_url(path) as f:
                data = pickle.load(f)
        else:
            with open(path, "rb") as f:
                data = pickle.load(f)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"Unpickling {path} needs the NVlabs EDM code ({e.name}): pass --edm_repo "
                                  "PATH_TO_EDM_CHECKOUT (git clone https://github.com/NVlabs/edm).") from e
    return data["ema"] if isinstance(data, dict) else data


def save_png(path, image):
    """Atomic PNG write of a PIL image: a killed run never leaves a truncated file behind."""
    atomic_write(path, lambda tmp: image.save(tmp, format="png"))


def shard(num_items, rank, world):
    """This process's contiguous, disjoint index range of num_items."""
    per = -(-num_items // world)
    return range(rank * per, min((rank + 1) * per, num_items))


def total_over_processes(count, state):
    """Sum of an int over all processes of an accelerate state (also a barrier)."""
    from accelerate.utils import gather_object

    return sum(gather_object([count])) if state.num_processes > 1 else count


def list_checkpoints(output_dir, logger=None):
    """Complete `checkpoint-N` folders under output_dir as [(N, path)], oldest first.

    Folders without the completion marker (a run killed while saving) are skipped with a warning.
    """
    import os

    found = []
    if not os.path.isdir(output_dir):
        return found
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        step = name[len(CHECKPOINT_PREFIX):]
        if step.endswith(".incomplete"):  # save_checkpoint's temporary name: killed before the rename
            step = step[: -len(".incomplete")]
        if not (name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and os.path.isdir(path)):
            continue
        if not os.path.exists(os.path.join(path, CHECKPOINT_COMPLETE)) or name.endswith(".incomplete"):
            if logger is not None:
                logger.warning(f"Ignoring incomplete checkpoint {path} (no {CHECKPOINT_COMPLETE} marker).")
            continue
        found.append((int(step), path))
    return sorted(found)


def resolve_resume_checkpoint(output_dir, resume_from, logger=None):
    """`latest` → the newest complete checkpoint under output_dir (None if there is none);
    a path → that checkpoint, which must be complete."""
    import os

    if not resume_from:
        return None
    if resume_from == "latest":
        ckpts = list_checkpoints(output_dir, logger)
        return ckpts[-1][1] if ckpts else None
    if not os.path.isdir(resume_from):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from!r} does not exist.")
    if not os.path.exists(os.path.join(resume_from, CHECKPOINT_COMPLETE)):
        raise ValueError(f"{resume_from} is an incomplete checkpoint (the run was killed while saving it).")
    return resume_from


def checkpoint_step(path):
    import os

    return int(os.path.basename(os.path.normpath(path))[len(CHECKPOINT_PREFIX):])


def save_checkpoint(accelerator, output_dir, step, total_limit=None, logger=None):
    """accelerator.save_state into checkpoint-N, atomically: written under a temporary name,
    marked complete, renamed. Then removes the oldest complete checkpoints beyond total_limit.
    Call on every process."""
    import os
    import shutil

    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = final + ".incomplete"
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    pause_for_test("checkpoint", step)  # test-only: tests/test_faults.py kills the run here
    if accelerator.is_main_process:
        with open(os.path.join(tmp, CHECKPOINT_COMPLETE), "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        if logger is not None:
            logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


def make_optimizer(params, lr, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8, use_8bit=False):
    """AdamW (§4), or bitsandbytes' 8-bit AdamW to save optimiser memory."""
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from e
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def scalars(logs):
    """Tensor logs → floats, with one host sync for all of them."""
    keys = list(logs)
    device = next((v.device for v in logs.values() if torch.is_tensor(v)), "cpu")
    vals = torch.stack([torch.as_tensor(logs[k], dtype=torch.float32, device=device).reshape(()) for k in keys])
    return dict(zip(keys, vals.cpu().tolist()))


def parse_floats(text):
    """'0.02,0.05 0.2' → [0.02, 0.05, 0.2] (commas or spaces)."""
    try:
        return [float(v) for v in str(text).replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{text!r} is not a list of numbers separated by commas or spaces.") from None


# ----------------------------------------------------------------------------------------------
# ImageNet-64 / class-conditional EDM: teacher closures, one-step students, labelled images,
# the class-grouped sampler (train_tfd_imagenet64.py and the step benchmark).
# ----------------------------------------------------------------------------------------------


def is_edm_network(model):
    """True for an NVlabs EDM network (EDMPrecond/VPPrecond/...: called as net(x, σ, one-hot))."""
    return hasattr(model, "label_dim") and hasattr(model, "sigma_data") and not hasattr(model, "config")


def num_class_labels(model):
    """Number of class labels the network is conditioned on (0 for an unconditional one)."""
    if is_edm_network(model):
        return int(model.label_dim or 0)
    return int(getattr(model.config, "num_class_embeds", None) or 0)


def _labels_per_sample(labels, num_samples):
    """One label per sample: labels given per group [G] are repeated over each group's samples."""
    labels = labels.reshape(-1)
    if labels.numel() == num_samples:
        return labels
    if num_samples % labels.numel():
        raise ValueError(f"{labels.numel()} class labels do not divide a batch of {num_samples} samples.")
    return labels.repeat_interleave(num_samples // labels.numel())


def edm_teacher_forward(teacher, class_labels, precond="cm", sigma_data=0.5, sigma_floor=0.002):
    """forward(sample, sigma) for FeatureExtractor: the teacher on a VE-noised sample x + σξ (§2).

    diffusers UNet2DModel: F(c_in·x, c_noise(σ), labels); NVlabs EDM network: net(x, σ, one-hot).
    σ is floored at sigma_floor (σ = 0, clean features, has no c_noise). class_labels: one per
    group (repeated over the group's samples) or one per sample. Runs in the teacher's own dtype
    with autocast off (float32 in the authors' recipe). Its return value is only the hooks'.
    """
    dtype = next(teacher.parameters()).dtype
    edm = is_edm_network(teacher)

    def forward(sample, sigma):
        labels = _labels_per_sample(class_labels.to(sample.device), sample.shape[0])
        sig = sigma.to(sample.device, torch.float32).reshape(-1).expand(sample.shape[0]).clamp_min(sigma_floor)
        with torch.autocast(sample.device.type, enabled=False):
            if edm:
                onehot = F.one_hot(labels.long(), teacher.label_dim).float()
                return teacher(sample.float(), sig, onehot)
            c_in = edm_scalings(sig, sigma_data)[2].view(-1, 1, 1, 1)
            model_in = (c_in * sample.float()).to(dtype)
            return teacher(model_in, edm_c_noise(sig, precond), class_labels=labels, return_dict=False)[0]

    return forward


def set_dropout(model, p):
    """Set every dropout probability of a model: torch Dropout modules and float `dropout` attributes
    (NVlabs EDM's UNetBlock calls functional dropout with self.dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = p
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = p
    return model


def edm_net_one_step(net, noise, class_labels, sigma_max=80.0, label_dim=None):
    """One-step sample of an NVlabs EDM network: D(σmax·z; σmax) = net(σmax·z, σmax, one-hot).

    EDM's own `edm_sampler(num_steps=1)` returns the same (its last step lands on t = 0).
    label_dim: needed when `net` is wrapped (DDP); defaults to net.label_dim.
    """
    label_dim = net.label_dim if label_dim is None else label_dim
    onehot = F.one_hot(class_labels.long(), label_dim).float()
    sigma = torch.full((noise.shape[0],), float(sigma_max), device=noise.device)
    return net(noise.float() * sigma_max, sigma, onehot).float()


def to_uint8(images):
    """SPEC §5: images in [−1, 1], [B, C, H, W] → uint8 [B, H, W, C] via clamp((x + 1)·127.5)
    (truncating, the evaluation protocol's conversion)."""
    x = ((images.detach().float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu()


def image_grid(images, nrow=None):
    """Images in [−1, 1], [B, C, H, W] → one PIL grid image (rows of nrow)."""
    from PIL import Image

    b, h, w, c = (x := to_uint8(images)).shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    grid = torch.zeros(ncol * h, nrow * w, c, dtype=torch.uint8)
    for i in range(b):
        r, q = divmod(i, nrow)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i]
    arr = grid.numpy()
    return Image.fromarray(arr[..., 0] if c == 1 else arr)


def eight_bit(image):
    """16-bit grayscale PIL images (modes I;16*, I) rescaled to 8-bit L; PIL's convert() would clip
    them to white. Other images are returned as they are."""
    import numpy as np
    from PIL import Image

    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return image
    return Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))


def to_teacher_image(image, channels, resolution):
    """A PIL image → uint8 [C, H, W] with the teacher's channels (1: L, 3: RGB) and resolution
    (shorter side resized with bicubic filtering, then center-cropped)."""
    import numpy as np
    from PIL import Image

    image = eight_bit(image).convert({1: "L", 3: "RGB"}[channels])
    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, channels)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class ClassGroupedSampler:
    """Draws, per step, `classes_per_batch` distinct classes and `per_class` image indices of each.

    Indices of a class are drawn without replacement; a class with fewer images is drawn with
    replacement (warned about once). Draw k of process `rank` depends only on (seed, rank, k), so
    the state is the draw counter: register the sampler with accelerator.register_for_checkpointing
    and a resumed run continues exactly (the counter is the same on every process). The classes of
    draw k come from one sequence shared by all processes, rank r taking positions [r·G, (r+1)·G):
    processes train disjoint classes while G·processes ≤ classes.
    """

    def __init__(self, labels, classes, classes_per_batch, per_class, seed=0, rank=0, logger=None):
        labels = torch.as_tensor(labels).reshape(-1)
        self.classes = torch.as_tensor(sorted(int(c) for c in classes), dtype=torch.long)
        if classes_per_batch > len(self.classes):
            raise ValueError(
                f"classes_per_batch={classes_per_batch} but only {len(self.classes)} classes are trained "
                f"({self.classes.tolist()[:20]}...): lower --classes_per_batch."
            )
        self.index = {int(c): (labels == c).nonzero().flatten() for c in self.classes}
        empty = [c for c, idx in self.index.items() if len(idx) == 0]
        if empty:
            raise ValueError(f"Classes {empty} have no images in the data set.")
        self.classes_per_batch, self.per_class = classes_per_batch, per_class
        self.seed, self.rank, self.draws = int(seed), int(rank), 0
        small = {c: len(i) for c, i in self.index.items() if len(i) < per_class}
        if small and logger is not None:
            logger.warning(
                f"{len(small)} classes have fewer than {per_class} images (e.g. {dict(list(small.items())[:5])}): "
                "they are drawn with replacement."
            )

    def __call__(self):
        """(classes [G], indices [G, per_class]) for the next step."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_033 + self.draws)
        shared = torch.Generator().manual_seed((self.seed * 1_000_003 - 1) * 1_000_033 + self.draws)
        self.draws += 1
        # Classes: positions [rank·G, (rank+1)·G) of a sequence shared by all processes (disjoint across them).
        G = self.classes_per_batch
        classes = self.classes[shared_draw(len(self.classes), self.rank * G, G, shared)]
        rows = []
        for c in classes.tolist():
            pool = self.index[c]
            if len(pool) >= self.per_class:
                rows.append(pool[torch.randperm(len(pool), generator=g)[: self.per_class]])
            else:
                rows.append(pool[torch.randint(len(pool), (self.per_class,), generator=g)])
        return classes, torch.stack(rows)

    def state_dict(self):
        return {"draws": self.draws, "seed": self.seed}

    def load_state_dict(self, state):
        self.draws = int(state["draws"])


_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")


def _is_edm_dataset(path):
    """An NVlabs EDM/StyleGAN dataset: a .zip or a folder of images with dataset.json labels."""
    import os

    return bool(path) and (str(path).endswith(".zip") or os.path.isfile(os.path.join(path, "dataset.json")))


def _edm_dataset_source(path):
    """(labels [N], fetch(indices) → PIL images) of an EDM dataset zip or folder (dataset_tool.py)."""
    import io
    import json
    import os
    import zipfile

    from PIL import Image

    if os.path.isdir(path):
        names = [os.path.relpath(os.path.join(r, f), path).replace("\\", "/") for r, _, fs in os.walk(path) for f in fs]
        read = lambda name: open(os.path.join(path, name), "rb").read()  # noqa: E731
    else:
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
        read = zf.read
    if "dataset.json" not in names:
        raise ValueError(f"{path} has no dataset.json: the EDM dataset format needs class labels in it.")
    meta = json.loads(read("dataset.json"))
    if not meta.get("labels"):
        raise ValueError(f"{path}/dataset.json has no labels: class-conditional distillation needs them.")
    table = {fname.replace("\\", "/"): int(label) for fname, label in meta["labels"]}
    images = sorted(n for n in names if n.lower().endswith(_IMAGE_EXTENSIONS))
    unlabelled = [n for n in images if n not in table]
    if unlabelled:
        raise ValueError(f"{len(unlabelled)} images of {path} have no label in dataset.json, e.g. {unlabelled[:3]}.")
    labels = torch.tensor([table[n] for n in images], dtype=torch.long)
    return labels, lambda idx: [Image.open(io.BytesIO(read(images[i]))) for i in idx]


def _hf_dataset_source(ds, image_column, label_column, where):
    """(labels [N], fetch(indices) → PIL images) of a datasets.Dataset."""
    import io

    from PIL import Image

    for kind, col in (("image", image_column), ("label", label_column)):
        if col not in ds.column_names:
            raise ValueError(
                f"{where} has no {kind} column {col!r}; its columns are {ds.column_names}. "
                f"Pass --{kind}_column."
            )
    labels = torch.as_tensor(list(ds[label_column]))
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim != 1:
        raise ValueError(f"Column {label_column!r} of {where} must hold one integer class id per image.")

    def as_pil(v):
        if isinstance(v, Image.Image):
            return v
        if isinstance(v, dict):
            return Image.open(v["path"] if v.get("bytes") is None else io.BytesIO(v["bytes"]))
        if isinstance(v, str):
            return Image.open(v)
        import numpy as np

        return Image.fromarray(np.asarray(v))

    return labels.long(), lambda idx: [as_pil(v) for v in ds[list(idx)][image_column]]


def open_labelled_images(dataset_name=None, train_data_dir=None, split="train", image_column="image",
                         label_column="label", dataset_config_name=None, cache_dir=None):
    """(labels [N], fetch(indices) → PIL images, description) of a labelled image data set.

    dataset_name: a Hub id or any local path `datasets.load_dataset` takes; a folder written by
    Dataset/DatasetDict.save_to_disk; or an EDM dataset zip/folder. train_data_dir: an imagefolder
    (class sub-folders) or an EDM dataset folder.
    """
    import os

    import datasets

    path = dataset_name or train_data_dir
    if not path:
        raise ValueError("Give the training images: --dataset_name or --train_data_dir.")
    if _is_edm_dataset(path):
        labels, fetch = _edm_dataset_source(path)
        return labels, fetch, f"EDM dataset {path}"
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
        try:
            ds = datasets.load_from_disk(path)
        except IndexError:  # what datasets raises for a saved data set without rows (no shards)
            raise ValueError(f"{path} holds no images.") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path} has splits {list(ds)}, not {split!r}: pass --dataset_split.")
            ds = ds[split]
    elif dataset_name:
        ds = datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir)
    else:
        ds = datasets.load_dataset("imagefolder", data_dir=train_data_dir, split=split, cache_dir=cache_dir)
    labels, fetch = _hf_dataset_source(ds, image_column, label_column, path)
    if len(labels) == 0:
        raise ValueError(f"{path} ({split}) holds no images.")
    return labels, fetch, f"{path} ({split})"


class LabelledImages:
    """Labelled images in the teacher's format: `labels` int64 [N], `get(indices)` → uint8 [..., C, H, W].

    Preloaded once into one uint8 tensor when it takes at most preload_max_gb, otherwise decoded
    on the fly (ImageNet-64 is 15.7 GB per process in memory).
    """

    def __init__(self, labels, fetch, channels, resolution, preload_max_gb=8.0, progress=True):
        self.labels, self._fetch = labels, fetch
        self.channels, self.resolution = channels, resolution
        self.data = None
        nbytes = len(labels) * channels * resolution * resolution
        if nbytes <= preload_max_gb * 2**30:
            from tqdm.auto import tqdm

            self.data = torch.empty(len(labels), channels, resolution, resolution, dtype=torch.uint8)
            chunk = 1024
            for start in tqdm(range(0, len(labels), chunk), desc="preprocessing images", disable=not progress):
                idx = list(range(start, min(start + chunk, len(labels))))
                self.data[start:start + len(idx)] = self._decode(idx)

    def _decode(self, idx):
        try:
            return torch.stack([to_teacher_image(im, self.channels, self.resolution) for im in self._fetch(idx)])
        except Exception:  # name the culprit: PIL's error does not for in-memory bytes (datasets, zips)
            for i in idx:
                try:
                    to_teacher_image(self._fetch([i])[0], self.channels, self.resolution)
                except Exception as e:
                    raise ValueError(f"Image {i} of the training data cannot be decoded ({type(e).__name__}: {e}): "
                                     "remove or re-encode it.") from e
            raise

    def get(self, indices):
        indices = torch.as_tensor(indices)
        flat = indices.reshape(-1)
        out = self.data[flat] if self.data is not None else self._decode(flat.tolist())
        return out.reshape(*indices.shape, *out.shape[1:])


def uint8_to_model(images, device, dtype=torch.float32):
    """uint8 images → [−1, 1] in `dtype` on `device`."""
    return images.to(device, non_blocking=True).to(dtype) / 127.5 - 1


# ----------------------------------------------------------------------------------------------
# SDXL / variance-preserving teacher: teacher forward, micro-conditioning, the positive cache (§4).
# ----------------------------------------------------------------------------------------------


def sdxl_student_and_teacher(unet, train_mode, device, teacher_dtype, lora_rank=64, lora_alpha=64,
                             lora_target_modules=("to_k", "to_q", "to_v", "to_out.0")):
    """(student, teacher) from the teacher's UNet: `full` trains a float32 copy next to the frozen
    teacher (in teacher_dtype); `lora` adds float32 LoRA adapters to the UNet itself, which is then
    also the teacher with its adapters disabled (`teacher_mode`): no second 2.6B copy."""
    import copy

    unet.requires_grad_(False).to(device, teacher_dtype)
    if train_mode == "full":
        return copy.deepcopy(unet).to(torch.float32).requires_grad_(True), unet
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                target_modules=list(lora_target_modules)))
    for prm in unet.parameters():
        if prm.requires_grad:
            prm.data = prm.data.float()
    return unet, unet


def vp_teacher_forward(unet, alphas_cumprod, encoder_hidden_states, added_cond_kwargs):
    """`forward(sample, sigma)` for `group_features`: a VP (ε-prediction) UNet fed the VE-noised
    sample as vp_scale_input(sample, σ) at the fractional timestep vp_timestep_for_sigma(σ) (§2).

    Text conditioning is given per group ([G, ...] tensors) and repeated for the G·K samples;
    no classifier-free guidance. The sample is cast to the UNet's dtype (the feature-pass precision).
    """

    def forward(sample, sigma):
        reps = sample.shape[0] // encoder_hidden_states.shape[0]
        t = vp_timestep_for_sigma(sigma.to(alphas_cumprod.device), alphas_cumprod).to(sample.device)
        cond = {k: v.repeat_interleave(reps, dim=0).to(unet.dtype) for k, v in added_cond_kwargs.items()}
        return unet(
            vp_scale_input(sample, sigma).to(unet.dtype),
            t,
            encoder_hidden_states=encoder_hidden_states.repeat_interleave(reps, dim=0).to(unet.dtype),
            added_cond_kwargs=cond,
            return_dict=False,
        )[0]

    return forward


def sdxl_time_ids(resolution, batch_size, device=None, dtype=torch.float32):
    """SDXL micro-conditioning ids [B, 6]: original size, crop (0, 0), target size, all at the
    training resolution (what StableDiffusionXLPipeline passes for a square image)."""
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype, device=device)
    return ids.expand(batch_size, 6)


@contextmanager
def teacher_mode(unet):
    """Run a LoRA student's UNet as its frozen teacher: adapters disabled, gradient checkpointing off.

    Checkpointing must be off: its recomputation happens in backward, after the adapters are
    re-enabled, and would silently differentiate the student instead of the teacher. For a
    model without adapters this only turns checkpointing off for the block.
    """
    has_adapters = bool(getattr(unet, "peft_config", None))
    checkpointing = bool(getattr(unet, "is_gradient_checkpointing", False))
    if has_adapters:
        unet.disable_adapters()
    if checkpointing:
        unet.disable_gradient_checkpointing()
    try:
        yield unet
    finally:
        if has_adapters:
            unet.enable_adapters()
        if checkpointing:
            unet.enable_gradient_checkpointing()


def normalize_caption(text):
    """Caption matching key (§4): lowercase, whitespace collapsed, trailing periods stripped."""
    return " ".join(str(text).lower().split()).rstrip(" .")


def _stable_hash(*parts):
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def positive_seed(prompt, slot, base_seed=0):
    """Seed of the teacher sample in (prompt, slot): the same on every machine and every rerun."""
    return int(_stable_hash("positive-seed", prompt, int(slot), int(base_seed))[:15], 16)


def _tensor_digest(tensors):
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class CacheEntryError(Exception):
    """A cache file that exists but cannot be trusted (truncated, corrupted, other settings)."""


class PositiveCache:
    """On-disk cache of per-prompt positives and text embeddings (§4).

    Layout: <root>/<settings key>/settings.json and entries/<ab>/<key>.safetensors, where the
    settings key hashes everything the content depends on (teacher id and revision, resolution,
    sampling steps, guidance, scheduler config, ...) and an entry's key hashes (settings key,
    prompt, slot plan). A cache made with other settings lives under another key: it is never
    reused, and the log says so. Entries are written atomically and carry a SHA-256 of their
    tensors; a file that fails to load or to verify raises CacheEntryError.
    """

    def __init__(self, root, settings):
        import json
        import os

        self.settings = dict(settings)
        self.key = _stable_hash("tfd-positive-cache-v1", self.settings)[:16]
        self.dir = os.path.join(root, self.key)
        os.makedirs(os.path.join(self.dir, "entries"), exist_ok=True)
        self.other_settings = sorted(
            d for d in os.listdir(root) if d != self.key and os.path.isfile(os.path.join(root, d, "settings.json"))
        )
        settings_path = os.path.join(self.dir, "settings.json")
        if not os.path.exists(settings_path):
            text = json.dumps(self.settings, indent=2, sort_keys=True, default=str)
            atomic_write(settings_path, lambda p: open(p, "w").write(text))

    def entry_key(self, prompt, slots):
        """slots: one source tag per positive slot, e.g. ["real:17", "teacher", ...]."""
        return _stable_hash(self.key, prompt, list(slots))[:32]

    def path(self, prompt, slots):
        import os

        key = self.entry_key(prompt, slots)
        return os.path.join(self.dir, "entries", key[:2], key + ".safetensors")

    def exists(self, prompt, slots):
        import os

        return os.path.exists(self.path(prompt, slots))

    def save(self, prompt, slots, tensors):
        import json
        import os

        from safetensors.torch import save_file

        path = self.path(prompt, slots)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"prompt": prompt, "slots": json.dumps(list(slots)), "sha256": _tensor_digest(tensors),
                "settings_key": self.key}
        def write(tmp):
            save_file(tensors, tmp, metadata=meta)
            pause_for_test("cache_entry", prompt)  # test-only: tests/test_faults.py kills the writer here

        atomic_write(path, write)
        return path

    def load(self, prompt, slots):
        """The entry's tensors, or None if absent; CacheEntryError if it is unreadable or wrong."""
        import json
        import os

        from safetensors import safe_open

        path = self.path(prompt, slots)
        if not os.path.exists(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for truncated/garbled files
            raise CacheEntryError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
        if meta.get("sha256") != _tensor_digest(tensors):
            raise CacheEntryError(f"{path}: checksum mismatch (corrupted)")
        if meta.get("prompt") != prompt or json.loads(meta.get("slots", "null")) != list(slots):
            raise CacheEntryError(f"{path}: holds another prompt or slot plan")
        return tensors

    def discard(self, prompt, slots):
        import os

        path = self.path(prompt, slots)
        if os.path.exists(path):
            os.remove(path)


# Logging and publishing helpers (generic; written for the SDXL script, usable by any training script).


def append_metrics(path, record):
    """Append one JSON line (a dict of scalars) to a metrics.jsonl file."""
    import json

    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path, step):
    """Drop the lines of a metrics.jsonl past `step` (a resumed run rewrites them), atomically."""
    import json
    import os

    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for ln in f:
            try:
                record = json.loads(ln)
            except ValueError:  # empty, or cut short by a kill mid-write
                continue
            if record.get("step", 0) <= step:
                kept.append(ln.rstrip("\n") + "\n")
    atomic_write(path, lambda t: open(t, "w").writelines(kept))


def log_image(accelerator, image, step, tag="validation"):
    """A PIL image to the accelerator's trackers (tensorboard, wandb)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image)]}, step=step)


def push_folder_to_hub(folder, repo_id=None, token=None, message="TFD one-step student"):
    """Upload a training output folder (without checkpoints, caches and temporary files)."""
    import os

    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id or os.path.basename(os.path.abspath(folder)), exist_ok=True, token=token).repo_id
    upload_folder(repo_id=repo_id, folder_path=folder, token=token, commit_message=message,
                  ignore_patterns=["checkpoint-*", "positive_cache/*", "logs/*", "*.incomplete*", "*.tmp-*"])
    return repo_id


# ----------------------------------------------------------------------------------------------
# Scaling out and fault tolerance: disjoint draws per process, FSDP-consolidated students, the
# output-folder guard, stale temporary files; test-only hooks (no-ops unless a TFD_TEST_* / TFD_DEBUG_DIR
# environment variable is set: tests/test_distributed.py, tests/test_faults.py).
# ----------------------------------------------------------------------------------------------


def shared_draw(n, start, count, generator, chunk=256):
    """Positions [start, start+count) of one random sequence of indices in range(n).

    Every lap of n consecutive positions is a permutation of range(n), and the sequence depends
    only on the generator's seed: processes seeding it alike and taking positions
    [rank·G, (rank+1)·G) draw disjoint sets while the world's G·world fits in n (then wrap).
    Costs O(start + count) draws, not O(n): fine for millions of prompts.
    """
    out, seen = [], set()
    while len(out) < start + count:
        for i in torch.randint(n, (chunk,), generator=generator).tolist():
            if i in seen:
                continue
            seen.add(i)
            out.append(i)
            if len(seen) == n:  # a lap is complete: the next one is a new permutation
                seen = set()
            if len(out) == start + count:
                break
    return torch.tensor(out[start:], dtype=torch.long)


def consolidated_model(accelerator, model):
    """The trained module with complete weights, for saving on the main process (call on every process).

    DDP/DeepSpeed ZeRO-2/one process: the unwrapped module. FSDP: its parameters are shards, so the
    full state dict is gathered (accelerator.get_state_dict, a collective) and loaded into a fresh
    copy built from the diffusers config on the main process (None elsewhere).
    """
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type != DistributedType.FSDP:
        return unwrapped
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    full = type(unwrapped).from_config(unwrapped.config)
    full.load_state_dict(state)
    return full


RUN_FILES = ("metrics.jsonl", "model_index.json", "network-snapshot.pkl", "pytorch_lora_weights.safetensors")


def check_output_dir(output_dir, resume_from_checkpoint):
    """An output folder holding another run (checkpoints, metrics or an exported model) is only
    continued on request: FileExistsError unless --resume_from_checkpoint is given."""
    import os

    if resume_from_checkpoint:
        return
    ckpts = list_checkpoints(output_dir)
    found = [ckpts[-1][1]] if ckpts else [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))]
    if found:
        raise FileExistsError(f"{output_dir} already holds another run ({', '.join(found)}): pass "
                              "--resume_from_checkpoint latest to continue it, or choose a new --output_dir.")


STALE_TMP_SECONDS = 600  # an atomic write takes seconds: an older temporary file is a killed writer's


def remove_stale_tmp_files(root, max_age_s=STALE_TMP_SECONDS):
    """Delete `*.tmp-*` leftovers of atomic writes killed mid-way under root (never read: readers
    open final names only). Younger ones may belong to a live writer and are left alone."""
    import os
    import time

    removed, now = 0, time.time()
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                if ".tmp-" in name and now - os.path.getmtime(path) > max_age_s:
                    os.remove(path)
                    removed += 1
            except FileNotFoundError:  # another process removed or renamed it meanwhile
                pass
    return removed


def pause_for_test(point, detail=""):
    """Test-only: with TFD_TEST_PAUSE=POINT (or POINT:DETAIL), announce on stderr and sleep
    TFD_TEST_PAUSE_SECONDS (60) here, so a test can SIGKILL the process at this exact moment."""
    import os
    import sys
    import time

    want = os.environ.get("TFD_TEST_PAUSE")
    if want and want in (point, f"{point}:{detail}"):
        print(f"TFD_TEST_PAUSE {point}:{detail} pid={os.getpid()}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("TFD_TEST_PAUSE_SECONDS", "60")))


def inject_test_fault(loss, step, rank=0):
    """Test-only: at the steps in TFD_TEST_NONFINITE_STEPS ("3,4"; "3@1": rank 1 only) make the loss
    non-finite as TFD_TEST_NONFINITE_KIND says: nan (default), inf, or grad (the loss stays finite,
    its gradient is infinite). Returns the loss unchanged otherwise."""
    import os

    spec = os.environ.get("TFD_TEST_NONFINITE_STEPS")
    if not spec or not ({str(step), f"{step}@{rank}"} & set(spec.replace(" ", "").split(","))):
        return loss
    kind = os.environ.get("TFD_TEST_NONFINITE_KIND", "nan")
    if kind == "grad":
        return loss + (loss - loss.detach()) * float("inf")
    return loss * float(kind)


def debug_record(accelerator, name, make_record):
    """Test-only: append make_record() (a dict) as a JSON line to $TFD_DEBUG_DIR/NAME-rankR.jsonl.
    Without TFD_DEBUG_DIR nothing is computed or written."""
    import json
    import os

    folder = os.environ.get("TFD_DEBUG_DIR")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}-rank{accelerator.process_index}.jsonl"), "a") as f:
        f.write(json.dumps(make_record()) + "\n")


def state_digest(model):
    """SHA-256 of a module's state dict (names, dtypes, shapes, bytes): equal digests, equal weights."""
    return _tensor_digest(dict(model.state_dict()))


# ----------------------------------------------------------------------------------------------
# The update after the backward: the same lines in both training scripts and the step benchmark.
# ----------------------------------------------------------------------------------------------


def clip_and_step(accelerator, optimizer, lr_scheduler, params, loss_sum, max_grad_norm):
    """Clip the gradients, step the optimiser and LR schedule only when the gradient norm and the
    loss (summed over processes) are finite, zero the gradients. Returns (ok, grad_norm); `ok` is a
    bool, so this is the step's one host sync. A GradScaler (fp16) steps either way: it skips the
    update and lowers its scale itself."""
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    ok = bool(torch.isfinite(torch.as_tensor(grad_norm)) &
              torch.isfinite(accelerator.reduce(loss_sum.float(), reduction="sum")))
    if ok or accelerator.scaler is not None:
        optimizer.step()
    if ok:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return ok, grad_norm


def start_run(accelerator, args, resume, logger):
    """Load the checkpoint to resume from (None: a new run), drop a killed run's metrics lines past
    it, record the settings and start the trackers. Returns (first_step, metrics.jsonl path)."""
    import os

    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    first_step = 0
    if resume is None and args.resume_from_checkpoint:
        logger.info(f"No checkpoint in {args.output_dir} to resume from: starting a new run.")
    if resume is not None:
        accelerator.load_state(resume)
        first_step = checkpoint_step(resume)
        logger.info(f"Resumed from {resume} at step {first_step}.")
    if accelerator.is_main_process:
        truncate_metrics(metrics_path, first_step)  # a killed run's lines past the checkpoint (or all)
        os.makedirs(args.output_dir, exist_ok=True)
        write_json(os.path.join(args.output_dir, "training_args.json"), vars(args))
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers(args.tracker_project_name, config=config)
    return first_step, metrics_path


def save_pipeline(pipe, output_dir):
    """pipe.save_pretrained into a temporary folder, then move each component in, complete."""
    import os
    import shutil

    tmp = os.path.join(output_dir, ".pipeline.incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    for name in os.listdir(tmp):
        dst = os.path.join(output_dir, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp, name), dst)
    os.rmdir(tmp)


class TrainingMonitor:
    """Bookkeeping of the training loop shared by both scripts: logs averaged over micro-steps, the
    non-finite-step guard, periodic logging (trackers, tqdm, metrics.jsonl) and checkpoints that
    are never taken inside a run of skipped updates."""

    def __init__(self, accelerator, args, progress, metrics_path, first_step, images_per_step, logger):
        import time

        self.accelerator, self.args, self.progress, self.logger = accelerator, args, progress, logger
        self.metrics_path, self.images_per_step = metrics_path, images_per_step
        self.bad_steps, self.last_time, self.last_step = 0, time.perf_counter(), first_step
        self.logs = {}

    def add(self, logs):
        """Accumulate one micro-step's logs (tensors), averaged over gradient accumulation."""
        n = self.args.gradient_accumulation_steps
        for k, v in logs.items():
            self.logs[k] = self.logs.get(k, 0.0) + v.detach().float() / n

    def end_step(self, step, ok, grad_norm, extra=None):
        """After an update: count a skipped one (stop after --max_bad_steps in a row, naming the last
        good checkpoint), log every --logging_steps (with `extra` scalars), checkpoint every
        --checkpointing_steps."""
        args, accelerator = self.args, self.accelerator
        self.bad_steps = 0 if ok else self.bad_steps + 1
        if not ok:
            self.logger.warning(f"Step {step}: non-finite loss or gradient norm; update skipped "
                                f"({self.bad_steps} in a row).")
            if self.bad_steps >= args.max_bad_steps:
                ckpts = list_checkpoints(args.output_dir)
                last = ckpts[-1][1] if ckpts else "none (no checkpoint yet)"
                accelerator.end_training()
                raise RuntimeError(f"{self.bad_steps} consecutive non-finite steps: stopping. Last good checkpoint: "
                                   f"{last}. Lower --learning_rate or use --mixed_precision no/bf16.")
        self.progress.update(1)
        if step % args.logging_steps == 0 or step == args.max_train_steps:
            self._log(step, grad_norm, extra or {})
        self.logs = {}
        if step % args.checkpointing_steps == 0:
            if self.bad_steps:  # a checkpoint inside a run of skipped updates would not be a good one to resume
                self.logger.warning(f"Step {step}: not checkpointing during {self.bad_steps} non-finite steps in a row.")
            else:
                save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, self.logger)

    def _log(self, step, grad_norm, extra):
        import time

        device = self.accelerator.device
        logs = dict(self.logs, **{"train/grad_norm": torch.as_tensor(grad_norm, device=device).float(),
                                  "train/bad_steps": torch.tensor(float(self.bad_steps), device=device)})
        keys = list(logs)
        vals = self.accelerator.reduce(torch.stack([logs[k].reshape(()).to(device) for k in keys]), "mean")
        values = scalars(dict(zip(keys, vals)))
        covered = [v for k, v in values.items() if k.startswith("covered/")]
        if covered:
            values["anchor/covered"] = sum(covered) / len(covered)
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        values.update({"train/steps_per_s": rate, "train/images_per_s": rate * self.images_per_step}, **extra)
        self.accelerator.log(values, step=step)
        self.progress.set_postfix(loss=f"{values['loss/total']:.4g}", lr=f"{values.get('train/lr', 0):.3g}")
        if self.accelerator.is_main_process:
            append_metrics(self.metrics_path, {"step": step, **values})
