"""The monitoring callbacks, run inside real (tiny) Lightning fits on the CPU.

Each fit trains `llama-tiny` for a few steps on fixed random batches and logs to a CSVLogger;
the tests read the metrics back from the CSV and check them against independent computations.
Fits that check values against the weights use lr = 0, so the weights the callbacks saw are the
weights the test sees afterwards.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from moc_lightning.models import ModelConfig, MoCTransformer
from moc_lightning.profiling import measure_model_saved_bytes
from moc_lightning.training.callbacks import (
    ActivationMemoryMonitor,
    ChannelStatsMonitor,
    PeakMemoryMonitor,
    TokensSeen,
    lm_batch_size,
    lm_batch_tokens,
    throughput_monitor,
)

BATCH, SEQ, STEPS, VOCAB = 4, 32, 6, 512
TOKENS = BATCH * SEQ
MOC = {"kind": "moc", "k": 8}


class TinyLM(L.LightningModule):
    """The contract the callbacks rely on: `model`, `model_cfg`, dict batches of input_ids."""

    def __init__(self, ffn: dict, lr: float = 1e-3, device: str = "cpu"):
        super().__init__()
        self.model_cfg = ModelConfig.from_preset("llama-tiny", ffn=ffn)
        self.model = MoCTransformer(self.model_cfg)
        self.lr = lr
        self.flops_per_batch = self.model.flops_per_token(SEQ) * TOKENS

    def training_step(self, batch, batch_idx):
        loss = self.model(batch["input_ids"], labels=batch["input_ids"]).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def make_batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(n)]


def fit(tmp_path: Path, module: L.LightningModule, callbacks: list, steps: int = STEPS, accumulate: int = 1,
        **trainer_kwargs):
    """Train `steps` optimizer steps on fixed batches, in order; return (batches, metrics, trainer)."""
    batches = make_batches(steps * accumulate)
    samples = [{"input_ids": row} for b in batches for row in b]
    loader = DataLoader(samples, batch_size=BATCH, shuffle=False)
    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(
        accelerator=trainer_kwargs.pop("accelerator", "cpu"), devices=1, max_steps=steps, logger=logger,
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accumulate_grad_batches=accumulate, callbacks=callbacks, **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, loader)
    return batches, read_metrics(Path(logger.log_dir) / "metrics.csv"), trainer


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """metric name -> {logger step: value}, from a CSVLogger file."""
    out: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in ("", None):
                    out.setdefault(name, {})[step] = float(value)
    return out


def gate_and_up(model: MoCTransformer, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, G and U of a plain forward, from each FFN's input (independent of the callbacks)."""
    inputs, handles = {}, []
    for i, layer in enumerate(model.layers):
        handles.append(layer.mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0])))
    with torch.no_grad():
        model(input_ids)
    for h in handles:
        h.remove()
    out = []
    for i, layer in enumerate(model.layers):
        x = inputs[i].reshape(-1, model.cfg.d_model)
        out.append((x @ layer.mlp.gate_proj.weight.T, x @ layer.mlp.up_proj.weight.T))
    return out


def all_callbacks(every: int = 1):
    return [
        PeakMemoryMonitor(log_every_n_steps=every),
        throughput_monitor(window_size=3, peak_flops=1e12),  # a peak given, so MFU is logged on CPU too
        TokensSeen(),
        ActivationMemoryMonitor(every_n_steps=every),
        ChannelStatsMonitor(every_n_steps=every),
    ]


@pytest.fixture(scope="module")
def moc_run(tmp_path_factory):
    """MoC K=8, every callback, every step, lr 0 (the weights stay those the callbacks saw)."""
    torch.manual_seed(0)
    callbacks = all_callbacks()
    module = TinyLM(MOC, lr=0.0)
    batches, metrics, trainer = fit(tmp_path_factory.mktemp("moc"), module, callbacks)
    return {"module": module, "batches": batches, "metrics": metrics, "callbacks": callbacks, "trainer": trainer}


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """Dense SwiGLU, activation and channel monitors every second step, training for real."""
    torch.manual_seed(0)
    callbacks = [ActivationMemoryMonitor(every_n_steps=2), ChannelStatsMonitor(every_n_steps=2)]
    module = TinyLM({"kind": "swiglu"}, lr=1e-3)
    batches, metrics, _ = fit(tmp_path_factory.mktemp("dense"), module, callbacks)
    return {"module": module, "batches": batches, "metrics": metrics, "callbacks": callbacks}


