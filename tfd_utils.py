# Teacher-Feature Drifting (TFD): the method, one short function per equation. The sections follow
# docs/method.md, which explains each in words:
#
#   1. teacher features       forward hooks on teacher modules, pooling, early stop, layer selectors
#   2. feature noise          one noise level per group, how each teacher family takes it, teacher forwards
#   3. the drifting field     attraction to positives, repulsion from the generated samples (Eq. 2-4, 7)
#   4. the regression         the frozen-target mean squared error (Eq. 11)
#   5. the anchor-margin loss coverage of real modes (Eq. 12-14)
#   6. the total              TFDLoss: the whole objective of a step, built from keyword arguments
#   7. one-step students      the generators (EDM, variance-preserving, rectified flow)
#
# Equation numbers refer to the paper ("Teacher-Feature Drifting: One-Step Diffusion Distillation with
# Pretrained Diffusion Representations"). Nothing here knows about flags, training loops, data or files:
# tfd_training.py and the scripts do.

import difflib
import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

# ----------------------------------------------------------------------------------------------
# 1. Teacher features: forward hooks, pooling, early stop, layer selectors.
# ----------------------------------------------------------------------------------------------

INPUT_SELECTOR = "input"


class _StopForward(Exception):
    """Raised by the hook of the last selected module: nothing after it is computed."""


def pool_feature(feature, pool_size):
    """Average-pool a feature map [B, C, H, W] (kernel = stride = pool_size, at most the map) and
    flatten it to [B, D]; non-spatial outputs are only flattened."""
    if feature.ndim == 4 and pool_size > 1:
        k = (min(pool_size, feature.shape[-2]), min(pool_size, feature.shape[-1]))
        feature = F.avg_pool2d(feature, kernel_size=k, stride=k)
    return feature.flatten(1)


def tokens_to_map(tokens, height, width):
    """Image tokens [B, L, C] of a patch transformer → a map [B, C, height, width], L = height·width
    in row-major patch order (the order the transformer's own unpatchify uses)."""
    return tokens.reshape(tokens.shape[0], height, width, tokens.shape[-1]).permute(0, 3, 1, 2)


def _find_edm_core(model):
    """The submodule holding NVlabs-EDM-style `enc`/`dec` ModuleDicts, with its name, or None."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "enc", None), torch.nn.ModuleDict) and \
                isinstance(getattr(module, "dec", None), torch.nn.ModuleDict):
            return name, module
    return None


def _block_units(prefix, block):
    """Units of one diffusers block in forward order: each resnet (or the attention after it), then
    its down/up-sampler."""
    units = []
    attentions = getattr(block, "attentions", None) or []
    for k in range(len(getattr(block, "resnets", None) or [])):
        has_attn = k < len(attentions) and attentions[k] is not None
        units.append(f"{prefix}.attentions.{k}" if has_attn else f"{prefix}.resnets.{k}")
    for attr in ("downsamplers", "upsamplers"):
        if getattr(block, attr, None):
            units.append(f"{prefix}.{attr}.0")
    return units


def unet_units(model):
    """(encoder units, decoder units) of a UNet in forward order, as module names; the paper counts
    layers as `enc:K` / `dec:K` over these, and the bottleneck is the last encoder unit.

    NVlabs EDM (DhariwalUNet/SongUNet): the keys of `enc` and `dec`. diffusers UNets: conv_in and the
    down blocks' units, then the mid block's and the up blocks' units.
    """
    edm = _find_edm_core(model)
    if edm is not None:
        prefix = edm[0] + "." if edm[0] else ""
        return [f"{prefix}enc.{k}" for k in edm[1].enc], [f"{prefix}dec.{k}" for k in edm[1].dec]
    if not hasattr(model, "down_blocks") or not hasattr(model, "up_blocks"):
        return [], []
    enc = ["conv_in"]
    for i, block in enumerate(model.down_blocks):
        enc += _block_units(f"down_blocks.{i}", block)
    dec = _block_units("mid_block", model.mid_block) if getattr(model, "mid_block", None) else []
    for i, block in enumerate(model.up_blocks):
        dec += _block_units(f"up_blocks.{i}", block)
    return enc, dec


def transformer_blocks(model):
    """Module names of a patch transformer's blocks in forward order (`transformer_blocks.K`)."""
    blocks = getattr(model, "transformer_blocks", None)
    return [f"transformer_blocks.{k}" for k in range(len(blocks))] if blocks is not None else []


def resolve_layers(model, selectors):
    """Selectors → module names: `enc:K`, `dec:K`, `bottleneck` (UNets), `block:K` (patch
    transformers; negative K counts from the end), `input`, or raw module names. Unknown ones raise a
    ValueError listing what is valid."""
    modules = dict(model.named_modules())
    enc, dec = unet_units(model)
    blocks = transformer_blocks(model)
    resolved = []
    for sel in selectors:
        name = sel
        if sel == "bottleneck" and enc:
            name = enc[-1]
        elif sel.startswith(("enc:", "dec:")) and (enc or dec):
            units, idx = (enc if sel.startswith("enc:") else dec), sel[4:]
            if not idx.isdigit() or int(idx) >= len(units):
                raise ValueError(f"Layer selector {sel!r} is out of range: this model has enc:0..enc:{len(enc) - 1} "
                                 f"and dec:0..dec:{len(dec) - 1}.")
            name = units[int(idx)]
        elif sel.startswith("block:") and blocks:
            name = blocks[_block_index(sel, len(blocks))]
        elif sel != INPUT_SELECTOR and (sel not in modules or sel == ""):
            raise ValueError(_unknown_layer_message(sel, modules, enc, dec, blocks))
        resolved.append(name)
    return resolved


