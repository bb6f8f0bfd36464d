"""Attention of one new token per row over a static KV cache (decoding), split over the cache.

A decode step's query is one row per head, so SDPA's kernels, built for blocks of queries, run a
handful of programs that each walk the whole cache (cuDNN's took 6.7 us a layer of a llama-1b step
on an H200, stop 18's `bench.decode_profile`, for 2 MB of keys and values). Here the cache is cut
into `splits` pieces per head ("flash-decoding", Dao et al. 2023), so every SM reads a piece:

  1. `_split_kernel`, one program per (row, head, piece): the scores of the piece's allowed slots,
     their softmax numerator and its weighted sum of values, written as a float32 partial
     (acc[D], running max, running sum). Slots the mask forbids (the step: slots not filled) are
     not loaded at all, so a cache that is mostly still empty costs what it holds, not its length.
  2. `_combine_kernel`, one program per (row, head): rescales the partials to a common max and
     writes the output in the query's dtype.

`decode_attention_step` is what a model's decode step calls: the split kernel also applies RoPE
to q and the new k, writes the new k and v into the cache, and builds the mask from the cache's
filled slots, which in PyTorch took three more launches a layer (inductor's fusions of them).

On sm_90 the two launches (and the first one after whatever came before) are chained by
programmatic dependent launch. The module imports without triton; kernels are JIT-decorated on
first use, in the mode in force then (compiled, or TRITON_INTERPRET=1 for CPU tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from moc_lightning.kernels.runtime import HAS_PDL, HAS_TRITON, ModeJit, pdl_runs_on, runs_on

try:
    import triton
    import triton.language as tl

    if HAS_PDL:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    triton = None
    tl = None

# Widest head the kernels take in one tile.
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


def _rope(at, d, partner, sign, cos, sin, in_head, ROUND_TO: tl.constexpr):
    """One head's vector at `at` rotated as `apply_rotary` does it (channel i paired with i + D/2,
    in float32), then rounded to ROUND_TO as the plain path's rotated q and k are; float32 out."""
    x = (tl.load(at + d, mask=in_head, other=0.0).to(tl.float32) * cos
         + sign * tl.load(at + partner, mask=in_head, other=0.0).to(tl.float32) * sin)
    return x.to(ROUND_TO).to(tl.float32)


