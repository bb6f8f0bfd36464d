"""MoC's Triton training kernels (moc_lightning.kernels.moc_train) under TRITON_INTERPRET=1 on CPU:
outputs and all four gradients against the float64 reference and against the torch path, saved
bytes equal to the torch path's, the kernels on their own, and the errors where they cannot run."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

# Triton decides whether a kernel is interpreted when the kernel is decorated, i.e. when its
# module is imported: set the switch first (and restore it, so other test files are unaffected).
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
import triton  # noqa: E402,F401  (these tests need triton; CI installs it with torch)

from moc_lightning.kernels import moc_train, topk_triton  # noqa: E402

if type(moc_train._scatter_forward_kernel).__name__ != "InterpretedFunction":
    moc_train = importlib.reload(moc_train)  # imported earlier without the switch
if _PREVIOUS_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET

from ffn_reference import assert_valid_topk_mask, reference_grads, reference_mask  # noqa: E402
from moc_lightning.ffn import FFNConfig, build_ffn, functions  # noqa: E402
from moc_lightning.ffn.compact import densify  # noqa: E402
from moc_lightning.profiling import measure_saved_bytes  # noqa: E402
from without_triton import run_without_triton  # noqa: E402

GRAD_NAMES = ("x", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(cfg, x, grad_out, dtype=torch.float32):
    """Output, gradients (x, gate, up, down), the kept-channel mask the module saved, the module."""
    torch.manual_seed(1)
    ffn = build_ffn(cfg).to(dtype)
    xg = x.to(dtype).clone().requires_grad_(True)
    saved = []
    keep_kept = lambda t: (saved.append(t) if t.dtype in (torch.int16, torch.int32, torch.uint8) else None) or t  # noqa: E731
    with torch.autograd.graph.saved_tensors_hooks(keep_kept, lambda t: t):
        out = ffn(xg)
    out.backward(grad_out.to(dtype))
    mask = saved_mask(saved[0], x.shape[0], cfg.d_ffn)
    grads = (xg.grad, ffn.gate_proj.weight.grad, ffn.up_proj.weight.grad, ffn.down_proj.weight.grad)
    return out.detach(), grads, mask, ffn


def saved_mask(saved: torch.Tensor, rows: int, d_ffn: int) -> torch.Tensor:
    """The 0/1 float64 mask (rows x d_ffn) of what MoC saved: kept channels' indices, or a
    bitmask (uint8) of them."""
    if saved.dtype == torch.uint8:
        return topk_triton.mask_to_dense(saved, d_ffn).double()
    return torch.zeros(rows, d_ffn, dtype=torch.float64).scatter_(1, saved.long(), 1.0)


# (d_ffn, rows, k, group, topk_backend, recompute)
CASES = [
    (44, 24, 7, None, "torch", True),
    (70, 13, 9, None, "torch", False),   # d_ffn and rows not multiples of any block
    (44, 24, 1, None, "torch", True),
    (44, 24, 44, None, "torch", False),  # every channel kept
    (44, 24, None, "2:8", "auto", True),  # 5 groups of 8 and a ragged one of 4
    (44, 24, None, "2:8", "auto", False),
    (70, 13, None, "3:16", "auto", False),  # a last group of 6
    (44, 24, None, "5:8", "auto", True),   # the last group of 4 keeps all 4
    (44, 24, None, "1:64", "auto", True),  # one group wider than d_ffn
    (44, 24, None, "2:4", "auto", False),
    (44, 24, None, "3:7", "torch", True),  # b not a power of two: Top-K backend + scatter
    (70, 13, None, "2:8", "torch", False),  # explicit backend: gathered and scattered
    # the triton row Top-K writes a bitmask: the mask forward and backward, the mask saved
    (70, 13, 9, None, "triton", True),
    (70, 13, 20, None, "triton", False),
    (44, 24, 44, None, "triton", True),
]


@pytest.mark.parametrize("placement", ["pre_silu", "post_silu"])
@pytest.mark.parametrize("d_ffn,rows,k,group,backend,recompute", CASES)
def test_triton_path_matches_reference_and_torch_path(d_ffn, rows, k, group, backend, recompute, placement):
    cfg = FFNConfig(kind="moc", d_model=16, d_ffn=d_ffn, k=k or 1, group=group, placement=placement,
                    recompute=recompute, topk_backend=backend)
    x, grad_out = torch.randn(rows, 16), torch.randn(rows, 16)
    out, grads, mask, ffn = run(cfg.replace(moc_kernel="triton"), x, grad_out)
    torch_out, torch_grads, torch_mask, torch_ffn = run(cfg.replace(moc_kernel="torch"), x, grad_out)
    g = x.double() @ ffn.gate_proj.weight.detach().double().T
    want_mask = reference_mask(g, cfg.k, group, placement)
    assert torch.equal(mask, want_mask), "random inputs have no ties: the reference's channels must be kept"
    weights = [m.weight.detach() for m in (ffn.gate_proj, ffn.up_proj, ffn.down_proj)]
    ref_out, ref_grads = reference_grads("moc", x, *weights, grad_out, mask=want_mask)
    assert out.shape == ref_out.shape == (rows, 16)
    assert rel_err(out, ref_out) < 2e-6 and rel_err(out, torch_out) < 2e-6
    for name, got, want, torch_got in zip(GRAD_NAMES, grads, ref_grads, torch_grads):
        assert got.shape == want.shape, name
        assert rel_err(got, want) < 2e-6, f"gradient of {name}: {rel_err(got, want):.2e} from the reference"
        assert rel_err(got, torch_got) < 2e-6, f"gradient of {name}: {rel_err(got, torch_got):.2e} from the torch path"
    xs = x.clone().requires_grad_(True)
    expected = measure_saved_bytes(torch_ffn, xs).total
    if backend == "triton":  # a bitmask of whole int32 words a row in place of int16 indices
        expected += rows * (4 * -(-d_ffn // 32) - 2 * cfg.k)
    assert measure_saved_bytes(ffn, xs).total == expected


@pytest.mark.parametrize("placement", ["pre_silu", "post_silu"])
@pytest.mark.parametrize("k,group,backend", [(5, None, "torch"), (None, "2:8", "auto"), (None, "3:8", "auto")])
def test_ties_keep_exactly_k_and_gradients_follow_the_chosen_mask(k, group, backend, placement):
    cfg = FFNConfig(kind="moc", d_model=16, d_ffn=44, k=k or 1, group=group, placement=placement, topk_backend=backend,
                    moc_kernel="triton")
    torch.manual_seed(3)
    base = torch.randint(-2, 3, (4, 16)).float()
    x = torch.randint(-2, 3, (24, 16)).float()
    grad_out = torch.randn(24, 16)
    torch.manual_seed(1)
    ffn = build_ffn(cfg)
    with torch.no_grad():  # integer-valued: G is exact, and channels repeat every 4, so many tie
        ffn.gate_proj.weight.copy_(base[torch.arange(44) % 4])
    xg = x.clone().requires_grad_(True)
    indices = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (indices.append(t) if t.dtype == torch.int16 else None) or t,
                                                  lambda t: t):
        out = ffn(xg)
    out.backward(grad_out)
    mask = torch.zeros(24, 44, dtype=torch.float64).scatter_(1, indices[0].long(), 1.0)
    assert_valid_topk_mask(mask, F.linear(x, ffn.gate_proj.weight.detach()), cfg.k, group, placement)
    weights = [m.weight.detach() for m in (ffn.gate_proj, ffn.up_proj, ffn.down_proj)]
    ref_out, ref_grads = reference_grads("moc", x, *weights, grad_out, mask=mask)
    assert rel_err(out.detach(), ref_out) < 2e-6
    grads = (xg.grad, ffn.gate_proj.weight.grad, ffn.up_proj.weight.grad, ffn.down_proj.weight.grad)
    for name, got, want in zip(GRAD_NAMES, grads, ref_grads):
        assert rel_err(got, want) < 2e-6, name


@pytest.mark.parametrize("group,backend", [(None, "torch"), ("2:8", "auto")])
def test_half_precision_under_autocast_matches_torch_path(group, backend):
    """fp16 (the interpreter's bf16 matrix product is not exact, fp16's is): the casts to the
    storage dtype, and gradients reaching fp32 weights."""
    results = {}
    for kernel in ("torch", "triton"):
        cfg = FFNConfig(kind="moc", d_model=16, d_ffn=44, k=7, group=group, topk_backend=backend, moc_kernel=kernel)
        torch.manual_seed(1)
        ffn = build_ffn(cfg)
        torch.manual_seed(2)
        x = torch.randn(24, 16, requires_grad=True)
        saved = []
        with torch.autocast("cpu", dtype=torch.float16), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.dtype) or t, lambda t: t
        ):
            out = ffn(x)
        out.float().sum().backward()
        assert out.dtype == torch.float16 and torch.float32 not in saved
        assert ffn.gate_proj.weight.grad.dtype == torch.float32
        results[kernel] = (out.float(), x.grad, ffn.gate_proj.weight.grad, ffn.up_proj.weight.grad, ffn.down_proj.weight.grad)
    for got, want in zip(results["triton"], results["torch"]):
        assert rel_err(got, want) < 5e-3


def test_scatter_kernels_take_indices_in_any_order_and_int32():
    torch.manual_seed(5)
    rows, width, kept = 11, 70, 9
    g, u = torch.randn(rows, width), torch.randn(rows, width)
    idx = torch.stack([torch.randperm(width)[:kept] for _ in range(rows)]).to(torch.int32)
    pack = moc_train.scatter_forward(g, u, idx, torch.int16, store_sz=True)
    order = idx.long()
    assert pack.idx.dtype == torch.int16 and torch.equal(pack.idx.long(), order)
    g_sel, u_sel = g.gather(1, order), u.gather(1, order)
    s_sel = F.silu(g_sel)
    assert torch.equal(pack.g_sel, g_sel) and torch.equal(pack.u_sel, u_sel)
    torch.testing.assert_close(pack.s_sel, s_sel)
    torch.testing.assert_close(pack.z_sel, s_sel * u_sel)
    torch.testing.assert_close(pack.z_dense, densify(order, s_sel * u_sel, width))
    grad_z = torch.randn(rows, width)
    buf = moc_train.scatter_backward(grad_z, pack.idx, pack.g_sel, pack.u_sel)
    gz = grad_z.gather(1, order)
    dsilu = torch.sigmoid(g_sel) * (1 + g_sel * (1 - torch.sigmoid(g_sel)))
    assert buf.shape == (rows, 3 * width)
    torch.testing.assert_close(buf[:, :width], densify(order, s_sel * u_sel, width))
    torch.testing.assert_close(buf[:, width:2 * width], densify(order, u_sel * gz * dsilu, width))
    torch.testing.assert_close(buf[:, 2 * width:], densify(order, s_sel * gz, width))


def test_scatter_forward_keeps_indices_already_of_the_saved_type():
    """The row Top-K writes int16 indices itself: the forward saves that tensor rather than a copy,
    with the same compact tensors as from int64 indices."""
    torch.manual_seed(6)
    g, u = torch.randn(7, 70), torch.randn(7, 70)
    idx = _ascending_indices(7, 70, 12)
    idx16 = idx.to(torch.int16)
    narrow = moc_train.scatter_forward(g, u, idx16, torch.int16, store_sz=True)
    wide = moc_train.scatter_forward(g, u, idx, torch.int16, store_sz=True)
    assert narrow.idx.data_ptr() == idx16.data_ptr()  # saved as it is, not copied
    assert wide.idx.dtype == torch.int16 and torch.equal(narrow.idx, wide.idx)
    for got, want in zip(narrow[:1] + narrow[2:], wide[:1] + wide[2:]):
        assert torch.equal(got, want)


def _ascending_indices(rows, width, kept, clustered=False):
    if clustered:  # every kept channel in the first tiles: runs longer than a tile's window
        return torch.arange(kept).expand(rows, kept).clone()
    return torch.stack([torch.randperm(width)[:kept].sort().values for _ in range(rows)])


@pytest.mark.parametrize("stored", [False, True])
@pytest.mark.parametrize("rows,width,kept,clustered", [
    (11, 70, 9, False),   # width not a multiple of the 32-channel mask word
    (5, 37, 37, False),   # every channel kept
    (6, 40, 1, False),
    (9, 100, 30, False),
    (4, 70, 40, True),    # every word of the first two full, then 8 kept, then none
    (3, 33, 17, True),
])
def test_mask_kernels_equal_the_scatter_kernels_and_the_formulas(rows, width, kept, clustered, stored):
    """The bitmask forward and backward against the scatter kernels on the same (ascending)
    channels, bit for bit, and the backward against equations 7b-7c in float64."""
    torch.manual_seed(7)
    g, u, grad_z = torch.randn(rows, width), torch.randn(rows, width), torch.randn(rows, width)
    idx = _ascending_indices(rows, width, kept, clustered)
    mask = topk_triton.mask_from_indices(idx, width)
    want = moc_train.scatter_forward(g, u, idx, torch.int16, store_sz=stored)
    pack = moc_train.mask_forward(g, u, mask, kept, store_sz=stored)
    assert pack.idx is mask  # the mask is what backward saves
    for name in ("z_dense", "g_sel", "u_sel") + (("s_sel", "z_sel") if stored else ()):
        assert torch.equal(getattr(pack, name), getattr(want, name)), name
    if not stored:
        assert pack.s_sel is None and pack.z_sel is None
    extra = (pack.s_sel, pack.z_sel) if stored else ()
    buf = moc_train.mask_backward(grad_z, mask, pack.g_sel, pack.u_sel, *extra)
    assert buf.shape == (rows, 3 * width)
    assert torch.equal(buf, moc_train.scatter_backward(grad_z, want.idx, want.g_sel, want.u_sel, *extra))
    g_sel, gz = g.gather(1, idx).double(), grad_z.gather(1, idx).double()
    s_sel, u_sel = F.silu(g_sel), u.gather(1, idx).double()
    dsilu = torch.sigmoid(g_sel) * (1 + g_sel * (1 - torch.sigmoid(g_sel)))
    for part, want_part in enumerate((s_sel * u_sel, u_sel * gz * dsilu, s_sel * gz)):
        torch.testing.assert_close(buf[:, part * width:(part + 1) * width].double(), densify(idx, want_part, width),
                                   rtol=1e-5, atol=1e-6)  # float32 kernel against float64


@pytest.mark.parametrize("width,kept,clustered", [(300, 200, True), (600, 90, False), (256, 256, False)])
def test_mask_kernels_with_the_gpus_tiles(monkeypatch, width, kept, clustered):
    """The GPU's tiles (the other tests use the interpreter's one word of 4 rows): 2 rows of 8
    words, so a tile's slots run across words and rows start at different slots."""
    monkeypatch.setattr(moc_train, "_INTERPRET_MASK", {"BLOCK_R": 2, "WORDS": 8})
    torch.manual_seed(3)
    rows = 5
    g, u, grad_z = torch.randn(rows, width), torch.randn(rows, width), torch.randn(rows, width)
    idx = _ascending_indices(rows, width, kept, clustered)
    mask = topk_triton.mask_from_indices(idx, width)
    want = moc_train.scatter_forward(g, u, idx, torch.int16, store_sz=False)
    pack = moc_train.mask_forward(g, u, mask, kept, store_sz=False)
    assert torch.equal(pack.z_dense, want.z_dense) and torch.equal(pack.g_sel, want.g_sel)
    buf = moc_train.mask_backward(grad_z, mask, pack.g_sel, pack.u_sel)
    assert torch.equal(buf, moc_train.scatter_backward(grad_z, want.idx, want.g_sel, want.u_sel))