def _block_index(sel, num_blocks):
    """`block:K` (zero-based, negative from the end) or `block:A/B`, the block at fraction A/B of the
    depth (round(n·A/B) − 1: block:1/2 of 24 blocks is block:11), so a setting carries across depths."""
    idx = sel[len("block:"):]
    try:
        if "/" in idx:
            a, b = (int(v) for v in idx.split("/"))
            k = max(0, round(num_blocks * a / b) - 1) if 0 < a <= b else num_blocks
        else:
            k = int(idx)
        if not -num_blocks <= k < num_blocks:
            raise IndexError
        return k
    except (ValueError, IndexError, ZeroDivisionError):
        raise ValueError(f"Layer selector {sel!r} is out of range: this transformer has block:0..block:"
                         f"{num_blocks - 1} (block:-1 is the last; block:A/B the block at fraction A/B of the "
                         "depth).") from None


def _unknown_layer_message(sel, modules, enc, dec, blocks):
    valid = [INPUT_SELECTOR]
    if enc:
        valid += [f"enc:0..enc:{len(enc) - 1}", f"dec:0..dec:{len(dec) - 1}", "bottleneck"]
    if blocks:
        valid += [f"block:0..block:{len(blocks) - 1}"]
    close = difflib.get_close_matches(sel, list(modules), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    shallow = [n for n in modules if n and n.count(".") <= 1]
    return (f"Unknown teacher layer {sel!r}.{hint} Valid selectors: {', '.join(valid)}; or any module name "
            f"of the teacher (model.named_modules()), e.g. {', '.join(shallow[:40])}.")


def _checkpoint_state(model):
    """{module: (gradient_checkpointing flag, checkpoint function)} of a diffusers model's blocks."""
    return {m: (m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", None)) for m in model.modules()
            if hasattr(m, "gradient_checkpointing")}


def _restore_checkpoint_state(state):
    for m, (flag, fn) in state.items():
        m.gradient_checkpointing = flag
        if fn is not None:
            m._gradient_checkpointing_func = fn


@contextmanager
def checkpointed_blocks(model, recompute_context=nullcontext):
    """Within: a diffusers `model` recomputes its blocks in backward instead of keeping their activations
    (its gradient checkpointing), the recomputation running inside recompute_context() (a LoRA student's
    teacher: adapters off again, so backward differentiates the teacher). Restored on exit."""
    state = _checkpoint_state(model)

    def checkpoint(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 context_fn=lambda: (nullcontext(), recompute_context()))

    for m in state:
        m.gradient_checkpointing, m._gradient_checkpointing_func = True, checkpoint
    try:
        yield model
    finally:
        _restore_checkpoint_state(state)


class FeatureExtractor:
    """Hooks named modules of a frozen teacher and returns their pooled, flattened outputs.

        with FeatureExtractor(teacher, ["enc:6", "bottleneck", "dec:7"], pool_size=4) as fx:
            feats = fx(lambda x: teacher_forward(x), noisy_sample)   # {selector: [B, D]}

    The forward stops right after the last selected module has run (nothing after it is computed),
    so `fn`'s return value is never used. Hooks are removed on exit, also when the forward raises.
    A module returning a tuple contributes its first element (UNet down blocks), except in a patch
    transformer, whose joint blocks return (context tokens, image tokens) and their attention (image
    tokens, context tokens): the image tokens are folded back to a map of the sample's patch grid (a
    tuple without them is a ValueError). `input` is the pooled sample given to `fn`.
    """

    def __init__(self, model, layers, pool_size=4, stop_early=True):
        self.model = model
        self.selectors = list(layers)
        if not self.selectors:
            raise ValueError("FeatureExtractor needs at least one layer.")
        self.names = resolve_layers(model, self.selectors)
        self.pool_size, self.stop_early = pool_size, stop_early
        self._blocks = transformer_blocks(model)
        self.patch_size = getattr(getattr(model, "config", None), "patch_size", None) if self._blocks else None
        self._handles, self._features, self._grid = [], {}, None

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for sel, name in zip(self.selectors, self.names):
            if name != INPUT_SELECTOR:
                self._handles.append(modules[name].register_forward_hook(self._hook(sel, name)))
        # A hook must fire once, outside any block that gradient checkpointing recomputes in backward:
        # the hooked modules and their ancestors run plainly, the other blocks as before.
        hooked = {n for n in self.names if n != INPUT_SELECTOR}
        plain = {modules[".".join(n.split(".")[:i])] for n in hooked for i in range(n.count(".") + 2)}
        self._saved_ckpt = _checkpoint_state(self.model)
        for m, (_, fn) in self._saved_ckpt.items():
            if fn is not None:
                m._gradient_checkpointing_func = lambda mod, *a, fn=fn: mod(*a) if mod in plain else fn(mod, *a)
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _restore_checkpoint_state(self._saved_ckpt)
        self._features = {}
        return False

    def _as_map(self, output, selector, name):
        if isinstance(output, (tuple, list)):
            if self.patch_size:
                return self._image_tokens(output, selector, name)
            output = output[0]
        return output

    def _image_tokens(self, output, selector, name):
        """The image tokens of a patch transformer module's tuple, folded to a map: a joint block returns
        (context, image), its attention (image, context). The one whose token count is the sample's patch
        grid, in that order of preference; none: a ValueError."""
        h, w = self._grid
        first = (1, 0) if name in self._blocks else (0, 1)
        for i in (*first, *range(2, len(output))):
            t = output[i] if i < len(output) else None
            if torch.is_tensor(t) and t.ndim == 3 and t.shape[1] == h * w:
                return tokens_to_map(t, h, w)
        shapes = [tuple(t.shape) if torch.is_tensor(t) else t for t in output]
        raise ValueError(f"Teacher layer {selector!r} ({name}) returns {shapes}: none of them is the {h * w} image "
                         f"tokens of the sample's {h}x{w} patch grid. Choose a layer that outputs image tokens: "
                         f"block:0..block:{len(self._blocks) - 1}, a block's attn, or a module name whose output is "
                         "[batch, tokens, channels] image tokens.")

    def _hook(self, selector, name):
        def hook(module, args, output):
            self._features[selector] = pool_feature(self._as_map(output, selector, name), self.pool_size)
            if self.stop_early and len(self._features) == len(self.selectors):
                raise _StopForward

        return hook

    def __call__(self, fn, sample):
        if not self._handles and any(n != INPUT_SELECTOR for n in self.names):
            raise RuntimeError("Use FeatureExtractor as a context manager: `with FeatureExtractor(...) as fx:`.")
        self._features = {}
        if self.patch_size:
            self._grid = (sample.shape[-2] // self.patch_size, sample.shape[-1] // self.patch_size)
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
# 2. Feature noise: one σ per group (Eq. 9), in "variance exploding" units of the teacher's data;
#    how variance-preserving and rectified-flow teachers take it; the teacher forwards of the feature
#    pass (forward(sample, sigma); conditioning given per group is repeated over its samples).
# ----------------------------------------------------------------------------------------------


def sample_feature_sigmas(num_groups, mean=-1.2, std=1.2, sigma_min=0.02, sigma_max=0.1, generator=None, device="cpu"):
    """One feature-noise level per group [G]: log σ ~ N(mean, std²) truncated to [σ_min, σ_max]
    (out-of-range draws are redrawn up to 8 times, then clamped). σ_min == σ_max fixes σ (0: clean)."""
    if sigma_min > sigma_max:
        raise ValueError(f"feature noise min {sigma_min} is above max {sigma_max}.")
    if sigma_min == sigma_max:
        return torch.full((num_groups,), float(sigma_min), device=device)

    def draw():
        z = torch.randn(num_groups, generator=generator, device=generator.device if generator else "cpu")
        return (mean + std * z).exp()

    sigma = draw()
    for _ in range(8):
        sigma = torch.where((sigma < sigma_min) | (sigma > sigma_max), draw(), sigma)
    return sigma.clamp(sigma_min, sigma_max).to(device)


def add_feature_noise(x, sigma, noise=None):
    """x + σ ξ with one σ per leading index: x [G, ...], sigma [G]; ξ fresh per sample."""
    if noise is None:
        noise = torch.randn_like(x)
    return x + sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) * noise


def _per_sample(sigma, x):
    return sigma.to(torch.float32).view(-1, *([1] * (x.ndim - 1)))


def vp_sigmas(alphas_cumprod):
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) of a variance-preserving schedule."""
    a = alphas_cumprod.double()
    return ((1 - a) / a).sqrt()


def vp_timestep_for_sigma(sigma, alphas_cumprod):
    """Fractional timestep t with σ_t = σ, interpolating log σ_t linearly over t; σ above the schedule's
    largest maps to its last timestep. σ = 0 (clean features) maps to t = 0. A σ between 0 and the schedule's
    smallest σ_0 (SDXL's: 0.0292) has no timestep: ValueError naming both."""
    sig0 = vp_sigmas(alphas_cumprod[:1])[0].item()
    low = sigma[(sigma > 0) & (sigma.double() < sig0 * (1 - 1e-6))]
    if low.numel():
        floor = math.ceil(sig0 * 1e4) / 1e4
        raise ValueError(f"Feature noise σ = {low.min().item():.4g} is below the teacher's smallest noise level "
                         f"σ(t=0) = {sig0:.4g}, where no timestep of its schedule puts it: raise --feature_noise_min "
                         f"to at least {floor:g}, or give --feature_noise_min 0 --feature_noise_max 0 (clean "
                         "features, at t = 0).")
    log_sig = vp_sigmas(alphas_cumprod).log()
    q = sigma.double().clamp_min(1e-20).log().clamp(log_sig[0], log_sig[-1])
    idx = torch.searchsorted(log_sig, q).clamp(1, len(log_sig) - 1)
    lo, hi = log_sig[idx - 1], log_sig[idx]
    return (idx - 1 + (q - lo) / (hi - lo)).to(torch.float32)


def vp_scale_input(x_noisy, sigma):
    """x + σξ as a variance-preserving model input: (x + σξ)/sqrt(1 + σ²)."""
    return (x_noisy.float() / (1 + _per_sample(sigma, x_noisy) ** 2).sqrt()).to(x_noisy.dtype)


def flow_time_for_sigma(sigma):
    """Flow time s = σ/(1 + σ) of x + σξ: x_s = (1 − s)x + sξ is (x + σξ)/(1 + σ)."""
    return sigma / (1 + sigma)


def flow_scale_input(x_noisy, sigma):
    """x + σξ as a rectified-flow model input: (x + σξ)/(1 + σ), the point at s = σ/(1 + σ)."""
    return (x_noisy.float() / (1 + _per_sample(sigma, x_noisy))).to(x_noisy.dtype)

PRECONDS = ("cm", "edm")


def is_edm_network(model):
    """True for an NVlabs EDM network (EDMPrecond/VPPrecond/...: called as net(x, σ, one-hot))."""
    return hasattr(model, "label_dim") and hasattr(model, "sigma_data") and not hasattr(model, "config")


def _per_group(cond, num_samples):
    """Per-group conditioning [G, ...] repeated to the samples [G·K, ...] (per-sample passes through)."""
    reps = num_samples // cond.shape[0]
    return cond.repeat_interleave(reps, dim=0) if reps > 1 else cond


def edm_teacher_forward(teacher, class_labels, precond="cm", sigma_data=0.5, sigma_floor=0.002):
    """The class-conditional EDM teacher on x + σξ, outside autocast (σ floored: σ = 0 has no c_noise).

    diffusers UNet2DModel: F(c_in·x, c_noise(σ), labels) in the teacher's dtype. NVlabs EDM network:
    net(x, σ, one-hot, force_fp32=True) in float32 (a `use_fp16` network would otherwise run in
    float16 on a GPU).
    """
    dtype = next(teacher.parameters()).dtype
    edm = is_edm_network(teacher)

    def forward(sample, sigma):
        labels = _per_group(class_labels.to(sample.device), sample.shape[0])
        sig = sigma.to(sample.device, torch.float32).reshape(-1).expand(sample.shape[0]).clamp_min(sigma_floor)
        with torch.autocast(sample.device.type, enabled=False):
            if edm:
                return teacher(sample.float(), sig, F.one_hot(labels.long(), teacher.label_dim).float(),
                               force_fp32=True)
            model_in = (edm_scalings(sig, sigma_data)[2].view(-1, 1, 1, 1) * sample.float()).to(dtype)
            return teacher(model_in, edm_c_noise(sig, precond), class_labels=labels, return_dict=False)[0]

    return forward


def vp_teacher_forward(unet, alphas_cumprod, encoder_hidden_states, added_cond_kwargs):
    """A variance-preserving (ε-prediction) UNet on vp_scale_input(x + σξ) at the fractional timestep
    whose σ_t equals σ, in the UNet's dtype. No classifier-free guidance."""

    def forward(sample, sigma):
        n, dt = sample.shape[0], unet.dtype
        t = vp_timestep_for_sigma(sigma.to(alphas_cumprod.device), alphas_cumprod).to(sample.device)
        cond = {k: _per_group(v, n).to(dt) for k, v in added_cond_kwargs.items()}
        return unet(vp_scale_input(sample, sigma).to(dt), t, encoder_hidden_states=_per_group(
            encoder_hidden_states, n).to(dt), added_cond_kwargs=cond, return_dict=False)[0]

    return forward


def flow_teacher_forward(transformer, encoder_hidden_states, pooled_projections):
    """A rectified-flow (velocity) transformer on flow_scale_input(x + σξ) at timestep 1000·σ/(1 + σ),
    in the transformer's dtype."""

    def forward(sample, sigma):
        n, dt = sample.shape[0], transformer.dtype
        t = 1000 * flow_time_for_sigma(sigma.to(sample.device, torch.float32))
        return transformer(hidden_states=flow_scale_input(sample, sigma).to(dt), timestep=t,
                           encoder_hidden_states=_per_group(encoder_hidden_states, n).to(dt),
                           pooled_projections=_per_group(pooled_projections, n).to(dt), return_dict=False)[0]

    return forward


# ----------------------------------------------------------------------------------------------
# 3. The drifting field: attraction to positives, repulsion from the generated samples themselves.
# ----------------------------------------------------------------------------------------------

DRIFT_KERNELS = ("drifting", "meanshift")


def pairwise_distance(a, b):
    """Euclidean distances [G, A, B] between the rows of a [G, A, D] and b [G, B, D], floored at 1e-4
    (sqrt(max(d², 1e-8))) so the gradient stays finite at coincident points."""
    # the direct (difference-based) kernel: the matmul form loses precision for close points
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").clamp_min(1e-4)


def drifting_weights(logits, num_generated):
    """The authors' kernel: a double softmax (over targets, over generated rows), then the coupling.

    logits: [G, N, N+P] = -d̂/R. Returns c [G, N, N+P]: the first N columns (negatives) carry
    -A⁻·ΣA⁺, the last P (positives) A⁺·ΣA⁻.
    """
    a = (logits.softmax(dim=-1) * logits.softmax(dim=-2)).clamp_min(1e-6).sqrt()
    a_neg, a_pos = a[..., :num_generated], a[..., num_generated:]
    c_neg = -a_neg * a_pos.sum(dim=-1, keepdim=True)
    c_pos = a_pos * a_neg.sum(dim=-1, keepdim=True)
    return torch.cat([c_neg, c_pos], dim=-1)


def meanshift_weights(logits, num_generated):
    """Paper Eq. (2)–(4): V = V⁺ − V⁻, separately normalised Laplace-kernel means, in the c-form of
    `drifting_weights` (each row's positive weights sum to 1, its negative weights to −1)."""
    w_neg = logits[..., :num_generated].softmax(dim=-1)
    w_pos = logits[..., num_generated:].softmax(dim=-1)
    return torch.cat([-w_neg, w_pos], dim=-1)


def drifting_field(generated, positives, radii, kernel="drifting"):
    """The drift F (the frozen target is t = x/s_in + F), in float32 without gradient.

    generated [G, N, D], positives [G, P, D] → (force [G, N, D], s_in, stats). The scale s is the
    mean distance over every group of the batch; each radius's force is normalised to unit RMS and
    the forces are summed. stats: `scale` and `force_norms` (the raw RMS force per radius, before
    normalisation: the progress signal, since the normalised loss stays flat by design).
    """
    if kernel not in DRIFT_KERNELS:
        raise ValueError(f"Unknown drift kernel {kernel!r}; choose one of {DRIFT_KERNELS}.")
    with torch.no_grad(), torch.autocast(generated.device.type, enabled=False):
        x = generated.detach().float()
        y = positives.detach().float()
        num_gen, dim = x.shape[1], x.shape[2]
        dist = torch.cat([pairwise_distance(x, x), pairwise_distance(x, y)], dim=-1)  # targets [x; y]
        scale = dist.mean()
        s_in = (scale / math.sqrt(dim)).clamp_min(1e-3)
        self_mask = torch.eye(num_gen, dist.shape[-1], device=x.device, dtype=x.dtype)
        dist_s = dist / scale.clamp_min(1e-3) + 1e6 * self_mask
        weights_fn = drifting_weights if kernel == "drifting" else meanshift_weights
        combined = torch.zeros_like(dist)
        force_norms = []
        for radius in radii:
            w = _force_matrix(weights_fn(-dist_s / radius, num_gen)) / s_in
            norm = _rms(_apply_weights(w, x, y)).clamp_min(1e-4)
            force_norms.append(norm)
            combined = combined + w / norm
        force = _apply_weights(combined, x, y)  # Σ_R F_R / ‖F_R‖: linear in the weights
    return force, s_in, {"scale": scale, "force_norms": torch.stack(force_norms)}


def _rms(t):
    """sqrt(mean(t²)), per-row norms first (one float32 norm over many millions of elements loses ~1e-4)."""
    return (torch.linalg.vector_norm(t.flatten(1), dim=1).square().sum() / t.numel()).sqrt()


def _force_matrix(c):
    """c [G, N, N+P] → w with F_i = Σ_j w_ij Y_j: the −(Σ_j c_ij) x_i term moves onto column i."""
    eye = torch.eye(c.shape[1], c.shape[-1], device=c.device, dtype=c.dtype)
    return c - c.sum(dim=-1, keepdim=True) * eye


def _apply_weights(w, x, y):
    """w [G, N, N+P] applied to the rows of [x; y] without concatenating them."""
    num_gen = x.shape[1]
    return torch.bmm(w[..., num_gen:], y).baddbmm_(w[..., :num_gen], x)


# ----------------------------------------------------------------------------------------------
# 4. The frozen-target regression (Eq. 11).
# ----------------------------------------------------------------------------------------------


def frozen_target_regression(generated, force, s_in):
    """Per-group loss [G]: mean over (N, D) of (x/s_in − sg(x/s_in + F))². Its value is mean(F²) and its
    gradient w.r.t. x is −2F/(s_in·N·D): the drift pulls each generated feature along F."""
    with torch.autocast(generated.device.type, enabled=False):
        x = generated.float() / s_in
        target = (x + force).detach()
        return (x - target).square().mean(dim=(1, 2))


def drifting_loss(generated, positives, radii, kernel="drifting", return_stats=False):
    """Per-group drifting loss [G] (Eq. 7/11): generated [G, N, D] carries the gradient, positives
    [G, P, D] are constants. With return_stats=True also returns `drifting_field`'s diagnostics."""
    force, s_in, stats = drifting_field(generated, positives, radii, kernel)
    loss = frozen_target_regression(generated, force, s_in)
    return (loss, stats) if return_stats else loss


# ----------------------------------------------------------------------------------------------
# 5. The anchor-margin loss (Eq. 12-14).
# ----------------------------------------------------------------------------------------------


def anchor_margin_loss(generated, anchors, alpha=0.5, bandwidth=None, temperature=1.0, return_stats=False):
    """Per-group anchor-margin coverage loss [G] on raw features: generated [G, N, D], anchors [G, M, D].

    support s_m = mean_j exp(−‖a_m − x_j‖/h) (Eq. 12), self-support s̄_m = mean_{k≠m} exp(−‖a_m − a_k‖/2h)
    (Eq. 13), loss = mean_m relu(α s̄_m − s_m) (Eq. 14). The bandwidth h is ONE value for the whole
    batch: the median of every anchor–generated distance of every group (torch.median's convention:
    the lower of the two middle values), detached, times `temperature`; or a fixed `bandwidth`.
    return_stats: also the fraction of anchors already meeting the margin (`covered`) and h.
    """
    with torch.autocast(generated.device.type, enabled=False):
        x = generated.float()
        a = anchors.detach().float()
        dist = pairwise_distance(a, x)  # [G, M, N], gradient through x
        h = dist.detach().median() * temperature if bandwidth is None else torch.tensor(float(bandwidth))
        h = h.to(x.device).clamp_min(1e-8)
        support = torch.exp(-dist / h).mean(dim=2)  # [G, M]
        deficit = alpha * _anchor_self_support(a, h) - support
        loss = deficit.clamp_min(0).mean(dim=1)
    if not return_stats:
        return loss
    return loss, {"covered": (deficit <= 0).float().mean(), "bandwidth": h}


def _anchor_self_support(anchors, h):
    """s̄_m of Eq. 13: [G, M]; zero when there is a single anchor."""
    num_anchors = anchors.shape[1]
    if num_anchors < 2:
        return anchors.new_zeros(anchors.shape[:2])
    k = torch.exp(-pairwise_distance(anchors, anchors) / (2 * h))
    k = k * (1 - torch.eye(num_anchors, device=anchors.device, dtype=k.dtype))
    return k.sum(dim=2) / (num_anchors - 1)


# ----------------------------------------------------------------------------------------------
# 6. The total of one step (Algorithm 1): noised teacher features of the generated samples (with
#    gradient), of positives and anchors (without), the drifting and anchor losses summed over layers.
# ----------------------------------------------------------------------------------------------


class TFDLoss:
    """The TFD objective, built once from its settings, called once per step:

        loss_fn = TFDLoss(teacher, feature_layers=["enc:6", "bottleneck"], drift_radii=[0.02, 0.05, 0.1, 0.2])
        loss, logs = loss_fn(teacher_forward, generated, positives, anchors, generator=gen)

    generated [G, N, ...] carries the student's graph; positives [G, P, ...] and anchors [G, M, ...]
    (None: the positives are the anchors) are constants; teacher_forward(sample, sigma) runs the
    teacher (section 2). Each group draws one σ (log-normal, truncated) shared by its samples; ξ is
    fresh per sample. Loss = Σ_layers mean_groups(drift) + anchor_weight·Σ_layers mean_groups(anchor).
    logs: scalar tensors (no host sync), `loss/total` first.

    The keywords of the objective are named as the scripts' flags (tfd_training.loss_kwargs passes them
    on by name). teacher_context: a context-manager factory entered around every teacher pass (a LoRA
    student's "adapters off"). checkpoint_teacher: in the generated samples' teacher pass, recompute the
    teacher's blocks in backward instead of keeping their activations (a diffusers teacher; the context
    is entered again around each recomputation).
    """

    def __init__(self, teacher, feature_layers, feature_pool_size=4, drift_radii=(0.02, 0.05, 0.1, 0.2),
                 drift_kernel="drifting", feature_noise_mean=-1.2, feature_noise_std=1.2, feature_noise_min=0.02,
                 feature_noise_max=0.1, anchor_weight=1.0, anchor_alpha=0.5, anchor_temperature=1.0,
                 anchor_bandwidth=None, teacher_context=None, checkpoint_teacher=False):
        if drift_kernel not in DRIFT_KERNELS:
            raise ValueError(f"Unknown drift kernel {drift_kernel!r}; choose one of {DRIFT_KERNELS}.")
        self.extractor = FeatureExtractor(teacher, feature_layers, feature_pool_size)
        self.radii, self.kernel = list(drift_radii), drift_kernel
        self.sigma_law = (feature_noise_mean, feature_noise_std, feature_noise_min, feature_noise_max)
        self.anchor_weight, self.anchor_alpha = anchor_weight, anchor_alpha
        self.anchor_temperature, self.anchor_bandwidth = anchor_temperature, anchor_bandwidth
        self.teacher_context = teacher_context or nullcontext
        if checkpoint_teacher and not hasattr(teacher, "enable_gradient_checkpointing"):
            raise ValueError(f"checkpoint_teacher: {type(teacher).__name__} has no block checkpointing (diffusers "
                             "models do).")
        self.checkpoint_teacher = checkpoint_teacher

    @property
    def layers(self):
        return self.extractor.names

    def sample_sigmas(self, num_groups, generator=None, device="cpu"):
        return sample_feature_sigmas(num_groups, *self.sigma_law, generator=generator, device=device)

    def features(self, forward, x, sigma, checkpoint=False):
        """Teacher features {layer: [G, K, D]} of grouped samples x [G, K, ...] at x + σ_g ξ; checkpoint: the
        teacher's blocks are recomputed in backward (those holding a hooked layer run plainly)."""
        g, k = x.shape[:2]
        flat = x.reshape(g * k, *x.shape[2:])
        sig = sigma.to(flat.device).repeat_interleave(k)
        model = self.extractor.model
        with self.teacher_context(), (checkpointed_blocks(model, self.teacher_context) if checkpoint
                                      else nullcontext()), self.extractor:
            feats = self.extractor(lambda s: forward(s, sig), add_feature_noise(flat, sig))
        return {name: f.reshape(g, k, -1) for name, f in feats.items()}

    def __call__(self, teacher_forward, generated, positives, anchors=None, generator=None, sigma=None):
        num_pos = positives.shape[1]
        sigma = self.sample_sigmas(generated.shape[0], generator, generated.device) if sigma is None else sigma
        gen_feats = self.features(teacher_forward, generated, sigma, checkpoint=self.checkpoint_teacher)
        with torch.no_grad():
            refs = positives if anchors is None else torch.cat([positives, anchors.to(positives.dtype)], dim=1)
            ref_feats = self.features(teacher_forward, refs, sigma)
        return self.loss(gen_feats, {k: v[:, :num_pos] for k, v in ref_feats.items()},
                         {k: v[:, num_pos:] for k, v in ref_feats.items()} if anchors is not None else None, sigma)

    def loss(self, gen_feats, pos_feats, anchor_feats, sigma):
        """Σ_layers of the per-group losses, averaged over groups, and the logs. anchor_feats None: the
        positives are the anchors."""
        anchor_feats = pos_feats if anchor_feats is None else anchor_feats
        drift_total, anchor_total, covered = 0.0, 0.0, []
        logs = {}
        for layer, gen in gen_feats.items():
            drift, stats = drifting_loss(gen, pos_feats[layer], self.radii, self.kernel, return_stats=True)
            drift_total = drift_total + drift.mean()
            logs[f"drift/{layer}"] = drift.mean().detach()
            logs[f"scale/{layer}"] = stats["scale"]
            for r, norm in zip(self.radii, stats["force_norms"]):
                logs[f"force/{layer}/r{r:g}"] = norm
            if self.anchor_weight > 0:
                anchor, astats = anchor_margin_loss(gen, anchor_feats[layer], self.anchor_alpha, self.anchor_bandwidth,
                                                    self.anchor_temperature, return_stats=True)
                anchor_total = anchor_total + anchor.mean()
                logs[f"anchor/{layer}"] = anchor.mean().detach()
                covered.append(astats["covered"])
        total = drift_total + self.anchor_weight * anchor_total
        logs = {"loss/total": total.detach(), "loss/drift": torch.as_tensor(drift_total).detach(),
                "loss/anchor": torch.as_tensor(anchor_total).detach(), **logs,
                "sigma/mean": sigma.float().mean(), "sigma/min": sigma.float().min(), "sigma/max": sigma.float().max()}
        if covered:
            logs["anchor/covered"] = torch.stack(covered).mean()
        return total, logs


# ----------------------------------------------------------------------------------------------
# 7. One-step students: each is exactly the function its saved pipeline runs in one step.
# ----------------------------------------------------------------------------------------------


def edm_scalings(sigma, sigma_data=0.5, sigma_min=None):
    """(c_skip, c_out, c_in) of EDM. With sigma_min: the consistency-model boundary variant
    c_skip = σd²/((σ−σmin)² + σd²), c_out = (σ−σmin)σd/sqrt(σ² + σd²), so that D(x, σmin) = x."""
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
    """D(x; σ) = c_skip x + c_out F(c_in x, c_noise(σ), class) for a diffusers UNet2DModel, float32
    around the network call; sigma a scalar or one value per sample."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sig = sigma.reshape(-1) if sigma.ndim else sigma.expand(x.shape[0])
    c_skip, c_out, _ = (c.view(-1, 1, 1, 1) for c in edm_scalings(sig, sigma_data, sigma_min))
    # x / sqrt(σ² + σd²) rather than c_in·x: bit-identical to the pipeline's scale_model_input
    model_in = (x.float() / (sig**2 + sigma_data**2).sqrt().view(-1, 1, 1, 1)).to(x.dtype)
    out = unet(model_in, edm_c_noise(sig, precond), class_labels=class_labels, return_dict=False)[0]
    return c_skip * x.float() + c_out * out.float()


def edm_one_step(unet, noise, class_labels, sigma_max=80.0, sigma_min=0.002, precond="cm", sigma_data=0.5):
    """The class-conditional student: x = D_boundary(σmax·z; σmax), exactly diffusers'
    ConsistencyModelPipeline with num_inference_steps=1 (its scheduler saved with clip_denoised=False)."""
    return edm_denoise(unet, sigma_max * noise, sigma_max, class_labels, precond, sigma_data, sigma_min)


@contextmanager
def _float32_output(module):
    handle = module.register_forward_hook(lambda m, args, out: out.float())
    try:
        yield
    finally:
        handle.remove()


def edm_net_one_step(net, noise, class_labels, sigma_max=80.0, label_dim=None):
    """The student as an NVlabs EDM network: D(σmax·z; σmax) = net(σmax·z, σmax, one-hot), one direct call
    (EDM's `edm_sampler` cannot take one step: it divides by num_steps − 1).

    Called with force_fp32=True, so a `use_fp16` network keeps float32 master weights and computes
    under the caller's autocast (or in float32) instead of in float16 without loss scaling; its inner
    model's output is cast to float32, which EDM's preconditioning asserts. label_dim: for a wrapped
    (DDP) net.
    """
    core = getattr(net, "module", net)
    onehot = F.one_hot(class_labels.long(), core.label_dim if label_dim is None else label_dim).float()
    sigma = torch.full((noise.shape[0],), float(sigma_max), device=noise.device)
    with _float32_output(core.model) if hasattr(core, "model") else nullcontext():
        return net(noise.float() * sigma_max, sigma, onehot, force_fp32=True).float()


@contextmanager
def float32_layer(model, name):
    """Within: the submodule `name` of `model` (a denoiser's last layer: conv_out, proj_out) computes in
    float32 outside autocast, from its input cast to float32 and float32 copies of its weights (a LoRA
    student's half-precision base weights included; the gradient flows through the casts). Under bf16
    autocast its output would otherwise be rounded to bf16 (relative error 2⁻⁹), which a one-step x₀
    then multiplies (1/√ᾱ_T = 14.6 at SDXL's T = 999). A model without that submodule is left as it is."""
    try:
        layer = getattr(model, "module", model).get_submodule(name)  # DDP: the wrapped model's
    except AttributeError:
        layer = None
    layer = getattr(layer, "base_layer", layer)  # a LoRA-wrapped layer: its base
    if not isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
        yield model
        return

    def forward(x):
        with torch.autocast(x.device.type, enabled=False):
            weight, bias = layer.weight.float(), None if layer.bias is None else layer.bias.float()
            if isinstance(layer, torch.nn.Conv2d):
                return layer._conv_forward(x.float(), weight, bias)
            return F.linear(x.float(), weight, bias)

    saved = layer.__dict__.get("forward")
    layer.forward = forward
    try:
        yield model
    finally:
        if saved is None:
            del layer.forward
        else:
            layer.forward = saved


def _input_cast(model, x):
    """Under autocast: no cast. Outside it: a cast of floating inputs to the dtype of the model's first
    parameter (a LoRA student's base weights may be half precision while its adapters and the noise are
    float32)."""
    if torch.is_autocast_enabled(x.device.type):
        return lambda v: v
    dtype = next(model.parameters()).dtype
    return lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v


VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def vp_x0(z, model_output, alpha_cumprod, prediction_type="epsilon"):
    """x₀ from a variance-preserving model's output at z = √ᾱ x₀ + √(1 − ᾱ) ε, in float64, returned as
    float32: ε-prediction x₀ = (z − √(1 − ᾱ) ε̂)/√ᾱ, v-prediction x₀ = √ᾱ z − √(1 − ᾱ) v̂, sample x₀ = output
    (DDIMScheduler's step with final ᾱ = 1, for each of its prediction types)."""
    a = torch.as_tensor(alpha_cumprod, dtype=torch.float64, device=z.device)
    out = model_output.double()
    if prediction_type == "epsilon":
        return ((z.double() - (1 - a).sqrt() * out) / a.sqrt()).float()
    if prediction_type == "v_prediction":
        return (a.sqrt() * z.double() - (1 - a).sqrt() * out).float()
    if prediction_type == "sample":
        return out.float()
    raise ValueError(f"Unknown prediction type {prediction_type!r}; choose one of {VP_PREDICTION_TYPES}.")


def vp_x0_from_eps(z, eps, alpha_cumprod):
    """x₀ = (z − sqrt(1 − ᾱ) ε̂)/sqrt(ᾱ), computed in float64 and returned as float32."""
    return vp_x0(z, eps, alpha_cumprod, "epsilon")


def sdxl_one_step(unet, noise, timestep, alpha_cumprod, encoder_hidden_states, added_cond_kwargs,
                  prediction_type="epsilon"):
    """The variance-preserving student: the UNet's output at timestep t from pure noise z, then x₀
    (`vp_x0`, float64), its last layer in float32 (`float32_layer`). The saved pipeline's one-step
    scheduler (a DDIMScheduler whose one step is [t] and whose final ᾱ is 1) runs exactly this."""
    t = torch.full((noise.shape[0],), int(timestep), device=noise.device, dtype=torch.long)
    cast = _input_cast(unet, noise)
    with float32_layer(unet, "conv_out"):
        out = unet(cast(noise), t, encoder_hidden_states=cast(encoder_hidden_states),
                   added_cond_kwargs={k: cast(v) for k, v in added_cond_kwargs.items()}, return_dict=False)[0]
    return vp_x0(noise, out, alpha_cumprod, prediction_type)


def flow_one_step(transformer, noise, encoder_hidden_states, pooled_projections):
    """The rectified-flow student: x₀ = z − v(z, t=1000) from pure noise (flow time 1), in float32, its last
    layer in float32 (`float32_layer`); FlowMatchEulerDiscreteScheduler at one step (sigmas [1, 0]) runs
    exactly this."""
    t = torch.full((noise.shape[0],), 1000.0, device=noise.device)
    cast = _input_cast(transformer, noise)
    with float32_layer(transformer, "proj_out"):
        v = transformer(hidden_states=cast(noise), timestep=t, encoder_hidden_states=cast(encoder_hidden_states),
                        pooled_projections=cast(pooled_projections), return_dict=False)[0]
    return noise.float() - v.float()
