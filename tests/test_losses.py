# The two losses (Eq. 7/11 and 12-14) against float64 reference loops written from the formulas,
# plus behaviour on 2-D toy data (the drift carries a blob onto a mixture; anchors cover modes).
import math

import numpy as np
import pytest
import torch

from tfd_utils import anchor_margin_loss, drifting_loss

# ----------------------------------------------------------------------------------------------
# Float64 references: explicit loops over groups, radii and pairs; vectors only along D.
# ----------------------------------------------------------------------------------------------


def _dist(u, v):
    return math.sqrt(max(float(np.sum((u - v) ** 2)), 1e-8))


def _softmax(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    total = sum(e)
    return [v / total for v in e]


def reference_drift(x, y, radii, kernel):
    """The drifting loss on numpy float64 x [G, N, D], y [G, P, D] → (loss [G], dloss_g/dx [G, N, D], stats)."""
    G, N, D = x.shape
    P = y.shape[1]
    Y = [np.concatenate([x[g], y[g]], axis=0) for g in range(G)]
    d = np.zeros((G, N, N + P))
    for g in range(G):
        for i in range(N):
            for j in range(N + P):
                d[g, i, j] = _dist(x[g, i], Y[g][j])
    s = sum(d[g, i, j] for g in range(G) for i in range(N) for j in range(N + P)) / (G * N * (N + P))
    s_in = max(s / math.sqrt(D), 1e-3)
    dn = d / max(s, 1e-3)
    for g in range(G):
        for i in range(N):
            dn[g, i, i] += 1e6
    total_force = np.zeros((G, N, D))
    norms = []
    for R in radii:
        f = np.zeros((G, N, D))
        for g in range(G):
            xs, Ys = x[g] / s_in, Y[g] / s_in
            L = [[-dn[g, i, j] / R for j in range(N + P)] for i in range(N)]
            if kernel == "drifting":
                row = [_softmax(L[i]) for i in range(N)]
                col = [_softmax([L[i][j] for i in range(N)]) for j in range(N + P)]
                A = [[math.sqrt(max(row[i][j] * col[j][i], 1e-6)) for j in range(N + P)] for i in range(N)]
                for i in range(N):
                    sum_neg = sum(A[i][k] for k in range(N))
                    sum_pos = sum(A[i][k] for k in range(N, N + P))
                    c = [-A[i][j] * sum_pos for j in range(N)] + [A[i][j] * sum_neg for j in range(N, N + P)]
                    f[g, i] = sum(c[j] * Ys[j] for j in range(N + P)) - sum(c) * xs[i]
            else:  # paper Eq. 2-4: V+ - V-, Laplace kernel exp(-d̂/R), negatives exclude the sample itself
                for i in range(N):
                    kp = [math.exp(-dn[g, i, N + p] / R) for p in range(P)]
                    v_pos = sum(kp[p] * (Ys[N + p] - xs[i]) for p in range(P)) / sum(kp)
                    others = [j for j in range(N) if j != i]
                    v_neg = np.zeros(D)
                    if others:
                        kn = [math.exp(-dn[g, i, j] / R) for j in others]
                        v_neg = sum(k * (Ys[j] - xs[i]) for k, j in zip(kn, others)) / sum(kn)
                    f[g, i] = v_pos - v_neg
        norm = math.sqrt(max(float(np.mean(f**2)), 1e-8))
        norms.append(norm)
        total_force += f / norm
    loss = np.zeros(G)
    grad = np.zeros((G, N, D))
    for g in range(G):
        t = x[g] / s_in + total_force[g]
        r = x[g] / s_in - t
        loss[g] = np.mean(r**2)
        grad[g] = 2 * r / s_in / (N * D)  # the target and s_in are constants
    return loss, grad, {"scale": s, "force_norms": np.array(norms)}


def reference_anchor(x, a, alpha, bandwidth, temperature):
    """Eq. 12-14 on numpy float64 x [G, N, D], a [G, M, D] → (loss [G], dloss_g/dx [G, N, D]). The
    bandwidth is one value for the batch: the lower middle of all G·M·N anchor-sample distances."""
    G, N, D = x.shape
    M = a.shape[1]
    loss, grad = np.zeros(G), np.zeros((G, N, D))
    dists = [[[_dist(a[g, m], x[g, j]) for j in range(N)] for m in range(M)] for g in range(G)]
    every = sorted(v for group in dists for row in group for v in row)
    h = every[(len(every) - 1) // 2] * temperature if bandwidth is None else bandwidth
    for g in range(G):
        dist = dists[g]
        for m in range(M):
            support = sum(math.exp(-dist[m][j] / h) for j in range(N)) / N
            self_support = 0.0
            if M > 1:
                self_support = sum(math.exp(-_dist(a[g, m], a[g, k]) / (2 * h)) for k in range(M) if k != m) / (M - 1)
            deficit = alpha * self_support - support
            if deficit > 0:
                loss[g] += deficit / M
                for j in range(N):  # d(-support/M)/dx_j with h fixed
                    unit = (x[g, j] - a[g, m]) / dist[m][j]
                    grad[g, j] += math.exp(-dist[m][j] / h) / h * unit / (N * M)
    return loss, grad


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _grad_per_group(loss_fn, gen):
    """Gradients of every group's loss w.r.t. its own rows, from one backward of Σ_g g·L_g: the
    loss of group g has no gradient path to other groups (s and the target are constants), so
    dividing by the group weight recovers dL_g/dx_g; a cross-group leak would break the match."""
    gen = gen.clone().requires_grad_(True)
    loss = loss_fn(gen)
    weights = torch.arange(1, loss.shape[0] + 1, dtype=torch.float32)
    (loss * weights).sum().backward()
    return loss.detach().double().numpy(), (gen.grad / weights[:, None, None]).double().numpy()


SHAPES = [  # G, N, P, D
    (1, 4, 4, 16),
    (3, 4, 4, 48),
    (2, 3, 5, 7),
    (1, 1, 3, 5),  # a single generated sample: no negatives besides itself
    (2, 4, 4, 2048),
]


@pytest.mark.parametrize("kernel", ["drifting", "meanshift"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "G{}N{}P{}D{}".format(*s))
def test_drifting_loss_matches_reference(kernel, shape):
    G, N, P, D = shape
    g = torch.Generator().manual_seed(G * 1000 + N * 100 + D)
    gen = torch.randn(G, N, D, generator=g)
    pos = torch.randn(G, P, D, generator=g) * 1.3 + 0.4
    radii = [0.02, 0.05, 0.1, 0.2] if D < 100 else [0.02, 0.05, 0.2]
    loss, grad = _grad_per_group(lambda x: drifting_loss(x, pos, radii, kernel), gen)
    ref_loss, ref_grad, ref_stats = reference_drift(gen.double().numpy(), pos.double().numpy(), radii, kernel)
    assert loss.shape == (G,)
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(grad, ref_grad) < 1e-5
    _, stats = drifting_loss(gen, pos, radii, kernel, return_stats=True)
    assert rel_err(stats["scale"], ref_stats["scale"]) < 1e-6
    assert rel_err(stats["force_norms"], ref_stats["force_norms"]) < 1e-5


def test_drifting_loss_matches_reference_wide_radii():
    # large radii make every pair count (no nearest-neighbour domination)
    g = torch.Generator().manual_seed(7)
    gen, pos = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    for kernel in ("drifting", "meanshift"):
        loss, grad = _grad_per_group(lambda x: drifting_loss(x, pos, [0.5, 2.0, 10.0], kernel), gen)
        ref_loss, ref_grad, _ = reference_drift(gen.double().numpy(), pos.double().numpy(), [0.5, 2.0, 10.0], kernel)
        assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


def test_drifting_loss_matches_reference_with_offset_features():
    # teacher features are not centred (e.g. after SiLU): a common offset must not cost precision
    g = torch.Generator().manual_seed(9)
    gen, pos = torch.randn(2, 4, 512, generator=g) + 5.0, torch.randn(2, 4, 512, generator=g) + 5.3
    loss, grad = _grad_per_group(lambda x: drifting_loss(x, pos, [0.02, 0.05, 0.2]), gen)
    ref_loss, ref_grad, _ = reference_drift(gen.double().numpy(), pos.double().numpy(), [0.02, 0.05, 0.2], "drifting")
    assert rel_err(loss, ref_loss) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


def test_drifting_loss_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="meanshift"):
        drifting_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 3), [0.1], kernel="gaussian")