def _split_kernel(q_ptr, k_ptr, v_ptr, ok_ptr, part_ptr, kn_ptr, vn_ptr, cos_ptr, sin_ptr, slot_ptr,
                  L, chunk, H, G, qk_scale, q_sb, q_sh, k_sb, k_sl, k_sh, v_sb, v_sl, v_sh, ok_sb, ok_sl,
                  kn_sb, kn_sh, vn_sb, vn_sh, cs_sb,
                  SPLITS: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
                  STEP: tl.constexpr, PDL: tl.constexpr):
    """One (row, head, piece) partial. STEP: q, the new k and v are the projections before RoPE,
    rotated here; the new k, v are this step's slot (written to the cache by the piece holding
    it, one query head of each group) and the slots allowed are the filled ones up to it."""
    bh = tl.program_id(0)
    piece = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv = h // G  # grouped-query attention: query heads h share k/v head h // G (SDPA's enable_gqa)
    d = tl.arange(0, D_PAD)
    in_head = d < D
    start = piece * chunk
    end = tl.minimum(start + chunk, L)
    if PDL:  # q comes from the launch before: wait for it, then let the combine be scheduled
        gdc_wait()
        gdc_launch_dependents()
    if STEP:
        slot = tl.load(slot_ptr).to(tl.int32)
        partner = tl.where(d < D // 2, d + D // 2, d - D // 2)
        sign = tl.where(d < D // 2, -1.0, 1.0)
        cos = tl.load(cos_ptr + b * cs_sb + d, mask=in_head, other=0.0)
        sin = tl.load(sin_ptr + b * cs_sb + d, mask=in_head, other=0.0)
        q = _rope(q_ptr + b * q_sb + h * q_sh, d, partner, sign, cos, sin, in_head, q_ptr.dtype.element_ty)
        k_new = _rope(kn_ptr + b * kn_sb + kv * kn_sh, d, partner, sign, cos, sin, in_head, k_ptr.dtype.element_ty)
        v_new = tl.load(vn_ptr + b * vn_sb + kv * vn_sh + d, mask=in_head, other=0.0).to(tl.float32)
        # the piece holding the slot writes it, one query head of each group
        writer = in_head & ((d * 0 + ((h % G == 0) & (slot >= start) & (slot < end)).to(tl.int32)) > 0)
        tl.store(k_ptr + b * k_sb + slot * k_sl + kv * k_sh + d, k_new.to(k_ptr.dtype.element_ty), mask=writer)
        tl.store(v_ptr + b * v_sb + slot * v_sl + kv * v_sh + d, v_new.to(v_ptr.dtype.element_ty), mask=writer)
    else:
        q = tl.load(q_ptr + b * q_sb + h * q_sh + d, mask=in_head, other=0.0).to(tl.float32)
    q = q * qk_scale  # scores in log2 units: exp2 is the hardware's exponential
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([D_PAD], tl.float32)
    for l0 in range(start, end, BLOCK_L):
        slots = l0 + tl.arange(0, BLOCK_L)
        ok = tl.load(ok_ptr + b * ok_sb + slots * ok_sl, mask=slots < end, other=0) != 0
        # the tiles' loads wait on the filled flags only (STEP: not on the slot too, one round
        # trip less; later slots hold nothing yet, and the slot's stale row is replaced below)
        tile = ok[:, None] & in_head[None, :]
        if STEP:  # this step's slot comes from registers, not from the cache
            here = slots == slot
            ok = (ok & (slots < slot)) | here
        k = tl.load(k_ptr + b * k_sb + slots[:, None] * k_sl + kv * k_sh + d[None, :], mask=tile, other=0.0)
        k = k.to(tl.float32)
        if STEP:
            k = tl.where(here[:, None], k_new[None, :], k)
        s = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no allowed slot yet: no NaN from -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use)
        v = tl.load(v_ptr + b * v_sb + slots[:, None] * v_sl + kv * v_sh + d[None, :], mask=tile, other=0.0)
        v = v.to(tl.float32)
        if STEP:  # the slot's own v; slots loaded but not allowed (later ones) weigh 0, NaN or not
            v = tl.where(here[:, None], v_new[None, :], tl.where(ok[:, None], v, 0.0))
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    row = part_ptr + (bh * SPLITS + piece) * (D_PAD + 2)
    tl.store(row + d, acc)
    one = tl.arange(0, 1)
    tl.store(row + D_PAD + one, m_i)
    tl.store(row + D_PAD + 1 + one, l_i)


def _combine_kernel(part_ptr, out_ptr, H, o_sb, o_sh, SPLITS: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr,
                    D_PAD: tl.constexpr, PDL: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pieces = tl.arange(0, S_PAD)
    real = pieces < SPLITS
    d = tl.arange(0, D_PAD)
    rows = part_ptr + (bh * SPLITS + pieces) * (D_PAD + 2)
    m = tl.load(rows + D_PAD, mask=real, other=float("-inf"))
    l = tl.load(rows + D_PAD + 1, mask=real, other=0.0)
    acc = tl.load(rows[:, None] + d[None, :], mask=real[:, None], other=0.0)
    # pieces with no allowed slot have m = -inf and weigh 0; a query always sees its own slot
    w = tl.exp2(m - tl.max(m, axis=0))
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + b * o_sb + h * o_sh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


# The kernels, compiled for the mode in force, and the device function they call, rebound by name.
_kernel = ModeJit(globals(), (_rope,))


@dataclass(frozen=True)
class AttentionLaunch:
    """Cache slots a split program walks in one tile, and the programs a launch aims at (the
    pieces per head follow: programs / (rows x heads), at most one per tile of the cache).

    The defaults are the fastest of stop 19's sweep on an H200, or within 4% of it, at every
    batch of 1 to 8 (the llama-1b layer: 32 heads of 64, a 256-slot cache with 192 written): many
    one-warp programs of 16 slots, 4.06 / 4.37 / 5.88 / 8.86 us at batch 1 / 2 / 4 / 8, where
    cuDNN's SDPA took 11.9 / 12.4 / 12.8 / 13.1 (the first settings, 32 slots on 2 warps aiming
    at 264 programs, 5.46 us at batch 1 and 14.4 at 8)."""

    block_l: int = 16
    target_programs: int = 1056
    warps: int = 1
    pdl: bool = True  # programmatic dependent launch (CUDA sm_90+; ignored elsewhere)

    def __post_init__(self):
        if self.block_l < 1 or self.block_l & (self.block_l - 1):
            raise ValueError(f"AttentionLaunch.block_l must be a power of two, got {self.block_l}")
        if self.target_programs < 1 or self.warps < 1:
            raise ValueError("AttentionLaunch.target_programs and warps must be at least 1")

    def pieces(self, heads: int, length: int) -> tuple[int, int]:
        """(pieces per head, slots per piece, a multiple of block_l)."""
        tiles = triton.cdiv(length, self.block_l)
        splits = max(1, min(tiles, triton.cdiv(self.target_programs, heads)))
        chunk = triton.cdiv(tiles, splits) * self.block_l
        return triton.cdiv(length, chunk), chunk


# What a call without `launch` takes (tests of whole models swap in fewer programs: the
# interpreter's cost is per program).
DEFAULT_LAUNCH = AttentionLaunch()


def _check(q, keys, values, allowed, mask_name="allowed"):
    if not HAS_TRITON:
        raise RuntimeError("the decode attention kernel needs triton, which is not installed (pip install triton)")
    if not runs_on(q.device):
        raise RuntimeError(f"the decode attention kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1), not on {q.device}")
    if q.dim() != 3 or keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(f"q must be (batch, heads, head_dim) and keys, values one (batch, length, kv_heads, "
                         f"head_dim) shape; got {tuple(q.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}")
    batch, heads, head_dim = q.shape
    _, length, kv_heads, _ = keys.shape
    if keys.shape[0] != batch or keys.shape[3] != head_dim or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit keys {tuple(keys.shape)}: same batch and head_dim, "
                         f"and heads a multiple of kv_heads")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim = {head_dim} is wider than the kernel takes ({MAX_HEAD_DIM})")
    if allowed.dtype != torch.bool or tuple(allowed.shape) != (batch, length):
        raise ValueError(f"{mask_name} must be a bool (batch, length) = ({batch}, {length}) mask, got "
                         f"{allowed.dtype} {tuple(allowed.shape)}")
    for name, t in (("keys", keys), ("values", values), (mask_name, allowed)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    if keys.stride(-1) != 1 or values.stride(-1) != 1:  # the cache itself: never copied here
        raise ValueError("keys and values must have a contiguous last dimension")
    if keys.dtype != q.dtype or values.dtype != q.dtype:
        raise ValueError(f"q, keys and values must share a dtype, got {q.dtype}, {keys.dtype}, {values.dtype}")


def _launch(q, keys, values, ok, scale, launch, step=None) -> torch.Tensor:
    """The split and combine launches; `step` = (k_new, v_new, cos, sin, slot) for the fused
    step, where q is before RoPE and `ok` marks the filled slots."""
    batch, heads, head_dim = q.shape
    cfg = launch or DEFAULT_LAUNCH
    length, kv_heads = keys.shape[1], keys.shape[2]
    splits, chunk = cfg.pieces(batch * heads, length)
    d_pad = triton.next_power_of_2(head_dim)
    part = torch.empty(batch * heads, splits, d_pad + 2, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    pdl = cfg.pdl and pdl_runs_on(q.device)
    extra = dict(launch_pdl=True) if pdl else {}  # a launch option of compiled kernels only
    ok = ok.view(torch.uint8)  # the same bytes; a pointer to bytes in both triton modes
    k_new, v_new, cos, sin, slot = step or (q, q, q, q, q)  # unread without STEP
    _kernel(_split_kernel)[(batch * heads, splits)](
        q, keys, values, ok, part, k_new, v_new, cos, sin, slot, length, chunk, heads, heads // kv_heads,
        scale * _LOG2E, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), ok.stride(0), ok.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), cos.stride(0),
        SPLITS=splits, D=head_dim, D_PAD=d_pad, BLOCK_L=cfg.block_l, STEP=step is not None, PDL=pdl,
        num_warps=cfg.warps, **extra)
    _kernel(_combine_kernel)[(batch * heads,)](
        part, out, heads, out.stride(0), out.stride(1), SPLITS=splits, S_PAD=triton.next_power_of_2(splits),
        D=head_dim, D_PAD=d_pad, PDL=pdl, num_warps=cfg.warps, **extra)
    return out


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, *,
                     scale: Optional[float] = None, launch: Optional[AttentionLaunch] = None) -> torch.Tensor:
    """softmax(q . k / sqrt(head_dim)) . v over the allowed slots, one query per (row, head).

    q: (batch, heads, head_dim); keys, values: (batch, length, kv_heads, head_dim) with heads a
    multiple of kv_heads; allowed: (batch, length) bool, which slots row b attends to (at least
    one a row, else its output is NaN, as SDPA's). Returns (batch, heads, head_dim) in q's dtype.
    """
    _check(q, keys, values, allowed)
    return _launch(_unit_stride(q), keys, values, allowed, scale, launch)


