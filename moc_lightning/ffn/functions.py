"""Memory-honest autograd functions: MoC (equations 7a-7e, mask held constant) and BackRazor.

Both take x as (rows, d_model) and the three nn.Linear weights (out_features x in_features), and
save only compact tensors for backward. GPU kernels replace the bodies later behind the same
signatures.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from moc_lightning.ffn.compact import compact_indices, densify, keep_largest_magnitude
from moc_lightning.ffn.topk import select_channels


def _silu_and_grad(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(g) and SiLU'(g) = sigma(g) * (1 + g * (1 - sigma(g))), in float32."""
    g = g.float()
    sig = torch.sigmoid(g)
    return g * sig, sig * (1.0 + g * (1.0 - sig))


class MoCFunction(torch.autograd.Function):
    """D = (SiLU(G) * M * U) W_down^T with M the Top-K mask of G, saving only the kept channels.

    Saved: x, the kept channels' indices (int16 below 32768 channels), G and U there; with
    recompute=False also S and Z there (Table 1's MoC column). Backward rebuilds S and Z from
    those and never differentiates through the selection.
    """

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, k: int, group: Optional[tuple[int, int]], placement: str,
                recompute: bool, backend: str):
        d_ffn = w_gate.shape[0]
        g = F.linear(x, w_gate)
        u = F.linear(x, w_up)
        idx = select_channels(g, k=k, group=group, placement=placement, backend=backend)
        g_sel, u_sel = g.gather(1, idx), u.gather(1, idx)
        del g, u
        s_sel, _ = _silu_and_grad(g_sel)
        z_sel = (s_sel * u_sel.float()).to(x.dtype)
        out = F.linear(densify(idx, z_sel, d_ffn), w_down)
        saved = [x, w_gate, w_up, w_down, compact_indices(idx, d_ffn), g_sel, u_sel]
        if not recompute:
            saved += [s_sel.to(x.dtype), z_sel]
        ctx.save_for_backward(*saved)
        ctx.recompute = recompute
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w_gate, w_up, w_down, idx, g_sel, u_sel, *stored = ctx.saved_tensors
        d_ffn, dtype = w_gate.shape[0], grad_out.dtype
        s_sel, dsilu = _silu_and_grad(g_sel)
        if stored:  # recompute=False: S and Z come from memory instead
            s_sel, z_sel = stored[0].float(), stored[1]
        else:
            z_sel = (s_sel * u_sel.float()).to(dtype)
        # (7a) grad of W_down from the sparse Z', and grad of Z' at the kept channels only.
        grad_w_down = grad_out.t() @ densify(idx, z_sel.to(dtype), d_ffn)
        grad_z_sel = (grad_out @ w_down).gather(1, idx.long()).float()
        # (7b), (7c): U' and S' gradients live on the kept channels.
        grad_u = densify(idx, (s_sel * grad_z_sel).to(dtype), d_ffn)
        grad_g = densify(idx, (u_sel.float() * grad_z_sel * dsilu).to(dtype), d_ffn)
        # (7d), (7e)
        grad_w_gate = grad_g.t() @ x
        grad_w_up = grad_u.t() @ x
        grad_x = grad_g @ w_gate + grad_u @ w_up if ctx.needs_input_grad[0] else None
        return grad_x, grad_w_gate, grad_w_up, grad_w_down, None, None, None, None, None


class BackRazorFunction(torch.autograd.Function):
    """Dense SwiGLU forward; the activations saved for backward (X, G, U, Z) are kept only at the
    `keep` fraction of each row largest in magnitude, as compact indices and values. The gradient
    is computed from those sparsified activations, so it is approximate (exact when keep = 1).
    """

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, keep: float):
        g = F.linear(x, w_gate)
        u = F.linear(x, w_up)
        z = (F.silu(g.float()) * u.float()).to(x.dtype)
        out = F.linear(z, w_down)
        saved = [w_gate, w_up, w_down]
        for t in (x, g, u, z):
            saved += keep_largest_magnitude(t, keep)
        ctx.save_for_backward(*saved)
        ctx.widths = (x.shape[1], g.shape[1])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        w_gate, w_up, w_down, x_i, x_v, g_i, g_v, u_i, u_v, z_i, z_v = ctx.saved_tensors
        d_model, d_ffn = ctx.widths
        x = densify(x_i, x_v, d_model)
        u = densify(u_i, u_v, d_ffn).float()
        z = densify(z_i, z_v, d_ffn)
        grad_w_down = grad_out.t() @ z
        grad_z = (grad_out @ w_down).float()
        # SiLU's backward needs G: only the kept entries of G pass a gradient on.
        silu_g, dsilu_kept = _silu_and_grad(g_v)
        grad_u = grad_z * densify(g_i, silu_g, d_ffn)
        grad_g = densify(g_i, (grad_z * u).gather(1, g_i.long()) * dsilu_kept, d_ffn)
        grad_u, grad_g = grad_u.to(grad_out.dtype), grad_g.to(grad_out.dtype)
        grad_w_gate = grad_g.t() @ x
        grad_w_up = grad_u.t() @ x
        grad_x = grad_g @ w_gate + grad_u @ w_up if ctx.needs_input_grad[0] else None
        return grad_x, grad_w_gate, grad_w_up, grad_w_down, None
