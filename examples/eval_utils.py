"""Helpers the evaluation examples share (evaluate_imagenet64.py, evaluate_coco.py, digits/evaluate.py):
sharding over processes, resumable output folders, and EDM's Heun sampler for the multi-step teacher rows."""

import json
import os

import torch

from tfd_training import write_json


def check_run_settings(path, settings):
    """Record the settings a resumable output folder is made with (first run), or require a
    resumed run to match them: images made with other settings are never mixed."""
    if not os.path.isfile(path):
        write_json(path, settings)
        return
    with open(path) as f:
        old = json.load(f)
    changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if changed:
        raise ValueError(f"The images next to {path} were made with other settings {changed} (old, new): use a "
                         "new --output_dir, or delete that folder.")


def shard(num_items, rank, world):
    """This process's contiguous, disjoint index range of num_items."""
    per = -(-num_items // world)
    return range(rank * per, min((rank + 1) * per, num_items))


def total_over_processes(count, state):
    """Sum of an int over all processes of an accelerate state (also a barrier)."""
    from accelerate.utils import gather_object

    return sum(gather_object([count])) if state.num_processes > 1 else count


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
