"""Triton Top-K kernels (run in triton's CPU interpreter) against torch.topk, and the backends'
registry: `triton` inside MoC, RAFT's clear refusal where it cannot be built."""

from __future__ import annotations

import os

import pytest
import torch

# triton's own library functions (tl.sum, tl.cumsum...) run in the CPU interpreter only if triton
# is first imported with TRITON_INTERPRET=1: import it so here, then restore the variable.
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401  (CI installs it with the dev extras)
except ImportError:
    triton = None
if _PREVIOUS_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

from moc_lightning.ffn import FFNConfig, build_ffn, select_channels
from moc_lightning.ffn.topk import _torch_group_topk, resolve_backend
from moc_lightning.kernels import raft_select_k, topk_triton
from without_triton import run_without_triton

DTYPES = (torch.bfloat16, torch.float32)


@pytest.fixture
def interpret(monkeypatch):
    """TRITON_INTERPRET=1 for this test only (the kernels are JIT-decorated in the mode in force)."""
    if triton is None:
        pytest.fail("triton is not installed: the dev extras install it (pip install -e '.[dev]')")
    if type(triton.language.standard.sum).__name__ != "InterpretedFunction":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (by an earlier test module): "
                    "its library functions cannot run in the interpreter in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def random_scores(rows: int, width: int, dtype: torch.dtype, ties: bool) -> torch.Tensor:
    if ties:  # few distinct values: every row has long runs of equal scores
        return torch.randint(-3, 3, (rows, width)).to(dtype)
    return torch.randn(rows, width).to(dtype)


