"""Shared fixtures: the real data beside the checkout, and deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MOC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`: the C4 sample, tinyshakespeare and the T5 tokenizer (see its README)."""
    if not (SHARED_DATA / "c4-en-sample-1000.json.gz").exists():
        pytest.fail(f"the shared data folder is missing: expected it at {SHARED_DATA} (set MOC_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
