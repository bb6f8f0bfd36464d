"""One trial: train the main job at the trial's point of the search space, as an MLflow child run of
the study's parent, and return its validation perplexity (and memory)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from moc_lightning.cli.train import run_directory
from moc_lightning.search.pruning import StepPruningCallback
from moc_lightning.search.settings import SearchSettings
from moc_lightning.search.space import suggest
from moc_lightning.sweep import Child, ParentRun


class TrialOutOfMemory(RuntimeError):
    """The trial's training ran out of memory (the trial ends FAIL; the study goes on)."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs to run trials of a study (written as JSON by `moc search`)."""

    storage: str
    study: str
    settings: dict
    train: list[str]  # main-job overrides of every trial: the scale's, the variant's, the user's
    experiment: str
    parent_run_id: str
    folder: str  # the study's run folder; trials train in folders under it
    config_dir: str
    memory_metric: str
    memory_unit: str
    d_ffn: int

    def to_dict(self) -> dict:
        return asdict(self)


def original_trial_number(trial: Any) -> int:
    """The number of the trial this one retries (after its worker died), else its own number.

    The retry callback records it in the trial's system attributes, which a running Trial does not
    expose: they are read from the study's (frozen) copy of the trial.
    """
    frozen = next((t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number), None)
    history = (frozen.system_attrs.get("retry_history") if frozen is not None else None) or []
    return int(history[0]) if history else int(trial.number)


class Objective:
    def __init__(self, spec: WorkerSpec, parent: ParentRun):
        self.spec = spec
        self.settings = SearchSettings.from_dict(spec.settings)
        self.parent = parent

    def _tag(self, run_id: Optional[str], **tags: Any) -> None:
        if run_id:
            for key, value in tags.items():
                self.parent.client.set_tag(run_id, key, str(value))

    @staticmethod
    def _completed_with(trial: Any, point: str) -> Any:
        """A COMPLETE trial that trained the same FFN (same group, placement and K; two K fractions
        can round to one K), or None."""
        for other in trial.study.get_trials(deepcopy=False):
            if other.number != trial.number and other.state.name == "COMPLETE" and other.user_attrs.get("moc.point") == point:
                return other
        return None

    def _repeat(self, trial: Any, earlier: Any):
        """The sampler asked again for a point already trained: answer with that trial's result rather
        than train the same model twice (small categorical spaces make this common)."""
        for key in ("ppl", "memory", "constraint", "k", "mlflow_run_id", "moc.child_dir"):
            if key in earlier.user_attrs:
                trial.set_user_attr(key, earlier.user_attrs[key])
        trial.set_user_attr("repeat_of", earlier.number)
        self._tag(earlier.user_attrs.get("mlflow_run_id"), **{"optuna.repeated_by": trial.number})
        return earlier.values[0] if not self.settings.multi_objective else tuple(earlier.values)

    def __call__(self, trial: Any):
        import optuna

        settings, spec = self.settings, self.spec
        overrides, chosen = suggest(trial, settings.space, spec.d_ffn)
        point = f"group={chosen['group']} placement={chosen['placement']} k={chosen['k']}"
        trial.set_user_attr("moc.point", point)
        earlier = self._completed_with(trial, point)
        if earlier is not None:
            return self._repeat(trial, earlier)
        origin = original_trial_number(trial)
        child = Child(f"trial-{origin:04d}", (*spec.train, *overrides), {
            "optuna.study": spec.study, "optuna.trial": str(trial.number),
            "moc.search.group": chosen["group"], "moc.search.placement": chosen["placement"],
            "moc.search.k": str(chosen["k"]),
        })
        job = self.parent.compose_child(child)
        child = Child(child.name, child.overrides, {**child.tags, "moc.ffn_label": job.ffn.label})
        # Where the trial trains: a retry reopens this folder, resuming the dead trial's checkpoint.
        trial.set_user_attr("moc.child_dir", str(run_directory(job)))
        trial.set_user_attr("k", chosen["k"])
        if origin != trial.number:
            trial.set_user_attr("retry_of", origin)

        pruning = None
        if not settings.multi_objective and settings.pruner["kind"] != "none":
            pruning = StepPruningCallback(trial)
        result = self.parent.run_child(child, callbacks=[pruning] if pruning else [], catch_oom=True)
        trial.set_user_attr("mlflow_run_id", result.run_id or "")
        if result.run_id:
            client = self.parent.client
            logged = result.params
            for key, value in trial.params.items():
                if f"trial.{key}" not in logged:
                    client.log_param(result.run_id, f"trial.{key}", str(value))
        if result.outcome == "oom":
            self._tag(result.run_id, **{"optuna.state": "FAIL"})
            raise TrialOutOfMemory(f"trial {trial.number} ({job.ffn.label}) ran out of memory")

        ppl = result.value("final/val/ppl", "val/ppl")
        memory = result.value(spec.memory_metric)
        if ppl is None:
            raise RuntimeError(f"trial {trial.number}: its run {result.run_id} logged no val/ppl")
        if memory is None and (settings.multi_objective or settings.memory_budget is not None):
            raise RuntimeError(f"trial {trial.number}: its run {result.run_id} logged no {spec.memory_metric}")
        trial.set_user_attr("ppl", ppl)
        if memory is not None:
            trial.set_user_attr("memory", memory)
        if settings.memory_budget is not None:
            # Optuna's constraint convention: <= 0 is feasible.
            trial.set_user_attr("constraint", [memory - settings.memory_budget])
        if pruning is not None and pruning.pruned_at is not None:
            trial.set_user_attr("pruned_at_step", pruning.pruned_at)
            self._tag(result.run_id, **{"optuna.state": "PRUNED", "optuna.pruned_at_step": pruning.pruned_at})
            raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at} (val/ppl {ppl:.4g})")
        self._tag(result.run_id, **{"optuna.state": "COMPLETE", "optuna.value.ppl": ppl})
        return ppl if not settings.multi_objective else (ppl, memory)


def constraint(trial: Any) -> list[float]:
    """The sampler's constraint: memory minus budget (trials that never measured it count as feasible)."""
    return list(trial.user_attrs.get("constraint", [0.0]))


def spec_path(folder: Path) -> Path:
    return Path(folder) / "worker_spec.json"
