"""A search worker process: `python -m moc_lightning.search.worker SPEC.json N_TRIALS INDEX`.

Started by `moc search --workers N`; runs N_TRIALS trials of the study SPEC.json names (see
`WorkerSpec`), on the same storage as the other workers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moc_lightning.search.objective import WorkerSpec
from moc_lightning.search.study import run_worker


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m moc_lightning.search.worker SPEC.json N_TRIALS WORKER_INDEX", file=sys.stderr)
        return 2
    spec = WorkerSpec(**json.loads(Path(argv[0]).read_text()))
    run_worker(spec, int(argv[1]), int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
