"""Triton decode kernels for the MoC FFN: 1 to 8 tokens per step, only the kept channels' up and
down weights read from memory.

    out[t] = sum over kept channels c of  SiLU(G[t, c]) * (x[t] . W_up[c]) * W_down^T[c]

Weights are channel-major: W_gate and W_up as nn.Linear holds them, (d_ffn, d) rows, and the
down projection transposed once, W_down^T (d_ffn, d), so a kept channel's down row is contiguous.

Row Top-K (k per token), three or four launches, each program writing only its own outputs (no
program waits on or reads what another wrote in the same launch, so there is nothing to race;
the one exception, a one-token call's threshold hint for the next call, steers only which
histogram bins are loaded early, never the result):
  1. `_gate_kernel`: G = x W_gate^T split over the channel blocks of many programs (all SMs), G
     written as float32 (tokens x d_ffn, a few KB), and a histogram of the rank keys' top bytes;
     16-bit keys also count in a fine histogram, one bin per key, and are written too (2 bytes a
     channel) for the ties.
  2. `_select_kernel` (tokens > 1): per token, the k-th largest rank key T and, where keys tie at
     T, the index up to which tied channels are kept, so exactly k are kept. 16-bit keys read T
     off the two histograms (two 1 KB loads); 32-bit keys take radix rounds over G's keys.
     With one token this select runs inside every updown program instead (one launch less): each
     reads T off the histograms and ranks its own block's channels tied at T after the tied ones
     the keys row has before the block (a count; bf16 G ties at T in practically every call).
  3. `_updown_kernel`: each program takes a block of channels, keeps those any token selected (the
     union: each needed row is read once per step), computes z = SiLU(G) * (x . W_up[c]) for the
     tokens that selected c, and writes its partial sum of z * W_down^T[c] (float32, tokens x d).
  4. `_finish_kernel`: adds the partials in a fixed order (the output is deterministic), casts to
     the model's dtype, and zeroes the histograms for the next call.
Grouped a:b Top-K needs no global select: `_updown_kernel` computes its block's G itself (blocks
are whole groups) and ranks channels inside each group, so MoC_a:b is two launches.

An earlier version let the last program of a launch (an atomic ticket) finish the sum and clear
the buffers; on an H100 it gave a wrong row in about 1 of 40 bf16 calls, a race this layout rules
out by construction. On sm_90 the launches may be chained by programmatic dependent launch
(`LaunchConfig.pdl`): each waits for the previous one to finish before it touches memory, so
only the gap between launches goes. Stop 16 also built and timed on an H200 (commits 979ec40 and
1f5d23b; correct in every check, then taken out): the finish inside the up/down launch behind a
grid barrier (cooperative launch), the gate there too for one token (one launch), and a:b
partials added with float32 atomics by the up/down programs, the last one writing the output.
None was faster than these chained launches (row Top-K 21.6-26.3 against 22.4 us; a:b 12.3 and
12.6 against 11.3 us): in-kernel timestamps showed the barriers costing what the launch gaps did,
and the one launch's gate, on one or two programs an SM, slower than the gate kernel's 1366.

Ranking follows `moc_lightning.ffn.topk`: pre_silu ranks by G, post_silu by |SiLU(G)|, with G first
rounded to the model's dtype (as the plain path ranks bf16 G). With 16-bit dtypes and pre_silu the
rank keys are the 16-bit patterns of G, otherwise 32-bit; ties at the threshold go to the lowest
channel index. Scratch buffers (`DecodeScratch`, one per shape and device shared by all layers)
are allocated once and reused, so a decode step can be captured in a CUDA graph; they serve one
stream at a time.

The module imports without triton; kernels are JIT-decorated on first use, in the mode in force
then (compiled, or TRITON_INTERPRET=1 for CPU tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from moc_lightning.kernels.runtime import HAS_PDL, HAS_TRITON, ModeJit, interpreting, pdl_runs_on, runs_on

try:
    import triton
    import triton.language as tl

    if HAS_PDL:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # the package still imports; `runs_on` answers False everywhere
    triton = None
    tl = None

# tl.topk (Triton 3.4+) picks one token's slots; older Tritons take the one-hot match of batches 2-8.
HAS_TOPK = HAS_TRITON and hasattr(tl, "topk")
# Tokens per step the kernels take (a decode batch); more rows go to the plain path.
MAX_ROWS = 8
# A token's whole G row is held by one program in the select: d_ffn up to this many channels.
MAX_SELECT_WIDTH = 32768
_ROUNDING = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# --- device functions --------------------------------------------------------------------------


def _rank_score(g, ROUND: tl.constexpr, POST_SILU: tl.constexpr):
    """What channels are ranked by, in float32: G rounded to the model's dtype, or |SiLU| of it."""
    if ROUND == 1:
        g = g.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        g = g.to(tl.float16).to(tl.float32)
    if POST_SILU:
        g = tl.abs(g * tl.sigmoid(g))
    return g


def _rank_key(score, ROUND: tl.constexpr, KEY16: tl.constexpr):
    """An integer key >= 0 ordered like the score: IEEE sign-magnitude bits with the magnitude of
    negatives flipped and the sign bit moved up. 16-bit keys for 16-bit scores, else 32-bit (in
    int64, to stay non-negative)."""
    if KEY16:
        if ROUND == 1:
            bits = score.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
        else:
            bits = score.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        key = (bits ^ ((bits >> 15) & 0x7FFF)) + 32768
    else:
        wide = score.to(tl.int32, bitcast=True).to(tl.int64)
        key = (wide ^ ((wide >> 31) & 0x7FFFFFFF)) + 2147483648
    return key


def _tie_cut(tied, need, offs, N_PAD: tl.constexpr):
    """The channel of the `need`-th tied key (those up to it are kept)."""
    rank = tl.cumsum(tied.to(tl.int32), axis=0)
    return tl.min(tl.where(tied & (rank == need), offs, N_PAD), axis=0)


