"""The MoC decode kernel (Triton, run by the interpreter on CPU) against the float64 reference and
the plain PyTorch MoC FFN: batch 1..8, d_ffn not a multiple of the blocks, both placements, a:b
groups with a ragged last group, ties, scratch left clean, inputs refused with clear errors."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates anything: CPU tensors, no GPU

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402,F401  (CI installs triton: a missing one must fail here, not skip)

from ffn_reference import f64, reference_forward, reference_mask  # noqa: E402
from moc_lightning.ffn import FFNConfig, build_ffn  # noqa: E402
from moc_lightning.kernels.moc_decode import DecodeScratch, LaunchConfig, moc_decode  # noqa: E402
from without_triton import run_without_triton  # noqa: E402

D, D_FFN = 48, 172  # 172 is not a multiple of the 16/32-channel blocks, 172 % 8 = 4, 172 % 5 = 2
SMALL = LaunchConfig(gate_block_c=16, gate_block_d=32, updown_block_c=32, updown_block_d=32)


def weights(d=D, d_ffn=D_FFN, dtype=torch.float32):
    wg, wu = torch.randn(d_ffn, d) / d**0.5, torch.randn(d_ffn, d) / d**0.5
    wd = torch.randn(d, d_ffn) / d_ffn**0.5
    return [w.to(dtype) for w in (wg, wu, wd)]


def reference(x, wg, wu, wd, k, group, placement, rank_dtype=f64):
    """float64 MoC output; the mask ranks G as the kernel sees it (rounded to rank_dtype)."""
    g = (x.to(f64) @ wg.to(f64).T).to(rank_dtype)
    mask = reference_mask(g, k, group, placement)
    return reference_forward("moc", x.to(f64), wg.to(f64), wu.to(f64), wd.to(f64), mask=mask)


def run(x, wg, wu, wd, k, group=None, placement="pre_silu", config=SMALL, scratch=None):
    scratch = scratch or DecodeScratch(wg.shape[1], wg.shape[0], x.device)
    ab = None if group is None else tuple(int(p) for p in group.split(":"))
    return moc_decode(x, wg, wu, wd.t().contiguous(), k=k, group=ab, placement=placement, scratch=scratch,
                      config=config)


def rel(out, ref):
    return float((out.to(f64) - ref).norm() / ref.norm())


CASES = [(rows, None, "pre_silu") for rows in range(1, 9)] + [
    (rows, group, placement) for rows in (1, 6) for group, placement in
    ((None, "post_silu"), ("2:8", "pre_silu"), ("2:8", "post_silu"), ("3:5", "pre_silu"))]


@pytest.mark.parametrize("rows, group, placement", CASES)
def test_matches_float64_reference(rows, group, placement):
    wg, wu, wd = weights()
    x = torch.randn(rows, D)
    out = run(x, wg, wu, wd, k=40, group=group, placement=placement)
    assert out.shape == (rows, D) and out.dtype == torch.float32
    assert rel(out, reference(x, wg, wu, wd, 40, group, placement)) < 1e-5


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("config", [
    # tensor cores (tokens padded to 16, tl.dot), 2 select bits a round, the select launched for one token
    LaunchConfig(gate_block_c=16, gate_block_d=16, updown_block_c=16, updown_block_d=16, use_dot=True,
                 select_here_rows=0, radix_bits=2),
    # whole rows in one tile (d_model <= updown_block_d), 4 kept rows at a time: several passes a block
    LaunchConfig(gate_block_c=32, gate_block_d=64, updown_block_c=64, updown_block_d=64, updown_rows=4),
    # batch 1's gate on an H200: few channels a program, each reading whole input rows; programmatic
    # dependent launch asked for, which runs only compiled on sm_90 (here it must be left out)
    LaunchConfig(gate_block_c=2, gate_block_d=64, gate_warps=8, updown_block_c=16, updown_block_d=64, pdl=True),
    # tensor cores with the column tiles and rounds pipelined (the interpreter runs them in order)
    LaunchConfig(gate_block_c=16, gate_block_d=16, updown_block_c=16, updown_block_d=16, use_dot=True, updown_stages=3),
], ids=["dot-select-launch", "single-tile", "narrow-gate-pdl", "dot-stages-3"])
def test_other_launch_configs(rows, config):
    wg, wu, wd = weights()
    x = torch.randn(rows, D)
    for group in (None, "2:8"):
        assert rel(run(x, wg, wu, wd, k=33, group=group, config=config), reference(x, wg, wu, wd, 33, group, "pre_silu")) < 1e-5


@pytest.mark.parametrize("rows, k", [(2, 3), (3, 40), (8, 90)])
@pytest.mark.parametrize("select_here_rows, stages", [(1, None), (8, 1), (1, 3)],
                         ids=["select-launched", "select-in-updown", "stages-3"])  # the interpreter runs stages unpipelined
def test_several_tokens_a_token_at_a_time(rows, k, select_here_rows, stages):
    """Batches 2-8 on CUDA cores with whole rows (d_model <= updown_block_d, no tensor cores): each
    token's up dot and down partial apart (held in registers up to 4 tokens, added in memory
    beyond). k 3 leaves most blocks with no kept row (their partial must be zeroed); k 90 at 8
    tokens needs more rounds of 4 slots than one. The thresholds come from the select launch, or
    each updown program finds every token's itself."""
    config = LaunchConfig(use_dot=False, gate_block_c=2, gate_block_d=64, gate_warps=8, updown_block_c=32,
                          updown_block_d=64, updown_rows=4, select_here_rows=select_here_rows, updown_stages=stages)
    wg, wu, wd = weights()
    x = torch.randn(rows, D)
    scratch = DecodeScratch(D, D_FFN, x.device)
    for group in (None, "2:8"):
        out = run(x, wg, wu, wd, k=k, group=group, config=config, scratch=scratch)
        assert rel(out, reference(x, wg, wu, wd, k, group, "pre_silu")) < 1e-5
    assert not scratch.hints  # the threshold hint is one token's: several tokens neither read nor write one
    # bf16: thresholds off the fine histogram, ties at T counted on the keys row, in every program
    wg, wu, wd = weights(dtype=torch.bfloat16)
    xb = torch.randn(rows, D, dtype=torch.bfloat16)
    out = run(xb, wg, wu, wd, k=k, config=config)
    ref = reference(xb, wg, wu, wd, k, None, "pre_silu", rank_dtype=torch.bfloat16)
    assert rel(out, ref) < 2e-2