# --- every metric is there -------------------------------------------------------------------------


def test_every_metric_is_logged(moc_run):
    names = set(moc_run["metrics"])
    expected = {
        "memory/peak_rss_gb", "memory/rss_gb",
        "train/device/samples_per_sec", "train/device/items_per_sec", "train/device/flops_per_sec",
        "train/device/mfu", "train/samples", "train/lengths", "train/tokens_seen",
        "activation/measured_mb", "activation/ffn_mb", "activation/attention_mb", "activation/lm_head_mb",
        "activation/analytic_mb", "activation/ffn_analytic_mb", "activation/attention_analytic_mb",
        "channels/neg_frac", "channels/neg_frac/layer0", "channels/neg_frac/layer1",
        "channels/sparsity", "channels/sparsity/layer0", "channels/sparsity/layer1",
        "channels/kept_negative_frac", "channels/kept_negative_frac/layer0", "channels/kept_negative_frac/layer1",
    }
    assert expected <= names, sorted(expected - names)
    # CUDA-only metrics are not invented on a CPU run
    assert not any(n.startswith("memory/peak_allocated") for n in names)
    # every-step callbacks land on every one of Lightning's logger steps (0 .. STEPS-1)
    for name in ("memory/rss_gb", "activation/measured_mb", "channels/neg_frac", "train/tokens_seen"):
        assert sorted(moc_run["metrics"][name]) == list(range(STEPS)), name


def test_hooks_are_removed_after_the_run(moc_run):
    model = moc_run["module"].model
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, module


def test_peak_memory_is_positive_and_summarised(moc_run):
    rss = moc_run["metrics"]["memory/peak_rss_gb"]
    assert all(0 < v < 1024 for v in rss.values())
    assert all(v > 0 for v in moc_run["metrics"]["memory/rss_gb"].values())
    (peak,) = [cb for cb in moc_run["callbacks"] if isinstance(cb, PeakMemoryMonitor)]
    assert set(peak.summary) == {"memory/peak_rss_gb"}
    assert peak.summary["memory/peak_rss_gb"] >= max(rss.values()) > 0


# --- throughput and tokens -------------------------------------------------------------------------


def test_throughput_is_lightnings_monitor_for_lm_batches(moc_run):
    assert isinstance(throughput_monitor(), ThroughputMonitor)
    batch = {"input_ids": torch.zeros(3, 7, dtype=torch.long)}
    assert (lm_batch_size(batch), lm_batch_tokens(batch)) == (3, 21)
    m = moc_run["metrics"]
    tokens_per_sec, samples_per_sec = m["train/device/items_per_sec"], m["train/device/samples_per_sec"]
    assert tokens_per_sec and all(v > 0 for v in tokens_per_sec.values())
    for step, value in tokens_per_sec.items():  # items are the tokens of the samples
        assert value == pytest.approx(samples_per_sec[step] * SEQ, rel=1e-6)
    assert max(m["train/lengths"].values()) == STEPS * TOKENS
    flops, mfu = m["train/device/flops_per_sec"], m["train/device/mfu"]
    assert all(mfu[s] == pytest.approx(flops[s] / 1e12) for s in mfu)


def test_tokens_seen_counts_every_step(moc_run):
    seen = moc_run["metrics"]["train/tokens_seen"]
    assert seen == {step: (step + 1) * TOKENS for step in range(STEPS)}


def test_tokens_seen_counts_accumulated_micro_batches(tmp_path):
    steps, accumulate = 3, 2
    tokens = TokensSeen()
    _, metrics, _ = fit(tmp_path, TinyLM({"kind": "swiglu"}), [tokens], steps=steps, accumulate=accumulate)
    # one value per optimizer step, at Lightning's step numbering
    assert metrics["train/tokens_seen"] == {s: (s + 1) * TOKENS * accumulate for s in range(steps)}
    assert tokens.state_dict() == {"tokens_seen": steps * accumulate * TOKENS}
    fresh = TokensSeen()
    fresh.load_state_dict(tokens.state_dict())
    assert fresh.tokens_seen == steps * accumulate * TOKENS


# --- activation memory -----------------------------------------------------------------------------