def test_mask_kernels_refuse_a_mask_of_the_wrong_shape():
    g = torch.randn(4, 70)
    with pytest.raises(ValueError, match=r"uint8 bitmask of shape \(4, 12\)"):
        moc_train.mask_forward(g, g, torch.zeros(4, 10, dtype=torch.uint8), 5, False)
    with pytest.raises(ValueError, match="uint8 bitmask"):
        moc_train.mask_backward(g, torch.zeros(4, 12, dtype=torch.int32), g[:, :5], g[:, :5])


def test_triton_row_topk_sends_the_ffn_through_the_mask_kernels(monkeypatch):
    calls = []
    for name in ("mask_forward", "mask_backward"):
        kernel = getattr(moc_train, name)
        monkeypatch.setattr(moc_train, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    x = torch.randn(13, 16, requires_grad=True)
    for backend, expected in (("torch", []), ("triton", ["mask_forward", "mask_backward"])):
        calls.clear()
        cfg = FFNConfig(kind="moc", d_model=16, d_ffn=70, k=9, topk_backend=backend, moc_kernel="triton")
        build_ffn(cfg)(x).sum().backward()
        assert calls == expected, backend


@pytest.mark.parametrize("post_silu", [False, True])
def test_group_kernels_keep_each_groups_best_at_its_slots(post_silu):
    torch.manual_seed(6)
    rows, width, a, b = 13, 70, 3, 8
    g, u = torch.randn(rows, width), torch.randn(rows, width)
    pack = moc_train.group_forward(g, u, (a, b), post_silu, torch.int16, store_sz=True)
    assert pack.idx.shape == (rows, 8 * 3 + 3)  # 8 full groups and a last one of 6 keeping 3
    # group j's picks sit at compact slots [3j, 3j + 3), best first
    slots_group = torch.arange(27).div(3, rounding_mode="floor").expand(rows, 27)
    assert torch.equal(pack.idx.long().div(b, rounding_mode="floor"), slots_group)
    scores = F.silu(g).abs() if post_silu else g
    picked = scores.gather(1, pack.idx.long()).view(rows, 9, 3)
    assert (picked[:, :, :-1] >= picked[:, :, 1:]).all()
    mask = torch.zeros(rows, width, dtype=torch.float64).scatter_(1, pack.idx.long(), 1.0)
    assert torch.equal(mask, reference_mask(g, 0, f"{a}:{b}", "post_silu" if post_silu else "pre_silu"))
    z = F.silu(g) * u
    torch.testing.assert_close(pack.z_dense, z * mask.float())
    torch.testing.assert_close(pack.z_sel, z.gather(1, pack.idx.long()))
    grad_z = torch.randn(rows, width)
    buf = moc_train.group_backward(grad_z, pack.idx, pack.g_sel, pack.u_sel, (a, b))
    scattered = moc_train.scatter_backward(grad_z, pack.idx, pack.g_sel, pack.u_sel)
    torch.testing.assert_close(buf, scattered)


def test_resolution_and_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"FFNConfig.moc_kernel = 'cuda' is not allowed: expected one of auto, torch, triton"):
        FFNConfig(kind="moc", moc_kernel="cuda")
    cpu = torch.randn(4, 16)
    assert functions.resolve_moc_kernel("auto", cpu) == "torch"  # the interpreter is for tests, not a default
    assert functions.resolve_moc_kernel("triton", cpu) == "triton"
    with pytest.raises(ValueError, match="float64"):
        functions.resolve_moc_kernel("triton", cpu.double())
    with pytest.raises(ValueError, match="power of two"):
        moc_train.group_forward(cpu, cpu, (3, 7), False, torch.int16, False)
    with pytest.raises(ValueError, match="unit column stride"):
        moc_train.scatter_forward(cpu.t(), cpu.t(), torch.zeros(16, 1, dtype=torch.long), torch.int16, False)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="run on CUDA tensors .*TRITON_INTERPRET=1.*moc_kernel='torch'"):
        build_ffn(FFNConfig(kind="moc", d_model=16, d_ffn=44, moc_kernel="triton"))(cpu)


def test_module_imports_and_refuses_cleanly_without_triton():
    code = (
        "import torch\n"
        "from moc_lightning.kernels import moc_train as m\n"
        "from moc_lightning.ffn import FFNConfig, build_ffn\n"
        "assert not m.TRITON_AVAILABLE\n"
        "build_ffn(FFNConfig(kind='moc', d_model=8, d_ffn=16))(torch.randn(2, 8))  # auto: the torch path\n"
        "try:\n"
        "    build_ffn(FFNConfig(kind='moc', d_model=8, d_ffn=16, moc_kernel='triton'))(torch.randn(2, 8))\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    done = run_without_triton(code)
    assert done.returncode == 0, done.stderr