ANCHOR_CASES = [  # G, N, M, D, alpha, bandwidth, temperature
    (1, 4, 4, 16, 0.5, None, 1.0),
    (3, 4, 4, 32, 0.9, None, 1.0),
    (2, 5, 3, 8, 0.7, None, 0.5),  # temperature
    (2, 4, 4, 8, 0.8, 3.0, 1.0),  # fixed bandwidth
    (2, 3, 6, 1024, 2.0, None, 2.0),
    (2, 4, 1, 8, 0.5, None, 1.0),  # one anchor: self-support 0, so the loss is 0
]


@pytest.mark.parametrize("case", ANCHOR_CASES, ids=lambda c: "G{}N{}M{}D{}-a{}-h{}-t{}".format(*c))
def test_anchor_margin_loss_matches_reference(case):
    G, N, M, D, alpha, bandwidth, temperature = case
    g = torch.Generator().manual_seed(N * 31 + M * 7 + D)
    # anchors in two clusters, generated samples near the first: some anchors uncovered, some not
    shift = torch.zeros(D)
    shift[: max(D // 4, 1)] = 6.0 / math.sqrt(max(D // 4, 1))
    anchors = torch.randn(G, M, D, generator=g) * 0.3 + (torch.arange(M) % 2)[None, :, None] * shift
    gen = torch.randn(G, N, D, generator=g) * 0.3
    loss, grad = _grad_per_group(
        lambda x: anchor_margin_loss(x, anchors, alpha=alpha, bandwidth=bandwidth, temperature=temperature), gen
    )
    ref_loss, ref_grad = reference_anchor(gen.double().numpy(), anchors.double().numpy(), alpha, bandwidth,
                                          temperature)
    if M == 1:
        assert np.all(ref_loss == 0) and np.all(loss == 0) and np.all(grad == 0)
        return
    assert ref_loss.min() > 0, "test case should have active deficits in every group"
    if alpha < 1:
        assert 0 < _covered(gen, anchors, alpha, bandwidth, temperature) < 1, "mix of covered and uncovered anchors"
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(grad, ref_grad) < 1e-5


def _covered(gen, anchors, alpha, bandwidth, temperature):
    _, stats = anchor_margin_loss(gen, anchors, alpha, bandwidth, temperature, return_stats=True)
    return stats["covered"].item()


def test_anchor_bandwidth_is_one_lower_median_over_the_batch():
    # 2 groups × 4×4 = 32 distances (even count): ONE bandwidth, the lower of the two middle values
    # (torch.median's convention, the authors' code), not one median per group nor their mean.
    gen = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(3))
    anchors = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(4))
    _, stats = anchor_margin_loss(gen, anchors, temperature=1.5, return_stats=True)
    every = np.sort(np.concatenate([torch.cdist(anchors[i], gen[i]).numpy().ravel() for i in range(2)]))
    assert every[15] < every[16]  # the convention matters for this draw
    np.testing.assert_allclose(stats["bandwidth"].item(), every[15] * 1.5, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Robustness: autocast, coincident rows, scale invariance.
# ----------------------------------------------------------------------------------------------


def test_losses_ignore_bf16_autocast():
    g = torch.Generator().manual_seed(11)
    gen, pos = torch.randn(3, 4, 64, generator=g), torch.randn(3, 4, 64, generator=g)
    for fn in (
        lambda x: drifting_loss(x, pos, [0.02, 0.05, 0.2]),
        lambda x: drifting_loss(x, pos, [0.02, 0.05, 0.2], kernel="meanshift"),
        lambda x: anchor_margin_loss(x, pos),
    ):
        plain_x = gen.clone().requires_grad_(True)
        plain = fn(plain_x)
        plain.sum().backward()
        x = gen.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x)
        assert out.dtype == torch.float32
        out.sum().backward()
        assert torch.equal(out.detach(), plain.detach())
        assert rel_err(x.grad.numpy(), plain_x.grad.numpy()) < 1e-6