def assert_row_topk(scores: torch.Tensor, idx: torch.Tensor, k: int, dtype: torch.dtype = torch.int64):
    rows, width = scores.shape
    assert idx.shape == (rows, k) and idx.dtype == dtype
    idx = idx.long()
    assert int(idx.min()) >= 0 and int(idx.max()) < width
    for row in idx.tolist():
        assert len(set(row)) == k, "indices must be distinct"
    # The documented order: MoC's compact tensors list the kept channels the same way.
    assert bool((idx.diff(dim=1) > 0).all()), "each row's indices must ascend"
    got = scores.gather(1, idx).double().sort(dim=1).values
    want = torch.topk(scores.double(), k, dim=1).values.sort(dim=1).values
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rows,width,k", [(7, 100, 13), (4, 37, 1), (3, 37, 37), (5, 300, 64), (2, 2736, 512)])
def test_row_topk_matches_torch(interpret, dtype, ties, rows, width, k):
    scores = random_scores(rows, width, dtype, ties)
    assert_row_topk(scores, topk_triton.row_topk(scores, k), k)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_row_topk_orders_signs_zeros_and_infinities(interpret, dtype, split):
    values = [float("-inf"), -1e4, -2.0, -0.0, 0.0, 1e-3, 3.0, 6e4, float("inf")]
    scores = torch.tensor(values, dtype=dtype)[torch.randperm(len(values))].repeat(3, 1)
    for k in (1, 3, 5, len(values)):
        assert_row_topk(scores, topk_triton.row_topk(scores, k, split=split), k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_topk_keeps_minus_infinity_and_ranks_nan_lowest(interpret, dtype):
    """When the k-th largest is -inf the threshold is -inf itself; NaN scores count as -inf."""
    scores = torch.full((4, 40), float("-inf"), dtype=dtype)
    scores[:, :3] = torch.tensor([1.0, -2.0, 5.0], dtype=dtype)
    scores[:, 7] = float("nan")
    idx = topk_triton.row_topk(scores, 10)
    assert idx.shape == (4, 10) and all(len(set(row)) == 10 for row in idx.tolist())
    assert all({0, 1, 2} <= set(row) for row in idx.tolist())
    rest = scores.gather(1, idx)[:, 3:].float()
    assert bool(((rest == float("-inf")) | rest.isnan()).all())


def test_split_blocks_pad_less_than_one_power_of_two():
    assert topk_triton.split_blocks(2736) == (2048, 1024)
    assert topk_triton.split_blocks(37) == (32, 8)
    assert topk_triton.split_blocks(3500) == (4096, 0)
    assert topk_triton.split_blocks(1) == (1, 0)


@pytest.mark.parametrize("segs,warps,split,int_count", [(1, 4, False, False), (4, 2, True, True), (2, 1, True, False)])
@pytest.mark.parametrize("ties", [False, True])
def test_row_topk_launch_overrides_keep_results(interpret, segs, warps, split, int_count, ties):
    """Launch settings, the segment in one power-of-two piece or in two (64 + 8 for 70), and
    both ways of counting."""
    scores = random_scores(9, 70, torch.float16, ties=ties)
    idx = topk_triton.row_topk(scores, 20, segs_per_program=segs, num_warps=warps, split=split, int_count=int_count)
    assert_row_topk(scores, idx, 20)


@pytest.mark.parametrize("width,k", [(38, 5), (70, 70), (2736, 512)])
def test_bf16_word_kernel_keeps_the_first_equal_channels_like_the_float_kernel(interpret, width, k):
    """Two keys per int32 word (the sm_90 bf16x2 compare, here its float32 stand-in): the same
    channels as the float32 kernel, and among equal scores the lowest channels, as a stable sort."""
    scores = random_scores(5, width, torch.bfloat16, ties=True)
    scores[1, :4] = torch.tensor([float("inf"), float("-inf"), -0.0, 0.0])
    packed = topk_triton.row_topk(scores, k, packed=True)
    assert_row_topk(scores, packed, k)
    assert torch.equal(packed.sort(dim=1).values, topk_triton.row_topk(scores, k, packed=False).sort(dim=1).values)
    stable = torch.argsort(scores.double(), dim=1, descending=True, stable=True)[:, :k]
    assert torch.equal(packed.sort(dim=1).values, stable.sort(dim=1).values)


@pytest.mark.parametrize("width,k", [(38, 5), (70, 70), (530, 100), (1000, 100), (2736, 512)])
@pytest.mark.parametrize("chunk", [4, 32, 256])
def test_bf16_word_kernel_places_in_chunks_whatever_their_width(interpret, width, k, chunk):
    """Placement a few words at a time (the slot offset carried from chunk to chunk, a ragged
    last chunk, one chunk wider than the row, 16-byte lanes for 2736 and a lane cut by the row's
    end for 1000 at 256): the same indices, in the same slots, as a stable
    sort would pick, ties included."""
    scores = random_scores(6, width, torch.bfloat16, ties=True)
    scores[2] = torch.randn(width).bfloat16()  # one row without ties
    chunked = topk_triton.row_topk(scores, k, packed=True, chunk=chunk)
    assert_row_topk(scores, chunked, k)
    stable = torch.argsort(scores.double(), dim=1, descending=True, stable=True)[:, :k]
    assert torch.equal(chunked, stable.sort(dim=1).values)


def test_bf16_word_kernel_keeps_the_first_ties_at_every_k(interpret):
    """Every k over rows of few distinct values: the last tie kept falls in a word's low half, in
    its high half, in the second register piece (38 channels: 16 + 4 words), or all ties are
    kept; the kept set is a stable sort's each time, and -0 ties with +0 as in IEEE."""
    scores = torch.randint(-2, 2, (4, 38)).bfloat16()
    scores[3, ::3] = -0.0
    scores[3, 1::3] = 0.0
    stable = torch.argsort(scores.double(), dim=1, descending=True, stable=True)
    for k in range(1, 39, 2):
        idx = topk_triton.row_topk(scores, k, packed=True, chunk=4)
        assert torch.equal(idx, stable[:, :k].sort(dim=1).values), f"k = {k}"


@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int16])
@pytest.mark.parametrize("dtype,packed", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, None)])
def test_row_topk_writes_narrow_indices(interpret, out_dtype, dtype, packed):
    scores = random_scores(5, 300, dtype, ties=True)
    idx = topk_triton.row_topk(scores, 40, packed=packed, out_dtype=out_dtype)
    assert_row_topk(scores, idx, 40, dtype=out_dtype)
    assert torch.equal(idx.long(), topk_triton.row_topk(scores, 40, packed=packed))


