"""Triton kernels for MoC's FFN in training: the element-wise work around the dense GEMMs, fused.

The GEMMs stay dense (cuBLAS); what these kernels remove is the string of element-wise passes and
d_ffn-wide temporaries of the plain PyTorch path:

forward   G, U (rows x d_ffn) -> the compact tensors backward keeps (the kept channels, as int16
          indices or a bitmask; G and U there; S and Z there too when recompute is off) and the
          dense Z' that the down projection multiplies, in one kernel.
backward  grad_Z = grad_out W_down (rows x d_ffn) plus the compact tensors -> one buffer
          [Z' | grad_G' | grad_U'] (rows x 3 d_ffn), so that grad W_down, [grad W_gate; grad W_up]
          and grad x are one GEMM each on views of it.

Three ways to know which channels are kept:
- any indices (row Top-K from a Top-K backend): the kernels gather at the indices and scatter into
  dense rows they first zero (a CTA barrier orders the zeros before the scattered values, so the
  rows reach memory once, as whole lines);
- a bitmask of each row's kept channels (the triton row Top-K writes one, see
  topk_triton.row_topk_mask): the compact tensors list the kept channels in ascending order,
  each column finds its slot by pop counts of the mask, and every dense tile, forward and
  backward, is read or written whole; the mask is what backward saves in place of indices;
- grouped a:b Top-K with b a power of two up to 64: a tile holds whole groups, so the forward
  kernel selects the a best of each group itself (a rounds of argmax), stores group j's picks at
  compact slots [j*a, j*a + a), and every dense tile, forward and backward, is written whole and
  coalesced, without zeroing or scattering.

On sm_90 the sigmoid in every kernel is PTX's approximate ex2 and rcp (see `_silu_parts`): the
kernels issue more instructions than they move bytes.

Measured and dropped (H100, .bench-raw/train-1.jsonl, train-2.jsonl): the gate/up GEMM with the
group selection in its epilogue (1.94 ms against 0.52 ms for cuBLAS's two GEMMs); 2:4 sparse
tensor cores for the 2:8 products (cuSPARSELt compression alone 3.1 ms); sorting each row's
indices before gathering (no gain); a rank-by-comparison group selection (slower than argmax);
the row Top-K fused into the forward kernel, one warp per row reading G once and writing Z' as
whole rows (2.1 ms against 1.0 ms for the Top-K and this gather kernel: a row held in one
warp's registers takes 255 of them, 8 warps an SM, and capping the registers spills more); and
again on an H200 with the Top-K's chunked placement, the compact G, U and indices stored as the
kept channels are placed (0.601 ms against 0.345 + 0.216 ms for the two kernels); the 2:8
backward reading the compact tensors and grad_Z as whole tiles instead of gathering each pick's
grad_Z (0.297 against 0.259 ms, H200, stop 13); for ascending indices, a backward finding each
column's slot by a binary search in a window of the compact run (0.356 ms against 0.302 ms for
the bitmask backward, H200, stop 14), the same search in the forward (0.61 ms), a histogram of
the window instead of the search (0.53-1.4 ms), and a 64-bit tile mask built from the window's
channels, with slots by popc (0.58 ms, stop 13: building the mask took a reduction a tile); for
the 2:8 forward (H200, stop 15), a persistent loop with its loads software pipelined (0.202
against 0.207 ms for the plain 1D grid: not worth the loop and grid sizing it adds) and ranking
by 16-bit integer keys, key and position in one int32 (the same 520 instructions; 0.219 ms).

Everything runs under TRITON_INTERPRET=1 on CPU tensors (the tests do that); on a machine without
triton the module still imports, and the launchers raise a clear error.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from moc_lightning.kernels.runtime import interpreting, runs_on
from moc_lightning.kernels.topk_triton import mask_bytes

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path of MoC does not need triton
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None
# Group widths selected in-kernel: powers of two (a tile holds whole groups) up to this.
MAX_FUSED_GROUP = 64


def require(device: torch.device) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError("the Triton MoC kernels need the `triton` package, which is not installed: "
                           "use moc_kernel='torch' (or 'auto')")
    if not runs_on(device):
        raise RuntimeError(f"the Triton MoC kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), "
                           f"not on {device}: use moc_kernel='torch' (or 'auto')")


def group_fusable(group: Optional[tuple[int, int]]) -> bool:
    """Whether a:b groups are selected inside the kernels (b a power of two <= MAX_FUSED_GROUP)."""
    if group is None:
        return False
    b = group[1]
    return b <= MAX_FUSED_GROUP and b & (b - 1) == 0


class ForwardPack(NamedTuple):
    """What the forward kernels produce: dense Z' for the down projection, the compact tensors
    backward keeps (s_sel and z_sel only when recompute is off, else None)."""

    z_dense: torch.Tensor
    idx: torch.Tensor
    g_sel: torch.Tensor
    u_sel: torch.Tensor
    s_sel: Optional[torch.Tensor]
    z_sel: Optional[torch.Tensor]


def _compact_outputs(rows: int, kept: int, like: torch.Tensor, index_dtype: Optional[torch.dtype], store_sz: bool):
    """Empty compact tensors (rows x kept); S and Z ones are 1-element dummies when not stored,
    and the index one None when index_dtype is (the caller has one)."""
    new = lambda dtype=like.dtype: torch.empty(rows, kept, dtype=dtype, device=like.device)
    dummy = like.new_empty(1)
    ix = None if index_dtype is None else new(index_dtype)
    return ix, new(), new(), (new() if store_sz else dummy), (new() if store_sz else dummy)


if TRITON_AVAILABLE:

    @triton.jit
    def _silu_parts(g, ASM: tl.constexpr):
        """sigma(g), SiLU(g) and SiLU'(g) in float32. ASM: sigma as 1 / (1 + 2^(-g log2 e)) with
        the approximate, flush-to-zero ex2 and rcp of PTX (4 instructions; tl.sigmoid's exp and
        division add range fix-ups, about 6 more an element, in kernels that issue more than
        they move)."""
        if ASM:
            sig = tl.inline_asm_elementwise(
                "{ .reg .f32 t; mul.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; add.f32 t, t, 0f3F800000; "
                "rcp.approx.ftz.f32 $0, t; }", "=r,r", [g], dtype=tl.float32, is_pure=True, pack=1)
        else:
            sig = tl.sigmoid(g)
        return sig, g * sig, sig * (1.0 + g * (1.0 - sig))

    @triton.jit
    def _row_block(n_rows, BLOCK_R: tl.constexpr, block=None):
        """Row block `block` (default: this program's) of BLOCK_R rows: their numbers, which
        exist, and int64 row offsets (rows, 1)."""
        if block is None:
            block = tl.program_id(0)
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        return rows, rows < n_rows, rows.to(tl.int64)[:, None]

    # --- any indices: gather, then scatter into zeroed rows --------------------------------------

    @triton.jit
    def _scatter_forward_kernel(G, U, IDX, ZD, IX, GS, US, SS, ZS, n_rows, width, kept,
                                s_g, s_u, s_idx, s_zd, s_c,
                                STORE_SZ: tl.constexpr, WRITE_IX: tl.constexpr, ASM: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
        rows, row_ok, r = _row_block(n_rows, BLOCK_R)
        for f0 in range(0, width, BLOCK_F):
            cols = f0 + tl.arange(0, BLOCK_F)[None, :]
            tl.store(ZD + r * s_zd + cols, tl.zeros([BLOCK_R, BLOCK_F], ZD.dtype.element_ty),
                     mask=row_ok[:, None] & (cols < width))
        tl.debug_barrier()  # the zeros land before any thread scatters into the same rows
        for k0 in range(0, kept, BLOCK_K):
            slots = k0 + tl.arange(0, BLOCK_K)[None, :]
            ok = row_ok[:, None] & (slots < kept)
            ch = tl.load(IDX + r * s_idx + slots, mask=ok, other=0).to(tl.int32)
            g = tl.load(G + r * s_g + ch, mask=ok, other=0.0)
            u = tl.load(U + r * s_u + ch, mask=ok, other=0.0)
            _, s, _ = _silu_parts(g.to(tl.float32), ASM)
            z = (s * u.to(tl.float32)).to(ZD.dtype.element_ty)
            compact = r * s_c + slots
            if WRITE_IX:
                tl.store(IX + compact, ch.to(IX.dtype.element_ty), mask=ok)
            tl.store(GS + compact, g, mask=ok)
            tl.store(US + compact, u, mask=ok)
            if STORE_SZ:
                tl.store(SS + compact, s.to(SS.dtype.element_ty), mask=ok)
                tl.store(ZS + compact, z, mask=ok)
            tl.store(ZD + r * s_zd + ch, z, mask=ok)

    @triton.jit
    def _scatter_backward_kernel(GZ, IX, GS, US, SS, ZS, BUF, n_rows, width, kept, s_gz, s_c, s_buf,
                                 STORED: tl.constexpr, ASM: tl.constexpr, BLOCK_R: tl.constexpr,
                                 BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
        rows, row_ok, r = _row_block(n_rows, BLOCK_R)
        for f0 in range(0, 3 * width, BLOCK_F):
            cols = f0 + tl.arange(0, BLOCK_F)[None, :]
            tl.store(BUF + r * s_buf + cols, tl.zeros([BLOCK_R, BLOCK_F], BUF.dtype.element_ty),
                     mask=row_ok[:, None] & (cols < 3 * width))
        tl.debug_barrier()
        for k0 in range(0, kept, BLOCK_K):
            slots = k0 + tl.arange(0, BLOCK_K)[None, :]
            ok = row_ok[:, None] & (slots < kept)
            compact = r * s_c + slots
            ch = tl.load(IX + compact, mask=ok, other=0).to(tl.int32)
            g = tl.load(GS + compact, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(US + compact, mask=ok, other=0.0).to(tl.float32)
            _, s, ds = _silu_parts(g, ASM)
            if STORED:
                s = tl.load(SS + compact, mask=ok, other=0.0).to(tl.float32)
                z = tl.load(ZS + compact, mask=ok, other=0.0).to(BUF.dtype.element_ty)
            else:
                z = (s * u).to(BUF.dtype.element_ty)
            gz = tl.load(GZ + r * s_gz + ch, mask=ok, other=0.0).to(tl.float32)
            out = BUF + r * s_buf + ch
            tl.store(out, z, mask=ok)
            tl.store(out + width, (u * gz * ds).to(BUF.dtype.element_ty), mask=ok)
            tl.store(out + 2 * width, (s * gz).to(BUF.dtype.element_ty), mask=ok)

    # --- a bitmask of the kept channels: every tile written whole, slots by pop counts ----------
    # The row Top-K can write each row's kept channels as a bitmask (bit b of int32 word w is
    # channel 32 w + b) instead of indices. The compact tensors then list the kept channels in
    # ascending order, and column c's slot is the row's kept count before c: the pop counts of
    # the earlier words plus that of c's own word below c, no search and no cross-lane gathers.
    # Both kernels read and write the dense tensors as whole coalesced tiles (8 channels a
    # thread: 16-byte accesses), and the mask is what backward saves in place of the indices
    # (344 bytes a row against 1,024 for K 512 of 2736 int16 indices). H200, 350M shapes
    # (stop 14): backward 0.302 ms (the binary-search one it replaced: 0.356), forward 0.206
    # (the gather forward: 0.204), and the Top-K writing the mask 0.144 against 0.169 for
    # int16 indices.

    @triton.jit
    def _popc(x, ASM: tl.constexpr):
        """Set bits of each int32 (one instruction on the GPU; bit tricks in the interpreter)."""
        if ASM:
            return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return (x * 0x01010101) >> 24

    @triton.jit
    def _mask_tile(MASK, r, row_ok, s_m, w0, n_words, start, width, ASM: tl.constexpr, WORDS: tl.constexpr):
        """The tile of mask words [w0, w0 + WORDS) of BLOCK_R rows, as (rows, WORDS, 32) tiles:
        the channels, which are kept, their compact slots (rows' first slots at `start`), where
        the tile is inside the tensor, and the next tile's start."""
        words = w0 + tl.arange(0, WORDS)[None, :]
        m = tl.load(MASK + r * s_m + words, mask=row_ok[:, None] & (words < n_words), other=0)
        count = _popc(m, ASM)
        before = start[:, None] + tl.cumsum(count, axis=1) - count
        bit = tl.arange(0, 32)[None, None, :]
        m3 = m[:, :, None]
        cols = words[:, :, None] * 32 + bit
        inside = row_ok[:, None, None] & (cols < width)
        keep = (((m3 >> bit) & 1) != 0) & inside
        slot = before[:, :, None] + _popc(m3 & ~(-1 << bit), ASM)
        return cols, keep, slot, inside, start + tl.sum(count, axis=1)

    @triton.jit
    def _mask_forward_kernel(G, U, MASK, ZD, GS, US, SS, ZS, n_rows, width, n_words, s_g, s_u, s_m, s_zd, s_c,
                             STORE_SZ: tl.constexpr, ASM: tl.constexpr, BLOCK_R: tl.constexpr,
                             WORDS: tl.constexpr):
        rows, row_ok, r = _row_block(n_rows, BLOCK_R)
        r3 = r[:, :, None]
        g_row, u_row, zd_row = G + r3 * s_g, U + r3 * s_u, ZD + r3 * s_zd
        gs_row, us_row, ss_row, zs_row = GS + r3 * s_c, US + r3 * s_c, SS + r3 * s_c, ZS + r3 * s_c
        start = tl.zeros([BLOCK_R], tl.int32)
        for w0 in range(0, n_words, WORDS):
            cols, keep, slot, inside, start = _mask_tile(MASK, r, row_ok, s_m, w0, n_words, start, width, ASM,
                                                         WORDS)
            g = tl.load(g_row + cols, mask=inside, other=0.0)
            u = tl.load(u_row + cols, mask=inside, other=0.0)
            _, s, _ = _silu_parts(g.to(tl.float32), ASM)
            z = (s * u.to(tl.float32)).to(ZD.dtype.element_ty)
            tl.store(zd_row + cols, tl.where(keep, z, 0.0).to(ZD.dtype.element_ty), mask=inside)
            tl.store(gs_row + slot, g, mask=keep)
            tl.store(us_row + slot, u, mask=keep)
            if STORE_SZ:
                tl.store(ss_row + slot, s.to(SS.dtype.element_ty), mask=keep)
                tl.store(zs_row + slot, z, mask=keep)

    @triton.jit
    def _mask_backward_kernel(GZ, MASK, GS, US, SS, ZS, BUF, n_rows, width, n_words, s_gz, s_m, s_c, s_buf,
                              STORED: tl.constexpr, ASM: tl.constexpr, BLOCK_R: tl.constexpr,
                              WORDS: tl.constexpr):
        rows, row_ok, r = _row_block(n_rows, BLOCK_R)
        r3 = r[:, :, None]
        # Each row's pointers, so that the loop adds int32 offsets (one wide multiply-add each).
        gs_row, us_row, ss_row, zs_row = GS + r3 * s_c, US + r3 * s_c, SS + r3 * s_c, ZS + r3 * s_c
        gz_row, out_row = GZ + r3 * s_gz, BUF + r3 * s_buf
        start = tl.zeros([BLOCK_R], tl.int32)
        for w0 in range(0, n_words, WORDS):
            cols, keep, slot, inside, start = _mask_tile(MASK, r, row_ok, s_m, w0, n_words, start, width, ASM,
                                                         WORDS)
            g = tl.load(gs_row + slot, mask=keep, other=0.0).to(tl.float32)
            u = tl.load(us_row + slot, mask=keep, other=0.0).to(tl.float32)
            _, s, ds = _silu_parts(g, ASM)
            if STORED:
                s = tl.load(ss_row + slot, mask=keep, other=0.0).to(tl.float32)
                z = tl.load(zs_row + slot, mask=keep, other=0.0)
            else:
                z = (s * u).to(BUF.dtype.element_ty)
            gz = tl.load(gz_row + cols, mask=inside, other=0.0).to(tl.float32)
            out = out_row + cols
            tl.store(out, tl.where(keep, z, 0.0).to(BUF.dtype.element_ty), mask=inside)
            tl.store(out + width, tl.where(keep, u * gz * ds, 0.0).to(BUF.dtype.element_ty), mask=inside)
            tl.store(out + 2 * width, tl.where(keep, s * gz, 0.0).to(BUF.dtype.element_ty), mask=inside)

    # --- a:b groups: selection inside the kernel, dense tiles written whole ----------------------

    @triton.jit
    def _group_block(n_rows, n_groups, BLOCK_R: tl.constexpr, GROUPS: tl.constexpr):
        """This program's (BLOCK_R rows, GROUPS groups) tile, as _row_block gives rows, plus the
        groups' numbers. The grid is 1D and consecutive programs walk along the rows: the 2D grid
        with row blocks fastest had the programs running at once cover a column strip of
        thousands of rows, 0.5-1 KB of each, and took 0.270 (forward) and 0.264 ms (backward)
        against 0.207 and 0.214 (H200, 32768 x 2736, 2:8, stop 15)."""
        n_blocks = tl.cdiv(n_groups, GROUPS)
        pid = tl.program_id(0)
        row_block = pid // n_blocks
        rows, row_ok, r = _row_block(n_rows, BLOCK_R, row_block)
        return rows, row_ok, r, (pid - row_block * n_blocks) * GROUPS + tl.arange(0, GROUPS)

    @triton.jit
    def _group_forward_kernel(G, U, ZD, IX, GS, US, SS, ZS, n_rows, width, s_g, s_u, s_zd, s_c,
                              A: tl.constexpr, A_P2: tl.constexpr, B: tl.constexpr, POST_SILU: tl.constexpr,
                              STORE_SZ: tl.constexpr, ASM: tl.constexpr, BLOCK_R: tl.constexpr, GROUPS: tl.constexpr):
        """Tiles of (rows, groups, B): A rounds of argmax per group (the first of equal ones), each
        knocking its winner out; the t-th pick of group j goes to compact slot j*A + t. The picks
        are gathered into (rows, groups, A) tiles and stored once, contiguous: storing each
        round's picks at stride A wrote the compact rows in A interleaved passes of 2-byte
        stores (0.379 ms on an H200 at 32768 x 2736, 2:8)."""
        rows, row_ok, r, groups = _group_block(n_rows, tl.cdiv(width, B), BLOCK_R, GROUPS)
        p3 = tl.arange(0, B)[None, None, :]
        ch3 = groups[None, :, None] * B + p3
        valid3 = row_ok[:, None, None] & (ch3 < width)
        g3 = tl.load(G + r[:, :, None] * s_g + ch3, mask=valid3, other=0.0).to(tl.float32)
        u3 = tl.load(U + r[:, :, None] * s_u + ch3, mask=valid3, other=0.0).to(tl.float32)
        if POST_SILU:
            _, s3, _ = _silu_parts(g3, ASM)
            scores = tl.abs(s3)
        else:
            scores = g3
        scores = tl.where(valid3, scores, float("-inf"))
        # Z' is placed pick by pick: SiLU is evaluated on the A picks of a group, not on all B
        # channels (fewer instructions in a kernel that issue, not memory, bounds).
        z3 = tl.zeros([BLOCK_R, GROUPS, B], tl.float32)
        slot3 = tl.arange(0, A_P2)[None, None, :]
        picked = slot3 < 0  # which (row, group, slot) holds a pick
        ch_acc = tl.zeros([BLOCK_R, GROUPS, A_P2], tl.int32)
        g_acc = tl.zeros([BLOCK_R, GROUPS, A_P2], tl.float32)
        u_acc = tl.zeros([BLOCK_R, GROUPS, A_P2], tl.float32)
        for t in tl.static_range(A):
            best = tl.max(scores, axis=2)
            pos = tl.min(tl.where(scores == best[:, :, None], p3, B), axis=2)
            hit = p3 == pos[:, :, None]
            # A ragged last group of r < A channels runs out of candidates: its later picks are
            # -inf and are neither kept nor stored (their slots lie past the kept width).
            ok = (best > float("-inf")) & row_ok[:, None]
            scores = tl.where(hit, float("-inf"), scores)
            if POST_SILU:
                g_pick = tl.sum(tl.where(hit, g3, 0.0), axis=2)
            else:
                g_pick = tl.where(ok, best, 0.0)  # the scores are G itself
            u_pick = tl.sum(tl.where(hit, u3, 0.0), axis=2)
            _, s_pick, _ = _silu_parts(g_pick, ASM)
            z3 = tl.where(hit & ok[:, :, None], (s_pick * u_pick)[:, :, None], z3)
            at = slot3 == t
            picked = picked | (at & ok[:, :, None])
            ch_acc = tl.where(at, (groups[None, :] * B + pos)[:, :, None], ch_acc)
            g_acc = tl.where(at, g_pick[:, :, None], g_acc)
            u_acc = tl.where(at, u_pick[:, :, None], u_acc)
        compact3 = r[:, :, None] * s_c + groups[None, :, None] * A + slot3
        tl.store(IX + compact3, ch_acc.to(IX.dtype.element_ty), mask=picked)
        tl.store(GS + compact3, g_acc.to(GS.dtype.element_ty), mask=picked)
        tl.store(US + compact3, u_acc.to(US.dtype.element_ty), mask=picked)
        if STORE_SZ:
            _, s_acc, _ = _silu_parts(g_acc, ASM)
            tl.store(SS + compact3, s_acc.to(SS.dtype.element_ty), mask=picked)
            tl.store(ZS + compact3, (s_acc * u_acc).to(ZS.dtype.element_ty), mask=picked)
        tl.store(ZD + r[:, :, None] * s_zd + ch3, z3.to(ZD.dtype.element_ty), mask=valid3)

    @triton.jit
    def _group_backward_kernel(GZ, IX, GS, US, SS, ZS, BUF, n_rows, width, n_groups, kept, s_gz, s_c, s_buf,
                               A: tl.constexpr, B: tl.constexpr, STORED: tl.constexpr, ASM: tl.constexpr,
                               BLOCK_R: tl.constexpr, GROUPS: tl.constexpr):
        """Compact slots [j*A, j*A + A) belong to group j: each dense tile is written once, whole."""
        rows, row_ok, r, groups = _group_block(n_rows, n_groups, BLOCK_R, GROUPS)
        ch3 = groups[None, :, None] * B + tl.arange(0, B)[None, None, :]
        z3 = tl.zeros([BLOCK_R, GROUPS, B], tl.float32)
        gg3 = tl.zeros([BLOCK_R, GROUPS, B], tl.float32)
        gu3 = tl.zeros([BLOCK_R, GROUPS, B], tl.float32)
        for t in tl.static_range(A):
            slots = groups[None, :] * A + t
            ok = row_ok[:, None] & (slots < kept) & (groups < n_groups)[None, :]
            compact = r * s_c + slots
            ch = tl.load(IX + compact, mask=ok, other=-1).to(tl.int32)
            g = tl.load(GS + compact, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(US + compact, mask=ok, other=0.0).to(tl.float32)
            _, s, ds = _silu_parts(g, ASM)
            if STORED:
                s = tl.load(SS + compact, mask=ok, other=0.0).to(tl.float32)
                z = tl.load(ZS + compact, mask=ok, other=0.0).to(tl.float32)
            else:
                z = (s * u).to(BUF.dtype.element_ty).to(tl.float32)
            gz = tl.load(GZ + r * s_gz + tl.maximum(ch, 0), mask=ok, other=0.0).to(tl.float32)
            hit = ch3 == ch[:, :, None]  # ch is -1 where the slot is empty: no hit
            z3 = tl.where(hit, z[:, :, None], z3)
            gg3 = tl.where(hit, (u * gz * ds)[:, :, None], gg3)
            gu3 = tl.where(hit, (s * gz)[:, :, None], gu3)
        out = BUF + r[:, :, None] * s_buf + ch3
        ok3 = row_ok[:, None, None] & (ch3 < width)
        tl.store(out, z3.to(BUF.dtype.element_ty), mask=ok3)
        tl.store(out + width, gg3.to(BUF.dtype.element_ty), mask=ok3)
        tl.store(out + 2 * width, gu3.to(BUF.dtype.element_ty), mask=ok3)

    def _tuned(kernel, configs, key):
        return triton.autotune(configs=configs, key=key)(kernel)

    _ELEMENTWISE_CONFIGS = [
        triton.Config({"BLOCK_R": r, "BLOCK_F": f, "BLOCK_K": k}, num_warps=w)
        for r, f, k, w in ((2, 512, 128, 4), (4, 512, 128, 4), (8, 512, 128, 4), (8, 512, 128, 8),
                           (2, 1024, 256, 4), (4, 1024, 512, 4), (8, 1024, 512, 8))
    ]
    # (rows, groups, warps): the five fastest of sixteen settings each (H200, 32768 x 2736, 2:8,
    # stop 15: forward 0.207-0.216 ms, the rest up to 0.29; backward 0.214-0.216, the rest up to 0.234).
    _GROUP_FORWARD_CONFIGS = [
        triton.Config({"BLOCK_R": r, "GROUPS": g}, num_warps=w)
        for r, g, w in ((2, 32, 2), (1, 64, 2), (4, 32, 4), (1, 128, 4), (1, 64, 1))
    ]
    _GROUP_BACKWARD_CONFIGS = [
        triton.Config({"BLOCK_R": r, "GROUPS": g}, num_warps=w)
        for r, g, w in ((1, 128, 4), (1, 256, 8), (1, 64, 1), (1, 64, 2), (2, 128, 8))
    ]
    # (rows, 32-channel words) tiles.
    _MASK_CONFIGS = [
        triton.Config({"BLOCK_R": r, "WORDS": w}, num_warps=nw)
        for r, w, nw in ((1, 4, 2), (1, 2, 1), (1, 8, 1), (2, 8, 2), (4, 8, 4), (1, 8, 2), (2, 8, 4), (1, 4, 1),
                         (2, 4, 2), (1, 16, 2))
    ]
    # bench.train times them all; the autotuners choose among the fastest there (stop 14, H200): one
    # row of 8 or 16 words. With all ten, the forward's autotuner once kept a 7% slower one.
    _MASK_TUNED_CONFIGS = [c for c in _MASK_CONFIGS if c.kwargs["BLOCK_R"] == 1 and c.kwargs["WORDS"] >= 8]
    _mask_forward_tuned = _tuned(_mask_forward_kernel, _MASK_TUNED_CONFIGS, ["width", "STORE_SZ"])
    _mask_backward_tuned = _tuned(_mask_backward_kernel, _MASK_TUNED_CONFIGS, ["width", "STORED"])
    _scatter_forward_tuned = _tuned(_scatter_forward_kernel, _ELEMENTWISE_CONFIGS,
                                   ["width", "kept", "STORE_SZ", "WRITE_IX"])
    _scatter_backward_tuned = _tuned(_scatter_backward_kernel, _ELEMENTWISE_CONFIGS, ["width", "kept", "STORED"])
    _group_forward_tuned = _tuned(_group_forward_kernel, _GROUP_FORWARD_CONFIGS,
                                  ["width", "A", "B", "POST_SILU", "STORE_SZ"])
    _group_backward_tuned = _tuned(_group_backward_kernel, _GROUP_BACKWARD_CONFIGS, ["width", "kept", "A", "B", "STORED"])

# Small fixed blocks under the interpreter: autotuning there would only cost time.
# (still smaller than the tests' shapes, so ragged edges are exercised).
_INTERPRET_ELEMENTWISE = {"BLOCK_R": 8, "BLOCK_F": 32, "BLOCK_K": 8}
_INTERPRET_GROUP = {"BLOCK_R": 16, "GROUPS": 4}
_INTERPRET_MASK = {"BLOCK_R": 4, "WORDS": 1}


def _launch(tuned, kernel, interpret_meta, grid, *args, **constexprs):
    constexprs.setdefault("ASM", _asm(args[0].device))
    if interpreting():
        kernel[grid(interpret_meta)](*args, **constexprs, **interpret_meta)
    else:
        tuned[grid](*args, **constexprs)


def _rows_grid(n_rows):
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),)


def _group_grid(n_rows, n_groups):
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]) * triton.cdiv(n_groups, meta["GROUPS"]),)


