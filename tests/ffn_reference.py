"""An independent float64 reference for every FFN kind, written for the tests only.

It shares no code with moc_lightning: masks come from sorting, gradients from autograd on the
dense masked formula (MoC's mask held constant), and BackRazor's sparsified backward is written
out from its definition.
"""

from __future__ import annotations

import math

import torch

f64 = torch.float64


def silu(t):
    return t * torch.sigmoid(t)


def silu_grad(t):
    s = torch.sigmoid(t)
    return s * (1 + t * (1 - s))


def scores_for(g, placement):
    return g if placement == "pre_silu" else silu(g).abs()


def reference_mask(g, k, group=None, placement="pre_silu"):
    """0/1 mask keeping the k best channels per row, or the a best of each group of b (the last,
    shorter group of r channels keeping min(a, r))."""
    scores = scores_for(g.to(f64), placement)
    rows, width = scores.shape
    mask = torch.zeros_like(scores)
    if group is None:
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        mask.scatter_(1, order[:, :k], 1.0)
        return mask
    a, b = (int(p) for p in group.split(":"))
    for start in range(0, width, b):
        stop = min(start + b, width)
        order = torch.argsort(scores[:, start:stop], dim=1, descending=True, stable=True)
        mask[:, start:stop].scatter_(1, order[:, : min(a, stop - start)], 1.0)
    return mask


def assert_valid_topk_mask(mask, g, k, group=None, placement="pre_silu"):
    """The mask keeps exactly the right number per row (or group), and nothing it drops
    outranks anything it keeps (ties may go either way)."""
    scores = scores_for(g.to(f64), placement)
    spans = [(0, scores.shape[1], k)]
    if group is not None:
        a, b = (int(p) for p in group.split(":"))
        spans = [(s, min(s + b, scores.shape[1]), min(a, min(s + b, scores.shape[1]) - s)) for s in range(0, scores.shape[1], b)]
    for start, stop, keep in spans:
        m, s = mask[:, start:stop].bool(), scores[:, start:stop]
        assert (m.sum(1) == keep).all(), f"span {start}:{stop} keeps {m.sum(1).tolist()} channels, expected {keep}"
        kept_min = torch.where(m, s, torch.full_like(s, math.inf)).min(1).values
        dropped_max = torch.where(~m, s, torch.full_like(s, -math.inf)).max(1).values
        assert (kept_min >= dropped_max).all(), "a dropped channel outranks a kept one"


def reference_forward(kind, x, wg, wu, wd, mask=None):
    g, u = x @ wg.T, x @ wu.T
    if kind == "swiglu" or kind == "backrazor":
        z = silu(g) * u
    elif kind == "moc":
        z = silu(g) * mask * u
    elif kind == "relu":
        z = torch.relu(g) * u
    elif kind == "drelu":
        z = torch.relu(g) * torch.relu(u)
    else:
        raise AssertionError(kind)
    return z @ wd.T


def reference_grads(kind, x, wg, wu, wd, grad_out, mask=None):
    """Output and gradients of (x, wg, wu, wd) by float64 autograd on the dense formula."""
    leaves = [t.detach().to(f64).requires_grad_(True) for t in (x, wg, wu, wd)]
    out = reference_forward(kind, *leaves, mask=None if mask is None else mask.to(f64))
    grads = torch.autograd.grad(out, leaves, grad_out.to(f64))
    return out.detach(), grads


def _top_magnitude(t, keep):
    n = max(1, min(t.shape[1], math.ceil(keep * t.shape[1])))
    order = torch.argsort(t.abs(), dim=1, descending=True, stable=True)
    mask = torch.zeros_like(t).scatter_(1, order[:, :n], 1.0)
    return t * mask, mask


def reference_backrazor_grads(x, wg, wu, wd, grad_out, keep):
    """BackRazor's definition: dense forward; backward from the saved X, G, U, Z each kept at the
    top `keep` fraction of its row by magnitude; SiLU's gradient only where G was kept."""
    x, wg, wu, wd, go = (t.detach().to(f64) for t in (x, wg, wu, wd, grad_out))
    g, u = x @ wg.T, x @ wu.T
    out = (silu(g) * u) @ wd.T
    xs, _ = _top_magnitude(x, keep)
    gs, gmask = _top_magnitude(g, keep)
    us, _ = _top_magnitude(u, keep)
    zs, _ = _top_magnitude(silu(g) * u, keep)
    grad_z = go @ wd
    grad_u = grad_z * silu(gs)
    grad_g = grad_z * us * silu_grad(gs) * gmask
    return out, (grad_g @ wg + grad_u @ wu, grad_g.T @ xs, grad_u.T @ xs, go.T @ zs)
