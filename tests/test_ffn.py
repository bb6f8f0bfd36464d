"""Every FFN kind, placement, group and recompute setting against the float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ffn_reference import (
    assert_valid_topk_mask,
    reference_backrazor_grads,
    reference_grads,
    reference_mask,
)
from moc_lightning.ffn import FFNConfig, build_ffn, select_channels

D_MODEL, D_FFN, ROWS = 16, 44, 24  # 44 channels: groups of 8 leave a ragged last group of 4


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_module(cfg, x, grad_out, dtype=torch.float32):
    """Output and gradients (x, gate, up, down) of the module built from cfg."""
    torch.manual_seed(1)
    ffn = build_ffn(cfg).to(dtype)
    x = x.to(dtype).clone().requires_grad_(True)
    out = ffn(x)
    out.backward(grad_out.to(dtype))
    weights = (ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight)
    return ffn, out.detach(), (x.grad, *(w.grad for w in weights))


def check_against_reference(ffn, out, grads, x, grad_out, kind, mask=None, tol=2e-6):
    weights = [m.weight.detach() for m in (ffn.gate_proj, ffn.up_proj, ffn.down_proj)]
    ref_out, ref_grads = reference_grads(kind, x, *weights, grad_out, mask=mask)
    assert out.shape == ref_out.shape
    assert rel_err(out, ref_out) < tol
    for name, got, want in zip(("x", "gate_proj", "up_proj", "down_proj"), grads, ref_grads):
        assert got.shape == want.shape, name
        assert rel_err(got, want) < tol, f"gradient of {name}: relative error {rel_err(got, want):.2e}"


@pytest.fixture
def inputs():
    x = torch.randn(ROWS, D_MODEL)
    grad_out = torch.randn(ROWS, D_MODEL)
    return x, grad_out


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("kind", ["swiglu", "relu", "drelu"])
def test_dense_kinds_match_reference(kind, checkpoint, inputs):
    x, grad_out = inputs
    cfg = FFNConfig(kind=kind, d_model=D_MODEL, d_ffn=D_FFN, checkpoint=checkpoint)
    ffn, out, grads = run_module(cfg, x, grad_out)
    check_against_reference(ffn, out, grads, x, grad_out, kind)


MOC_SETTINGS = [
    # (k, group): plain Top-K, groups dividing d_ffn or not, a last group shorter than a
    (7, None),
    (1, None),
    (D_FFN, None),
    (None, "2:8"),   # 5 full groups of 8 and a last group of 4 keeping 2
    (None, "2:4"),   # 11 full groups
    (None, "5:8"),   # the last group of 4 keeps min(5, 4) = 4
    (None, "3:16"),  # 2 groups of 16 and one of 12
    (None, "1:64"),  # b > d_ffn: one group of 44 keeps 1
]


@pytest.mark.parametrize("placement", ["pre_silu", "post_silu"])
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("k,group", MOC_SETTINGS)
def test_moc_matches_reference(k, group, placement, recompute, inputs):
    x, grad_out = inputs
    cfg = FFNConfig(kind="moc", d_model=D_MODEL, d_ffn=D_FFN, k=k or 1, group=group, placement=placement,
                    recompute=recompute)
    ffn, out, grads = run_module(cfg, x, grad_out)
    g = x.double() @ ffn.gate_proj.weight.detach().double().T
    mask = reference_mask(g, cfg.k, group, placement)
    assert int(mask.sum(1)[0]) == cfg.kept_channels
    # With random inputs there are no ties: the module must keep exactly the reference's channels.
    picked = select_channels(F.linear(x, ffn.gate_proj.weight.detach()), k=cfg.k, group=cfg.group_ab, placement=placement)
    module_mask = torch.zeros_like(mask).scatter_(1, picked, 1.0)
    assert torch.equal(module_mask, mask)
    check_against_reference(ffn, out, grads, x, grad_out, "moc", mask=mask)


@pytest.mark.parametrize("group", [None, "2:8", "3:8"])
def test_moc_with_whole_ffn_checkpoint(group, inputs):
    x, grad_out = inputs
    cfg = FFNConfig(kind="moc", d_model=D_MODEL, d_ffn=D_FFN, k=9, group=group, checkpoint=True)
    ffn, out, grads = run_module(cfg, x, grad_out)
    g = x.double() @ ffn.gate_proj.weight.detach().double().T
    check_against_reference(ffn, out, grads, x, grad_out, "moc", mask=reference_mask(g, 9, group))


@pytest.mark.parametrize("placement", ["pre_silu", "post_silu"])
@pytest.mark.parametrize("k,group", [(5, None), (None, "2:8"), (None, "3:8")])
def test_moc_ties_keep_exactly_k_and_match_reference(k, group, placement):
    """Gate rows repeated so that many channels tie: any tie-break is allowed, but exactly K (or a
    per group) channels must be kept, none outranked by a dropped one, and the output and
    gradients must be those of the mask actually chosen."""
    cfg = FFNConfig(kind="moc", d_model=D_MODEL, d_ffn=D_FFN, k=k or 1, group=group, placement=placement)
    torch.manual_seed(3)
    ffn = build_ffn(cfg)
    with torch.no_grad():  # integer-valued weights and inputs: G is exact in float32 and float64
        base = torch.randint(-2, 3, (4, D_MODEL)).float()
        ffn.gate_proj.weight.copy_(base[torch.arange(D_FFN) % 4])
    x = torch.randint(-2, 3, (ROWS, D_MODEL)).float()
    grad_out = torch.randn(ROWS, D_MODEL)
    g = F.linear(x, ffn.gate_proj.weight.detach())
    assert (g.unsqueeze(2) == g.unsqueeze(1)).sum() > ROWS * D_FFN * 5, "the test needs ties"
    picked = select_channels(g, k=cfg.k, group=cfg.group_ab, placement=placement)
    mask = torch.zeros(ROWS, D_FFN, dtype=torch.float64).scatter_(1, picked, 1.0)
    assert_valid_topk_mask(mask, g, cfg.k, group, placement)
    xg = x.clone().requires_grad_(True)
    out = ffn(xg)
    out.backward(grad_out)
    grads = (xg.grad, ffn.gate_proj.weight.grad, ffn.up_proj.weight.grad, ffn.down_proj.weight.grad)
    check_against_reference(ffn, out.detach(), grads, x, grad_out, "moc", mask=mask)


def test_moc_saves_only_compact_tensors():
    cfg = FFNConfig(kind="moc", d_model=D_MODEL, d_ffn=D_FFN, k=6)
    ffn = build_ffn(cfg)
    params = {p.data_ptr() for p in ffn.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ffn(torch.randn(ROWS, D_MODEL, requires_grad=True))
    activations = [t for t in saved if t.data_ptr() not in params]
    shapes = sorted((tuple(t.shape), str(t.dtype)) for t in activations)
    expected = [((ROWS, D_MODEL), torch.float32), ((ROWS, 6), torch.int16), ((ROWS, 6), torch.float32),
                ((ROWS, 6), torch.float32)]
    assert shapes == sorted((shape, str(dtype)) for shape, dtype in expected)


def test_moc_indices_widen_past_int16():
    from moc_lightning.ffn.compact import index_dtype

    assert index_dtype(2736) == torch.int16 and index_dtype(32768) == torch.int16
    assert index_dtype(32769) == torch.int32


def test_moc_under_autocast_saves_bf16_and_grads_reach_fp32_weights():
    cfg = FFNConfig(kind="moc", d_model=D_MODEL, d_ffn=D_FFN, k=6)
    ffn = build_ffn(cfg)
    x = torch.randn(2, ROWS, D_MODEL, requires_grad=True)
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.dtype) or t, lambda t: t
    ):
        out = ffn(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.float32 not in saved
    out.float().sum().backward()
    assert ffn.gate_proj.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    # bf16 against the float64 reference: error of bf16 rounding, not of a wrong formula
    g = x.detach().reshape(-1, D_MODEL).double() @ ffn.gate_proj.weight.detach().double().T
    ref_out, _ = reference_grads("moc", x.detach().reshape(-1, D_MODEL), ffn.gate_proj.weight, ffn.up_proj.weight,
                                 ffn.down_proj.weight, torch.ones(2 * ROWS, D_MODEL), mask=reference_mask(g, 6))
    assert rel_err(out.reshape(-1, D_MODEL), ref_out) < 2e-2


@pytest.mark.parametrize("keep", [0.3, 0.05])
def test_backrazor_matches_its_definition(keep, inputs):
    x, grad_out = inputs
    cfg = FFNConfig(kind="backrazor", d_model=D_MODEL, d_ffn=D_FFN, backrazor_keep=keep)
    ffn, out, grads = run_module(cfg, x, grad_out)
    weights = [m.weight.detach() for m in (ffn.gate_proj, ffn.up_proj, ffn.down_proj)]
    ref_out, ref_grads = reference_backrazor_grads(x, *weights, grad_out, keep)
    assert rel_err(out, ref_out) < 2e-6
    for name, got, want in zip(("x", "gate_proj", "up_proj", "down_proj"), grads, ref_grads):
        assert rel_err(got, want) < 2e-6, name
    # and it is an approximation: different from the exact dense gradient
    _, exact = reference_grads("swiglu", x, *weights, grad_out)
    assert rel_err(grads[1], exact[1]) > 1e-3


def test_backrazor_keeping_everything_is_exact(inputs):
    x, grad_out = inputs
    cfg = FFNConfig(kind="backrazor", d_model=D_MODEL, d_ffn=D_FFN, backrazor_keep=1.0)
    ffn, out, grads = run_module(cfg, x, grad_out)
    check_against_reference(ffn, out, grads, x, grad_out, "swiglu")


def test_module_names_shapes_and_leading_dims():
    for kind in ("swiglu", "moc", "relu", "drelu", "backrazor"):
        ffn = build_ffn(FFNConfig(kind=kind, d_model=D_MODEL, d_ffn=D_FFN, k=4))
        assert [n for n, _ in ffn.named_parameters()] == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
        assert ffn.gate_proj.weight.shape == (D_FFN, D_MODEL) and ffn.down_proj.weight.shape == (D_MODEL, D_FFN)
        assert all(m.bias is None for m in (ffn.gate_proj, ffn.up_proj, ffn.down_proj))
        x = torch.randn(2, 3, 5, D_MODEL)
        flat = ffn(x.reshape(-1, D_MODEL)).reshape(2, 3, 5, D_MODEL)
        torch.testing.assert_close(ffn(x), flat)