def _check_rows(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"expected 2-D tensors with unit column stride, got shape {tuple(t.shape)} "
                             f"and strides {t.stride()}")


def scatter_forward(g: torch.Tensor, u: torch.Tensor, idx: torch.Tensor, index_dtype: torch.dtype,
                    store_sz: bool) -> ForwardPack:
    """Any kept-channel indices (rows x kept, any order): gather G and U there, fuse SiLU(G) * U,
    and write the compact tensors (in the order of `idx`) plus the dense Z' (rows x d_ffn, zero
    off the kept channels). Indices already of `index_dtype` and contiguous are kept as they
    are (the Top-K wrote them narrow) rather than copied."""
    require(g.device)
    _check_rows(g, u, idx)
    rows, width = g.shape
    kept = idx.shape[1]
    z_dense = torch.empty(rows, width, dtype=g.dtype, device=g.device)
    write_ix = not (idx.dtype == index_dtype and idx.is_contiguous())
    ix, gs, us, ss, zs = _compact_outputs(rows, kept, g, index_dtype if write_ix else None, store_sz)
    ix = ix if write_ix else idx  # WRITE_IX off: the kernel never stores through it
    _launch(_scatter_forward_tuned, _scatter_forward_kernel, _INTERPRET_ELEMENTWISE,
            _rows_grid(rows), g, u, idx, z_dense, ix, gs, us, ss, zs, rows, width, kept,
            g.stride(0), u.stride(0), idx.stride(0), z_dense.stride(0), kept, STORE_SZ=store_sz,
            WRITE_IX=write_ix)
    return ForwardPack(z_dense, ix, gs, us, ss if store_sz else None, zs if store_sz else None)