def test_no_nan_when_generated_rows_coincide():
    g = torch.Generator().manual_seed(5)
    pos = torch.randn(2, 4, 8, generator=g)
    row = torch.randn(8, generator=g)
    gen = row.expand(2, 4, 8).clone()
    gen[1, 2] = pos[1, 0]  # a generated sample sitting exactly on a positive / anchor
    for fn in (
        lambda x: drifting_loss(x, pos, [0.02, 0.05, 0.2]),
        lambda x: drifting_loss(x, pos, [0.02, 0.05, 0.2], kernel="meanshift"),
        lambda x: anchor_margin_loss(x, pos),
    ):
        x = gen.clone().requires_grad_(True)
        loss = fn(x)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    # all samples identical (scale → tiny): still finite
    same = torch.zeros(1, 4, 8, requires_grad=True)
    drifting_loss(same, torch.zeros(1, 4, 8), [0.05]).sum().backward()
    assert torch.isfinite(same.grad).all()


@pytest.mark.parametrize("kernel", ["drifting", "meanshift"])
def test_drift_gradient_direction_is_scale_invariant(kernel):
    g = torch.Generator().manual_seed(2)
    gen, pos = torch.randn(3, 4, 32, generator=g), torch.randn(3, 4, 32, generator=g) + 0.5
    grads = []
    for c in (1.0, 1000.0, 0.05):
        x = (gen * c).requires_grad_(True)
        drifting_loss(x, pos * c, [0.02, 0.05, 0.2], kernel).sum().backward()
        grads.append(x.grad.flatten())
    for other in grads[1:]:
        assert torch.nn.functional.cosine_similarity(grads[0], other, dim=0) > 1 - 1e-5