def decode_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          keys: torch.Tensor, values: torch.Tensor, filled: torch.Tensor, slot: torch.Tensor, *,
                          scale: Optional[float] = None, launch: Optional[AttentionLaunch] = None) -> torch.Tensor:
    """A decode step's attention in one go: RoPE on q and the new k, the new k and v written to
    the cache at `slot`, and the attention of q over the filled slots up to it. It replaces
    `apply_rotary`, `KVCache.write` and SDPA with `KVCache.mark`'s mask, and their launches.

    q: (batch, heads, head_dim), k, v: (batch, kv_heads, head_dim), the projections before RoPE;
    cos, sin: (batch, head_dim) float32 at each row's position; keys, values: the layer's cache
    (batch, length, kv_heads, head_dim), written at column `slot` (a one-element integer tensor);
    filled: (batch, length) bool, the cache's real slots (this step's included or not: a query
    always sees its own slot). Returns (batch, heads, head_dim) in q's dtype.
    """
    _check(q, keys, values, filled, "filled")
    batch, heads, head_dim = q.shape
    kv_shape = (batch, keys.shape[2], head_dim)
    if tuple(k.shape) != kv_shape or tuple(v.shape) != kv_shape or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k and v must be (batch, kv_heads, head_dim) = {kv_shape} in {q.dtype}, got "
                         f"{tuple(k.shape)} {k.dtype} and {tuple(v.shape)} {v.dtype}")
    if head_dim % 2:
        raise ValueError(f"RoPE pairs channel i with i + head_dim / 2: head_dim = {head_dim} must be even")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (batch, head_dim) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 (batch, head_dim) = ({batch}, {head_dim}), got "
                             f"{t.dtype} {tuple(t.shape)}")
    if slot.numel() != 1 or slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot must be a one-element integer tensor, got {slot.dtype} {tuple(slot.shape)}")
    step = (_unit_stride(k), _unit_stride(v), _unit_stride(cos), _unit_stride(sin), slot.reshape(1))
    return _launch(_unit_stride(q), keys, values, filled, scale, launch, step)


def applies(x: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether a decode step whose activations are x can take the kernel over the cache `keys`
    (batch, length, kv_heads, head_dim): a device it runs on, no autograd, the cache's dtype, a
    head it takes."""
    return (HAS_TRITON and runs_on(keys.device) and not torch.is_grad_enabled() and x.dtype == keys.dtype
            and keys.shape[-1] <= MAX_HEAD_DIM)


@torch.library.custom_op("moc_lightning::decode_attention_step", mutates_args=("keys", "values"))
def decode_attention_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             keys: torch.Tensor, values: torch.Tensor, filled: torch.Tensor,
                             slot: torch.Tensor) -> torch.Tensor:
    """`decode_attention_step` as an op; it writes the cache in place (declared, so that the
    compiler orders the layer's later reads of the cache after it)."""
    return decode_attention_step(q, k, v, cos, sin, keys, values, filled, slot)


@decode_attention_step_op.register_fake
def _(q, k, v, cos, sin, keys, values, filled, slot):
    return q.new_empty(q.shape)