def group_forward(g: torch.Tensor, u: torch.Tensor, group: tuple[int, int], post_silu: bool,
                  index_dtype: torch.dtype, store_sz: bool) -> ForwardPack:
    """a:b groups selected in the kernel from G and U (b a power of two <= MAX_FUSED_GROUP);
    group j's kept channels at compact slots [j*a, j*a + a), best first."""
    require(g.device)
    _check_rows(g, u)
    if not group_fusable(group):
        raise ValueError(f"group {group} is not selected in-kernel: b must be a power of two <= {MAX_FUSED_GROUP}")
    a, b = group
    rows, width = g.shape
    kept = _group_kept(width, a, b)
    z_dense = torch.empty(rows, width, dtype=g.dtype, device=g.device)
    ix, gs, us, ss, zs = _compact_outputs(rows, kept, g, index_dtype, store_sz)
    _launch(_group_forward_tuned, _group_forward_kernel, _INTERPRET_GROUP, _group_grid(rows, triton.cdiv(width, b)),
            g, u, z_dense, ix, gs, us, ss, zs, rows, width, g.stride(0), u.stride(0), z_dense.stride(0), kept,
            A=a, A_P2=triton.next_power_of_2(a), B=b, POST_SILU=post_silu, STORE_SZ=store_sz)
    return ForwardPack(z_dense, ix, gs, us, ss if store_sz else None, zs if store_sz else None)