def test_row_topk_refuses_index_types_too_narrow_or_not_integer(interpret):
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        topk_triton.row_topk(torch.randn(2, 16), 3, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="torch.int16 cannot hold channel indices up to 32768"):
        topk_triton.row_topk(torch.randn(1, 32769), 3, out_dtype=torch.int16)
    with pytest.raises(ValueError, match="chunk = 3 must be a power of two"):
        topk_triton.row_topk(torch.randn(2, 16).bfloat16(), 3, chunk=3)
    with pytest.raises(ValueError, match=r"maxnreg = 8 must be in \[24, 255\]"):
        topk_triton.row_topk(torch.randn(2, 16).bfloat16(), 3, maxnreg=8)
    wide = torch.randn(2, topk_triton.MAX_BLOCK + 5)  # the torch.topk fallback converts too
    assert_row_topk(wide, topk_triton.row_topk(wide, 6, out_dtype=torch.int32), 6, dtype=torch.int32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("group", [None, (2, 8)])
def test_select_channels_returns_the_index_type_asked_for(interpret, backend, group):
    g = torch.randn(10, 44)
    narrow = select_channels(g, k=9, group=group, backend=backend, index_dtype=torch.int16)
    assert narrow.dtype == torch.int16
    assert torch.equal(narrow.long(), select_channels(g, k=9, group=group, backend=backend))


def test_bf16_word_kernel_takes_even_widths_and_strides_only(interpret):
    scores = torch.randn(4, 37).bfloat16()
    assert topk_triton.bf16_words(scores) is None and topk_triton.bf16_words(scores.float()) is None
    with pytest.raises(ValueError, match="packed=True takes bf16 rows of an even width"):
        topk_triton.row_topk(scores, 3, packed=True)
    assert_row_topk(scores, topk_triton.row_topk(scores, 3), 3)  # the float32 kernel instead
    wide = torch.randn(4, 41).bfloat16()
    assert topk_triton.bf16_words(wide[:, 1:]) is None  # odd offset: no int32 view
    assert_row_topk(wide[:, 1:], topk_triton.row_topk(wide[:, 1:], 7), 7)


def test_rows_wider_than_one_program_go_to_torch_topk_in_ascending_order(interpret):
    scores = torch.randn(2, topk_triton.MAX_BLOCK + 5)
    assert_row_topk(scores, topk_triton.row_topk(scores, 40), 40)


def test_only_the_triton_backend_writes_masks_itself(interpret):
    from moc_lightning.ffn.topk import row_mask_native

    assert row_mask_native("triton", torch.device("cpu"))
    assert not row_mask_native("torch", torch.device("cpu"))


def stable_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 (bool) of the k best of each row, the lowest channels first among equal scores (NaN
    ranks as -inf)."""
    order = torch.argsort(scores.double().nan_to_num(nan=float("-inf")), dim=1, descending=True, stable=True)[:, :k]
    return torch.zeros(scores.shape, dtype=torch.bool).scatter_(1, order, True)


@pytest.mark.parametrize("width,k", [(38, 5), (64, 7), (70, 70), (530, 100), (1000, 100), (2736, 512), (2740, 300)])
@pytest.mark.parametrize("ties", [False, True])
def test_row_topk_mask_keeps_a_stable_sorts_channels(interpret, width, k, ties):
    """The word kernel writing a bitmask (one byte a lane): whole int32 words a row, bits past the
    row zero, exactly the channels of a stable sort (ties included), as mask_from_indices packs
    row_topk's indices; 2740 is an even width whose rows do not align to 16 bytes."""
    scores = random_scores(5, width, torch.bfloat16, ties)
    scores[1, :4] = torch.tensor([float("nan"), float("-inf"), -0.0, 0.0])
    mask = topk_triton.row_topk_mask(scores, k)
    assert mask.dtype == torch.uint8 and mask.shape == (5, topk_triton.mask_bytes(width))
    assert topk_triton.mask_bytes(width) % 4 == 0 and topk_triton.mask_bytes(width) * 8 >= width
    assert torch.equal(topk_triton.mask_to_dense(mask, width), stable_mask(scores, k))
    bits = (mask.unsqueeze(2) >> torch.arange(8, dtype=torch.uint8)) & 1
    assert int(bits.view(5, -1)[:, width:].sum()) == 0, "bits past the row must be zero"
    assert torch.equal(mask, topk_triton.mask_from_indices(topk_triton.row_topk(scores, k), width))


@pytest.mark.parametrize("dtype,width", [(torch.float32, 300), (torch.bfloat16, 37), (torch.float16, 64)])
def test_row_topk_mask_of_other_rows_comes_from_indices(interpret, dtype, width):
    """Rows the word kernel does not take (not bf16, or an odd width) get the mask of row_topk's
    indices."""
    scores = random_scores(4, width, dtype, ties=True)
    mask = topk_triton.row_topk_mask(scores, 9)
    assert torch.equal(topk_triton.mask_to_dense(mask, width), stable_mask(scores, 9))


def test_mask_from_indices_sets_bit_b_of_word_w_for_channel_32w_plus_b():
    idx = torch.tensor([[0, 31, 32, 69], [1, 2, 3, 40]])
    words = topk_triton.mask_from_indices(idx, 70).view(torch.int32)
    assert words.shape == (2, 3)
    assert words[0].tolist() == [1 | -(1 << 31), 1, 1 << 5]
    assert words[1].tolist() == [0b1110, 1 << 8, 0]


def test_row_topk_mask_refuses_bad_k(interpret):
    with pytest.raises(ValueError, match="k = 0"):
        topk_triton.row_topk_mask(torch.randn(2, 40).bfloat16(), 0)


def test_row_topk_takes_strided_rows(interpret):
    scores = torch.randn(6, 90)[:, 5:80]
    assert_row_topk(scores, topk_triton.row_topk(scores, 11), 11)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width,a,b", [
    (48, 2, 8),     # b divides the width
    (44, 2, 8),     # ragged last group of 4
    (45, 3, 7),     # b not a power of two, last group of 3 keeps 3
    (41, 5, 8),     # last group of 1 keeps min(a, 1) = 1
    (50, 9, 16),    # more picks than the argmax kernel takes: radix select per group
    (21, 4, 4),     # a == b keeps everything
    (20, 1, 1),
])
def test_group_topk_matches_torch(interpret, dtype, width, a, b):
    scores = random_scores(6, width, dtype, ties=True)
    idx = topk_triton.group_topk(scores, a, b)
    ref = _torch_group_topk(scores, a, b)
    full, rest = divmod(width, b)
    assert idx.shape == ref.shape == (6, full * a + min(a, rest)) and idx.dtype == torch.int64
    for row in idx.tolist():
        assert len(set(row)) == idx.shape[1]
    got, want = scores.gather(1, idx).double(), scores.gather(1, ref).double()
    bounds = [(g * a, (g + 1) * a, g * b) for g in range(full)] + [(full * a, idx.shape[1], full * b)] * bool(rest)
    for lo, hi, first_col in bounds:  # each group's picks sit in its own slots and columns
        assert torch.equal(got[:, lo:hi].sort(dim=1).values, want[:, lo:hi].sort(dim=1).values)
        assert bool(((idx[:, lo:hi] >= first_col) & (idx[:, lo:hi] < first_col + b)).all())


