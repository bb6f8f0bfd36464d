"""The MoC FFN's inference path: the Triton decode kernel for steps of 1 to 8 tokens.

`MoCFFN.prepare_for_decode()` builds a `DecodeLayout` once (W_down^T made contiguous, so a kept
channel's down row is one contiguous read, and the kernel's scratch buffers); from then on
`MoCFFN.forward` sends small no-grad batches here (`decode_applies`) and everything else to the
training path. The layout follows the weights: if down_proj.weight is replaced or changed in
place (training resumed, a checkpoint loaded), W_down^T is rebuilt on the next call.

Under torch.compile the kernel is reached through the custom op `moc_lightning::moc_decode`, which
the compiler treats as one opaque call (its Triton launches, scratch and Python launcher are not
traced), so a whole decode step compiles without graph breaks. That path uses the default launch
configs (a `DecodeLayout.config` override applies to eager calls) and does not re-check the
weights for changes: a compiled step is built for fixed weights.
"""

from __future__ import annotations

from typing import Optional

import torch

from moc_lightning.kernels import moc_decode as kernel


class DecodeLayout:
    """What the decode kernel reads besides W_gate and W_up: W_down^T (d_ffn, d_model) and scratch.

    Costs one extra copy of W_down per layer (d_ffn * d_model elements) while prepared; the
    scratch is shared by every layer of the same shape on the device.
    """

    def __init__(self, ffn: torch.nn.Module, config: Optional[kernel.LaunchConfig] = None):
        weight = ffn.down_proj.weight
        self.config = config
        self.w_down_t = weight.detach().t().contiguous()
        self._source = self._identity(weight)
        d_model, d_ffn = weight.shape
        self.scratch = kernel.shared_scratch(d_model, d_ffn, weight.device)

    @staticmethod
    def _identity(weight: torch.Tensor) -> tuple:
        return weight.data_ptr(), weight._version, weight.dtype, weight.device

    def refresh(self, ffn: torch.nn.Module) -> None:
        """Rebuild W_down^T (and the scratch, on a new device) if down_proj.weight changed."""
        weight = ffn.down_proj.weight
        if self._identity(weight) == self._source:
            return
        if weight.device != self.scratch.device:
            d_model, d_ffn = weight.shape
            self.scratch = kernel.shared_scratch(d_model, d_ffn, weight.device)
        self.w_down_t = weight.detach().t().contiguous()
        self._source = self._identity(weight)


def decode_applies(ffn: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `x` goes to the decode kernel: prepared, no autograd, 1..8 rows, a device the kernel
    runs on, the weights' dtype, and no autocast to change it."""
    if getattr(ffn, "decode_layout", None) is None or torch.is_grad_enabled():
        return False
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if not 1 <= rows <= kernel.MAX_ROWS or not kernel.runs_on(x.device):
        return False
    weight = ffn.gate_proj.weight
    if x.dtype != weight.dtype or x.device != weight.device or torch.is_autocast_enabled(x.device.type):
        return False
    cfg = ffn.cfg
    return cfg.group is not None or cfg.d_ffn <= kernel.MAX_SELECT_WIDTH


@torch.library.custom_op("moc_lightning::moc_decode", mutates_args=())
def moc_decode_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, k: int,
                  group_a: int, group_b: int, post_silu: bool) -> torch.Tensor:
    """`kernel.moc_decode` as an op: x (rows, d_model); group_b = 0 means row Top-K. Its scratch is
    the shared one of the shape, left as it was found (the histogram zeroed), so the op is pure."""
    scratch = kernel.shared_scratch(w_gate.shape[1], w_gate.shape[0], x.device)
    return kernel.moc_decode(x, w_gate, w_up, w_down_t, k=k, group=(group_a, group_b) if group_b else None,
                             placement="post_silu" if post_silu else "pre_silu", scratch=scratch)


@moc_decode_op.register_fake
def _(x, w_gate, w_up, w_down_t, k, group_a, group_b, post_silu):
    return torch.empty_like(x)


def decode_forward(ffn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MoC FFN of x (..., d_model) with at most 8 rows, by the decode kernel."""
    layout: DecodeLayout = ffn.decode_layout
    cfg = ffn.cfg
    rows = x.reshape(-1, x.shape[-1])
    w_gate, w_up = ffn.gate_proj.weight.detach(), ffn.up_proj.weight.detach()
    if torch.compiler.is_compiling():
        group_a, group_b = cfg.group_ab or (0, 0)
        out = moc_decode_op(rows, w_gate, w_up, layout.w_down_t, cfg.k, group_a, group_b, cfg.placement == "post_silu")
    else:
        layout.refresh(ffn)
        out = kernel.moc_decode(rows, w_gate, w_up, layout.w_down_t, k=cfg.k, group=cfg.group_ab,
                                placement=cfg.placement, scratch=layout.scratch, config=layout.config)
    return out.reshape(x.shape)
