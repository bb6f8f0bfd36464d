"""The chunked lm_head + cross-entropy loss (ModelConfig.loss_chunk_tokens): same loss and
gradients as the plain full-logits path, without saving the (tokens, vocab) logits."""

from __future__ import annotations

import json
import math
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from moc_lightning.models import ModelConfig, MoCTransformer
from moc_lightning.models.chunked_loss import chunked_lm_head_loss
from moc_lightning.training.callbacks import ActivationMemoryMonitor
from moc_lightning.training.module import MoCLanguageModel

N, D, V = 37, 24, 97  # 37 rows: prime, so most chunk sizes leave a short last chunk


def inputs(dtype=torch.float32, seed=0, ignored=(0, 5, 6, 36)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(ignored)] = -100
    return h, w, labels


def reference(h, w, labels):
    """Loss and gradients from plain F.cross_entropy on float64 logits."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    loss = F.cross_entropy(h64 @ w64.T, labels, ignore_index=-100)
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


def chunked(h, w, labels, chunk):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = chunked_lm_head_loss(h, w, labels, chunk)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def assert_close(actual, expected, rtol, atol):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# 1 row at a time, 5 and 16 (neither divides 37), 37 exactly, and more rows than there are
@pytest.mark.parametrize("chunk", [1, 5, 16, N, 1000])
def test_loss_and_gradients_match_float64_reference(chunk):
    h, w, labels = inputs()
    ref = reference(h, w, labels)
    got = chunked(h, w, labels, chunk)
    for actual, expected in zip(got, ref):
        assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_within_bf16_tolerance():
    h, w, labels = inputs(torch.bfloat16, seed=1)
    ref_loss, ref_h, ref_w = reference(h, w, labels)  # exact math on the same bf16 values
    loss, grad_h, grad_w = chunked(h, w, labels, 8)
    assert loss.dtype == torch.float32 and grad_h.dtype == grad_w.dtype == torch.bfloat16
    # bf16 logits and gradients (8 bits of mantissa): errors of about 1e-4 in the loss and 3e-3
    # in the gradients here, the same as the plain bf16 path's
    assert abs(loss.item() - ref_loss.item()) < 1e-3 * ref_loss.item()
    for actual, expected in ((grad_h, ref_h), (grad_w, ref_w)):
        assert (actual.double() - expected).norm() < 1e-2 * expected.norm()


def test_all_labels_ignored_is_nan_with_zero_gradients_like_cross_entropy():
    h, w, labels = inputs(ignored=range(N))
    loss, grad_h, grad_w = chunked(h, w, labels, 8)
    plain = F.cross_entropy(h @ w.T, labels, ignore_index=-100)
    assert math.isnan(loss.item()) and math.isnan(plain.item())
    assert not grad_h.any() and not grad_w.any()


def test_chunk_size_must_be_a_positive_integer():
    h, w, labels = inputs()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_tokens"):
            chunked_lm_head_loss(h, w, labels, bad)


# --- saved memory --------------------------------------------------------------------------------


def saved_bytes(fn) -> int:
    """Bytes of every distinct storage autograd saves while fn() runs (weights included)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total


def test_saved_bytes_are_far_below_the_logits():
    rows, vocab, d = 512, 4096, 16
    h = torch.randn(rows, d, requires_grad=True)
    w = torch.randn(vocab, d, requires_grad=True)
    labels = torch.randint(0, vocab, (rows,))
    logits_bytes = rows * vocab * 4
    plain = saved_bytes(lambda: F.cross_entropy((h @ w.T).float(), labels))
    kept = saved_bytes(lambda: chunked_lm_head_loss(h, w, labels, 64))
    assert plain >= logits_bytes  # the counter sees the plain path's float32 log-softmax
    # h, W, labels and one float32 per row: (rows x (d + 3) + vocab x d) x 4 bytes
    assert kept == (h.numel() + w.numel()) * 4 + rows * (8 + 4)
    assert kept < logits_bytes / 20


# --- in the model --------------------------------------------------------------------------------


def tiny(chunk: int, **overrides) -> MoCTransformer:
    torch.manual_seed(0)
    return MoCTransformer(ModelConfig.from_preset("llama-tiny", loss_chunk_tokens=chunk, **overrides))


@pytest.mark.parametrize("tied", [True, False])
def test_model_gradients_equal_plain_path(tied):
    ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, 10:20] = -100
    results = []
    for chunk in (0, 23):  # 23 does not divide 3 x 40
        model = tiny(chunk, tie_embeddings=tied)
        out = model(ids, labels=labels)
        assert (out.logits is None) == (chunk > 0)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain_loss, plain_grads), (loss, grads) = results
    assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == grads.keys() and ("lm_head.weight" in grads) != tied
    for name in grads:
        assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)


def test_model_under_bf16_autocast_matches_plain_path():
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))
    losses, grads = [], []
    for chunk in (0, 16):
        model = tiny(chunk)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        assert model.lm_head.weight.grad.dtype == torch.float32
        losses.append(loss.item())
        grads.append(model.lm_head.weight.grad)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert (grads[1] - grads[0]).norm() < 2e-2 * grads[0].norm()


def test_without_labels_the_model_still_returns_logits():
    model = tiny(16)
    ids = torch.randint(0, 512, (2, 8))
    out = model(ids)
    assert out.loss is None and out.logits.shape == (2, 8, 512)
    with torch.no_grad():  # validation: loss only, no graph
        assert model(ids, labels=ids).loss.isfinite()


# --- config --------------------------------------------------------------------------------------


def test_config_validates_and_round_trips():
    for bad in (-1, 2.0, "64", True, None):
        with pytest.raises(ValueError, match=r"ModelConfig\.loss_chunk_tokens = .* is not allowed"):
            ModelConfig.from_preset("llama-tiny", loss_chunk_tokens=bad)
    assert ModelConfig().loss_chunk_tokens == 0
    cfg = ModelConfig.from_preset("llama-tiny", loss_chunk_tokens=4096)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # a config saved before the field existed loads with the plain path
    old = {k: v for k, v in cfg.to_dict().items() if k != "loss_chunk_tokens"}
    assert ModelConfig.from_dict(old).loss_chunk_tokens == 0


def test_hydra_override_reaches_the_model_config():
    from moc_lightning.cli.config import build_job, compose

    job = build_job(compose(["model=llama-tiny", "model.loss_chunk_tokens=128"]))
    assert job.model.loss_chunk_tokens == 128


# --- a training run ------------------------------------------------------------------------------


def test_lightning_training_and_validation_steps_run_chunked(tmp_path):
    cfg = ModelConfig.from_preset("llama-tiny", ffn={"kind": "moc", "k": 8}, loss_chunk_tokens=48)
    torch.manual_seed(0)
    module = MoCLanguageModel(model=cfg.to_dict(), optim={}, total_steps=2)
    g = torch.Generator().manual_seed(4)
    loader = DataLoader([{"input_ids": torch.randint(0, 512, (32,), generator=g)} for _ in range(8)], batch_size=4)
    monitor = ActivationMemoryMonitor(every_n_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, val_check_interval=2, limit_val_batches=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[monitor], default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, loader, loader)
    assert trainer.global_step == 2
    assert math.isfinite(trainer.callback_metrics["train/loss"]) and math.isfinite(trainer.callback_metrics["val/loss"])
    # the loss's saved bytes stay under lm_head's name and match the analytic figure exactly
    latest = monitor.latest
    assert latest["activation/lm_head_mb"] == pytest.approx(latest["activation/lm_head_analytic_mb"])
