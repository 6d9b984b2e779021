"""Rank the test files by the CPU they use (the suite is bound by CPU on CI's 2 cores).

    RENKEI_CPU_REPORT=/tmp/cpu make test
    .venv/bin/python bench/suite_cpu.py /tmp/cpu [--tests]

Reads what tests/conftest.py wrote (per test: CPU of the pytest process, CPU
of its reaped child processes, wall seconds) and prints, per file (or per test
with --tests), CPU and wall seconds, largest first, with the share of the whole
suite's CPU.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tests", action="store_true", help="one line per test, not per file")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    rows: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for tsv in sorted(args.folder.glob("cpu-*.tsv")):
        for line in tsv.read_text(encoding="utf-8").splitlines():
            nodeid, own, kids, wall = line.split("\t")
            key = nodeid if args.tests else nodeid.split("::")[0]
            for i, value in enumerate((own, kids, wall)):
                rows[key][i] += float(value)
    total_cpu = sum(r[0] + r[1] for r in rows.values()) or 1.0
    total_wall = sum(r[2] for r in rows.values())
    print(f"{'cpu s':>8} {'own':>7} {'kids':>7} {'wall s':>7} {'share':>6}  test")
    ranked = sorted(rows.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))
    for key, (own, kids, wall) in ranked[: args.top]:
        print(f"{own + kids:8.1f} {own:7.1f} {kids:7.1f} {wall:7.1f} {(own + kids) / total_cpu:6.1%}  {key}")
    print(f"{total_cpu:8.1f} {'':7} {'':7} {total_wall:7.1f} {1:6.0%}  all {len(rows)}")


if __name__ == "__main__":
    main()