def test_measured_activation_equals_an_independent_measurement(moc_run):
    model, batch = moc_run["module"].model, moc_run["batches"][0]
    logged = moc_run["metrics"]
    independent = measure_model_saved_bytes(model, batch, labels=batch)
    for step in range(STEPS):
        assert logged["activation/measured_mb"][step] == pytest.approx(independent["total"] / 2**20, rel=1e-6)
        for category, nbytes in independent.items():
            if category != "total":
                assert logged[f"activation/{category}_mb"][step] == pytest.approx(nbytes / 2**20, rel=1e-6)
    (monitor,) = [cb for cb in moc_run["callbacks"] if isinstance(cb, ActivationMemoryMonitor)]
    assert monitor.latest["activation/measured_mb"] == pytest.approx(independent["total"] / 2**20, rel=1e-6)


def test_analytic_activation_is_the_float32_accounting(moc_run):
    from moc_lightning.profiling import model_activation_bytes

    cfg = moc_run["module"].model_cfg
    parts = model_activation_bytes(cfg, BATCH, SEQ, torch.float32)
    logged = moc_run["metrics"]
    assert logged["activation/analytic_mb"][0] == pytest.approx(sum(parts.values()) / 2**20, rel=1e-6)
    assert logged["activation/ffn_analytic_mb"][0] == pytest.approx(parts["ffn"] / 2**20, rel=1e-6)
    # measured and analytic FFN figures agree (the profiling tests check this more closely)
    assert logged["activation/ffn_mb"][0] == pytest.approx(logged["activation/ffn_analytic_mb"][0], rel=0.1)


def test_moc_ffn_activation_far_below_dense(moc_run, dense_run):
    moc = moc_run["metrics"]["activation/ffn_mb"]
    dense = dense_run["metrics"]["activation/ffn_mb"]
    assert sorted(dense) == [1, 3, 5]  # every second optimizer step: 2, 4, 6
    assert max(moc.values()) < 0.25 * min(dense.values())
    assert moc_run["metrics"]["activation/measured_mb"][1] < dense_run["metrics"]["activation/measured_mb"][1]


# --- channel statistics ----------------------------------------------------------------------------


def test_moc_channel_stats_match_an_independent_computation(moc_run):
    model, logged = moc_run["module"].model, moc_run["metrics"]
    for step in (0, STEPS - 1):
        neg, kept_neg = [], []
        for i, (g, _) in enumerate(gate_and_up(model, moc_run["batches"][step])):
            kept = torch.topk(g, MOC["k"], dim=-1).indices
            neg.append((g < 0).double().mean().item())
            kept_neg.append((g.gather(1, kept) < 0).double().mean().item())
            assert logged[f"channels/neg_frac/layer{i}"][step] == pytest.approx(neg[-1], abs=1e-9)
            assert logged[f"channels/kept_negative_frac/layer{i}"][step] == pytest.approx(kept_neg[-1], abs=1e-9)
            assert logged[f"channels/sparsity/layer{i}"][step] == pytest.approx(1 - MOC["k"] / 172, abs=1e-9)
        assert 0 <= logged["channels/neg_frac"][step] <= 1
        assert logged["channels/neg_frac"][step] == pytest.approx(sum(neg) / len(neg), abs=1e-9)
        assert logged["channels/kept_negative_frac"][step] == pytest.approx(sum(kept_neg) / len(kept_neg), abs=1e-9)