def _row_threshold(g_row_ptr, key_row_ptr, hist, fine_guess, guess_top, fine_row_ptr, F, K, B0, W: tl.constexpr,
                   N_PAD: tl.constexpr, ROUND: tl.constexpr, POST_SILU: tl.constexpr, KEY16: tl.constexpr,
                   RADIX_BITS: tl.constexpr):
    """Threshold of one token's Top-K: the k-th largest key T, and the channel index up to which
    channels whose key equals T are kept, so that exactly K are kept. Returns (T, cut); the cut is
    right for the channels of the window [B0, B0 + W) (the whole row: B0 = 0, W = N_PAD).

    T's top byte comes from `hist`, the token's histogram of key top bytes (256 bins, loaded by
    the caller) the gate kernel's programs built with atomics (in an earlier launch;
    `_finish_kernel` zeroes it). 16-bit keys: the low byte comes from the fine histogram (one bin
    per key), 256 bins under the top byte, so T is two 1 KB loads and two scans; `fine_guess` is
    the caller's early load of the bins under top byte `guess_top` (-1: no guess), which saves the
    second load when the guess is right. Where keys tie at T beyond what K takes, the window's own
    tied channels are ranked after those the keys row (the gate kernel's, 2 bytes a channel) has
    before B0: a count, not a scan of the row. 32-bit keys: the lower bits are searched over G's keys, a
    CTA-wide count per RADIX_BITS round."""
    bins = tl.arange(0, 256)
    if KEY16:  # the key loads first, in flight with the histograms' (only ties need them)
        offs = tl.arange(0, N_PAD)
        before = offs < B0
        win = B0 + tl.arange(0, W)
        win_ok = win < F
        keys_before = tl.load(key_row_ptr + offs, mask=before, other=0).to(tl.int32) & 0xFFFF
        keys_win = tl.load(key_row_ptr + win, mask=win_ok, other=0).to(tl.int32) & 0xFFFF
    # Every CTA-wide scan or reduction is a shared-memory round with barriers (two each, on 4
    # warps), and the threshold is a chain of them, so each step below is one scan and one sum
    # of a packed value: since the suffix counts fall with the bin, the bins whose count reaches
    # K are exactly bins 0..top, so top = their number - 1 and the keys above top are the other
    # bins' sum (the count below 2^20, as F <= MAX_SELECT_WIDTH). 25 barriers, not 40 (stop 18).
    at_or_above = tl.cumsum(hist, axis=0, reverse=True)  # #keys whose top byte >= bin
    packed = tl.sum(tl.where(at_or_above >= K, 1 << 20, hist), axis=0)
    top = (packed >> 20) - 1
    if KEY16:
        above_top = packed & 0xFFFFF
        if top == guess_top:  # the guessed bins are the right ones: one round trip less
            fine = fine_guess
        else:
            fine = tl.load(fine_row_ptr + top * 256 + bins)
        fine_at_or_above = above_top + tl.cumsum(fine, axis=0, reverse=True)
        # bins reaching K (low = their number - 1), those passing K, and the keys above low
        packed = tl.sum(tl.where(fine_at_or_above >= K, (1 << 40) + ((fine_at_or_above > K).to(tl.int64) << 20),
                                 fine.to(tl.int64)), axis=0)
        low = (packed >> 40).to(tl.int32) - 1
        thr = top * 256 + low
        cut = F
        if ((packed >> 20) & 0xFFFFF) == (packed >> 40):  # bin low passes K too: ties at T, keep the first
            need = K - above_top - (packed & 0xFFFFF).to(tl.int32)  # `need` of them; from B0 on, `rest`
            rest = need - tl.sum((before & (keys_before == thr)).to(tl.int32), axis=0)
            cut = tl.where(rest > 0, _tie_cut(win_ok & (keys_win == thr), rest, win, N_PAD), -1)
    else:
        offs = tl.arange(0, N_PAD)
        ok = offs < F
        g = tl.load(g_row_ptr + offs, mask=ok, other=0.0)
        key = _rank_key(_rank_score(g, ROUND, POST_SILU), ROUND, KEY16)
        # T = the largest t with #(key >= t) >= K: the top byte, then RADIX_BITS bits a round.
        thr = (tl.min(key, axis=0) * 0 + top) << 24  # the key's type (int64 keys: no overflow)
        for i in tl.static_range(24 // RADIX_BITS):
            shift = 24 - RADIX_BITS * (i + 1)
            best = thr * 0
            for digit in tl.static_range(1, 1 << RADIX_BITS):
                cand = thr | ((thr * 0 + digit) << shift)
                count = tl.sum((ok & (key >= cand)).to(tl.int32), axis=0)
                best = tl.where(count >= K, digit, best)
            thr = thr | (best << shift)
        above = ok & (key > thr)
        tied = ok & (key == thr)
        need = K - tl.sum(above.to(tl.int32), axis=0)
        cut = F
        if tl.sum(tied.to(tl.int32), axis=0) > need:  # ties at T: keep the first `need` of them
            cut = _tie_cut(tied, need, offs, N_PAD)
    return thr, cut


def _after_previous(PDL: tl.constexpr):
    """Programmatic dependent launch (sm_90): wait until the previous launch has finished and its
    writes are visible, then let the next launch be scheduled. Each launch waits before touching
    memory, so the order is the stream's; what is saved is the gap between dependent launches."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def _x_dot_tile(xv, w, T: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """(T, R) float32 = xv (T, BLOCK_D) . w (R, BLOCK_D)^T."""
    if USE_DOT:  # tensor cores; T is padded to 16 tokens
        if IEEE:
            out = tl.dot(xv, tl.trans(w), input_precision="ieee")
        else:
            out = tl.dot(xv, tl.trans(w))
    elif T == 1:
        out = tl.sum(w.to(tl.float32) * xv.to(tl.float32), axis=1)[None, :]
    else:
        out = tl.sum(xv.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return out


def _z_dot_tile(z, w, T: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """(T, BLOCK_D) float32 = z (T, R) . w (R, BLOCK_D)."""
    if USE_DOT:
        if IEEE:
            out = tl.dot(z.to(w.dtype), w, input_precision="ieee")
        else:
            out = tl.dot(z.to(w.dtype), w)
    elif T == 1:
        out = tl.sum(tl.sum(z, axis=0)[:, None] * w.to(tl.float32), axis=0)[None, :]
    else:
        out = tl.sum(z[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return out


def _x_dot_tile_by_token(x_ptr, w, cols, col_ok, B, D, T: tl.constexpr, R: tl.constexpr):
    """(T, R) float32 = x[:, cols] . w (R, cols)^T on CUDA cores a token at a time: a (T, R, cols)
    product in registers spills at T 4-8 with whole 2048-wide rows (sm_90)."""
    tok = tl.arange(0, T)
    out = tl.zeros((T, R), dtype=tl.float32)
    for t in tl.static_range(T):
        xt = tl.load(x_ptr + t * D + cols, mask=col_ok & (cols * 0 + t < B), other=0.0)
        one = (B > t).to(w.dtype)  # 1 (0 past B): keeps the float32 copy of w per token, not hoisted
        out = tl.where(tok[:, None] == t, tl.sum((w * one).to(tl.float32) * xt.to(tl.float32)[None, :], axis=1)[None, :], out)
    return out


def _rows_times_x(x_ptr, w_ptr, rows, row_ok, tok, tok_ok, B, D, T: tl.constexpr, R: tl.constexpr,
                  BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr, STAGES: tl.constexpr):
    """acc[t, r] = x[tok[t]] . w[rows[r]] in float32, (T, R), tok = 0..T-1 (those < B real). Rows
    masked off are never read. STAGES: the column tiles' loads pipelined that deep (None: Triton's choice)."""
    acc = tl.zeros((T, R), dtype=tl.float32)
    row_base = rows.to(tl.int64) * D
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        w = tl.load(w_ptr + row_base[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if T > 1 and not USE_DOT:  # a token at a time: the (T, R, BLOCK_D) product's gate was slower (H200,
            acc += _x_dot_tile_by_token(x_ptr, w, cols, col_ok, B, D, T, R)  # batch 2: 11.4 against 9.8 us)
        else:
            xv = tl.load(x_ptr + tok[:, None] * D + cols[None, :], mask=tok_ok[:, None] & col_ok[None, :], other=0.0)
            acc += _x_dot_tile(xv, w, T, USE_DOT, IEEE)
    return acc


def _add_down_rows(z, wdt_ptr, part, first, rows, row_ok, tok, tok_ok, D, T: tl.constexpr,
                   BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """part[tok[t]] (+)= sum_r z[t, r] * wdt[rows[r]]: the program's own partial (no other program
    touches it), written on its first slot round (first == 0) and added to on later ones."""
    row_base = rows.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        w = tl.load(wdt_ptr + row_base[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        at = part + tok[:, None] * D + cols[None, :]
        ok = tok_ok[:, None] & col_ok[None, :]
        prev = tl.load(at, mask=ok & (first > 0), other=0.0)
        tl.store(at, prev + _z_dot_tile(z, w, T, USE_DOT, IEEE), mask=ok)
    tl.debug_barrier()  # the next round reads what this one wrote


def _top_slots(take, ch, g, R: tl.constexpr):
    """One token: the first R channels of `take` (lowest first) as slots: (rows, their G, slot
    holds one), rows 0 past the taken ones. A bitonic top-R of a key that ranks the taken channels
    first and carries G along, a few shuffles a step (a one-hot (R, BLOCK_C) match, as several
    tokens do, took a third of the batch-1 row phase's ~2,900 instructions a thread, stop 17's
    SASS). Channels < 2^29."""
    g_bits = tl.sum(g, axis=0).to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    top = tl.topk(tl.where(take, 1 << 62, 0) | (((1 << 29) - ch).to(tl.int64) << 32) | g_bits, R)
    held = top >= (1 << 62)
    rows = tl.where(held, (1 << 29) - ((top >> 32) & ((1 << 30) - 1)), 0).to(tl.int32)
    return rows, (top & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True), held


def _whole_rows(wu_ptr, wdt_ptr, rows, D, BLOCK_D: tl.constexpr, EXACT_D: tl.constexpr):
    """The R slots' whole up and down rows (R, BLOCK_D), both requested before any math (one round
    trip). Slots past the kept rows read row 0 (the caller leaves rows 0 there) and the caller's sel
    zeroes them, so the loads need no row mask; with EXACT_D (D == BLOCK_D) no column mask either.
    A mask costs a predicate and a select per loaded value, and a thread holds hundreds."""
    cols = tl.arange(0, BLOCK_D)
    at = rows.to(tl.int64)[:, None] * D + cols[None, :]
    if EXACT_D:
        return tl.load(wu_ptr + at), tl.load(wdt_ptr + at)
    col_ok = cols < D
    return (tl.load(wu_ptr + at, mask=col_ok[None, :], other=0.0),
            tl.load(wdt_ptr + at, mask=col_ok[None, :], other=0.0))


def _updown_rows(x_ptr, wu_ptr, wdt_ptr, part, acc, first, rows, row_ok, g, sel, tok, tok_ok, B, D, T: tl.constexpr,
                 R: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr, EXACT_D: tl.constexpr,
                 USE_DOT: tl.constexpr, IEEE: tl.constexpr, STAGES: tl.constexpr = None):
    """(SiLU(g) * (x . W_up[rows]) where sel) . W_down^T[rows] for R rows (g, sel: (T, R)): added
    to acc (T, BLOCK_D) when one tile holds the whole width (SINGLE), else to the partial in memory."""
    if SINGLE:
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        wu, wd = _whole_rows(wu_ptr, wdt_ptr, rows, D, BLOCK_D, EXACT_D)
        xv = tl.load(x_ptr + tok[:, None] * D + cols[None, :], mask=tok_ok[:, None] & col_ok[None, :], other=0.0)
        z = tl.where(sel, g * tl.sigmoid(g) * _x_dot_tile(xv, wu, T, USE_DOT, IEEE), 0.0)
        acc += _z_dot_tile(z, wd, T, USE_DOT, IEEE)
    else:
        u = _rows_times_x(x_ptr, wu_ptr, rows, row_ok, tok, tok_ok, B, D, T, R, BLOCK_D, USE_DOT, IEEE, STAGES)
        z = tl.where(sel, g * tl.sigmoid(g) * u, 0.0)
        _add_down_rows(z, wdt_ptr, part, first, rows, row_ok, tok, tok_ok, D, T, BLOCK_D, USE_DOT, IEEE)
    return acc


def _updown_rows_by_token(x_ptr, wu_ptr, wdt_ptr, part, acc, first, rows, g, sel, B, D, T: tl.constexpr,
                          R: tl.constexpr, BLOCK_D: tl.constexpr, EXACT_D: tl.constexpr, ACC_REGS: tl.constexpr):
    """Several tokens on CUDA cores, whole rows (d_model <= BLOCK_D): both R-row tiles requested
    at once, as one token does, then a token at a time: its up dot, and its share of the down
    partial. ACC_REGS: the partial stays in acc (T, BLOCK_D) across the rounds (few tokens), else
    each token's share is added in memory. A (T, R, BLOCK_D) product in registers spills (0.3-12.5
    KB a thread at T 2-8, sm_90), and tensor cores pad the tokens to 16 and loop over narrow column
    tiles whose loads wait on one another (stop 15: 31-42 us for the up/down at batch 2-8 against
    a 3.6-8.5 us floor). Each tile's float32 copy is made per token (times the token's 0 or 1, which
    the compiler cannot hoist): hoisted, both copies stay live and spill. g, sel: (T, R)."""
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    wu, wd = _whole_rows(wu_ptr, wdt_ptr, rows, D, BLOCK_D, EXACT_D)
    tok = tl.arange(0, T)
    z = tl.where(sel, g * tl.sigmoid(g) * _x_dot_tile_by_token(x_ptr, wu, cols, col_ok, B, D, T, R), 0.0)
    for t in tl.static_range(T):
        z_t = tl.sum(tl.where(tok[:, None] == t, z, 0.0), axis=0)
        contrib = tl.sum(z_t[:, None] * (wd * (B > t).to(wd.dtype)).to(tl.float32), axis=0)
        if ACC_REGS:
            acc = tl.where(tok[:, None] == t, acc + contrib[None, :], acc)
        else:
            dst = part + t * D + cols
            ok = col_ok & (cols * 0 + t < B)
            prev = tl.load(dst, mask=ok & (first > 0), other=0.0)
            tl.store(dst, prev + contrib, mask=ok)
    if not ACC_REGS:
        tl.debug_barrier()  # the next round reads what this one wrote
    return acc


def _gate_kernel(x_ptr, wg_ptr, g_ptr, keys_ptr, hist_ptr, fine_ptr, D, F, B,
                 T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                 USE_DOT: tl.constexpr, IEEE: tl.constexpr, ROUND: tl.constexpr, POST_SILU: tl.constexpr,
                 KEY16: tl.constexpr, PDL: tl.constexpr):
    """G for BLOCK_C channels and all tokens, and their counts in the histogram of key top bytes
    (and, 16-bit keys, in the fine histogram of whole keys; the keys are also written, 2 bytes a
    channel, for the select's ties)."""
    _after_previous(PDL)
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < F
    tok = tl.arange(0, T)
    tok_ok = tok < B
    g = _rows_times_x(x_ptr, wg_ptr, ch, ch_ok, tok, tok_ok, B, D, T, BLOCK_C, BLOCK_D, USE_DOT, IEEE, None)
    valid = tok_ok[:, None] & ch_ok[None, :]
    tl.store(g_ptr + tok[:, None] * F + ch[None, :], g, mask=valid)
    # The select's first step, spread over all programs. Relaxed adds: only later launches read it.
    KEY_BITS: tl.constexpr = 16 if KEY16 else 32
    key = _rank_key(_rank_score(g, ROUND, POST_SILU), ROUND, KEY16)
    top = (key >> (KEY_BITS - 8)).to(tl.int32)
    tl.atomic_add(hist_ptr + tok[:, None] * 256 + top, 1, mask=valid, sem="relaxed")
    if KEY16:
        tl.atomic_add(fine_ptr + tok[:, None] * 65536 + key, 1, mask=valid, sem="relaxed")
        tl.store(keys_ptr + tok[:, None] * F + ch[None, :], key.to(tl.int16), mask=valid)  # 0..65535 wrapped


def _select_kernel(g_ptr, keys_ptr, hist_ptr, fine_ptr, thr_ptr, cut_ptr, F, K, N_PAD: tl.constexpr, ROUND: tl.constexpr,
                   POST_SILU: tl.constexpr, KEY16: tl.constexpr, RADIX_BITS: tl.constexpr, PDL: tl.constexpr):
    _after_previous(PDL)
    t = tl.program_id(0)
    hist = tl.load(hist_ptr + t * 256 + tl.arange(0, 256))
    thr, cut = _row_threshold(g_ptr + t * F, keys_ptr + t * F, hist, hist, -1, fine_ptr + t * 65536, F, K, 0, N_PAD,
                              N_PAD, ROUND, POST_SILU, KEY16, RADIX_BITS)
    tl.store(thr_ptr + t, thr.to(tl.int64))
    tl.store(cut_ptr + t, cut)


def _updown_kernel(x_ptr, wg_ptr, g_ptr, keys_ptr, hist_ptr, fine_ptr, thr_ptr, cut_ptr, wu_ptr, wdt_ptr, part_ptr,
                   hint_ptr, D, F, K, GROUP_A, GROUP_B, B, MAXR,
                   T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                   R: tl.constexpr, SINGLE: tl.constexpr, EXACT_D: tl.constexpr, GATE_D: tl.constexpr,
                   USE_DOT: tl.constexpr, IEEE: tl.constexpr, GROUPED: tl.constexpr, GROUP_P2: tl.constexpr,
                   SELECT_HERE: tl.constexpr, N_PAD: tl.constexpr, RADIX_BITS: tl.constexpr,
                   ROUND: tl.constexpr, POST_SILU: tl.constexpr, KEY16: tl.constexpr, HINT: tl.constexpr,
                   TOPK: tl.constexpr, BY_TOKEN: tl.constexpr, ACC_REGS: tl.constexpr, STAGES: tl.constexpr,
                   PDL: tl.constexpr):
    """The kept channels of one block: z = SiLU(G) * (x . W_up[c]), and this program's partial
    sum of z * W_down^T[c] written to its own slice of part (T, D); `_finish_kernel` adds them.

    HINT (one token, 16-bit keys): hint_ptr holds the threshold key of this layer's previous
    call, a guess at this one's: the fine histogram's bins under its top byte are loaded with the
    coarse histogram, a round trip off the threshold when the guess holds (1.28 against 1.54 us
    into the launch, H200). What is kept never depends on the hint. Program 0 writes this call's
    threshold key for the next call; the other programs read the hint at their start, the old one
    or the new (either is a fair guess). Stop 17 also loaded the first rows the hint calls likely
    before the threshold was known (commit 7ad36f6): the median program finished 1.3 us sooner,
    but the programs left with a second round later, and the step took 17.7-22.2 against 17.2 us.
    Stop 18 timed three more ways to a lighter row phase, and took them out: 131 programs of 42
    channels on 64 lanes, about one an SM (commit 21519f4; 16.9 against 15.9 us), rounds of few
    rows on half the slots, and masked loads past the kept rows (commit ed07b63; 15.4-15.6 and
    16.3 against 15.3-15.4 us: the median program was done 1.3 us sooner with half rounds, but
    the slowest program, which sets the step, was not)."""
    if HINT:  # written by this layer's last call, launches ago: read before the wait, which its round trip overlaps
        hint = tl.load(hint_ptr)
    _after_previous(PDL)
    lane = tl.arange(0, BLOCK_C)
    tok = tl.arange(0, T)
    tok_ok = tok < B
    if GROUPED:
        # Whole groups per block: lane i is member i % GROUP_P2 of group i // GROUP_P2.
        member = lane % GROUP_P2
        ch = (tl.program_id(0) * (BLOCK_C // GROUP_P2) + lane // GROUP_P2) * GROUP_B + member
        ch_ok = (member < GROUP_B) & (ch < F)
        g = _rows_times_x(x_ptr, wg_ptr, ch, ch_ok, tok, tok_ok, B, D, T, BLOCK_C, GATE_D, USE_DOT, IEEE, STAGES)
        score = _rank_score(g, ROUND, POST_SILU)
        # rank of lane i in its group = #members j that outrank it (ties: lower channel first)
        same = ((lane[:, None] // GROUP_P2) == (lane[None, :] // GROUP_P2)) & ch_ok[None, :]
        s_i = score[:, :, None]
        s_j = score[:, None, :]
        beats = same[None, :, :] & ((s_j > s_i) | ((s_j == s_i) & (lane[None, None, :] < lane[None, :, None])))
        rank = tl.sum(beats.to(tl.int32), axis=2)
        sel = (rank < GROUP_A) & ch_ok[None, :] & tok_ok[:, None]
    else:
        ch = tl.program_id(0) * BLOCK_C + lane
        ch_ok = ch < F
        g = tl.load(g_ptr + tok[:, None] * F + ch[None, :], mask=tok_ok[:, None] & ch_ok[None, :], other=0.0)
        key = _rank_key(_rank_score(g, ROUND, POST_SILU), ROUND, KEY16)
        if SELECT_HERE and T == 1:  # the histogram asked for first: the threshold's round trips start it
            hist = tl.load(hist_ptr + tl.arange(0, 256))
            fine_guess, guess_top = hist, -1
        if HINT:
            guess_top = hint >> 8  # T's top byte, if T is near the last one: its fine bins now
            at = guess_top * 256 + tl.arange(0, 256)
            fine_guess = tl.load(fine_ptr + at, mask=at < 65536, other=0)
        if SELECT_HERE and T > 1:  # a few tokens: each token's threshold in turn, as one token's below
            thr = tl.zeros((T,), dtype=tl.int64)
            cut = tl.zeros((T,), dtype=tl.int32)
            for t in tl.static_range(T):
                if B > t:  # a token past B has no histogram to read
                    hist_t = tl.load(hist_ptr + t * 256 + tl.arange(0, 256))
                    thr_t, cut_t = _row_threshold(g_ptr + t * F, keys_ptr + t * F, hist_t, hist_t, -1,
                                                  fine_ptr + t * 65536, F, K, tl.program_id(0) * BLOCK_C, BLOCK_C,
                                                  N_PAD, ROUND, POST_SILU, KEY16, RADIX_BITS)
                    thr = tl.where(tok == t, thr_t.to(tl.int64), thr)
                    cut = tl.where(tok == t, cut_t, cut)
        elif SELECT_HERE:  # one token: every program finds the threshold itself (no select launch)
            thr_1, cut_1 = _row_threshold(g_ptr, keys_ptr, hist, fine_guess, guess_top, fine_ptr, F, K,
                                          tl.program_id(0) * BLOCK_C, BLOCK_C, N_PAD, ROUND, POST_SILU, KEY16,
                                          RADIX_BITS)
            if HINT:
                if tl.program_id(0) == 0:
                    tl.store(hint_ptr, thr_1.to(tl.int32))
            thr = tl.zeros((T,), dtype=tl.int64) + thr_1
            cut = tl.zeros((T,), dtype=tl.int32) + cut_1
        else:
            thr = tl.load(thr_ptr + tok, mask=tok_ok, other=0)
            cut = tl.load(cut_ptr + tok, mask=tok_ok, other=0)
        sel = (key > thr[:, None]) | ((key == thr[:, None]) & (ch[None, :] <= cut[:, None]))
        sel = sel & ch_ok[None, :] & tok_ok[:, None]
    needed = tl.max(sel.to(tl.int32), axis=0) > 0  # the union over tokens: each row read once
    part = part_ptr + tl.program_id(0).to(tl.int64) * MAXR * D
    acc = tl.zeros((T, BLOCK_D), dtype=tl.float32)  # SINGLE: the whole partial, in registers
    n_needed = tl.sum(needed.to(tl.int32), axis=0)
    # Compact the needed rows into slots of R, so every load the program issues is a kept row
    # (masked-off rows would leave the memory system idle while the tile is computed). Slots past
    # the kept rows hold row 0.
    place = tl.cumsum(needed.to(tl.int32), axis=0) - 1
    if TOPK and T == 1:
        for first in range(0, n_needed, R):
            rows, g_r, held = _top_slots(needed & (place >= first), ch, g, R)
            acc = _updown_rows(x_ptr, wu_ptr, wdt_ptr, part, acc, first, rows, held, g_r[None, :], held[None, :], tok,
                               tok_ok, B, D, T, R, BLOCK_D, SINGLE, EXACT_D, USE_DOT, IEEE)
    else:
        for first in tl.range(0, n_needed, R, num_stages=STAGES):
            want = first + tl.arange(0, R)
            match = (place[None, :] == want[:, None]) & needed[None, :]  # (R, BLOCK_C): slot r holds lane c
            rows = tl.sum(tl.where(match, ch[None, :], 0), axis=1)
            g_r = tl.sum(tl.where(match[None, :, :], g[:, None, :], 0.0), axis=2)
            sel_r = tl.sum(tl.where(match[None, :, :], sel[:, None, :].to(tl.int32), 0), axis=2) > 0
            if BY_TOKEN:
                acc = _updown_rows_by_token(x_ptr, wu_ptr, wdt_ptr, part, acc, first, rows, g_r, sel_r, B, D, T, R,
                                            BLOCK_D, EXACT_D, ACC_REGS)
            else:
                acc = _updown_rows(x_ptr, wu_ptr, wdt_ptr, part, acc, first, rows, want < n_needed, g_r, sel_r, tok,
                                   tok_ok, B, D, T, R, BLOCK_D, SINGLE, EXACT_D, USE_DOT, IEEE, STAGES)
    if SINGLE and (ACC_REGS or not BY_TOKEN):
        cols = tl.arange(0, BLOCK_D)
        tl.store(part + tok[:, None] * D + cols[None, :], acc, mask=tok_ok[:, None] & (cols < D)[None, :])
    else:
        if n_needed == 0:  # no kept row here: the partial is zero
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                tl.store(part + tok[:, None] * D + cols[None, :], acc, mask=tok_ok[:, None] & (cols < D)[None, :])


def _finish_kernel(part_ptr, out_ptr, hist_ptr, fine_ptr, P, D, MAXR, P_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                   CLEAR_HIST: tl.constexpr, CLEAR_FINE: tl.constexpr, PDL: tl.constexpr):
    """out[t, cols] = the sum of the updown programs' partials, in a fixed order (deterministic);
    also zeroes token t's histograms for the next call (the fine one split over the programs)."""
    _after_previous(PDL)
    t = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    total = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for p0 in range(0, P, P_BLOCK):  # a whole (P_BLOCK, BLOCK_D) tile a round: loads in flight together
        ps = p0 + tl.arange(0, P_BLOCK)
        tile = tl.load(part_ptr + ps.to(tl.int64)[:, None] * MAXR * D + t * D + cols[None, :],
                       mask=(ps < P)[:, None] & col_ok[None, :], other=0.0)
        total += tl.sum(tile, axis=0)
    tl.store(out_ptr + t * D + cols, total.to(out_ptr.dtype.element_ty), mask=col_ok)
    if CLEAR_HIST:
        if tl.program_id(0) == 0:
            bins = tl.arange(0, 256)
            tl.store(hist_ptr + t * 256 + bins, tl.zeros((256,), dtype=tl.int32))
    if CLEAR_FINE:
        for f0 in range(tl.program_id(0) * 1024, 65536, tl.num_programs(0) * 1024):
            tl.store(fine_ptr + t * 65536 + f0 + tl.arange(0, 1024), tl.zeros((1024,), dtype=tl.int32))


# The kernels, compiled for the mode in force, and the device functions they call, rebound by name.
_kernel = ModeJit(globals(), (_after_previous, _rank_score, _rank_key, _tie_cut, _x_dot_tile_by_token, _row_threshold,
                              _x_dot_tile, _z_dot_tile, _rows_times_x, _add_down_rows, _top_slots, _whole_rows,
                              _updown_rows, _updown_rows_by_token))


# --- host side ---------------------------------------------------------------------------------


@dataclass
class LaunchConfig:
    """Block sizes and warps of the kernels; `launch_config` picks them per batch size."""

    gate_block_c: int = 16
    gate_block_d: int = 512
    gate_warps: int = 4
    updown_block_c: int = 32  # at least 16 (the partials buffer is sized for that)
    updown_block_d: int = 256
    updown_warps: int = 4
    updown_rows: int = 8  # kept rows a program loads at once (16 at least with use_dot)
    # registers a thread may use in the up/down kernel (None: the compiler's choice); a cap lets
    # two 8-warp programs share an SM
    updown_maxnreg: Optional[int] = None
    select_warps: int = 8
    radix_bits: int = 1
    use_dot: bool = False
    # Up to this many tokens every updown program finds the thresholds itself from G and the
    # histograms, one token after another (one launch less, paid with the select's work repeated
    # in each program); more tokens, or 0, launch `_select_kernel` first.
    select_here_rows: int = 1
    # The up/down programs' loops (rounds of kept rows; tensor cores' column tiles) software-pipelined
    # this deep, the next iteration's rows copied into shared memory (cp.async) while this one is
    # computed; 1: not pipelined; None: Triton's choice (it pipelines the tensor cores' loops, three
    # deep on sm_90, and leaves the rounds be).
    updown_stages: Optional[int] = None
    finish_block_d: int = 32
    finish_warps: int = 4
    # Programmatic dependent launch between the step's launches (CUDA sm_90+; ignored elsewhere).
    pdl: bool = False

    def __post_init__(self):
        if self.updown_stages is not None and self.updown_stages < 1:
            raise ValueError(f"LaunchConfig.updown_stages = {self.updown_stages} must be at least 1 (or None)")
        if self.updown_block_c < 16:
            raise ValueError(f"LaunchConfig.updown_block_c = {self.updown_block_c} must be at least 16")


# Per batch size (the smallest entry >= the rows), for row Top-K and for a:b groups (which use only
# the updown fields). The benchmark (`moc_lightning.bench.decode --sweep`) measures alternatives.
# Batch 1's entries are the fastest of `--sweep` on an H100 (2026-11-25), and the row Top-K's gate
# blocks (whole 2048-wide input rows; 4 channels at stop 14, 2 on 8 warps since stop 17) the
# fastest on an H200 (stop 14: gate 6.9 against 9.1 us, the step 25.1 against 27.0 us;
# BENCHMARKS.md). a:b groups at batch 1: 342 programs of two
# 8-channel groups, each reading its 16 gate rows whole and its 4 kept rows in one round, on 4
# warps, and the finish on 16 columns a program (H200, stop 15: 12.2 against 21.3 us for 86
# programs of 8 groups). Stop 15's sweep (H200) also chose programmatic dependent launch for both
# at batch 1 (row Top-K 21.0 against 22.5 us, with 32-channel up/down programs on 4 warps; a:b
# 11.4 against 12.2 us) and for a:b groups at 2-8 (2-3.5%); the row Top-K at 2-8 ran 1-3% slower
# with it. Stop 16 (H200), ties counted on the keys row: 16 row slots at batch 1 (17.8 against 18.2
# us for 8; 16-channel programs 18.7-20.8). Stop 17 (H200, steps timed on fresh inputs), with the
# unmasked tiles and top-R slots: 16 slots 17.2-17.4 us, 8 slots 17.9-18.3, 8 warps 17.6-20.3;
# the gate on 8 warps 15.89 us against 4 warps' 17.2 (2 warps 16.38, 2 channels a program 16.23),
# then 2 channels a program on 8 warps 15.57 against 4 channels' 15.85 (8 channels 18.69).
# Batch 2 since stop 20 (H200 sweeps): CUDA cores, whole rows, a token at a time, 8 row slots on 4
# warps, the thresholds found in the up/down programs, chained launches, the gate on 4 channels a
# program on 4 warps: row Top-K 30.4 us against tensor cores' 50.5 in one sweep (the gate 7.6 us,
# 2 channels on 8 warps 32.0); a:b the same way on 8 warps, 27.7-27.8 against 35.9-36.3. Batch 4
# the same way with 4 row slots and the select launched: 59.5 and 60.4 us against tensor cores'
# 61.2 and 61.6 in two sweeps (8 slots 73.0; the gate 11.0 us, as slow as tensor cores' 9.5-11.6).
# At 8 tokens these kernels ran far slower (141-1734 against 66.3: registers spill), and for a:b
# at 4 and 8 too (66.7-839 against 60.0-63.9), which stay on tensor cores. Stop 21 (H200, one
# sweep): the rounds of row slots pipelined two deep, batch 2 on 4 slots 29.9 us against 31.0
# (8 slots pipelined 32.4, 4 slots three deep 30.6), batch 4 58.4 against 60.8 (three deep 74.2);
# a:b at batch 2 gained nothing (28.1 against 27.8), nor batch 8 a token at a time (141-178).
# a:b at 4 and 8 tokens since stop 21 (H200, two rounds in one call): 16-channel programs, gate
# tiles of 256 columns, the tensor cores' loops not pipelined, 54.7 and 62.7 us against 60.0 and
# 63.4 for 32-channel programs on 512-column gate tiles pipelined three deep (Triton's choice);
# pipelined, the 16-channel form took 60.0 and 64.9 (three deep) or 73.6 and 79.4 (two).
LAUNCH_CONFIGS: dict[int, LaunchConfig] = {
    1: LaunchConfig(gate_block_c=2, gate_block_d=2048, gate_warps=8, updown_block_c=32, updown_block_d=2048,
                    updown_warps=4, updown_rows=16, finish_block_d=16, pdl=True),
    2: LaunchConfig(gate_block_c=4, gate_block_d=2048, gate_warps=4, updown_block_c=32, updown_block_d=2048,
                    updown_rows=4, updown_stages=2, select_here_rows=2, pdl=True),
    4: LaunchConfig(gate_block_c=4, gate_block_d=2048, gate_warps=4, updown_block_c=32, updown_block_d=2048,
                    updown_rows=4, updown_stages=2),
    8: LaunchConfig(gate_block_c=32, gate_block_d=128, updown_block_d=128, use_dot=True),
}
GROUPED_LAUNCH_CONFIGS: dict[int, LaunchConfig] = {
    1: LaunchConfig(gate_block_d=2048, updown_block_c=16, updown_block_d=2048, updown_warps=4, updown_rows=4,
                    finish_block_d=16, pdl=True),
    2: LaunchConfig(gate_block_d=2048, updown_block_c=16, updown_block_d=2048, updown_rows=8, updown_warps=8, pdl=True),
    4: LaunchConfig(updown_block_c=16, gate_block_d=256, updown_block_d=128, use_dot=True, updown_stages=1, pdl=True),
    8: LaunchConfig(updown_block_c=16, gate_block_d=256, updown_block_d=128, use_dot=True, updown_stages=1, pdl=True),
}


def launch_config(rows: int, grouped: bool = False) -> LaunchConfig:
    table = GROUPED_LAUNCH_CONFIGS if grouped else LAUNCH_CONFIGS
    return table[min(b for b in table if b >= rows)]


class DecodeScratch:
    """Buffers a decode step reuses: G, its 16-bit rank keys, the histograms of the keys (top
    bytes; whole 16-bit keys), the per-token thresholds, and one float32 partial output per updown
    program. The histograms are the only ones carried between calls, and `_finish_kernel` leaves
    them zeroed."""

    def __init__(self, d_model: int, d_ffn: int, device: torch.device, max_rows: int = MAX_ROWS):
        self.d_model, self.d_ffn, self.max_rows = d_model, d_ffn, max_rows
        self.g = torch.empty(max_rows, d_ffn, dtype=torch.float32, device=device)
        self.hist = torch.zeros(max_rows, 256, dtype=torch.int32, device=device)
        # One bin per 16-bit key (bf16/fp16 ranked before SiLU): the select reads T off it.
        self.fine = torch.zeros(max_rows, 65536, dtype=torch.int32, device=device)
        # The 16-bit keys themselves (wrapped into int16): ties at T are counted on these.
        self.keys = torch.zeros(max_rows, d_ffn, dtype=torch.int16, device=device)
        self.thr = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.cut = torch.zeros(max_rows, dtype=torch.int32, device=device)
        # A block of at least 16 lanes holds at least 8 channels (a:b groups: b just above a power
        # of two fills a little over half its lanes), hence at most this many updown programs.
        self.max_programs = -(-d_ffn // 8) + 1
        self.part = torch.empty(self.max_programs, max_rows, d_model, dtype=torch.float32, device=device)
        # Per layer (its W_gate's address): the threshold key of its last one-token call, a hint
        # at the next one's. Above every 16-bit key until a call writes one: no guess.
        self.hints: dict[int, torch.Tensor] = {}

    def hint(self, w_gate: torch.Tensor) -> Optional[torch.Tensor]:
        """The layer's hint (made on its first call), or None while a CUDA graph is being captured
        and the layer has none yet: its making would be captured too, and reset it every replay."""
        at = w_gate.data_ptr()
        if at not in self.hints:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            self.hints[at] = torch.full((1,), 1 << 16, dtype=torch.int32, device=self.device)
        return self.hints[at]

    def clear_counts(self) -> None:
        """Zero the histograms (after gate launches run without their finish, as a benchmark does)."""
        self.hist.zero_()
        self.fine.zero_()

    @property
    def device(self) -> torch.device:
        return self.g.device


_SHARED: dict[tuple, DecodeScratch] = {}


def shared_scratch(d_model: int, d_ffn: int, device: torch.device) -> DecodeScratch:
    """One scratch per (shape, device), shared by all layers of that shape: layers run one after
    another on one stream, and nothing but the (zeroed) histogram outlives a call."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (d_model, d_ffn, str(device))
    if key not in _SHARED:
        _SHARED[key] = DecodeScratch(d_model, d_ffn, device)
    return _SHARED[key]


def _check_inputs(x, w_gate, w_up, w_down_t, k, group, placement, scratch):
    if not HAS_TRITON:
        raise RuntimeError("the MoC decode kernel needs triton, which is not installed (pip install triton)")
    if not runs_on(x.device):
        raise RuntimeError(f"the MoC decode kernel runs on CUDA (or on CPU under TRITON_INTERPRET=1), not on {x.device}")
    if x.dim() != 2 or not 1 <= x.shape[0] <= scratch.max_rows:
        raise ValueError(f"x must be (rows, d_model) with 1 <= rows <= {scratch.max_rows}, got {tuple(x.shape)}")
    d_ffn, d_model = w_gate.shape
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
        if tuple(w.shape) != (d_ffn, d_model):
            raise ValueError(f"{name} must be (d_ffn, d_model) = ({d_ffn}, {d_model}), got {tuple(w.shape)}")
        if w.dtype != x.dtype or w.device != x.device or not w.is_contiguous():
            raise ValueError(f"{name} must be contiguous, {x.dtype} on {x.device}, like x")
    if x.shape[1] != d_model:
        raise ValueError(f"x has {x.shape[1]} features, the weights {d_model}")
    if x.dtype not in _ROUNDING:
        raise ValueError(f"the MoC decode kernel takes float32, bfloat16 or float16, got {x.dtype}")
    if (scratch.d_model, scratch.d_ffn) != (d_model, d_ffn) or scratch.device != x.device:
        raise ValueError("the scratch buffers were made for another shape or device")
    if placement not in ("pre_silu", "post_silu"):
        raise ValueError(f"placement must be pre_silu or post_silu, got {placement!r}")
    if group is None:
        if not 1 <= k <= d_ffn:
            raise ValueError(f"k = {k} must be in [1, d_ffn = {d_ffn}]")
        if d_ffn > MAX_SELECT_WIDTH:
            raise ValueError(f"d_ffn = {d_ffn} is wider than the select kernel takes ({MAX_SELECT_WIDTH})")
    elif not 1 <= group[0] <= group[1]:
        raise ValueError(f"group a:b = {group[0]}:{group[1]} needs 1 <= a <= b")


def decode_stages(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, *,
                  k: int, group: Optional[tuple[int, int]] = None, placement: str = "pre_silu",
                  scratch: DecodeScratch, config: Optional[LaunchConfig] = None,
                  launch_select: bool = False) -> tuple[torch.Tensor, dict[str, Callable[[], None]]]:
    """The output tensor and the launches that fill it, by name, in order: 'gate' (G and the
    histogram), 'select' (row Top-K thresholds, one program a token; not launched when the
    updown programs select themselves, see `LaunchConfig.select_here_rows`), 'updown' (a:b
    groups: the gate and selection too), 'finish' (the partials summed into the output). Running
    them in order is `moc_decode`; the benchmark times them one by one. launch_select: launch the
    select whatever the config says (the benchmark times it alone)."""
    _check_inputs(x, w_gate, w_up, w_down_t, k, group, placement, scratch)
    x = x.contiguous()
    rows, d_model = x.shape
    d_ffn = w_gate.shape[0]
    cfg = config or launch_config(rows, grouped=group is not None)
    tokens = 16 if cfg.use_dot else triton.next_power_of_2(rows)
    rounding = _ROUNDING[x.dtype]
    post_silu = placement == "post_silu"
    common = dict(T=tokens, USE_DOT=cfg.use_dot, IEEE=x.dtype == torch.float32)
    slots = max(cfg.updown_rows, 16) if cfg.use_dot else cfg.updown_rows
    rank = dict(ROUND=rounding, POST_SILU=post_silu, KEY16=rounding != 0 and not post_silu)
    pdl = cfg.pdl and pdl_runs_on(x.device)
    # launch_pdl is a launch option of compiled kernels only (the interpreter takes no such option)
    common["PDL"] = pdl
    launch = dict(launch_pdl=True) if pdl else {}
    s = scratch
    out = torch.empty_like(x)
    stages: dict[str, Callable[[], None]] = {}
    n_pad = triton.next_power_of_2(d_ffn)
    select_here = False
    if group is None:
        select_here = rows <= cfg.select_here_rows and not launch_select
        gate_grid = (triton.cdiv(d_ffn, cfg.gate_block_c),)
        stages["gate"] = lambda: _kernel(_gate_kernel)[gate_grid](
            x, w_gate, s.g, s.keys, s.hist, s.fine, d_model, d_ffn, rows, BLOCK_C=cfg.gate_block_c, BLOCK_D=cfg.gate_block_d,
            num_warps=cfg.gate_warps, **common, **rank, **launch)
        if not select_here:
            stages["select"] = lambda: _kernel(_select_kernel)[(rows,)](
                s.g, s.keys, s.hist, s.fine, s.thr, s.cut, d_ffn, k, N_PAD=n_pad, RADIX_BITS=cfg.radix_bits,
                num_warps=cfg.select_warps, PDL=pdl, **rank, **launch)
        block_c, group_a, group_b, group_p2 = cfg.updown_block_c, 0, 1, 1
        grid = triton.cdiv(d_ffn, block_c)
    else:
        group_a, group_b = group
        group_p2 = triton.next_power_of_2(group_b)
        block_c = max(cfg.updown_block_c, group_p2)
        grid = triton.cdiv(triton.cdiv(d_ffn, group_b), block_c // group_p2)
    if grid > s.max_programs:
        raise ValueError(f"the launch config needs {grid} updown programs, the scratch holds {s.max_programs}")
    if tokens == 1 and HAS_TOPK:  # the slots are a top-R of the block's lanes
        slots = min(slots, block_c)
    hint = s.hint(w_gate) if select_here and rows == 1 and rank["KEY16"] else None
    # several tokens on CUDA cores with whole rows: a token at a time (see _updown_rows_by_token)
    by_token = d_model <= cfg.updown_block_d and tokens > 1 and not cfg.use_dot
    # the partial held in registers across the rounds: up to 4 tokens of 2048 columns (64 a thread on 4 warps)
    acc_regs = by_token and tokens * triton.next_power_of_2(d_model) <= 8192
    # a register cap is a compile option of the CUDA backend (the interpreter takes none)
    regs = dict(maxnreg=cfg.updown_maxnreg) if cfg.updown_maxnreg and not interpreting() else {}
    stages["updown"] = lambda: _kernel(_updown_kernel)[(grid,)](
        x, w_gate, s.g, s.keys, s.hist, s.fine, s.thr, s.cut, w_up, w_down_t, s.part, s.thr if hint is None else hint,
        d_model, d_ffn, k, group_a, group_b, rows, s.max_rows, HINT=hint is not None, TOPK=HAS_TOPK, BLOCK_C=block_c,
        BLOCK_D=cfg.updown_block_d, GROUPED=group is not None, GROUP_P2=group_p2, R=slots,
        SINGLE=d_model <= cfg.updown_block_d, EXACT_D=d_model == cfg.updown_block_d, GATE_D=cfg.gate_block_d,
        SELECT_HERE=select_here, N_PAD=n_pad, RADIX_BITS=cfg.radix_bits, BY_TOKEN=by_token, ACC_REGS=acc_regs,
        STAGES=cfg.updown_stages,
        num_warps=cfg.updown_warps, **common,
        **rank, **launch, **regs)
    finish_grid = (triton.cdiv(d_model, cfg.finish_block_d), rows)
    p_block = min(triton.next_power_of_2(grid), max(16, 8192 // cfg.finish_block_d))
    stages["finish"] = lambda: _kernel(_finish_kernel)[finish_grid](
        s.part, out, s.hist, s.fine, grid, d_model, s.max_rows, P_BLOCK=p_block, BLOCK_D=cfg.finish_block_d,
        CLEAR_HIST=group is None, CLEAR_FINE=group is None and rank["KEY16"], num_warps=cfg.finish_warps, PDL=pdl,
        **launch)
    return out, stages


def moc_decode(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, *,
               k: int, group: Optional[tuple[int, int]] = None, placement: str = "pre_silu",
               scratch: DecodeScratch, config: Optional[LaunchConfig] = None) -> torch.Tensor:
    """The MoC FFN of 1..8 tokens, x (rows, d_model) -> (rows, d_model) in x's dtype.

    w_gate, w_up: (d_ffn, d_model) as nn.Linear holds them; w_down_t: down_proj.weight transposed,
    contiguous (d_ffn, d_model). k is ignored when group = (a, b) is given.
    """
    out, stages = decode_stages(x, w_gate, w_up, w_down_t, k=k, group=group, placement=placement,
                                scratch=scratch, config=config)
    try:
        for launch in stages.values():
            launch()
    except BaseException:
        # a launch that fails (a compile error, an interrupt) leaves the gate's counts in the shared
        # histograms, which only the finish clears: the next call would rank on them
        scratch.clear_counts()
        raise
    return out


def moc_decode_bytes(d_model: int, d_ffn: int, kept_rows: int, rows: int, itemsize: int) -> int:
    """Bytes a decode step must move at least: all of W_gate, the kept rows of W_up and W_down^T,
    x in and out (the HBM floor's numerator)."""
    return itemsize * (d_ffn * d_model + 2 * kept_rows * d_model + 2 * rows * d_model)
