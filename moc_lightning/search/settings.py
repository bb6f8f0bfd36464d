"""The settings of a study, validated: objectives, memory budget, search space, sampler, pruner,
heartbeat, and the main job's overrides every trial trains with. Read from conf/search/<space>.yaml
at a scale (see `moc_lightning.sweep.settings`), then `search.key=value` overrides."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from moc_lightning.cli.config import ConfigError
from moc_lightning.ffn.config import PLACEMENTS, parse_group

OBJECTIVES = ("ppl", "memory")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "percentile", "threshold", "none")
NO_GROUP = "none"
# `memory_metric: auto` resolves to one of these where the study starts (its unit is the budget's).
AUTO_MEMORY = {"cuda": ("final/memory/run_peak_allocated_gb", "GiB"), "cpu": ("activation/measured_mb", "MiB")}


def _refuse(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"search.{key} = {value!r} is not allowed: {allowed}")


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(key, value, "expected an integer >= 1")
    return value


@dataclass(frozen=True)
class SearchSettings:
    """objectives      ("ppl",): minimise validation perplexity, under `memory_budget` when set;
                       ("ppl", "memory"): both, the result being the Pareto front (no pruning:
                       Optuna cannot prune multi-objective trials).
    memory_metric      the MLflow metric that is a trial's memory: "auto" (CUDA peak allocated,
                       GiB, on a GPU; the measured activation memory of a training step, MiB, on
                       a CPU, where the process's peak RSS is mostly the interpreter) or a name.
    memory_budget      single objective: trials above it are infeasible (a sampler constraint),
                       in the metric's unit; None: no budget.
    n_trials           trials the study should have finished (complete or pruned).
    variant            main-job overrides naming the MoC variant (e.g. [ffn=moc_gcp]).
    space              k_fraction {low, high[, step, log]} (K = round(k_fraction * d_ffn)) or
                       k {low, high[, step, log]}; group: list of "none" / "a:b"; placement: list.
                       K is only sampled for trials without a group (a:b groups fix the count).
    sampler            {kind: tpe | random, seed, n_startup_trials}
    pruner             {kind: median | percentile | threshold | none, n_startup_trials,
                       n_warmup_steps, percentile, upper}: judged on the validation perplexity
                       reported at each validation step.
    heartbeat_interval, grace_period   seconds: a RUNNING trial whose heartbeat is older than the
                       grace period was killed; it is marked FAIL and retried with its params
                       (up to max_retry times), resuming from its checkpoint.
    train              main-job overrides for every trial (the scale's).
    """

    objectives: tuple[str, ...] = ("ppl",)
    memory_metric: str = "auto"
    memory_budget: Optional[float] = None
    n_trials: int = 20
    variant: tuple[str, ...] = ("ffn=moc",)
    space: Any = None
    sampler: Any = None
    pruner: Any = None
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: Optional[int] = 2
    train: tuple[str, ...] = ()

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        objectives = tuple(self.objectives or ())
        if not objectives or any(o not in OBJECTIVES for o in objectives) or len(set(objectives)) != len(objectives):
            raise _refuse("objectives", list(self.objectives or ()), "expected [ppl] or [ppl, memory]")
        set_("objectives", objectives)
        if not isinstance(self.memory_metric, str) or not self.memory_metric:
            raise _refuse("memory_metric", self.memory_metric, "expected auto or an MLflow metric name")
        if self.memory_budget is not None:
            if isinstance(self.memory_budget, bool) or not isinstance(self.memory_budget, (int, float)) or self.memory_budget <= 0:
                raise _refuse("memory_budget", self.memory_budget, "expected null or a number > 0")
            if self.multi_objective:
                raise _refuse("memory_budget", self.memory_budget, "a budget is for a single objective; "
                              "with [ppl, memory] the Pareto front shows every trade-off")
        _positive_int("n_trials", self.n_trials)
        _positive_int("heartbeat_interval", self.heartbeat_interval)
        _positive_int("grace_period", self.grace_period)
        if self.grace_period <= self.heartbeat_interval:
            raise _refuse("grace_period", self.grace_period,
                          f"expected more than heartbeat_interval = {self.heartbeat_interval} seconds")
        if self.max_retry is not None and (isinstance(self.max_retry, bool) or not isinstance(self.max_retry, int)
                                           or self.max_retry < 0):
            raise _refuse("max_retry", self.max_retry, "expected null (always) or an integer >= 0")
        set_("variant", tuple(self.variant or ()))
        set_("train", tuple(self.train or ()))
        set_("space", self._checked_space(self.space))
        set_("sampler", self._checked_sampler(self.sampler))
        set_("pruner", self._checked_pruner(self.pruner))

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @staticmethod
    def _range(key: str, spec: Any, low_min: float, high_max: Optional[float], integer: bool) -> dict:
        if not isinstance(spec, dict) or "low" not in spec or "high" not in spec:
            raise _refuse(f"space.{key}", spec, "expected {low: ..., high: ...} (optional step, log)")
        unknown = sorted(set(spec) - {"low", "high", "step", "log"})
        if unknown:
            raise _refuse(f"space.{key}", spec, f"unknown key(s) {', '.join(unknown)}; allowed: low, high, step, log")
        low, high = spec["low"], spec["high"]
        number = int if integer else (int, float)
        if not all(isinstance(v, number) and not isinstance(v, bool) for v in (low, high)) or not low_min <= low <= high \
                or (high_max is not None and high > high_max):
            allowed = f"{low_min} <= low <= high" + (f" <= {high_max}" if high_max is not None else "")
            raise _refuse(f"space.{key}", spec, f"expected {'integers' if integer else 'numbers'} with {allowed}")
        return {"low": low, "high": high, "step": spec.get("step"), "log": bool(spec.get("log", False))}

    def _checked_space(self, space: Any) -> dict:
        if not isinstance(space, dict):
            raise _refuse("space", space, "expected a mapping with group, placement and k_fraction or k")
        unknown = sorted(set(space) - {"k_fraction", "k", "group", "placement"})
        if unknown:
            raise _refuse("space", space, f"unknown key(s) {', '.join(unknown)}; allowed: k_fraction, k, group, placement")
        raw_groups = space.get("group") or [NO_GROUP]
        if any(isinstance(g, int) for g in raw_groups):  # YAML 1.1 reads an unquoted 2:8 as 128 (base 60)
            raise _refuse("space.group", raw_groups, "quote a:b groups, e.g. search.space.group=['none','2:8'] "
                          "(unquoted, YAML reads 2:8 as the number 128)")
        groups = [str(g) for g in raw_groups]
        for group in groups:
            if group != NO_GROUP:
                try:
                    parse_group(group)
                except ValueError as exc:
                    raise _refuse("space.group", groups, f"{exc} (or 'none')") from None
        placements = [str(p) for p in (space.get("placement") or ["pre_silu"])]
        if any(p not in PLACEMENTS for p in placements):
            raise _refuse("space.placement", placements, f"expected a list of {', '.join(PLACEMENTS)}")
        out: dict = {"group": groups, "placement": placements}
        if NO_GROUP in groups:
            if ("k_fraction" in space) == ("k" in space):
                raise _refuse("space", space, "with group 'none' in the space, give exactly one of k_fraction or k")
            if "k_fraction" in space:
                out["k_fraction"] = self._range("k_fraction", space["k_fraction"], 0.0, 1.0, integer=False)
                if out["k_fraction"]["low"] <= 0:
                    raise _refuse("space.k_fraction", space["k_fraction"], "expected 0 < low <= high <= 1")
            else:
                out["k"] = self._range("k", space["k"], 1, None, integer=True)
        return out

    @staticmethod
    def _checked_sampler(sampler: Any) -> dict:
        sampler = dict(sampler or {})
        out = {"kind": sampler.pop("kind", "tpe"), "seed": sampler.pop("seed", 0),
               "n_startup_trials": sampler.pop("n_startup_trials", 4)}
        if sampler:
            raise _refuse("sampler", sampler, "unknown key(s); allowed: kind, seed, n_startup_trials")
        if out["kind"] not in SAMPLERS:
            raise _refuse("sampler.kind", out["kind"], f"expected one of {', '.join(SAMPLERS)}")
        if isinstance(out["seed"], bool) or not isinstance(out["seed"], int) or out["seed"] < 0:
            raise _refuse("sampler.seed", out["seed"], "expected an integer >= 0")
        _positive_int("sampler.n_startup_trials", out["n_startup_trials"])
        return out

    @staticmethod
    def _checked_pruner(pruner: Any) -> dict:
        pruner = dict(pruner or {"kind": "none"})
        out = {"kind": pruner.pop("kind", "median"), "n_startup_trials": pruner.pop("n_startup_trials", 2),
               "n_warmup_steps": pruner.pop("n_warmup_steps", 0), "percentile": pruner.pop("percentile", 25.0),
               "upper": pruner.pop("upper", None)}
        if pruner:
            raise _refuse("pruner", pruner, "unknown key(s); allowed: kind, n_startup_trials, n_warmup_steps, "
                                            "percentile, upper")
        if out["kind"] not in PRUNERS:
            raise _refuse("pruner.kind", out["kind"], f"expected one of {', '.join(PRUNERS)}")
        if out["kind"] == "threshold" and not isinstance(out["upper"], (int, float)):
            raise _refuse("pruner.upper", out["upper"], "the threshold pruner needs an upper perplexity")
        if not 0 < float(out["percentile"]) < 100:
            raise _refuse("pruner.percentile", out["percentile"], "expected 0 < percentile < 100")
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SearchSettings":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"search settings: unknown key(s) {', '.join(unknown)}; the settings are {', '.join(sorted(known))}")
        return cls(**data)
