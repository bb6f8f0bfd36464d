"""The FFN variants as nn.Modules with HF LLaMA weight names (gate_proj, up_proj, down_proj)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moc_lightning.ffn.config import FFNConfig
from moc_lightning.ffn.decode import DecodeLayout, decode_applies, decode_forward
from moc_lightning.ffn.functions import BackRazorFunction, MoCFunction, resolve_moc_kernel


class GatedFFN(nn.Module):
    """Shared body: the three bias-free projections and optional whole-FFN checkpointing.

    Each kind below defines `ffn(x)`, its formula.
    """

    def __init__(self, cfg: FFNConfig):
        super().__init__()
        self.cfg = cfg
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ffn, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ffn, bias=False)
        self.down_proj = nn.Linear(cfg.d_ffn, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.checkpoint and torch.is_grad_enabled():
            return checkpoint(self.ffn, x, use_reentrant=False)
        return self.ffn(x)

    def extra_repr(self) -> str:
        return self.cfg.label

    def _weights_for(self, x: torch.Tensor):
        """x and the weights as the autograd functions want them: 2-D rows, one dtype.

        Under autocast the custom functions see what autocast would have given nn.Linear (the
        autocast dtype), and autocast is switched off inside them.
        """
        weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, weights = x.to(dtype), tuple(w.to(dtype) for w in weights)
        return x.reshape(-1, x.shape[-1]), weights


class SwiGLUFFN(GatedFFN):
    def ffn(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ReLUFFN(GatedFFN):
    def ffn(self, x):
        return self.down_proj(F.relu(self.gate_proj(x)) * self.up_proj(x))


class DReLUFFN(GatedFFN):
    def ffn(self, x):
        return self.down_proj(F.relu(self.gate_proj(x)) * F.relu(self.up_proj(x)))


class MoCFFN(GatedFFN):
    decode_layout = None  # set by prepare_for_decode: the decode kernel's W_down^T and scratch

    def prepare_for_decode(self, enable: bool = True) -> None:
        """Switch small no-grad batches (1..8 tokens) to the Triton decode kernel; False switches back."""
        self.decode_layout = DecodeLayout(self) if enable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if decode_applies(self, x):
            return decode_forward(self, x)
        return super().forward(x)

    def ffn(self, x):
        cfg = self.cfg
        rows, weights = self._weights_for(x)
        with torch.autocast(x.device.type, enabled=False):
            kernel = resolve_moc_kernel(cfg.moc_kernel, rows)
            out = MoCFunction.apply(rows, *weights, cfg.k, cfg.group_ab, cfg.placement, cfg.recompute,
                                    cfg.topk_backend, kernel)
        return out.reshape(*x.shape[:-1], cfg.d_model)


class BackRazorFFN(GatedFFN):
    def ffn(self, x):
        rows, weights = self._weights_for(x)
        with torch.autocast(x.device.type, enabled=False):
            out = BackRazorFunction.apply(rows, *weights, self.cfg.backrazor_keep)
        return out.reshape(*x.shape[:-1], self.cfg.d_model)


FFN_CLASSES: dict[str, type[GatedFFN]] = {
    "swiglu": SwiGLUFFN,
    "moc": MoCFFN,
    "relu": ReLUFFN,
    "drelu": DReLUFFN,
    "backrazor": BackRazorFFN,
}


def build_ffn(cfg: FFNConfig) -> GatedFFN:
    """The FFN module `cfg` describes."""
    return FFN_CLASSES[cfg.kind](cfg)