@pytest.mark.parametrize("block", [32, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-radix", "bf16-fine-histogram"])
@pytest.mark.parametrize("k", [1, 17, 99, 100])
def test_ties_keep_exactly_k_lowest_index_first(k, dtype, block):
    """Only 5 distinct gate rows: G ties everywhere. Exactly k channels are kept; among tied
    channels at the threshold the lowest indices, which is the reference mask's stable order.
    float32 keys go through the radix rounds, bf16 ones through the fine histogram. Where the
    up/down programs select (one token; two with select_here_rows 2), each ranks its block's tied
    channels after those before it (blocks of 32 or 16)."""
    d, d_ffn = 32, 100
    distinct = torch.randn(5, d)
    wg = distinct[torch.randint(0, 5, (d_ffn,))].contiguous()
    _, wu, wd = weights(d, d_ffn)
    wg, wu, wd = (w.to(dtype) for w in (wg, wu, wd))
    x = torch.randn(2, d).to(dtype)
    scratch = DecodeScratch(d, d_ffn, x.device)
    for rows, here in ((1, 1), (2, 1), (2, 2)):  # two tokens: the select launched, or in every up/down program
        config = dataclasses.replace(SMALL, updown_block_c=block, select_here_rows=here)
        out = run(x[:rows], wg, wu, wd, k=k, scratch=scratch, config=config)
        ref = reference(x[:rows], wg, wu, wd, k, None, "pre_silu", rank_dtype=dtype if dtype != torch.float32 else f64)
        assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
        assert not scratch.hist.any() and not scratch.fine.any()


@pytest.mark.parametrize("group", [None, "2:8"])
def test_one_token_slots_without_topk_are_the_same(monkeypatch, group):
    """Triton before 3.4 has no tl.topk: one token's slots then come from the one-hot match of
    several tokens, in the same order (lowest channel first), so the output is bit for bit the
    same."""
    import moc_lightning.kernels.moc_decode as md

    wg, wu, wd = weights(dtype=torch.bfloat16)
    x = torch.randn(1, D).to(torch.bfloat16)
    config = LaunchConfig(gate_block_c=16, gate_block_d=32, updown_block_c=32, updown_block_d=64, updown_rows=4)
    with_topk = run(x, wg, wu, wd, k=40, group=group, config=config)
    monkeypatch.setattr(md, "HAS_TOPK", False)
    assert torch.equal(run(x, wg, wu, wd, k=40, group=group, config=config), with_topk)


def test_a_failed_step_leaves_the_histograms_clean(monkeypatch):
    """A launch that raises after the gate ran (a compile error, an interrupt) must not leave the
    gate's counts in the shared histograms: only the finish clears them, and the next call would
    rank on stale counts."""
    import moc_lightning.kernels.moc_decode as md

    wg, wu, wd = weights(dtype=torch.bfloat16)
    x = torch.randn(1, D).to(torch.bfloat16)
    scratch = DecodeScratch(D, D_FFN, x.device)
    real = md._kernel

    def failing(fn):
        if fn.__name__ == "_updown_kernel":
            raise RuntimeError("compile failed")
        return real(fn)

    monkeypatch.setattr(md, "_kernel", failing)
    with pytest.raises(RuntimeError, match="compile failed"):
        run(x, wg, wu, wd, k=40, scratch=scratch)
    assert not scratch.hist.any() and not scratch.fine.any()
    monkeypatch.setattr(md, "_kernel", real)
    out = run(x, wg, wu, wd, k=40, scratch=scratch)
    assert rel(out, reference(x, wg, wu, wd, 40, None, "pre_silu", rank_dtype=torch.bfloat16)) < 1e-2


def test_bfloat16_ranks_the_rounded_gate():
    wg, wu, wd = weights(dtype=torch.bfloat16)
    x = torch.randn(3, D).to(torch.bfloat16)
    out = run(x, wg, wu, wd, k=40)
    assert out.dtype == torch.bfloat16
    # pre_silu on 16-bit weights ranks G rounded to bf16 (16-bit keys), like the plain path.
    assert rel(out, reference(x, wg, wu, wd, 40, None, "pre_silu", rank_dtype=torch.bfloat16)) < 1e-2


def test_scratch_is_left_clean_and_reused():
    wg, wu, wd = weights()
    scratch = DecodeScratch(D, D_FFN, torch.device("cpu"))
    scratch.part.fill_(float("nan"))  # partials are written before they are read: garbage is harmless
    x = torch.randn(4, D)
    first = run(x, wg, wu, wd, k=40, scratch=scratch)
    assert not scratch.hist.any() and not scratch.fine.any() and not first.isnan().any()
    one = run(x[:1], wg, wu, wd, k=40, scratch=scratch)
    grouped = run(x[:3], wg, wu, wd, k=40, group="2:8", scratch=scratch)
    again = run(x, wg, wu, wd, k=40, scratch=scratch)
    assert torch.equal(first, again)  # the partials are added in a fixed order: bit for bit
    assert torch.allclose(one, first[:1], atol=1e-6)
    assert rel(grouped, reference(x[:3], wg, wu, wd, 40, "2:8", "pre_silu")) < 1e-5


def test_layers_share_one_scratch_per_shape():
    from moc_lightning.kernels.moc_decode import shared_scratch

    ffns = [build_ffn(FFNConfig(kind="moc", d_model=D, d_ffn=D_FFN)) for _ in range(2)]
    for ffn in ffns:
        ffn.prepare_for_decode()
    assert ffns[0].decode_layout.scratch is ffns[1].decode_layout.scratch
    assert shared_scratch(D, 64, torch.device("cpu")) is not ffns[0].decode_layout.scratch


def test_kernels_are_jitted_once_per_mode_with_their_device_functions_rebound():
    """`ModeJit` (what moc_decode's and decode_attention's `_kernel` are): a kernel asked for twice
    in one mode is one JIT function, and the device functions it calls are rebound by name in the
    module's namespace to their JIT versions (a compiled kernel looks them up there)."""
    from moc_lightning.kernels.runtime import ModeJit

    def helper(x):
        return x

    def kernel(ptr):
        pass

    namespace = {"helper": helper}
    jit = ModeJit(namespace, (helper,))
    first = jit(kernel)
    assert jit(kernel) is first and first.fn is kernel
    assert namespace["helper"] is not helper and namespace["helper"].fn is helper


def test_programmatic_dependent_launch_only_where_compiled_for_sm90():
    from moc_lightning.kernels.moc_decode import pdl_runs_on

    assert not pdl_runs_on(torch.device("cpu"))  # the interpreter has no launch options


def test_too_small_updown_block_is_refused():
    with pytest.raises(ValueError, match="updown_block_c = 8 must be at least 16"):
        LaunchConfig(updown_block_c=8)
    with pytest.raises(ValueError, match="updown_stages = 0 must be at least 1"):
        LaunchConfig(updown_stages=0)


def test_threshold_hint_is_each_layers_last_and_never_changes_the_output():
    """One token, bf16: a call leaves its layer's threshold key as the next call's hint (per
    W_gate, so layers keep their own). The output is the same bit for bit whatever the hint: the
    threshold's top byte guessed right or wrong, or no guess. Several tokens leave the hints alone."""
    k = 40
    layers = [weights(dtype=torch.bfloat16) for _ in range(2)]
    scratch = DecodeScratch(D, D_FFN, torch.device("cpu"))
    # whole-row tiles (d_model 48 <= 64) of 4 slots: ~7 kept rows a 32-channel block, several rounds
    config = LaunchConfig(gate_block_c=16, gate_block_d=32, updown_block_c=32, updown_block_d=64, updown_rows=4)
    for wg, wu, wd in layers:
        x = torch.randn(1, D).to(torch.bfloat16)
        assert wg.data_ptr() not in scratch.hints  # made by the first call that uses it
        first = run(x, wg, wu, wd, k=k, scratch=scratch, config=config)
        kth = int((scratch.keys[0].int() & 0xFFFF).topk(k).values[-1])  # the k-th of the keys the gate wrote
        assert int(scratch.hint(wg)) == kth
        for guess in (kth, 0, 65535, 1 << 16, kth - 256, kth + 300):
            scratch.hint(wg).fill_(guess)
            assert torch.equal(run(x, wg, wu, wd, k=k, scratch=scratch, config=config), first), guess
            assert int(scratch.hint(wg)) == kth
        assert rel(first, reference(x, wg, wu, wd, k, None, "pre_silu", rank_dtype=torch.bfloat16)) < 1e-2
    assert len(scratch.hints) == 2 and int(scratch.hint(layers[0][0])) != int(scratch.hint(layers[1][0]))
    before = {at: int(h) for at, h in scratch.hints.items()}
    wg, wu, wd = layers[0]
    run(torch.randn(3, D).to(torch.bfloat16), wg, wu, wd, k=k, scratch=scratch, config=config)
    assert {at: int(h) for at, h in scratch.hints.items()} == before


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("settings", [{}, {"group": "2:8"}, {"placement": "post_silu", "k": 20}])
def test_module_decode_path_matches_plain_pytorch_ffn(rows, settings):
    cfg = FFNConfig(kind="moc", d_model=D, d_ffn=D_FFN, topk_backend="torch", moc_kernel="torch", **settings)
    ffn = build_ffn(cfg)
    x = torch.randn(rows, 1, D)
    with torch.no_grad():
        plain = ffn(x)
        ffn.prepare_for_decode()
        ffn.decode_layout.config = SMALL
        kernel = ffn(x)
    assert kernel.shape == plain.shape == (rows, 1, D)
    assert torch.allclose(kernel, plain, rtol=1e-4, atol=1e-6)


def test_module_uses_the_kernel_only_for_small_no_grad_batches(monkeypatch):
    import moc_lightning.ffn.decode as decode

    ffn = build_ffn(FFNConfig(kind="moc", d_model=D, d_ffn=D_FFN, topk_backend="torch", moc_kernel="torch"))
    ffn.prepare_for_decode()
    calls = []
    monkeypatch.setattr(decode.kernel, "moc_decode", lambda *a, **kw: calls.append(a[0].shape) or a[0] * 0)
    with torch.no_grad():
        ffn(torch.randn(2, 3, D))  # 6 rows: kernel
        ffn(torch.randn(9, D))  # 9 rows: plain path
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast would change the dtype: plain path
            ffn(torch.randn(1, D))
    ffn(torch.randn(1, D))  # autograd on: plain path (the kernel has no backward)
    assert calls == [torch.Size([6, D])]
    ffn.prepare_for_decode(False)
    with torch.no_grad():
        ffn(torch.randn(1, D))
    assert len(calls) == 1


def test_changed_down_weight_is_picked_up():
    ffn = build_ffn(FFNConfig(kind="moc", d_model=D, d_ffn=D_FFN, topk_backend="torch", moc_kernel="torch"))
    ffn.prepare_for_decode()
    ffn.decode_layout.config = SMALL
    x = torch.randn(1, D)
    with torch.no_grad():
        ffn.down_proj.weight.mul_(2.0)  # in place, as an optimizer step would
        kernel = ffn(x)
        ffn.prepare_for_decode(False)
        plain = ffn(x)
    assert torch.allclose(kernel, plain, rtol=1e-4, atol=1e-6)


def test_bad_inputs_are_refused_with_clear_errors(monkeypatch):
    wg, wu, wd = weights()
    scratch = DecodeScratch(D, D_FFN, torch.device("cpu"))
    wdt = wd.t().contiguous()
    with pytest.raises(ValueError, match="1 <= rows <= 8"):
        moc_decode(torch.randn(9, D), wg, wu, wdt, k=4, scratch=scratch)
    with pytest.raises(ValueError, match="w_down_t must be"):
        moc_decode(torch.randn(1, D), wg, wu, wd, k=4, scratch=scratch)
    with pytest.raises(ValueError, match=r"k = 0 must be in \[1, d_ffn = 172\]"):
        moc_decode(torch.randn(1, D), wg, wu, wdt, k=0, scratch=scratch)
    with pytest.raises(ValueError, match="another shape"):
        moc_decode(torch.randn(1, D), wg, wu, wdt, k=4, scratch=DecodeScratch(D, 64, torch.device("cpu")))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="runs on CUDA .*TRITON_INTERPRET=1.* not on cpu"):
        moc_decode(torch.randn(1, D), wg, wu, wdt, k=4, scratch=scratch)


def test_module_imports_and_refuses_clearly_without_triton():
    code = (
        "import torch\n"
        "from moc_lightning.kernels import moc_decode as m\n"
        "from moc_lightning.ffn import FFNConfig, build_ffn\n"
        "assert not m.HAS_TRITON and not m.runs_on(torch.device('cpu'))\n"
        "ffn = build_ffn(FFNConfig(kind='moc', d_model=8, d_ffn=16))\n"
        "ffn.prepare_for_decode()\n"
        "with torch.no_grad(): assert ffn(torch.randn(1, 8)).shape == (1, 8)  # plain path\n"
        "try:\n"
        "    m.moc_decode(torch.randn(1, 8), *[torch.randn(16, 8)] * 3, k=2, scratch=m.DecodeScratch(8, 16, torch.device('cpu')))\n"
        "except RuntimeError as e:\n"
        "    assert 'needs triton' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    result = run_without_triton(code)
    assert result.returncode == 0, result.stderr


def test_decode_sweep_candidates_are_distinct_launch_configs():
    """Each `bench.decode --sweep` candidate changes the default it applies to: a candidate equal
    to the default (or to another candidate) would time one config twice."""
    from moc_lightning.bench import decode as bench_decode
    from moc_lightning.kernels import moc_decode

    for table, candidates in ((moc_decode.LAUNCH_CONFIGS, bench_decode.SWEEP_ROW),
                              (moc_decode.GROUPED_LAUNCH_CONFIGS, bench_decode.SWEEP_GROUP)):
        assert set(candidates) == set(table)
        for rows, changes in candidates.items():
            configs = [repr(dataclasses.replace(table[rows], **change)) for change in changes]
            assert len(set(configs)) == len(configs), (rows, changes)
