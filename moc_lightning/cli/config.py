"""The job config: composed from YAML under conf/ with Hydra, checked against a schema, then turned
into the project's own validated dataclasses.

Hydra composes the groups (model size x FFN variant x data x trainer, plus experiment files) and
parses command-line overrides; we use its compose API rather than `@hydra.main` so that the job
keeps its working directory, its logging and its error messages. The schema registered below has
one field per field of the real configs, each defaulting to None ("the real config's default"),
so that a misspelt key is refused by name while every default keeps a single home: the dataclass
that validates it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from moc_lightning.data.config import DataConfig
from moc_lightning.ffn import FFNConfig
from moc_lightning.models import ModelConfig
from moc_lightning.tracking.config import TrackingConfig
from moc_lightning.training.optim import OptimConfig

# The checkout's conf/ (the package is installed editable); MOC_CONF_DIR or --config-dir overrides.
DEFAULT_CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(Exception):
    """A config that cannot be used; the message says which key or value and what is allowed."""


@dataclass(frozen=True)
class TrainerConfig:
    """How Lightning runs the job. precision None: bf16-mixed on GPU, 32-true on CPU."""

    max_steps: int = 200
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | any Lightning strategy name
    precision: Optional[str] = None
    accumulate_grad_batches: int = 1
    val_every_n_steps: int = 100
    limit_val_batches: int = 20
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 50
    monitor_every_n_steps: int = 50  # activation memory and channel statistics
    seed: int = 0
    progress_bar: bool = True

    def __post_init__(self):
        for name in ("max_steps", "num_nodes", "accumulate_grad_batches", "val_every_n_steps", "limit_val_batches",
                     "log_every_n_steps", "checkpoint_every_n_steps", "monitor_every_n_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"trainer.{name} = {value!r} is not allowed: expected an integer >= 1")
        if self.accelerator not in ("auto", "cpu", "gpu", "cuda", "mps", "tpu"):
            raise ValueError(f"trainer.accelerator = {self.accelerator!r} is not allowed: expected auto, cpu or gpu")


def _schema_of(cls, skip=(), extra=()) -> type:
    """A dataclass with the same field names as `cls`, each Any = None (see the module docstring)."""
    fields = [(f.name, Any, field(default=None)) for f in dataclasses.fields(cls) if f.name not in skip]
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", [*extra, *fields])


SECTIONS = {
    "model": _schema_of(ModelConfig, skip=("name", "ffn"), extra=[("preset", Any, field(default="llama-small"))]),
    "ffn": _schema_of(FFNConfig, skip=("d_model", "d_ffn")),
    "data": _schema_of(DataConfig),
    "optim": _schema_of(OptimConfig),
    "trainer": _schema_of(TrainerConfig),
    "tracking": _schema_of(TrackingConfig),
}
JobSchema = dataclasses.make_dataclass(
    "JobSchema",
    [(name, schema, field(default_factory=schema)) for name, schema in SECTIONS.items()]
    + [("run_dir", Any, field(default="runs")), ("name", Any, field(default=None))],
)


def _given(section: dict) -> dict:
    return {k: v for k, v in section.items() if v is not None}


def _without_unset(value):
    """`_given` at every depth."""
    if isinstance(value, dict):
        return {k: _without_unset(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_unset(v) for v in value]
    return value


@dataclass(frozen=True)
class JobConfig:
    """The resolved job: every section built into its validated dataclass."""

    model: ModelConfig
    ffn: FFNConfig  # layer 0's, for tags and names
    data: DataConfig
    optim: OptimConfig
    trainer: TrainerConfig
    tracking: TrackingConfig
    run_dir: str
    name: Optional[str]
    raw: dict  # the composed config as plain data (printed, saved and logged)

    @property
    def fingerprint(self) -> str:
        """Eight hex digits naming this exact config: the same command finds the same run. Settings
        left unset (None) are not hashed, so a new optional setting keeps existing runs' names."""
        return hashlib.sha1(json.dumps(_without_unset(self.raw), sort_keys=True, default=str).encode()).hexdigest()[:8]

    @property
    def run_name(self) -> str:
        return self.name or f"{self.model.name}-{self.ffn.label}-{self.fingerprint}"

    @property
    def experiment(self) -> str:
        """Runs that compare FFN variants at one model size on one data source share an experiment."""
        return self.tracking.experiment or f"{self.model.name} on {self.data_label}"

    @property
    def data_label(self) -> str:
        if self.data.source != "files":
            return self.data.source
        return ",".join(Path(str(p)).name for p in self.data.paths) or "files"

    def with_vocab_size(self, vocab_size: int) -> "JobConfig":
        return dataclasses.replace(self, model=self.model.replace(vocab_size=vocab_size))


def build_job(raw: dict) -> JobConfig:
    """Turn a composed config (plain dicts) into a JobConfig, or raise ConfigError."""
    try:
        model_section = _given(raw["model"])
        preset = model_section.pop("preset")
        ffn = _given(raw["ffn"])
        model = ModelConfig.from_preset(preset, ffn=ffn, **model_section)
        return JobConfig(
            model=model,
            ffn=model.ffn_config(0),
            data=DataConfig(**_given(raw["data"])),
            optim=OptimConfig(**_given(raw["optim"])),
            trainer=TrainerConfig(**_given(raw["trainer"])),
            tracking=TrackingConfig(**_given(raw["tracking"])),
            run_dir=str(raw.get("run_dir") or "runs"),
            name=raw.get("name"),
            raw=raw,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def compose(overrides: list[str], config_name: str = "train", config_dir: Optional[str] = None) -> dict:
    """Compose conf/<config_name>.yaml with command-line overrides into plain dicts."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    conf_dir = Path(config_dir or os.environ.get("MOC_CONF_DIR") or DEFAULT_CONF_DIR).resolve()
    if not (conf_dir / f"{config_name}.yaml").exists():
        raise ConfigError(f"no config {config_name}.yaml in {conf_dir}: pass --config-dir or set MOC_CONF_DIR")
    ConfigStore.instance().store(name="job_schema", node=JobSchema)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3", job_name="moc"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        # Hydra's messages are good but spread over lines; make them one paragraph. For a key the
        # schema lacks, Hydra suggests `+key=...`, which the schema would refuse too: say what exists.
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        unknown = re.match(r"Could not override '([^']+)'", message)
        if unknown:
            key = unknown.group(1)
            section, _, name = key.partition(".")
            allowed = ", ".join(f.name for f in dataclasses.fields(SECTIONS[section])) if section in SECTIONS else ""
            message = f"unknown config key {key!r}" + (f"; the keys of {section!r} are: {allowed}" if allowed else "")
        raise ConfigError(f"{message} (config folder: {conf_dir})") from None
    finally:
        GlobalHydra.instance().clear()


def to_yaml(raw: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(raw))
