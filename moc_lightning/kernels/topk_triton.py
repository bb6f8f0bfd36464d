"""Triton Top-K for MoC: the indices of the K largest scores of each row, or of each a:b group.

Row Top-K is a radix threshold select: every segment (a row, or one a:b group) is loaded once
into registers as float32 values; a bitwise binary search over the order-preserving integer
keys of the values finds the K-th largest, T, each step counting the values >= the candidate
(float compares and adds, the cheapest instructions, and one warp per row so the counts need no
barrier); one prefix scan then places the values above T and the first (K - #above) equal to
T, so exactly K distinct indices come out whatever the ties. Small groups (a <= 8) use a
cheaper kernel instead: a rounds of argmax per group, each round knocking out the winner.

Outputs are int64 (rows x kept; row Top-K can write int32 or int16 instead), the layout of
`moc_lightning.ffn.topk`'s torch backend: group g's picks sit at columns [g*a, g*a + min(a, r_g)),
the ragged last group's at the end.

The module imports without triton; the kernels are JIT-decorated on first use, in the mode
(compiled or TRITON_INTERPRET=1) in force then, so CPU tests can run them in the interpreter.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] is None: imports of it are blocked
        return False


# triton itself is imported on first use, not here: whether its own library functions run in the
# interpreter is fixed when it is imported, and importing this module (every `moc_lightning.ffn`
# import does) must not fix that for a test session that sets TRITON_INTERPRET=1 later.
HAS_TRITON = _triton_installed()
triton = None
tl = None

# A whole segment lives in one program's registers, and the scan packs two counts of up to
# BLOCK into one int32 (16 bits each): wider rows go to torch.topk (see `row_topk`).
MAX_BLOCK = 32768
# Groups with at most this many picks use the argmax-rounds kernel; more use the radix select.
MAX_ARGMAX_ROUNDS = 8
# Words of a bf16 row placed at a time (see `_bf16_pair_topk`): the fastest on an H200 of 64 to
# 512 (stop 13, H200: 0.177 ms at 128 against 0.230 at 64, 0.187 at 256 and 0.242 at 512).
PLACE_CHUNK = 128
# Registers per thread the word kernel may use. Stop 12's kernel took 168 uncapped (12 one-warp
# rows an SM, no warp ready 42% of the time) and ran best at 96. Today's needs 60 and the cap no
# longer binds: 64 to 128 time within 0.5%, and 255 (no cap) 6% slower (bench.topk --tune).
PAIR_MAXNREG = 96


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None where these kernels run on `device` (CUDA with triton, or CPU tensors under
    TRITON_INTERPRET=1, as the tests do), else one line saying why not."""
    device = torch.device(device)
    if not HAS_TRITON:
        return "triton is not installed (pip install triton; CUDA builds of PyTorch bring it)"
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return None
    return f"the triton Top-K kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), not on {device.type}"


def runs_on(device: torch.device) -> bool:
    return unavailable_reason(device) is None


