"""Callbacks that watch a training run: memory, throughput, tokens, activation memory and channels.

They rely only on what the LightningModule promises: the transformer as `pl_module.model`, its
`ModelConfig` as `pl_module.model_cfg`, and batches `{'input_ids': LongTensor (batch, seq)}`.

Cadence. A callback with `every_n_steps = n` acts on optimizer steps n, 2n, ... (1-based), that is
on the same steps as `Trainer(log_every_n_steps=n)` writes its own metrics, and its metrics land
on the same logger step as Lightning's (the count of optimizer steps finished before that one).
With gradient accumulation a step is counted once, at the micro-batch that completes it.

Logging. Metrics go to the trainer's loggers through Lightning's logger connector (the same path
Lightning's own ThroughputMonitor takes) rather than through `pl_module.log`: `pl_module.log`
writes only on the trainer's `log_every_n_steps` cadence (a callback with another cadence would
lose its values) and turns every value into a float32 tensor (a token count above 2**24 would
lose digits). Loggers write on rank zero only. Values that differ between ranks are reduced
first with the strategy's own collective (`trainer.strategy.reduce`): memory by max, channel
statistics by mean. No metric is worth a crashed run: a measurement that fails is skipped with
one warning.
"""

from __future__ import annotations

import math
import resource
import sys
from typing import Any, Optional

import psutil
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from moc_lightning.ffn import select_channels
from moc_lightning.profiling import SavedTensorRecorder, model_activation_bytes, model_category, model_scopes

GIB = 2**30
MIB = 2**20

__all__ = [
    "PeakMemoryMonitor", "TokensSeen", "ActivationMemoryMonitor", "ChannelStatsMonitor",
    "LMThroughputMonitor", "throughput_monitor", "lm_batch_size", "lm_batch_tokens",
]


# --- shared helpers --------------------------------------------------------------------------------


def _input_ids(batch: Any) -> Optional[torch.Tensor]:
    """The (batch, seq) token tensor of a batch: a dict's 'input_ids', or the batch itself."""
    if isinstance(batch, dict):
        batch = batch.get("input_ids")
    return batch if isinstance(batch, torch.Tensor) and batch.dim() == 2 else None


def lm_batch_size(batch: Any) -> int:
    """Samples in an LM batch: the rows of its input_ids."""
    ids = _input_ids(batch)
    return 0 if ids is None else int(ids.shape[0])


def lm_batch_tokens(batch: Any) -> int:
    """Tokens in an LM batch (packed blocks, so every position is a real token)."""
    ids = _input_ids(batch)
    return 0 if ids is None else int(ids.numel())


def _step_closed(trainer: Trainer) -> Optional[int]:
    """At on_train_batch_end: the (1-based) optimizer step this micro-batch completes, or None
    while gradients are still being accumulated."""
    loop = trainer.fit_loop
    if loop._should_accumulate():
        return None
    return loop.epoch_loop._batches_that_stepped + 1


def _step_ahead(trainer: Trainer) -> int:
    """At on_train_batch_start: the (1-based) optimizer step this micro-batch belongs to."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped + 1


def _log_metrics(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Write metrics to every logger at Lightning's current step (loggers act on rank zero only)."""
    metrics = {k: v for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if metrics and trainer.loggers:
        trainer._logger_connector.log_metrics(metrics)


def _reduce(trainer: Trainer, values: list[float], op: str) -> list[float]:
    """The element-wise max / mean of `values` over all ranks (one collective; all ranks call it)."""
    if trainer.world_size <= 1 or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=trainer.strategy.root_device)
    return trainer.strategy.reduce(t, reduce_op=op).tolist()


class _Warner:
    """Warns once per kind of failure, so a metric that cannot be had does not flood the log."""

    def __init__(self, owner: str):
        self.owner = owner
        self._said: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            rank_zero_warn(f"{self.owner}: {message}; the metric is skipped")


