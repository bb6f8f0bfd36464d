"""A short table of benchmark JSON lines: every figure, and the correctness checks counted.

    python -m moc_lightning.bench.summary results/*.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

# context keys that say where a figure was measured rather than what it is
_WHERE = ("bench", "name", "value", "unit", "device", "torch", "date")


def summarise(paths: list[str]) -> str:
    lines, checks, failed = [], Counter(), []
    for path in paths:
        with open(path) as f:
            for raw in f:
                if not raw.startswith("{"):
                    continue
                record = json.loads(raw)
                context = " ".join(f"{k}={v}" for k, v in record.items() if k not in _WHERE)
                if record["unit"] == "pass":
                    checks[(record["bench"], record["value"] == 1.0)] += 1
                    if record["value"] != 1.0:
                        failed.append(f"FAILED {record['bench']}/{record['name']} {context}")
                    continue
                lines.append(f"{record['bench']:>7} {record['name']:<32} {record['value']:>12.4g} {record['unit']:<8} {context}")
    benches = sorted({bench for bench, _ in checks})
    lines += [f"checks {bench}: {checks[(bench, True)]} passed, {checks[(bench, False)]} failed" for bench in benches]
    return "\n".join(lines + failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    print(summarise(parser.parse_args().paths))


if __name__ == "__main__":
    main()
