"""The tags every training run carries: which FFN, which model, which code."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
from pathlib import Path
from typing import Any, Mapping

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD of the checkout the package lives in, or "unknown" when it is not one (an installed wheel)."""
    top = _git("rev-parse", "--show-toplevel")
    # The package must be the checkout's own `moc_lightning/`, not a wheel inside someone else's repository.
    if top is None or (Path(top).resolve() / PACKAGE_DIR.name) != PACKAGE_DIR:
        return "unknown"
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> str:
    """"true" when the checkout has uncommitted changes to tracked files, "false" when clean, else "unknown"."""
    if git_commit() == "unknown":
        return "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return "unknown" if status is None else ("true" if status else "false")


def standard_tags(ffn_cfg: Mapping[str, Any] | Any, model_name: str) -> dict[str, str]:
    """Tags that let runs be filtered by FFN and model, and traced back to the code.

    `ffn_cfg` is an FFNConfig or its dict (`dataclasses.asdict`); `model_name` the preset (e.g. "llama_60m").
    """
    if dataclasses.is_dataclass(ffn_cfg) and not isinstance(ffn_cfg, type):
        ffn_cfg = dataclasses.asdict(ffn_cfg)
    if not isinstance(ffn_cfg, Mapping):
        raise TypeError(f"standard_tags: ffn_cfg must be an FFNConfig or a dict, got {type(ffn_cfg).__name__}")
    commit = git_commit()
    group = ffn_cfg.get("group")
    return {
        "ffn.kind": str(ffn_cfg.get("kind")),
        "ffn.k": str(ffn_cfg.get("k")),
        "ffn.group": "none" if group is None else str(group),
        "ffn.placement": str(ffn_cfg.get("placement")),
        "model.size": str(model_name),
        "git.commit": commit,
        "git.dirty": git_dirty(),
        "mlflow.source.git.commit": commit,
    }
