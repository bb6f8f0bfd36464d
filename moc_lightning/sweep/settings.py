"""Settings files with named scales: conf/pipeline/<name>.yaml and conf/search/<space>.yaml.

A settings file holds its defaults at the top level and, under `scales:`, what each scale changes:

    k_values: null
    train: []                       # overrides of the main job (conf/train.yaml) for every child
    scales:
      smoke:     {train: [experiment=smoke-sweep], k_values: [8, 16, 32]}
      gpu-small: {train: [experiment=gpu-small]}

The resolved settings are the defaults, then the scale's block, then the command line's own
overrides (`pipeline.k_values=[8,16]`, `search.n_trials=6`); keys the file does not define are
refused, so a misspelt setting never goes unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from moc_lightning.cli.config import DEFAULT_CONF_DIR, ConfigError


def conf_dir(config_dir: Optional[str] = None) -> Path:
    """The config folder: the argument, else $MOC_CONF_DIR, else the checkout's conf/."""
    return Path(config_dir or os.environ.get("MOC_CONF_DIR") or DEFAULT_CONF_DIR).resolve()


def split_overrides(overrides: Iterable[str], prefix: str) -> tuple[list[str], list[str]]:
    """(own, train): overrides starting with `prefix` (e.g. "pipeline.", stripped) and the rest."""
    own, train = [], []
    for item in overrides:
        (own if item.startswith(prefix) else train).append(item[len(prefix):] if item.startswith(prefix) else item)
    return own, train


def fingerprint(*parts: Any) -> str:
    """Eight hex digits naming `parts` (JSON-serialisable): the same command finds the same runs."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def load_settings(path: Path, scale: str, own_overrides: Iterable[str], what: str) -> dict:
    """The resolved settings of `path` at `scale`, with `own_overrides` (key=value) on top.

    `what` names the file's owner in messages ("pipeline compare"). Raises ConfigError.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.exists() else []
        raise ConfigError(f"{what}: no settings file {path}" + (f"; there are: {', '.join(known)}" if known else ""))
    try:
        loaded = OmegaConf.load(path)
        base = OmegaConf.to_container(loaded, resolve=True)
        if not isinstance(base, dict):
            raise ConfigError(f"{what}: {path} must hold a mapping")
        scales = base.pop("scales", None) or {}
        base.setdefault("train", [])
        if scale not in scales:
            raise ConfigError(f"{what} has no scale {scale!r}: its scales are {', '.join(scales) or 'none'} ({path})")
        merged = OmegaConf.create(base)
        OmegaConf.set_struct(merged, True)  # a key the file does not define is refused by name
        merged = OmegaConf.merge(merged, OmegaConf.create(scales[scale] or {}))
        own = list(own_overrides)
        if own:
            bad = [item for item in own if "=" not in item]
            if bad:
                raise ConfigError(f"{what}: override {bad[0]!r} is not key=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(own))
        settings = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        keys = ", ".join(sorted(k for k in base)) if "base" in locals() and isinstance(base, dict) else ""
        raise ConfigError(f"{what}: {message}" + (f"; its settings are: {keys}" if keys else "") + f" ({path})") from None
    if not isinstance(settings.get("train"), list) or not all(isinstance(o, str) for o in settings["train"]):
        raise ConfigError(f"{what}: 'train' must be a list of main-job overrides such as experiment=smoke ({path})")
    return settings