def independent_kept(g: torch.Tensor, ffn: dict) -> torch.Tensor:
    """The channels MoC keeps per row, by plain torch.topk (a different code path from select_channels)."""
    scores = g if ffn.get("placement", "pre_silu") == "pre_silu" else F.silu(g).abs()
    if "group" not in ffn:
        return torch.topk(scores, ffn["k"], dim=-1).indices
    a, b = map(int, ffn["group"].split(":"))
    rows, width = scores.shape
    assert width % b == 0  # 172 = 43 x 4: the shapes used here
    picked = torch.topk(scores.reshape(rows, width // b, b), a, dim=-1).indices
    return (picked + torch.arange(0, width, b).unsqueeze(-1)).reshape(rows, -1)


@pytest.mark.parametrize("ffn", [{"kind": "moc", "group": "3:4"}, {"kind": "moc", "k": 120, "placement": "post_silu"}])
def test_moc_kept_negative_frac_where_negatives_are_kept(tmp_path, ffn):
    """Settings that keep many channels, so some kept gate values are negative."""
    module = TinyLM(ffn, lr=0.0)
    batches, logged, _ = fit(tmp_path, module, [ChannelStatsMonitor(every_n_steps=1)], steps=2)
    kept_fraction = module.model_cfg.ffn_config(0).kept_channels / 172
    for step in range(2):
        for i, (g, _) in enumerate(gate_and_up(module.model, batches[step])):
            expected = (g.gather(1, independent_kept(g, ffn)) < 0).double().mean().item()
            assert logged[f"channels/kept_negative_frac/layer{i}"][step] == pytest.approx(expected, abs=1e-9)
            assert logged[f"channels/sparsity/layer{i}"][step] == pytest.approx(1 - kept_fraction, abs=1e-9)
        assert 0.05 < logged["channels/kept_negative_frac"][step] < 1


def test_dense_channel_stats(dense_run):
    logged = dense_run["metrics"]
    assert sorted(logged["channels/neg_frac"]) == [1, 3, 5]
    assert all(0 < v < 1 for v in logged["channels/neg_frac"].values())
    assert all(v == pytest.approx(0, abs=1e-3) for v in logged["channels/sparsity"].values())  # SiLU(G)*U is dense
    assert "channels/kept_negative_frac" not in logged


@pytest.mark.parametrize("kind", ["relu", "drelu"])
def test_relu_sparsity_matches_an_independent_computation(tmp_path, kind):
    module = TinyLM({"kind": kind}, lr=0.0)
    batches, logged, _ = fit(tmp_path, module, [ChannelStatsMonitor(every_n_steps=1)], steps=2)
    for step in range(2):
        sparsity, neg = [], []
        for i, (g, u) in enumerate(gate_and_up(module.model, batches[step])):
            zero = (g <= 0) if kind == "relu" else (g <= 0) | (u <= 0)
            sparsity.append(zero.double().mean().item())
            neg.append((g < 0).double().mean().item())
            assert logged[f"channels/sparsity/layer{i}"][step] == pytest.approx(sparsity[-1], abs=1e-9)
            assert logged[f"channels/neg_frac/layer{i}"][step] == pytest.approx(neg[-1], abs=1e-9)
        assert logged["channels/sparsity"][step] == pytest.approx(sum(sparsity) / 2, abs=1e-9)
        assert 0.3 < logged["channels/sparsity"][step] < 1


# --- robustness ------------------------------------------------------------------------------------


class NoContract(TinyLM):
    """A module that breaks the contract: its transformer is not `model` and it has no `model_cfg`."""

    def __init__(self):
        super().__init__({"kind": "swiglu"})
        self.net = self.model
        del self.model, self.model_cfg

    def training_step(self, batch, batch_idx):
        return self.net(batch["input_ids"], labels=batch["input_ids"]).loss


def test_missing_contract_skips_metrics_without_failing_the_run(tmp_path):
    callbacks = [ActivationMemoryMonitor(every_n_steps=1), ChannelStatsMonitor(every_n_steps=1), PeakMemoryMonitor(1)]
    with pytest.warns(UserWarning, match="the metric is skipped"):
        _, logged, trainer = fit(tmp_path, NoContract(), callbacks, steps=2)
    assert trainer.global_step == 2
    assert not any(n.startswith(("activation/", "channels/")) for n in logged)
    assert "memory/rss_gb" in logged


# --- GPU (skipped on CPU machines) -----------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_and_bf16_activation(tmp_path):
    callbacks = all_callbacks()
    module = TinyLM(MOC)
    _, logged, _ = fit(tmp_path, module, callbacks, accelerator="gpu", precision="bf16-mixed")
    for name in ("memory/peak_allocated_gb", "memory/peak_reserved_gb", "memory/run_peak_allocated_gb", "train/device/mfu"):
        assert name in logged and all(v > 0 for v in logged[name].values()), name
    run_peak = logged["memory/run_peak_allocated_gb"]
    assert all(run_peak[s] >= logged["memory/peak_allocated_gb"][s] for s in run_peak)
    (peak,) = [cb for cb in callbacks if isinstance(cb, PeakMemoryMonitor)]
    assert peak.summary["memory/run_peak_allocated_gb"] >= max(run_peak.values())
    assert peak.summary["memory/run_peak_reserved_gb"] > 0
    from moc_lightning.profiling import model_activation_bytes

    parts = model_activation_bytes(module.model_cfg, BATCH, SEQ, torch.bfloat16)
    assert logged["activation/analytic_mb"][0] == pytest.approx(sum(parts.values()) / 2**20, rel=1e-6)
    assert all(not math.isnan(v) for v in logged["channels/neg_frac"].values())
