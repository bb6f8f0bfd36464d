"""Shared fixtures: the real data beside the checkout, and deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def _import_triton_for_its_interpreter() -> None:
    """Without a GPU the Triton kernels are tested in triton's CPU interpreter, which runs triton's
    own library functions (tl.sum, tl.cumsum...) only if triton was first imported with
    TRITON_INTERPRET=1: import it so here, before any module that imports it (moc_lightning.ffn
    does), then restore the variable; the kernel tests turn the interpreter on for themselves."""
    if torch.cuda.is_available():
        return  # compiled kernels need triton's library as compiled functions
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_triton_for_its_interpreter()

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