def test_group_topk_refuses_bad_groups(interpret):
    with pytest.raises(ValueError, match="1 <= a <= b"):
        topk_triton.group_topk(torch.randn(2, 16), 3, 2)


def test_row_topk_refuses_bad_k_and_dtype(interpret):
    with pytest.raises(ValueError, match=r"k = 0 must be in \[1, 16\]"):
        topk_triton.row_topk(torch.randn(2, 16), 0)
    with pytest.raises(TypeError, match="bf16, fp16 or fp32"):
        topk_triton.row_topk(torch.randn(2, 16, dtype=torch.float64), 3)


@pytest.mark.parametrize("placement", ["pre_silu", "post_silu"])
@pytest.mark.parametrize("group", [None, (2, 8)])
def test_select_channels_triton_matches_torch(interpret, placement, group):
    g = torch.randn(10, 44)
    kw = dict(k=9, group=group, placement=placement)
    got = select_channels(g, backend="triton", **kw).sort(dim=1).values
    want = select_channels(g, backend="torch", **kw).sort(dim=1).values
    assert torch.equal(got, want)  # continuous random scores: no ties, one right answer


@pytest.mark.parametrize("group", [None, "2:8"])
def test_moc_ffn_with_triton_topk_matches_torch_topk(interpret, group):
    x = torch.randn(12, 16)
    grad_out = torch.randn(12, 16)
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        ffn = build_ffn(FFNConfig(kind="moc", d_model=16, d_ffn=44, k=10, group=group, topk_backend=backend))
        xi = x.clone().requires_grad_(True)
        out = ffn(xi)
        out.backward(grad_out)
        results[backend] = [out.detach(), xi.grad] + [p.grad for p in ffn.parameters()]
    for got, want in zip(results["triton"], results["torch"]):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_auto_takes_triton_on_cuda_only(monkeypatch):
    """On CPU triton runs only in its interpreter: tests may name it, `auto` keeps torch."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    if topk_triton.HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert resolve_backend("auto", torch.device("cpu")) == "torch"
        assert resolve_backend("triton", torch.device("cpu")) == "triton"
        assert resolve_backend("auto", torch.device("cuda")) == "triton"  # by device type: no GPU needed
    assert FFNConfig(kind="moc", topk_backend="triton").topk_backend == "triton"
    assert FFNConfig(kind="moc", topk_backend="raft").topk_backend == "raft"


def test_triton_backend_refused_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="topk_backend = 'triton' does not run on cpu: .*TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))


def test_kernels_import_and_auto_works_without_triton():
    """A machine without triton: the kernel module imports, says why, and `auto` falls to torch."""
    code = (
        "import torch\n"
        "from moc_lightning.ffn import select_channels\n"
        "from moc_lightning.ffn.topk import resolve_backend\n"
        "from moc_lightning.kernels import topk_triton\n"
        "assert not topk_triton.HAS_TRITON\n"
        "assert 'triton is not installed' in topk_triton.unavailable_reason(torch.device('cuda'))\n"
        "assert resolve_backend('auto', torch.device('cpu')) == 'torch'\n"
        "assert select_channels(torch.randn(3, 20), k=4).shape == (3, 4)\n"
    )
    result = run_without_triton(code)
    assert result.returncode == 0, result.stderr


def test_raft_refused_on_cpu_with_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv(raft_select_k.HOME_ENV, str(tmp_path))  # no RAFT there
    with pytest.raises(ValueError) as info:
        resolve_backend("raft", torch.device("cpu"))
    message = str(info.value)
    assert "\n" not in message
    assert "topk_backend = 'raft' does not run on cpu: RAFT select_k runs on CUDA tensors only" in message
    assert f"MOC_RAFT_HOME={tmp_path} lacks raft/matrix/detail/select_radix.cuh" in message
    assert "pip install libraft-cu13" in message and "use 'auto' or 'torch' instead" in message
    with pytest.raises(RuntimeError, match="RAFT select_k runs on CUDA tensors only"):
        raft_select_k.row_topk(torch.randn(2, 8), 3)
    assert resolve_backend("auto", torch.device("cpu")) != "raft"


def test_raft_missing_headers_say_what_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv(raft_select_k.HOME_ENV, str(tmp_path))
    location, why = raft_select_k.find_raft()
    assert location is None
    assert f"MOC_RAFT_HOME={tmp_path} lacks raft/matrix/detail/select_radix.cuh" in why
    assert "librmm.so" in why
    assert "pip install libraft-cu13" in raft_select_k.HOW_TO_PROVIDE


def test_raft_home_with_everything_is_found(tmp_path, monkeypatch):
    for header in raft_select_k.REQUIRED_HEADERS:
        (tmp_path / "include" / header).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "include" / header).write_text("")
    (tmp_path / "lib").mkdir()
    for lib in raft_select_k.REQUIRED_LIBS:
        (tmp_path / "lib" / lib).write_text("")
    monkeypatch.setenv(raft_select_k.HOME_ENV, str(tmp_path))
    location, why = raft_select_k.find_raft()
    assert why == "" and location.include_dirs == (str(tmp_path / "include"),)
    assert location.lib_dirs == (str(tmp_path / "lib"),)


def test_raft_without_wheels_names_them(monkeypatch):
    monkeypatch.delenv(raft_select_k.HOME_ENV, raising=False)
    monkeypatch.setattr(raft_select_k, "_package_dir", lambda name: None)
    location, why = raft_select_k.find_raft()
    assert location is None and why == "no installed wheel provides libraft, librmm, rapids_logger"


@pytest.mark.parametrize("placement", ["pre_silu", "post_silu"])
def test_select_channel_mask_from_any_backend(interpret, placement):
    """The triton backend writes the mask itself, the torch one through its indices: the same
    channels (no ties in random scores), those select_channels picks."""
    from moc_lightning.ffn.topk import select_channel_mask

    g = torch.randn(6, 70).bfloat16()
    want = torch.zeros(6, 70, dtype=torch.bool).scatter_(
        1, select_channels(g, k=9, placement=placement, backend="torch").long(), True)
    for backend in ("torch", "triton"):
        mask = select_channel_mask(g, k=9, placement=placement, backend=backend)
        assert mask.shape == (6, topk_triton.mask_bytes(70))
        assert torch.equal(topk_triton.mask_to_dense(mask, 70), want), backend
