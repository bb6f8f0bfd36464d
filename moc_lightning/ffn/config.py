"""The one config every FFN variant is built from, validated when it is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

KINDS = ("swiglu", "moc", "relu", "drelu", "backrazor")
PLACEMENTS = ("pre_silu", "post_silu")
# How MoC's FFN runs in training: `torch` (plain PyTorch, any device), `triton` (fused kernels,
# moc_lightning.kernels.moc_train), `auto` (triton on CUDA when triton is importable, else torch).
MOC_KERNELS = ("auto", "torch", "triton")
# Top-K backends a config may name. `auto` picks the fastest one available where the FFN runs;
# GPU backends register themselves in `moc_lightning.ffn.topk` when their kernels exist.
TOPK_BACKENDS = ("auto", "torch", "triton", "raft")


def _refuse(field: str, value, allowed: str) -> ValueError:
    return ValueError(f"FFNConfig.{field} = {value!r} is not allowed: {allowed}")


def parse_group(group: str) -> tuple[int, int]:
    """'a:b' -> (a, b), refusing anything but two positive integers with a <= b."""
    parts = str(group).split(":")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise _refuse("group", group, "expected None or 'a:b' with integers 1 <= a <= b (e.g. '2:8')")
    a, b = (int(p) for p in parts)
    if b <= 0:
        raise _refuse("group", group, f"b = {b} must be >= 1 (allowed: 1 <= a <= b)")
    if a <= 0:
        raise _refuse("group", group, f"a = {a} must be >= 1 (allowed: 1 <= a <= b = {b})")
    if a > b:
        raise _refuse("group", group, f"a = {a} must be <= b = {b} (allowed: 1 <= a <= b)")
    return a, b


@dataclass(frozen=True)
class FFNConfig:
    """One FFN layer: its kind, its shape and the settings of its sparsity.

    kind        swiglu | moc | relu | drelu | backrazor (formulas in DESIGN.md).
    k           channels MoC keeps per token; None means the paper's choice, d_model // 2
                (ignored when `group` is set, and by the other kinds).
    group       None, or "a:b": MoC keeps the a largest of every b contiguous channels.
    placement   pre_silu: rank channels by G (signed); post_silu: by |SiLU(G)|.
    recompute   MoC saves only the kept channels' indices, G and U, and recomputes SiLU and Z in
                backward; False saves S and Z at the kept channels as well (Table 1's MoC column).
    checkpoint  gradient checkpointing of the whole FFN (the FFN+GCP / MoC+GCP baselines).
    backrazor_keep  fraction of each saved activation row BackRazor keeps (by magnitude).
    topk_backend    auto | torch | triton | raft (moc_lightning.ffn.topk says where each runs).
    moc_kernel  auto | torch | triton: MoC's training body (same results and saved tensors);
                auto takes triton on CUDA when triton is importable, else torch.
    """

    kind: str = "swiglu"
    d_model: int = 512
    d_ffn: int = 1376
    k: Optional[int] = None
    group: Optional[str] = None
    placement: str = "pre_silu"
    recompute: bool = True
    checkpoint: bool = False
    backrazor_keep: float = 0.2
    topk_backend: str = "auto"
    moc_kernel: str = "auto"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise _refuse("kind", self.kind, f"expected one of {', '.join(KINDS)}")
        for name in ("d_model", "d_ffn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _refuse(name, value, "expected an integer >= 1")
        if self.placement not in PLACEMENTS:
            raise _refuse("placement", self.placement, f"expected one of {', '.join(PLACEMENTS)}")
        if self.topk_backend not in TOPK_BACKENDS:
            raise _refuse("topk_backend", self.topk_backend, f"expected one of {', '.join(TOPK_BACKENDS)}")
        if self.moc_kernel not in MOC_KERNELS:
            raise _refuse("moc_kernel", self.moc_kernel, f"expected one of {', '.join(MOC_KERNELS)}")
        if self.group is not None:
            parse_group(self.group)
        if self.k is None:
            object.__setattr__(self, "k", max(1, min(self.d_model // 2, self.d_ffn)))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_ffn:
            raise _refuse("k", self.k, f"expected an integer with 1 <= k <= d_ffn = {self.d_ffn}")
        if not isinstance(self.backrazor_keep, (int, float)) or not 0.0 < self.backrazor_keep <= 1.0:
            raise _refuse("backrazor_keep", self.backrazor_keep, "expected a fraction with 0 < backrazor_keep <= 1")
        for name in ("recompute", "checkpoint"):
            if not isinstance(getattr(self, name), bool):
                raise _refuse(name, getattr(self, name), "expected true or false")

    @property
    def group_ab(self) -> Optional[tuple[int, int]]:
        return None if self.group is None else parse_group(self.group)

    @property
    def kept_channels(self) -> int:
        """Channels MoC keeps per token: k, or for a:b groups a per full group plus min(a, r)."""
        if self.group is None:
            return self.k
        a, b = parse_group(self.group)
        full, rest = divmod(self.d_ffn, b)
        return full * a + min(a, rest)

    @property
    def label(self) -> str:
        """A short human name: 'moc_2:8', 'moc_k512+gcp', 'swiglu'."""
        name = self.kind
        if self.kind == "moc":
            name += f"_{self.group}" if self.group else f"_k{self.k}"
            if self.placement == "post_silu":
                name += "_post"
            if not self.recompute:
                name += "_stored"
        if self.kind == "backrazor":
            name += f"_{self.backrazor_keep:g}"
        return name + ("+gcp" if self.checkpoint else "")

    def replace(self, **changes) -> "FFNConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
