"""Run a snippet in a fresh interpreter where `import triton` fails, as on a machine without it."""

from __future__ import annotations

import os
import subprocess
import sys

BLOCK_TRITON = "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"


def run_without_triton(code: str) -> subprocess.CompletedProcess:
    """`code` after triton is blocked, with TRITON_INTERPRET=1 (so only triton's absence stops a
    kernel on CPU); the caller asserts on the return code and stderr."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", BLOCK_TRITON + code], capture_output=True, text=True, env=env,
                          timeout=120)