# ----------------------------------------------------------------------------------------------
# Behaviour on 2-D toy data.
# ----------------------------------------------------------------------------------------------

MODES = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])


def _mixture(n, generator):
    idx = torch.randint(0, 2, (n,), generator=generator)
    return MODES[idx] + 0.3 * torch.randn(n, 2, generator=generator)


def energy_distance(a, b):
    return 2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()


def _coverage(x):
    """Fraction of the samples nearest to each mode: [left, right]."""
    left = (torch.cdist(x, MODES).argmin(dim=1) == 0).float().mean().item()
    return left, 1 - left


@pytest.mark.parametrize("kernel", ["drifting", "meanshift"])
def test_drift_carries_a_blob_onto_a_two_mode_mixture(kernel):
    g = torch.Generator().manual_seed(0)
    groups, n = 8, 16
    x = 0.5 * torch.randn(groups, n, 2, generator=g) + torch.tensor([0.0, 3.0])
    reference = _mixture(4000, g)
    start = energy_distance(x.reshape(-1, 2), reference)
    for _ in range(120):
        x.requires_grad_(True)
        loss = drifting_loss(x, _mixture(groups * n, g).reshape(groups, n, 2), [0.05, 0.2, 0.5], kernel)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        x = (x - 0.5 * grad).detach()  # one gradient step on the frozen-target regression
    end = energy_distance(x.reshape(-1, 2), reference)
    assert end < start / 20, (start.item(), end.item())
    left, right = _coverage(x.reshape(-1, 2))
    assert 0.3 < left < 0.7, (left, right)


def test_anchor_loss_zero_on_anchors_and_pulls_toward_uncovered_anchor():
    anchors = torch.tensor([[[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]]])
    on = anchors.clone().requires_grad_(True)
    loss = anchor_margin_loss(on, anchors)
    loss.sum().backward()
    assert loss.item() == 0 and on.grad.abs().max() == 0
    # all generated samples near anchor 0: anchors 1 and 2 are uncovered
    x = torch.tensor([[[0.1, 0.0], [0.0, 0.1], [2.0, 0.0]]], requires_grad=True)
    loss, stats = anchor_margin_loss(x, anchors, alpha=1.0, bandwidth=1.0, return_stats=True)
    assert loss.item() > 0 and stats["covered"].item() < 1
    loss.sum().backward()
    step = -x.grad[0, 2]  # the sample between anchors 0 and 1 moves toward the uncovered anchor 1
    assert step[0] > 0 and step[0] > 10 * step[1].abs()


def test_anchors_recover_a_missed_mode():
    """The blob starts on the left mode and the positives show only the left mode; the anchors
    come from both modes. The drift alone keeps every sample on the left; with the anchor term a
    share of the samples moves over until the right anchors meet their margin."""

    def right_share(anchor_weight):
        g = torch.Generator().manual_seed(1)
        groups, n = 8, 8
        x = MODES[0] + 0.3 * torch.randn(groups, n, 2, generator=g)
        anchors = MODES.repeat(4, 1).expand(groups, 8, 2) + 0.3 * torch.randn(groups, 8, 2, generator=g)
        for _ in range(200):
            x.requires_grad_(True)
            pos = MODES[0] + 0.3 * torch.randn(groups, 8, 2, generator=g)
            loss = drifting_loss(x, pos, [0.05, 0.2]).sum()
            loss = loss + anchor_weight * anchor_margin_loss(x, anchors, alpha=0.5).sum()
            (grad,) = torch.autograd.grad(loss, x)
            x = (x - 0.3 * grad).detach()
        return _coverage(x.reshape(-1, 2))[1]

    without, with_anchor = right_share(0.0), right_share(50.0)
    assert without < 0.05 and with_anchor >= 0.2, (without, with_anchor)