def _segment_topk(bits_ptr, out_ptr, n_segments, segs_per_row, seg_width, k,
                  in_row_stride, in_col0, seg_in_stride, out_row_stride, out_col0, seg_out_stride,
                  FMT: tl.constexpr, SEGS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                  HAS_B: tl.constexpr, INT_COUNT: tl.constexpr):
    """SEGS segments per program; segment s is row s // segs_per_row, piece s % segs_per_row.

    A segment lives in registers as float32 values in two pieces, BLOCK_A then (if HAS_B)
    BLOCK_B channels, so a width like 2736 pads to 2048 + 1024 rather than 4096. FMT: 0 bf16,
    1 fp16, 2 fp32 (the raw bits come in as integers).
    """
    seg = tl.program_id(0) * SEGS + tl.arange(0, SEGS)
    row = (seg // segs_per_row).to(tl.int64)
    piece = seg % segs_per_row
    first_col = in_col0 + piece * seg_in_stride
    seg_base = row * in_row_stride + first_col
    seg_ok = seg < n_segments
    # Values as float32 (exact for every input type). NaN scores rank lowest, as -inf; padding
    # is NaN, which every comparison below rejects, so it is never counted nor kept.
    cols_a = tl.arange(0, BLOCK_A)
    valid_a = seg_ok[:, None] & (cols_a < seg_width)[None, :]
    bits_a = tl.load(bits_ptr + seg_base[:, None] + cols_a[None, :], mask=valid_a, other=0)
    if FMT == 0:
        x_a = (bits_a.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    elif FMT == 1:
        x_a = bits_a.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        x_a = bits_a.to(tl.float32, bitcast=True)
    x_a = tl.where(valid_a, tl.where(x_a != x_a, float("-inf"), x_a), float("nan"))
    if HAS_B:
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        valid_b = seg_ok[:, None] & (cols_b < seg_width)[None, :]
        bits_b = tl.load(bits_ptr + seg_base[:, None] + cols_b[None, :], mask=valid_b, other=0)
        if FMT == 0:
            x_b = (bits_b.to(tl.int32) << 16).to(tl.float32, bitcast=True)
        elif FMT == 1:
            x_b = bits_b.to(tl.float16, bitcast=True).to(tl.float32)
        else:
            x_b = bits_b.to(tl.float32, bitcast=True)
        x_b = tl.where(valid_b, tl.where(x_b != x_b, float("-inf"), x_b), float("nan"))

    # T = the largest order-preserving key t with #(x >= value(t)) >= k, built from the top bit
    # down. Keys are the IEEE bits with negatives' magnitude flipped and the sign moved, so key
    # order is value order; keys below -inf's (negative NaNs) stand for -inf. A loop, not
    # unrolled: the body is already long, and compiling 16 copies of it takes minutes.
    if FMT == 2:
        thr = (seg * 0).to(tl.int64)
        NBITS: tl.constexpr = 32
        NEG_INF_KEY: tl.constexpr = 0x007FFFFF
    else:
        thr = seg * 0
        NBITS: tl.constexpr = 16
        NEG_INF_KEY: tl.constexpr = 0x03FF if FMT == 1 else 0x007F
    value = thr.to(tl.float32)  # carried out of the loop: the threshold's value
    for i in range(NBITS + 1):
        # NBITS candidates, then (i == NBITS) the threshold itself, whose value is kept.
        cand = thr | tl.where(i < NBITS, (thr * 0 + 1) << tl.maximum(NBITS - 1 - i, 0), 0)
        key = tl.maximum(cand, NEG_INF_KEY)
        if FMT == 2:
            bits = key ^ tl.where(key >= 2147483648, 2147483648, 0xFFFFFFFF)
            value = bits.to(tl.int32).to(tl.float32, bitcast=True)
        else:
            bits = key ^ tl.where(key >= 0x8000, 0x8000, 0xFFFF)
            if FMT == 0:
                value = (bits << 16).to(tl.float32, bitcast=True)
            else:
                value = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        if i < NBITS:
            # Counted as float 1/0 flags (exact below 2**24; compare and add, one instruction
            # each) or as int32 flags (the compiler packs predicates and pop-counts them).
            if INT_COUNT:
                count = tl.sum((x_a >= value[:, None]).to(tl.int32), axis=1)
                if HAS_B:
                    count += tl.sum((x_b >= value[:, None]).to(tl.int32), axis=1)
            else:
                count = tl.sum(tl.where(x_a >= value[:, None], 1.0, 0.0), axis=1)
                if HAS_B:  # a second, independent chain of adds
                    count += tl.sum(tl.where(x_b >= value[:, None], 1.0, 0.0), axis=1)
            thr = tl.where(count >= k, cand, thr)
    t = value[:, None]

    # Keep the values above T and the first (k - #above) equal to T, in channel order. One scan
    # counts both: above T in the high 16 bits, equal to T in the low 16 bits.
    flags_a = (x_a > t).to(tl.int32) * 65536 + (x_a == t).to(tl.int32)
    totals = tl.sum(flags_a, axis=1)
    if HAS_B:
        flags_b = (x_b > t).to(tl.int32) * 65536 + (x_b == t).to(tl.int32)
        totals += tl.sum(flags_b, axis=1)
    need = (k - (totals >> 16))[:, None]
    out_base = (row * out_row_stride + out_col0 + piece * seg_out_stride)[:, None]
    scan = tl.cumsum(flags_a, axis=1)
    keep = ((flags_a >> 16) == 1) | (((flags_a & 1) == 1) & ((scan & 0xFFFF) <= need))
    pos = (scan >> 16) + tl.minimum(scan & 0xFFFF, need) - 1
    tl.store(out_ptr + out_base + pos, (first_col[:, None] + cols_a[None, :]).to(out_ptr.dtype.element_ty), mask=keep)
    if HAS_B:
        scan = tl.cumsum(flags_b, axis=1) + tl.sum(flags_a, axis=1)[:, None]
        keep = ((flags_b >> 16) == 1) | (((flags_b & 1) == 1) & ((scan & 0xFFFF) <= need))
        pos = (scan >> 16) + tl.minimum(scan & 0xFFFF, need) - 1
        tl.store(out_ptr + out_base + pos, (first_col[:, None] + cols_b[None, :]).to(out_ptr.dtype.element_ty), mask=keep)


# --- bf16 rows, two keys per 32-bit word ----------------------------------------------------
# A bf16 row is read as int32 words holding two adjacent channels (the even one in the low half).
# On sm_90 one `set.ge.u32.bf16x2` compares both halves of a word against the candidate and one
# add counts them (and REDUX sums a warp): the 16-round threshold search is about 1,570 warp
# instructions a row. The kernel issues instructions more than it moves bytes (ncu on an H200: SM
# 83% busy, DRAM 14%), so the placement is kept to one compare a word:
# - the search also yields #(x > t) and #(x >= t); where every value equal to t is kept, the kept
#   halves are those >= t; otherwise each chunk counts its ties against those still to keep, and
#   the chunk where they run out finds the last one kept (the cut) by a scan: halves before it
#   keep >= t, after it > t (>= the next bf16 value up);
# - a chunk is laid out (a lane's contiguous words, lanes), read with 16-byte loads where rows
#   align, so its slots take one warp scan, and the 2-byte index stores are inline PTX (see
#   `_store_where`).
# The row is placed a chunk at a time, read again from cache (the whole row at once held 255
# registers), under a register cap (PAIR_MAXNREG) so that many rows share an SM. From stop 12's
# kernel (0.258 ms at 32768 x 2736, K 512, int16 indices, H200) to this one (0.169 ms): 5,100 ->
# 3,500 warp instructions a row (BENCHMARKS.md, stop 13). Elsewhere (the CPU interpreter, older
# GPUs) the same words are compared as two float32 values: same results.

def _pair_ge(p, c, ASM: tl.constexpr):
    """0xFFFF in each 16-bit half of the result where that half of `p` is >= the bf16 value in
    the same half of `c`, 0 in the other halves."""
    if ASM:
        return tl.inline_asm_elementwise("set.ge.u32.bf16x2 $0, $1, $2;", "=r,r,r", [p, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    lo, hi = _pair_halves(p)
    c_lo, c_hi = _pair_halves(c)
    return tl.where(lo >= c_lo, 0xFFFF, 0) | tl.where(hi >= c_hi, -65536, 0)


def _pair_eq(p, c, ASM: tl.constexpr):
    """As `_pair_ge`, for halves equal to those of `c`."""
    if ASM:
        return tl.inline_asm_elementwise("set.eq.u32.bf16x2 $0, $1, $2;", "=r,r,r", [p, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    lo, hi = _pair_halves(p)
    c_lo, c_hi = _pair_halves(c)
    return tl.where(lo == c_lo, 0xFFFF, 0) | tl.where(hi == c_hi, -65536, 0)


def _pair_nan_to_neg_inf(p, ASM: tl.constexpr):
    """NaN halves become -inf (max.bf16x2 returns the other operand where one is NaN)."""
    if ASM:
        return tl.inline_asm_elementwise("max.bf16x2 $0, $1, $2;", "=r,r,r", [p, p * 0 - 8323200],
                                         dtype=tl.int32, is_pure=True, pack=1)
    lo = p & 0xFFFF
    hi = (p >> 16) & 0xFFFF
    lo = tl.where((lo & 0x7FFF) > 0x7F80, 0xFF80, lo)
    hi = tl.where((hi & 0x7FFF) > 0x7F80, 0xFF80, hi)
    return lo | (hi << 16)


def _pair_halves(p):
    """The low (even channel) and high (odd channel) bf16 halves of int32 words, as float32."""
    return (p << 16).to(tl.float32, bitcast=True), (p & -65536).to(tl.float32, bitcast=True)


def _key_bits(key):
    """The bf16 bits (in an int32) of an order-preserving 16-bit key; keys below -inf's (negative
    NaNs) stand for -inf."""
    key = tl.maximum(key, 0x007F)
    return key ^ tl.where(key >= 0x8000, 0x8000, 0xFFFF)


def _pair_threshold(p_a, p_b, k, HAS_B: tl.constexpr, ASM: tl.constexpr):
    """The k-th largest bf16 value t of one row held as words p_a (and p_b), NaN already -inf and
    padding -inf: the largest order-preserving 16-bit key with #(x >= value(key)) >= k, built from
    the top bit down. Returns t's bits, the bits of the next bf16 value up (x > t exactly where x
    >= it), #(x > t) and #(x >= t).

    The count: summing the compare words as int32 gives S = 0xFFFF*n_lo - 0x10000*n_hi (mod
    2**32), so -S = 0x10000*(n_hi - n_lo) + n_lo exactly (n_lo, n_hi < 2**15): n_lo is its low
    half, n_hi - n_lo its arithmetic high half. Padding (-inf) counts only for the candidate
    -inf, which every row's k values reach anyway. The last candidate refused is t's key + 1
    (t's bits below the refused one are all set), so its count is #(x > t); the last accepted
    one is t itself."""
    thr = k * 0
    above = k * 0
    at_or_above = k * 0
    for i in range(16):
        cand = thr | (1 << (15 - i))
        bits = _key_bits(cand)
        s = tl.sum(_pair_ge(p_a, bits | (bits << 16), ASM), axis=0)
        if HAS_B:
            s += tl.sum(_pair_ge(p_b, bits | (bits << 16), ASM), axis=0)
        ns = -s
        count = 2 * (ns & 0xFFFF) + (ns >> 16)
        ok = count >= k
        thr = tl.where(ok, cand, thr)
        above = tl.where(ok, above, count)
        at_or_above = tl.where(ok, count, at_or_above)
    return _key_bits(thr), _key_bits(tl.minimum(thr + 1, 0xFFFF)), above, at_or_above


def _store_where(ptr, value, flag, ASM: tl.constexpr):
    """ptr[...] = value where flag != 0. On sm_90 as inline PTX, an element-wise op that keeps the
    layout its operands have: Triton 3.6 gives tl.store's scattered pointers a layout of its own
    and moves pointers and masks into it through shared memory (SASS: about 40 instructions a
    chunk)."""
    if ASM:
        if value.dtype.primitive_bitwidth == 16:
            asm: tl.constexpr = "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p st.global.b16 [$1], $3; mov.b32 $0, 0; }"
            tl.inline_asm_elementwise(asm, "=r,l,r,h", [ptr.to(tl.int64, bitcast=True), flag, value],
                                      dtype=tl.int32, is_pure=False, pack=1)
        elif value.dtype.primitive_bitwidth == 32:
            asm: tl.constexpr = "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p st.global.b32 [$1], $3; mov.b32 $0, 0; }"
            tl.inline_asm_elementwise(asm, "=r,l,r,r", [ptr.to(tl.int64, bitcast=True), flag, value],
                                      dtype=tl.int32, is_pure=False, pack=1)
        else:
            asm: tl.constexpr = "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p st.global.b64 [$1], $3; mov.b32 $0, 0; }"
            tl.inline_asm_elementwise(asm, "=r,l,r,l", [ptr.to(tl.int64, bitcast=True), flag, value],
                                      dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(ptr, value, mask=flag != 0)


def _pair_row_threshold(base, n_pairs, k, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, HAS_B: tl.constexpr,
                        ASM: tl.constexpr):
    """`_pair_threshold` of the row at `base` (n_pairs words), loaded into registers."""
    w_a = tl.arange(0, BLOCK_A)
    # Padding is -inf in both halves: 0xFF80FF80 as a signed int32.
    p_a = _pair_nan_to_neg_inf(tl.load(base + w_a, mask=w_a < n_pairs, other=-8323200), ASM)
    p_b = p_a
    if HAS_B:
        w_b = BLOCK_A + tl.arange(0, BLOCK_B)
        p_b = _pair_nan_to_neg_inf(tl.load(base + w_b, mask=w_b < n_pairs, other=-8323200), ASM)
    return _pair_threshold(p_a, p_b, k, HAS_B, ASM)


def _scan_2d(n):
    """The exclusive prefix sums of n (VEC, LANES) in column-major order (word lane * VEC + i at
    [i, lane]), and its total. Lanes hold their VEC contiguous words in registers (16-byte loads
    where aligned), so one warp scan of the lane totals does it; a 1-d chunk spreads its words
    over the lanes and took a warp scan per register. (VEC, LANES) rather than (LANES, VEC): the
    default layout of the scattered index stores then matches the loads' (no shared-memory
    conversion between them)."""
    lane_total = tl.sum(n, axis=0)
    before = tl.cumsum(lane_total, axis=0) - lane_total
    return before[None, :] + tl.cumsum(n, axis=0) - n, tl.sum(lane_total, axis=0)


def _pair_chunk_cut(eq_lo, eq_hi, w, need):
    """The channel of the need-th value equal to t in a chunk of words w (need >= 1, and the
    chunk holds at least that many)."""
    before, _ = _scan_2d(eq_lo + eq_hi)
    cut_lo = (eq_lo == 1) & (before + 1 == need)
    cut_hi = (eq_hi == 1) & (before + eq_lo + 1 == need)
    cut = tl.where(cut_lo, 2 * w, tl.where(cut_hi, 2 * w + 1, 1 << 30))
    return tl.min(tl.min(cut, axis=0), axis=0)


def _bf16_pair_topk(words_ptr, out_ptr, n_pairs, k, in_row_stride, out_row_stride, mask_bytes,
                    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, HAS_B: tl.constexpr, ASM: tl.constexpr,
                    LANES: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr, MASK_OUT: tl.constexpr):
    """One row per program: its words in two register pieces (BLOCK_A, then BLOCK_B words) for
    the threshold search; then the kept values are placed a chunk of (VEC, LANES) words at a time,
    the row read again (from cache), one compare a word: halves >= t up to the last value equal
    to t that is kept (the `cut` channel), > t after it. Where some ties are dropped, each chunk
    also counts its ties against those still to keep; the chunk where they run out finds the cut
    by a scan. MASK_OUT: a bitmask of the kept channels instead of their indices (see
    `row_topk_mask`), one byte a lane (VEC = 4 words, 8 channels), mask_bytes a row."""
    row = tl.program_id(0).to(tl.int64)
    if ALIGNED:  # in_row_stride counts 4-word vectors: the compiler then knows rows start on 16 B
        base = words_ptr + row * (in_row_stride * 4)
    else:
        base = words_ptr + row * in_row_stride
    out = out_ptr + row * out_row_stride
    idx_ty = out_ptr.dtype.element_ty
    tb, ub, above, at_or_above = _pair_row_threshold(base, n_pairs, k, BLOCK_A, BLOCK_B, HAS_B, ASM)
    tt = tb | (tb << 16)
    uu = ub | (ub << 16)
    budget = k - above  # values equal to t still to keep
    all_ties_kept = at_or_above - above == budget
    offset = k * 0
    for w0 in range(0, n_pairs, LANES * VEC):
        start = w0 + tl.arange(0, LANES)[None, :] * VEC
        w = start + tl.arange(0, VEC)[:, None]
        if ALIGNED:  # whole lanes in or out (n_pairs is a multiple of VEC): 16-byte loads
            valid = start < n_pairs
        else:
            valid = w < n_pairs
        v = valid.to(tl.int32)
        p = _pair_nan_to_neg_inf(tl.load(base + w, mask=valid, other=0), ASM)
        cut = 2 * (w0 + LANES * VEC)  # no tie of this chunk dropped
        if not all_ties_kept:
            eq = _pair_eq(p, tt, ASM)
            eq_lo = eq & v
            eq_hi = (eq >> 16) & v
            ties = tl.sum(tl.sum(eq_lo + eq_hi, axis=0), axis=0)
            if ties > budget:
                if budget == 0:
                    cut = 2 * w0 - 1  # every half of the chunk needs > t
                else:
                    cut = _pair_chunk_cut(eq_lo, eq_hi, w, budget)
                budget = budget * 0
            else:
                budget -= ties
        cut_w = cut >> 1
        # The cut word: an even cut channel is its low half, so its high half needs > t.
        c_cut = tl.where((cut & 1) == 0, tb | (ub << 16), tt)
        ge = _pair_ge(p, tl.where(w < cut_w, tt, tl.where(w == cut_w, c_cut, uu)), ASM)
        keep_lo = ge & v
        keep_hi = (ge >> 16) & v
        if MASK_OUT:
            # No slots to count: the lane's 8 channels are one byte, bit i channel 8 * byte + i.
            tl.static_assert(VEC == 4)
            shift = 2 * tl.arange(0, VEC)[:, None]
            byte = tl.sum((keep_lo << shift) | (keep_hi << (shift + 1)), axis=0)
            at = (w0 + tl.arange(0, LANES) * VEC) // 4
            tl.store(out + at, byte.to(idx_ty), mask=at < mask_bytes)  # past the row: zero bits
        else:
            slot, kept = _scan_2d(keep_lo + keep_hi)
            slot += offset
            _store_where(out + slot, (2 * w).to(idx_ty), keep_lo, ASM)
            _store_where(out + slot + keep_lo, (2 * w + 1).to(idx_ty), keep_hi, ASM)
            offset += kept


def _group_argmax_topk(bits_ptr, out_ptr, width, n_groups, b, in_row_stride, out_row_stride,
                       KEY_BITS: tl.constexpr, A: tl.constexpr, A_P2: tl.constexpr, GROUPS: tl.constexpr,
                       BP2: tl.constexpr):
    """Program (row, tile) picks the A best of GROUPS groups by A rounds of argmax, and stores
    each group's picks as one contiguous run."""
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    lane = tl.arange(0, BP2)
    col = group[:, None] * b + lane[None, :]
    valid = (group < n_groups)[:, None] & (lane < b)[None, :] & (col < width)
    bits = tl.load(bits_ptr + row * in_row_stride + col, mask=valid, other=0)
    # Order-preserving integer key of IEEE sign-magnitude bits: flip the magnitude of negatives,
    # then shift the sign so every key is >= 0 (32-bit keys need int64 for that).
    if KEY_BITS == 16:
        bits = bits.to(tl.int32)
        key = (bits ^ ((bits >> 15) & 0x7FFF)) + 32768
    else:
        bits = bits.to(tl.int64)
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)) + 2147483648
    key = tl.where(valid, key, -1)  # below every real key
    # The ragged last group of r channels keeps min(A, r).
    picks = tl.minimum(tl.sum(valid.to(tl.int32), axis=1), A)
    slot = tl.arange(0, A_P2)
    picked = group[:, None] * 0 + slot[None, :] * 0
    for p in tl.static_range(A):
        best = tl.argmax(key, axis=1, tie_break_left=True)
        picked = tl.where(slot[None, :] == p, best[:, None], picked)
        key = tl.where(lane[None, :] == best[:, None], -1, key)
    tl.store(out_ptr + row * out_row_stride + group[:, None] * A + slot[None, :],
             (group[:, None] * b + picked).to(tl.int64), mask=(slot[None, :] < picks[:, None]) & (slot < A)[None, :])


_JIT_CACHE: dict[tuple[str, bool], object] = {}
# The plain functions the kernels call: `_kernel` rebinds these names to JIT-compiled versions.
_HELPERS = {f.__name__: f for f in (_pair_ge, _pair_eq, _pair_nan_to_neg_inf, _pair_halves, _key_bits,
                                    _pair_threshold, _pair_row_threshold, _scan_2d, _pair_chunk_cut, _store_where)}


def _import_triton() -> None:
    """Bind `triton` and `tl` in this module: the kernels see `tl` through their globals."""
    global triton, tl
    if tl is None:
        import triton as triton_module
        import triton.language as tl_module

        triton, tl = triton_module, tl_module


def _jit(fn):
    mode = (fn.__name__, interpreting())
    if mode not in _JIT_CACHE:
        _JIT_CACHE[mode] = triton.jit(fn)
    return _JIT_CACHE[mode]


def _kernel(fn):
    """`fn` JIT-compiled for the mode in force now (TRITON_INTERPRET is read when decorating),
    with the helpers it calls bound, under their own names, to their versions for that mode."""
    for name, helper in _HELPERS.items():
        globals()[name] = _jit(helper)
    return _jit(fn)


_FORMATS = {torch.bfloat16: (0, torch.int16), torch.float16: (1, torch.int16), torch.float32: (2, torch.int32)}


def _raw_bits(scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The scores' raw IEEE bits as an integer tensor (a view, no copy) and their format code."""
    if scores.dtype not in _FORMATS:
        raise TypeError(f"triton Top-K takes bf16, fp16 or fp32 scores, got {scores.dtype}")
    if scores.dim() != 2:
        raise ValueError(f"triton Top-K takes (rows, channels) scores, got shape {tuple(scores.shape)}")
    reason = unavailable_reason(scores.device)
    if reason is not None:
        raise RuntimeError(reason)
    _import_triton()
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    fmt, view = _FORMATS[scores.dtype]
    return scores.view(view), fmt


def split_blocks(width: int) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B) register pieces of a segment: width pads to one power of two, or to
    two (2048 + 1024 for 2736) when that pads less. BLOCK_B = 0: one piece."""
    block = triton.next_power_of_2(width)
    if block >= 4:
        half = block // 2
        rest = triton.next_power_of_2(width - half)
        if rest < half:
            return half, rest
    return block, 0


def _launch_config(padded: int) -> tuple[int, int]:
    """(segments per program, warps): one warp per segment up to ~128 values a thread (its
    reductions then need no barrier; the fastest setting timed on an H100 for 2736 channels,
    ahead of 2 and 4 warps), more warps for wider segments, many segments per program for small
    ones (a:b groups)."""
    if padded >= 1024:
        return 1, max(1, min(16, triton.next_power_of_2(triton.cdiv(padded, 4096))))
    return 1 << ((1024 // padded).bit_length() - 1), 1  # a power of two


def _launch_segments(bits: torch.Tensor, out: torch.Tensor, fmt: int, *, n_segments: int,
                     segs_per_row: int, seg_width: int, k: int, in_col0: int, seg_in_stride: int,
                     out_col0: int, seg_out_stride: int, segs_per_program: Optional[int] = None,
                     num_warps: Optional[int] = None, split: Optional[bool] = None,
                     int_count: bool = False) -> None:
    block_a, block_b = split_blocks(seg_width) if split is not False else (triton.next_power_of_2(seg_width), 0)
    default_segs, default_warps = _launch_config(block_a + block_b)
    segs = segs_per_program or default_segs
    grid = (triton.cdiv(n_segments, segs),)
    _kernel(_segment_topk)[grid](
        bits, out, n_segments, segs_per_row, seg_width, k,
        bits.stride(0), in_col0, seg_in_stride, out.stride(0), out_col0, seg_out_stride,
        FMT=fmt, SEGS=segs, BLOCK_A=block_a, BLOCK_B=max(block_b, 1), HAS_B=block_b > 0, INT_COUNT=int_count,
        num_warps=num_warps or default_warps)


def bf16_words(t: torch.Tensor) -> Optional[torch.Tensor]:
    """`t` (bf16, rows x channels) viewed as int32 words of two adjacent channels, or None where
    that view does not exist (other dtypes, an odd width, odd strides or offsets)."""
    if (t.dtype != torch.bfloat16 or t.dim() != 2 or t.shape[1] % 2 or t.stride(1) != 1
            or (t.shape[0] > 1 and t.stride(0) % 2) or t.storage_offset() % 2):
        return None
    return t.view(torch.int32)


def packed_compare_in_asm(device: torch.device) -> bool:
    """Whether the bf16x2 compares run as sm_90 PTX (`set.ge.u32.bf16x2`) on `device`; elsewhere
    the word kernels compare the two halves as float32 (the interpreter, older GPUs)."""
    device = torch.device(device)
    return device.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(device) >= (9, 0)


def mask_chunk(num_warps: int) -> int:
    """The placement chunk of the word kernel writing a bitmask: 4 words a lane (8 channels, one
    byte of the mask) in every lane."""
    return 4 * 32 * num_warps


def chunk_layout(chunk: int, num_warps: int) -> tuple[int, int]:
    """(LANES, VEC) of the word kernel's placement chunk: VEC contiguous words in each of LANES
    lanes."""
    vec = max(1, chunk // (32 * num_warps))
    return chunk // vec, vec


def _launch_pairs(words: torch.Tensor, out: torch.Tensor, k: int, num_warps: Optional[int],
                  chunk: Optional[int], maxnreg: Optional[int], mask_out: bool = False) -> None:
    n_pairs = words.shape[1]
    block_a, block_b = split_blocks(n_pairs)
    _, default_warps = _launch_config(2 * (block_a + block_b))
    num_warps = num_warps or default_warps
    if mask_out:
        chunk = mask_chunk(num_warps)
    chunk = PLACE_CHUNK if chunk is None else chunk
    if chunk <= 0 or chunk & (chunk - 1):
        raise ValueError(f"chunk = {chunk} must be a power of two")
    if maxnreg is not None and not 24 <= maxnreg <= 255:
        raise ValueError(f"maxnreg = {maxnreg} must be in [24, 255] registers a thread")
    lanes, vec = chunk_layout(chunk, num_warps)
    # 16-byte loads where each lane's words are whole aligned vectors.
    aligned = vec % 4 == 0 and n_pairs % vec == 0 and words.stride(0) % 4 == 0 and words.data_ptr() % 16 == 0
    _kernel(_bf16_pair_topk)[(words.shape[0],)](
        words, out, n_pairs, k, words.stride(0) // 4 if aligned else words.stride(0), out.stride(0), out.shape[1],
        BLOCK_A=block_a, BLOCK_B=max(block_b, 1), HAS_B=block_b > 0,
        ASM=packed_compare_in_asm(words.device), LANES=lanes, VEC=vec, num_warps=num_warps,
        ALIGNED=aligned, MASK_OUT=mask_out,
        **({} if interpreting() or maxnreg is None else {"maxnreg": maxnreg}))


INDEX_DTYPES = (torch.int64, torch.int32, torch.int16)


def _check_out_dtype(out_dtype: torch.dtype, width: int) -> None:
    if out_dtype not in INDEX_DTYPES:
        raise ValueError(f"out_dtype must be one of {', '.join(map(str, INDEX_DTYPES))}, got {out_dtype}")
    if width - 1 > torch.iinfo(out_dtype).max:
        raise ValueError(f"{out_dtype} cannot hold channel indices up to {width - 1}")


def row_topk(scores: torch.Tensor, k: int, *, segs_per_program: Optional[int] = None,
             num_warps: Optional[int] = None, split: Optional[bool] = None, int_count: bool = False,
             packed: Optional[bool] = None, chunk: Optional[int] = None, maxnreg: Optional[int] = None,
             out_dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Indices (rows x k, int64 unless out_dtype says narrower) of the k largest scores of each
    row (NaN ranks as -inf), in ascending channel order within each row (among equal scores the
    lowest channels, as a stable sort would pick). Rows wider than MAX_BLOCK channels do not fit
    one program and go to torch.topk, sorted.

    bf16 rows of an even width take the two-keys-per-word kernel unless packed=False (a
    launch setting other than num_warps, chunk and maxnreg also selects the float32 kernel);
    chunk is its placement's width in words (None: PLACE_CHUNK), maxnreg a cap on its registers
    per thread (None: PAIR_MAXNREG)."""
    bits, fmt = _raw_bits(scores)
    rows, width = scores.shape
    if not 1 <= k <= width:
        raise ValueError(f"k = {k} must be in [1, {width}] (the row width)")
    _check_out_dtype(out_dtype, width)
    if width > MAX_BLOCK:
        return torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values.to(out_dtype)
    out = torch.empty(rows, k, dtype=out_dtype, device=scores.device)
    if rows == 0:
        return out
    words = bf16_words(scores)
    if packed and words is None:
        raise ValueError("packed=True takes bf16 rows of an even width with even strides")
    if packed is None:
        packed = words is not None and segs_per_program is None and split is None and not int_count
    if packed:
        _launch_pairs(words, out, k, num_warps, chunk, PAIR_MAXNREG if maxnreg is None else maxnreg)
        return out
    _launch_segments(bits, out, fmt, n_segments=rows, segs_per_row=1, seg_width=width, k=k,
                     in_col0=0, seg_in_stride=0, out_col0=0, seg_out_stride=0,
                     segs_per_program=segs_per_program, num_warps=num_warps, split=split,
                     int_count=int_count)
    return out


def mask_bytes(width: int) -> int:
    """Bytes a row of a kept-channel bitmask takes: whole int32 words (kernels read it so)."""
    return 4 * ((width + 31) // 32)


def mask_from_indices(idx: torch.Tensor, width: int) -> torch.Tensor:
    """The bitmask (uint8, rows x mask_bytes(width)) of the channels `idx` (rows x kept) lists:
    bit i of byte j is channel 8 j + i (little-endian, so bit b of int32 word w is channel
    32 w + b); bits past the row are zero."""
    rows = idx.shape[0]
    bits = torch.zeros(rows, 8 * mask_bytes(width), dtype=torch.uint8, device=idx.device)
    bits.scatter_(1, idx.long(), 1)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=idx.device)
    return (bits.view(rows, -1, 8) * weights).sum(dim=2, dtype=torch.uint8)


def mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """Every bit of a bitmask, padding past the row included, as 0/1 (uint8, rows x 8 bytes)."""
    bits = (mask.unsqueeze(2) >> torch.arange(8, dtype=torch.uint8, device=mask.device)) & 1
    return bits.view(mask.shape[0], -1)


def mask_to_dense(mask: torch.Tensor, width: int) -> torch.Tensor:
    """The kept channels of a bitmask as a dense bool tensor (rows x width): True where kept."""
    return mask_bits(mask)[:, :width].bool()


def row_topk_mask(scores: torch.Tensor, k: int, *, num_warps: Optional[int] = None,
                  maxnreg: Optional[int] = None) -> torch.Tensor:
    """The k largest scores of each row (NaN ranks as -inf; among equal scores the lowest
    channels, as `row_topk`) as a bitmask, uint8 rows x mask_bytes(width) (see
    `mask_from_indices`): what MoC's mask kernels read in place of indices (a third of int16
    indices' bytes at K 512 of 2736). bf16 rows of an even width are written by the word
    kernel directly, with no slots to count; other rows go through `row_topk`'s indices."""
    _raw_bits(scores)  # the dtype, shape and device checks
    rows, width = scores.shape
    words = bf16_words(scores)
    if words is None or width > MAX_BLOCK:
        return mask_from_indices(row_topk(scores, k, num_warps=num_warps), width)
    if not 1 <= k <= width:
        raise ValueError(f"k = {k} must be in [1, {width}] (the row width)")
    out = torch.empty(rows, mask_bytes(width), dtype=torch.uint8, device=scores.device)
    if rows:
        _launch_pairs(words, out.view(torch.int8), k, num_warps, None,
                      PAIR_MAXNREG if maxnreg is None else maxnreg, mask_out=True)
    return out


def group_topk(scores: torch.Tensor, a: int, b: int, *, groups_per_program: Optional[int] = None,
               num_warps: Optional[int] = None) -> torch.Tensor:
    """Indices (int64, rows x kept) of the a largest of every b contiguous channels of each row;
    the last, shorter group of r channels keeps min(a, r). Group g's picks are columns g*a.."""
    rows, width = scores.shape
    if not 1 <= a <= b:
        raise ValueError(f"group a:b = {a}:{b} needs 1 <= a <= b")
    full, rest = divmod(width, b)
    kept = full * a + min(a, rest)
    bits, fmt = _raw_bits(scores)
    out = torch.empty(rows, kept, dtype=torch.int64, device=scores.device)
    if rows == 0:
        return out
    bp2 = triton.next_power_of_2(b)
    if a <= MAX_ARGMAX_ROUNDS and bp2 <= 128:
        n_groups = full + (1 if rest else 0)
        # 32 groups of 8 a one-warp program: the fastest of the settings timed on an H100
        # (moc_lightning.bench.topk --tune), tied with 64.
        groups = groups_per_program or max(1, min(triton.next_power_of_2(n_groups), 256 // bp2))
        grid = (rows, triton.cdiv(n_groups, groups))
        _kernel(_group_argmax_topk)[grid](
            bits, out, width, n_groups, b, bits.stride(0), out.stride(0),
            KEY_BITS=32 if fmt == 2 else 16, A=a, A_P2=triton.next_power_of_2(a), GROUPS=groups, BP2=bp2,
            num_warps=num_warps or 1)
        return out
    if b > MAX_BLOCK:
        return torch.cat([torch.topk(scores[:, g * b:(g + 1) * b], min(a, width - g * b), dim=-1, sorted=False).indices + g * b
                          for g in range(full + (1 if rest else 0))], dim=1)
    if full:
        _launch_segments(bits, out, fmt, n_segments=rows * full, segs_per_row=full, seg_width=b, k=a,
                         in_col0=0, seg_in_stride=b, out_col0=0, seg_out_stride=a,
                         segs_per_program=groups_per_program, num_warps=num_warps)
    if rest:
        _launch_segments(bits, out, fmt, n_segments=rows, segs_per_row=1, seg_width=rest, k=min(a, rest),
                         in_col0=full * b, seg_in_stride=0, out_col0=full * a, seg_out_stride=0)
    return out