# --- peak memory -----------------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    """This process's peak resident set size since it started (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemoryMonitor(Callback):
    """Peak memory, every `log_every_n_steps` optimizer steps, in GiB (2**30 bytes), max over ranks.

    On a CUDA device: `memory/peak_allocated_gb` and `memory/peak_reserved_gb`, the peaks of the
    interval since the last log (the allocator's peak counters are reset after each reading), and
    `memory/run_peak_allocated_gb`, the peak of the whole run so far. Always (the host side, on
    GPU runs too): `memory/peak_rss_gb`, the process's peak resident memory since it started (the
    kernel keeps no resettable counter), and `memory/rss_gb`, its resident memory now.

    At the end of fit, `self.summary` holds the run's peaks (`memory/run_peak_allocated_gb` and
    `memory/run_peak_reserved_gb` on GPU, `memory/peak_rss_gb` always) for the job to log as
    final metrics.

    Hand-written because Lightning's DeviceStatsMonitor logs the allocator's whole statistics dump
    with no per-interval reset, and on CPU only system-wide percentages, not this process's memory.
    """

    def __init__(self, log_every_n_steps: int = 50):
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps = {log_every_n_steps} must be >= 1")
        self.log_every_n_steps = log_every_n_steps
        self.summary: dict[str, float] = {}
        self._run_peak_allocated = 0
        self._run_peak_reserved = 0
        self._warn = _Warner(type(self).__name__)

    @staticmethod
    def _cuda_device(trainer: Trainer) -> Optional[torch.device]:
        device = trainer.strategy.root_device
        return device if device.type == "cuda" and torch.cuda.is_available() else None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.summary = {}
        self._run_peak_allocated = self._run_peak_reserved = 0
        device = self._cuda_device(trainer)
        if device is not None:  # the run's peak starts here, not at whatever ran before in this process
            torch.cuda.reset_peak_memory_stats(device)

    def _read_cuda(self, device: torch.device) -> tuple[int, int]:
        """The interval's peaks (allocated, reserved), folded into the run's peaks, then reset."""
        allocated = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
        self._run_peak_allocated = max(self._run_peak_allocated, allocated)
        self._run_peak_reserved = max(self._run_peak_reserved, reserved)
        return allocated, reserved

    def _read(self, trainer: Trainer, final: bool) -> dict[str, float]:
        """Metric name -> GiB, max over ranks. The names depend only on the device type, so every
        rank joins the same collective; a reading that fails is NaN (then dropped), not an error."""
        readers = {"memory/peak_rss_gb": _peak_rss_bytes}
        if not final:
            readers["memory/rss_gb"] = lambda: psutil.Process().memory_info().rss
        device = self._cuda_device(trainer)
        if device is not None:
            try:
                allocated, reserved = self._read_cuda(device)
            except Exception as exc:  # noqa: BLE001 (a metric must not end the run)
                self._warn("cuda", f"CUDA memory could not be read ({exc!r})")
                allocated = reserved = math.nan
            if final:
                readers["memory/run_peak_allocated_gb"] = lambda: self._run_peak_allocated
                readers["memory/run_peak_reserved_gb"] = lambda: self._run_peak_reserved
            else:
                readers["memory/peak_allocated_gb"] = lambda: allocated
                readers["memory/peak_reserved_gb"] = lambda: reserved
                readers["memory/run_peak_allocated_gb"] = lambda: self._run_peak_allocated
        values = []
        for name, read in readers.items():
            try:
                values.append(read() / GIB)
            except Exception as exc:  # noqa: BLE001
                self._warn(name, f"{name} could not be read ({exc!r})")
                values.append(math.nan)
        return dict(zip(readers, _reduce(trainer, values, "max")))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = _step_closed(trainer)
        if step is not None and step % self.log_every_n_steps == 0:
            _log_metrics(trainer, self._read(trainer, final=False))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The last interval since the previous log is folded in too.
        self.summary = {k: v for k, v in self._read(trainer, final=True).items() if math.isfinite(v)}


# --- throughput and tokens -------------------------------------------------------------------------

# Dense (no structured sparsity) peak FLOP/s of Hopper SXM chips, H100 and H200 alike (same
# compute, different memory). Lightning's own table covers the H100 names but maps an H200 only
# when its name says 'sxm1' or 'nvl1', which the usual name ('NVIDIA H200') does not.
_HOPPER_SXM_DENSE_FLOPS = {torch.bfloat16: 989.4e12, torch.float16: 989.4e12}


class LMThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor for LM batches, with the device's peak FLOP/s overridable.

    See `throughput_monitor` for what it logs. `peak_flops` replaces the peak Lightning looks up
    for the device (None keeps Lightning's, with an H200 fallback); MFU is flops/s over it.
    """

    def __init__(self, window_size: int = 50, peak_flops: Optional[float] = None, **kwargs: Any):
        super().__init__(batch_size_fn=lm_batch_size, length_fn=lm_batch_tokens, window_size=window_size, **kwargs)
        self.peak_flops = peak_flops

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.peak_flops or self.available_flops or self._fallback_peak(trainer)
        if peak and peak != self.available_flops:
            self.available_flops = int(peak)
            for throughput in self._throughputs.values():
                throughput.available_flops = int(peak)

    @staticmethod
    def _fallback_peak(trainer: Trainer) -> Optional[float]:
        device = trainer.strategy.root_device
        if device.type != "cuda" or "h200" not in torch.cuda.get_device_name(device).lower():
            return None
        precision = str(trainer.precision)
        dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else None
        return _HOPPER_SXM_DENSE_FLOPS.get(dtype)


def throughput_monitor(window_size: int = 50, peak_flops: Optional[float] = None) -> ThroughputMonitor:
    """Lightning's ThroughputMonitor configured for LM batches.

    Samples are the rows of `input_ids`, items its tokens. Every `Trainer(log_every_n_steps)`
    steps, once `window_size` micro-batches have been seen (rolling averages over that window),
    it logs through the trainer's loggers, for training:
      train/device/samples_per_sec, train/device/items_per_sec (tokens/s), train/device/batches_per_sec,
      train/time, train/batches, train/samples, train/lengths (tokens, this rank);
      train/device/flops_per_sec when the module has `flops_per_batch` (not None), and
      train/device/mfu when the device's peak is known too (GPU, or `peak_flops`);
      with several devices also the global train/samples_per_sec, train/items_per_sec, ...;
    and the same under validate/ during validation. A module with no `flops_per_batch`
    attribute gets one warning from Lightning.
    """
    return LMThroughputMonitor(window_size=window_size, peak_flops=peak_flops)


class TokensSeen(Callback):
    """`train/tokens_seen`: the tokens trained on so far, over all ranks.

    Each micro-batch adds its tokens times the world size (every rank trains on a batch of the
    same shape), so with gradient accumulation a step counts batch tokens x world size x
    accumulation. Logged as an exact integer every `log_every_n_steps` optimizer steps (None: the
    trainer's own `log_every_n_steps`), and kept in checkpoints so a resumed run counts on.
    Hand-written: ThroughputMonitor's `train/lengths` is this rank's count and restarts with fit.
    """

    def __init__(self, log_every_n_steps: Optional[int] = None):
        self.log_every_n_steps = log_every_n_steps
        self.tokens_seen = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self.tokens_seen += lm_batch_tokens(batch) * trainer.world_size
        step = _step_closed(trainer)
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if step is not None and every and step % every == 0:
            _log_metrics(trainer, {"train/tokens_seen": self.tokens_seen})

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))


# --- activation memory -----------------------------------------------------------------------------


def _compute_dtype(trainer: Trainer) -> torch.dtype:
    """The dtype activations are kept in under the trainer's precision."""
    precision = str(trainer.precision)
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


class ActivationMemoryMonitor(Callback):
    """The bytes the training forward really saves for backward, next to the paper's accounting.

    On optimizer steps `every_n_steps`, 2 x `every_n_steps`, ... (the first micro-batch of the
    step), a forward pre-hook and a forward hook on `pl_module.model` open and close a
    `SavedTensorRecorder` around the model's own training forward: no extra forward pass. Logged,
    in MiB (2**20 bytes), for this rank's micro-batch:
      activation/measured_mb              all bytes saved for backward inside the model's forward
      activation/<category>_mb            by category (embedding, attention, ffn, rmsnorm, lm_head, other)
      activation/analytic_mb              `model_activation_bytes(model_cfg, batch, seq_len, dtype)`
      activation/<category>_analytic_mb   its parts (attention, ffn, rmsnorm, residual, lm_head)
    with dtype bf16 under bf16 precision, fp16 under 16-bit precision, else float32. What the
    LightningModule computes outside `pl_module.model` (a loss on the logits, say) is not counted.
    `self.latest` holds the last logged dict.
    """

    def __init__(self, every_n_steps: int = 50):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps = {every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self.latest: dict[str, float] = {}
        self._handles: list = []
        self._recorder: Optional[SavedTensorRecorder] = None
        self._result = None
        self._done = False
        self._last_step = -1
        self._warn = _Warner(type(self).__name__)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        step = _step_ahead(trainer)
        if step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        model = getattr(pl_module, "model", None)
        if not isinstance(model, torch.nn.Module):
            self._warn("model", "pl_module has no `model` module")
            return
        self._result, self._done = None, False
        self._handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit, always_call=True),  # closes the recorder on errors too
        ]

    def _enter(self, module: torch.nn.Module, args) -> None:
        if self._done or self._recorder is not None:  # only the step's first forward is recorded
            return
        recorder = SavedTensorRecorder(module.parameters(), model_scopes(module))
        recorder.__enter__()
        self._recorder = recorder

    def _exit(self, module: torch.nn.Module, args, output) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.__exit__(None, None, None)
            self._result, self._done = recorder.result, True

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._exit(None, None, None)  # a forward that never returned must not leave the recorder open

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self._handles:
            return
        self._remove_hooks()
        result, self._result = self._result, None
        if result is None:
            self._warn("forward", "pl_module.model's forward did not run in the training step")
            return
        metrics = {"activation/measured_mb": result.total / MIB}
        for category, nbytes in sorted(result.by_category(model_category).items()):
            metrics[f"activation/{category}_mb"] = nbytes / MIB
        metrics.update(self._analytic(trainer, pl_module, batch))
        self.latest = metrics
        _log_metrics(trainer, metrics)

    def _analytic(self, trainer: Trainer, pl_module: LightningModule, batch) -> dict[str, float]:
        cfg = getattr(pl_module, "model_cfg", None) or getattr(getattr(pl_module, "model", None), "cfg", None)
        ids = _input_ids(batch)
        if cfg is None or ids is None:
            self._warn("cfg", "no model_cfg or input_ids for the analytic figure")
            return {}
        try:
            parts = model_activation_bytes(cfg, int(ids.shape[0]), int(ids.shape[1]), _compute_dtype(trainer))
        except Exception as exc:  # noqa: BLE001
            self._warn("analytic", f"analytic activation memory failed ({exc!r})")
            return {}
        out = {"activation/analytic_mb": sum(parts.values()) / MIB}
        out.update({f"activation/{name}_analytic_mb": nbytes / MIB for name, nbytes in parts.items()})
        return out

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()


# --- channel statistics ----------------------------------------------------------------------------


class ChannelStatsMonitor(Callback):
    """How the FFN channels of each layer behave, on optimizer steps `every_n_steps`, 2 x ...

    For the first micro-batch of those steps, hooks on each layer's `mlp`, `mlp.gate_proj` and
    `mlp.up_proj` (registered for that micro-batch only) read G = gate_proj(x) and U = up_proj(x)
    from the training forward itself. MoC and BackRazor never call their Linear modules (their
    autograd functions take the weights), so for them G (and U where needed) is recomputed from
    the FFN's input: one extra matmul per layer on those steps. All under no_grad, on detached
    tensors, averaged over ranks. Per layer i, and the mean over layers:
      channels/neg_frac/layer{i}, channels/neg_frac      fraction of negative pre-SiLU gate values
      channels/sparsity/layer{i}, channels/sparsity      realised sparsity:
          relu   zero entries of ReLU(G)
          drelu  zero entries of ReLU(G) * ReLU(U)
          moc    1 - kept channels / d_ffn
          swiglu, backrazor  zero entries of SiLU(G) * U (a dense forward: about 0)
      channels/kept_negative_frac/layer{i}, channels/kept_negative_frac   (moc layers only)
          fraction of the kept channels whose gate value is negative
    `self.latest` holds the last logged dict.
    """

    def __init__(self, every_n_steps: int = 50):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps = {every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self.latest: dict[str, float] = {}
        self._handles: list = []
        self._keys: list[str] = []
        self._values: dict[str, torch.Tensor] = {}
        self._state: dict[int, dict] = {}
        self._last_step = -1
        self._warn = _Warner(type(self).__name__)

    @staticmethod
    def _ffns(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
        layers = getattr(model, "layers", None)
        if layers is None:
            return []
        ffns = [(i, getattr(layer, "mlp", None)) for i, layer in enumerate(layers)]
        return [(i, m) for i, m in ffns if m is not None and all(hasattr(m, a) for a in ("cfg", "gate_proj", "up_proj"))]

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        step = _step_ahead(trainer)
        if step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step
        ffns = self._ffns(getattr(pl_module, "model", None))
        if not ffns:
            self._warn("layers", "pl_module.model has no layers[i].mlp with gate_proj and up_proj")
            return
        # The metric names are fixed by the config (not by the data), so every rank reduces the same list.
        self._keys, self._values, self._state = [], {}, {}
        for i, mlp in ffns:
            self._keys += [f"channels/neg_frac/layer{i}", f"channels/sparsity/layer{i}"]
            if mlp.cfg.kind == "moc":
                self._keys.append(f"channels/kept_negative_frac/layer{i}")
            self._state[i] = {"active": False}
            self._handles += [
                mlp.register_forward_pre_hook(lambda m, args, i=i: self._mlp_start(i, args)),
                mlp.register_forward_hook(lambda m, args, out, i=i: self._mlp_end(i, m, args), always_call=True),
                mlp.gate_proj.register_forward_hook(lambda m, args, out, i=i: self._capture(i, "g", out)),
                mlp.up_proj.register_forward_hook(lambda m, args, out, i=i: self._capture(i, "u", out)),
            ]

    def _mlp_start(self, i: int, args) -> None:
        state = self._state[i]
        if "done" not in state:  # the first call of the step only
            state.update(active=True, g=None, u=None)

    def _capture(self, i: int, name: str, out) -> None:
        # Only inside the FFN's forward: a checkpointed FFN calls gate_proj again in backward.
        state = self._state.get(i)
        if state is not None and state["active"] and isinstance(out, torch.Tensor):
            state[name] = out.detach()

    def _mlp_end(self, i: int, mlp: torch.nn.Module, args) -> None:
        state = self._state[i]
        if not state.get("active"):
            return
        state.update(active=False, done=True)
        g, u = state.pop("g"), state.pop("u")
        try:
            with torch.no_grad():
                self._values.update(self._layer_stats(i, mlp, args[0].detach(), g, u))
        except Exception as exc:  # noqa: BLE001 (a metric must not end the run)
            self._warn("stats", f"channel statistics failed ({exc!r})")

    @staticmethod
    def _layer_stats(i: int, mlp: torch.nn.Module, x: torch.Tensor, g, u) -> dict[str, torch.Tensor]:
        """0-d float64 tensors on the FFN's device (read back once per step, not once per value)."""
        cfg = mlp.cfg
        # Recomputed inside the FFN's forward hook, so under the same autocast as the FFN itself.
        if g is None:
            g = F.linear(x, mlp.gate_proj.weight)
        g = g.reshape(-1, g.shape[-1])

        def frac(mask: torch.Tensor) -> torch.Tensor:
            return torch.count_nonzero(mask).to(torch.float64) / mask.numel()

        out = {f"channels/neg_frac/layer{i}": frac(g < 0)}
        if cfg.kind == "moc":
            kept = select_channels(g, k=cfg.k, group=cfg.group_ab, placement=cfg.placement, backend=cfg.topk_backend)
            out[f"channels/sparsity/layer{i}"] = torch.tensor(1.0 - kept.shape[1] / g.shape[1], dtype=torch.float64, device=g.device)
            out[f"channels/kept_negative_frac/layer{i}"] = frac(g.gather(1, kept) < 0)
            return out
        if cfg.kind == "relu":
            out[f"channels/sparsity/layer{i}"] = frac(F.relu(g) == 0)
            return out
        if u is None:
            u = F.linear(x, mlp.up_proj.weight)
        u = u.reshape(g.shape)
        act = F.relu(g) * F.relu(u) if cfg.kind == "drelu" else F.silu(g) * u
        out[f"channels/sparsity/layer{i}"] = frac(act == 0)
        return out

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for state in self._state.values():
            state.update(active=False, g=None, u=None)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self._handles:
            return
        self._remove_hooks()
        found = [self._values[k] for k in self._keys if k in self._values]
        found = iter(torch.stack([t.to(found[0].device) for t in found]).tolist() if found else [])
        values = [next(found) if k in self._values else math.nan for k in self._keys]
        self._values, self._state = {}, {}
        metrics = {k: v for k, v in zip(self._keys, _reduce(trainer, values, "mean")) if math.isfinite(v)}
        for name in ("neg_frac", "sparsity", "kept_negative_frac"):
            per_layer = [v for k, v in metrics.items() if k.startswith(f"channels/{name}/layer")]
            if per_layer:
                metrics[f"channels/{name}"] = sum(per_layer) / len(per_layer)
        if metrics:
            self.latest = metrics
            _log_metrics(trainer, metrics)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()