def _asm(device: torch.device) -> bool:
    """Whether kernels may use inline PTX (compiled for a CUDA device, not interpreted)."""
    return device.type == "cuda" and not interpreting()


def _mask_words(mask: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """A kept-channel bitmask (uint8, rows x 4 ceil(width / 32), as the row Top-K writes it) as
    the int32 words the kernels read."""
    if mask.dtype != torch.uint8 or mask.shape != (rows, mask_bytes(width)):
        raise ValueError(f"expected a uint8 bitmask of shape ({rows}, {mask_bytes(width)}), got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    return mask.contiguous().view(torch.int32)


def mask_forward(g: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, kept: int, store_sz: bool) -> ForwardPack:
    """The kept channels given as a bitmask of `kept` channels a row (see
    topk_triton.row_topk_mask): the compact tensors in ascending channel order, and the dense
    Z'. The pack's `idx` is the mask itself (what backward saves in place of indices)."""
    require(g.device)
    _check_rows(g, u)
    rows, width = g.shape
    words = _mask_words(mask, rows, width)
    z_dense = torch.empty(rows, width, dtype=g.dtype, device=g.device)
    _, gs, us, ss, zs = _compact_outputs(rows, kept, g, None, store_sz)
    _launch(_mask_forward_tuned, _mask_forward_kernel, _INTERPRET_MASK, _rows_grid(rows), g, u, words, z_dense,
            gs, us, ss, zs, rows, width, words.shape[1], g.stride(0), u.stride(0), words.stride(0),
            z_dense.stride(0), kept, STORE_SZ=store_sz)
    return ForwardPack(z_dense, mask, gs, us, ss if store_sz else None, zs if store_sz else None)


def mask_backward(grad_z: torch.Tensor, mask: torch.Tensor, g_sel: torch.Tensor, u_sel: torch.Tensor,
                  s_sel: Optional[torch.Tensor] = None, z_sel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """scatter_backward for compact tensors in ascending channel order whose kept channels are
    given as a bitmask (as mask_forward leaves them)."""
    require(grad_z.device)
    _check_rows(grad_z, g_sel, u_sel)
    rows, width = grad_z.shape
    words = _mask_words(mask, rows, width)
    buf = _backward_buffer(grad_z)
    stored = s_sel is not None
    dummy = g_sel.new_empty(1)
    _launch(_mask_backward_tuned, _mask_backward_kernel, _INTERPRET_MASK, _rows_grid(rows), grad_z, words, g_sel,
            u_sel, s_sel if stored else dummy, z_sel if stored else dummy, buf, rows, width, words.shape[1],
            grad_z.stride(0), words.stride(0), g_sel.stride(0), buf.stride(0), STORED=stored)
    return buf


def _group_kept(width: int, a: int, b: int) -> int:
    full, rest = divmod(width, b)
    return full * a + min(a, rest)


def _backward_buffer(grad_z: torch.Tensor) -> torch.Tensor:
    return torch.empty(grad_z.shape[0], 3 * grad_z.shape[1], dtype=grad_z.dtype, device=grad_z.device)


def scatter_backward(grad_z: torch.Tensor, idx: torch.Tensor, g_sel: torch.Tensor, u_sel: torch.Tensor,
                     s_sel: Optional[torch.Tensor] = None, z_sel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[Z' | grad_G' | grad_U'] (rows x 3 d_ffn) from grad_Z = grad_out W_down and the compact
    tensors, any index order (equations 7b, 7c on the kept channels, zero elsewhere)."""
    require(grad_z.device)
    _check_rows(grad_z, idx, g_sel, u_sel)
    rows, width = grad_z.shape
    buf = _backward_buffer(grad_z)
    stored = s_sel is not None
    dummy = g_sel.new_empty(1)
    _launch(_scatter_backward_tuned, _scatter_backward_kernel, _INTERPRET_ELEMENTWISE, _rows_grid(rows), grad_z, idx,
            g_sel, u_sel, s_sel if stored else dummy, z_sel if stored else dummy, buf, rows, width, idx.shape[1],
            grad_z.stride(0), idx.stride(0), buf.stride(0), STORED=stored)
    return buf


def group_backward(grad_z: torch.Tensor, idx: torch.Tensor, g_sel: torch.Tensor, u_sel: torch.Tensor,
                   group: tuple[int, int], s_sel: Optional[torch.Tensor] = None,
                   z_sel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """scatter_backward for compact tensors in group-slot order (as the grouped forwards write them)."""
    require(grad_z.device)
    _check_rows(grad_z, idx, g_sel, u_sel)
    a, b = group
    rows, width = grad_z.shape
    n_groups = triton.cdiv(width, b)
    kept = idx.shape[1]
    buf = _backward_buffer(grad_z)
    stored = s_sel is not None
    dummy = g_sel.new_empty(1)
    _launch(_group_backward_tuned, _group_backward_kernel, _INTERPRET_GROUP,
            _group_grid(rows, n_groups), grad_z, idx, g_sel, u_sel, s_sel if stored else dummy,
            z_sel if stored else dummy, buf, rows, width, n_groups, kept, grad_z.stride(0), idx.stride(0),
            buf.stride(0), A=a, B=b, STORED=stored)
    return buf
