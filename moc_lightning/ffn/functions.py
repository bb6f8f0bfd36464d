"""Memory-honest autograd functions: MoC (equations 7a-7e, mask held constant) and BackRazor.

Both take x as (rows, d_model) and the three nn.Linear weights (out_features x in_features), and
save only compact tensors for backward. MoC has two bodies behind one signature: plain PyTorch
(`torch`, any device) and fused Triton kernels around the dense GEMMs (`triton`,
moc_lightning.kernels.moc_train); both save the same tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from moc_lightning.ffn.compact import compact_indices, densify, index_dtype, keep_largest_magnitude
from moc_lightning.ffn.topk import resolve_backend, row_mask_native, select_channel_mask, select_channels

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernels():
    """The Triton kernel module, imported on first use: CPU runs never import triton."""
    from moc_lightning.kernels import moc_train

    return moc_train


def resolve_moc_kernel(name: str, x: torch.Tensor) -> str:
    """`auto` -> `triton` for CUDA tensors when triton is importable, else `torch`; an explicit
    `triton` where it cannot run is refused with the reason."""
    if name == "auto":
        usable = x.device.type == "cuda" and x.dtype in TRITON_DTYPES and _kernels().TRITON_AVAILABLE
        return "triton" if usable else "torch"
    if name == "triton":
        _kernels().require(x.device)
        if x.dtype not in TRITON_DTYPES:
            raise ValueError(f"moc_kernel='triton' takes {', '.join(map(str, TRITON_DTYPES))} inputs, not {x.dtype}: "
                             "use moc_kernel='torch' (or 'auto')")
        return name
    if name == "torch":
        return name
    raise ValueError(f"moc_kernel = {name!r} is not one of auto, torch, triton")


def _silu_and_grad(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(g) and SiLU'(g) = sigma(g) * (1 + g * (1 - sigma(g))), in float32."""
    g = g.float()
    sig = torch.sigmoid(g)
    return g * sig, sig * (1.0 + g * (1.0 - sig))


class MoCFunction(torch.autograd.Function):
    """D = (SiLU(G) * M * U) W_down^T with M the Top-K mask of G, saving only the kept channels.

    Saved: x, the kept channels' indices (int16 below 32768 channels; the Triton kernels save
    a bitmask of them instead where the Top-K backend writes one), G and U there; with
    recompute=False also S and Z there (Table 1's MoC column). Backward rebuilds S and Z from
    those and never differentiates through the selection. `kernel` is a resolved moc_kernel
    (`torch` or `triton`, see resolve_moc_kernel).
    """

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, k: int, group: Optional[tuple[int, int]], placement: str,
                recompute: bool, backend: str, kernel: str):
        if kernel == "triton":
            pack, ctx.slot_order = _triton_forward(x, w_gate, w_up, k, group, placement, not recompute, backend)
            out = F.linear(pack.z_dense, w_down)
            saved = [x, w_gate, w_up, w_down, pack.idx, pack.g_sel, pack.u_sel]
            if not recompute:
                saved += [pack.s_sel, pack.z_sel]
        else:
            out, saved = _torch_forward(x, w_gate, w_up, w_down, k, group, placement, recompute, backend)
        ctx.save_for_backward(*saved)
        ctx.kernel = kernel
        return out

    @staticmethod
    def backward(ctx, grad_out):
        backward = _triton_backward if ctx.kernel == "triton" else _torch_backward
        grad_x, grad_w_gate, grad_w_up, grad_w_down = backward(ctx, grad_out)
        return grad_x, grad_w_gate, grad_w_up, grad_w_down, None, None, None, None, None, None


def _torch_forward(x, w_gate, w_up, w_down, k, group, placement, recompute, backend):
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
    return out, saved


def _torch_backward(ctx, grad_out):
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
    return grad_x, grad_w_gate, grad_w_up, grad_w_down


def _triton_forward(x, w_gate, w_up, k, group, placement, store_sz, backend):
    """(the kernels' ForwardPack, the order of its compact slots: an (a, b) group whose slot
    order they follow, "mask" (ascending channels within each row, the pack's idx a bitmask of
    them), or None for the order of the indices).

    G and U come from one GEMM against [W_gate; W_up] (measured faster than two, concatenation
    included). a:b groups with a power-of-two b are selected inside the kernel unless a Top-K
    backend is named explicitly; a row Top-K whose backend writes bitmasks (triton) goes
    through the mask kernels, and backward saves the mask (a third of int16 indices' bytes at
    K 512 of 2736); the rest goes through select_channels (indices of the saved type, int16
    below 32768 channels) and the gather kernel, which keeps the order of the indices.
    """
    moc_train = _kernels()
    d_ffn = w_gate.shape[0]
    gate_up = F.linear(x, torch.cat((w_gate, w_up)))
    g, u = gate_up[:, :d_ffn], gate_up[:, d_ffn:]
    idx_dtype = index_dtype(d_ffn)
    if group is not None and backend == "auto" and moc_train.group_fusable(group):
        return moc_train.group_forward(g, u, group, placement == "post_silu", idx_dtype, store_sz), group
    backend = resolve_backend(backend, g.device)  # once: `auto` tries the backends in turn
    if group is None and row_mask_native(backend, g.device):
        mask = select_channel_mask(g, k=k, placement=placement, backend=backend)
        return moc_train.mask_forward(g, u, mask, k, store_sz), "mask"
    idx = select_channels(g, k=k, group=group, placement=placement, backend=backend, index_dtype=idx_dtype)
    return moc_train.scatter_forward(g, u, idx, idx_dtype, store_sz), None


def _triton_backward(ctx, grad_out):
    """One kernel writes [Z' | grad_G' | grad_U']; then one GEMM each for grad W_down,
    [grad W_gate; grad W_up] and grad x (against [W_gate; W_up])."""
    moc_train = _kernels()
    x, w_gate, w_up, w_down, idx, g_sel, u_sel, *stored = ctx.saved_tensors
    d_ffn = w_gate.shape[0]
    grad_out = grad_out.contiguous()
    grad_z = grad_out @ w_down
    s_sel, z_sel = stored if stored else (None, None)
    if ctx.slot_order == "mask":
        buf = moc_train.mask_backward(grad_z, idx, g_sel, u_sel, s_sel, z_sel)
    elif ctx.slot_order is not None:
        buf = moc_train.group_backward(grad_z, idx, g_sel, u_sel, ctx.slot_order, s_sel, z_sel)
    else:
        buf = moc_train.scatter_backward(grad_z, idx, g_sel, u_sel, s_sel, z_sel)
    del grad_z
    grad_w_down = grad_out.t() @ buf[:, :d_ffn]
    grad_gate_up = buf[:, d_ffn:]
    grad_w_gate_up = grad_gate_up.t() @ x
    grad_x = grad_gate_up @ torch.cat((w_gate, w_up)) if ctx.needs_input_grad[0] else None
    return grad_x, grad_w_gate_up[:d_ffn], grad_w_gate_up[d_ffn:], grad_w_down


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
