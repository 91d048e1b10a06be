#!/usr/bin/env python3
"""Pool several ``limits_cpu.py`` results: every repeat of every file, one figure per variant.

    python3 benchmarks/limits_pool.py benchmarks/results/*-limits-cpu.md

On a shared machine one run's median can land several points either side of the truth;
pooled over many rounds, three estimators of "what the limits add" should agree: the
median of the paired ratios (each repeat against the off run of its round, with the
quartiles), their geometric mean, and the ratio of the pooled medians.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

REPEAT_LINE = re.compile(r"^- ([\w-]+): ([\d., ]+)$", re.M)


def repeats(path: Path) -> dict[str, list[float]]:
    """The "Every repeat" lists of one result file, by variant."""
    return {m.group(1): [float(x) for x in m.group(2).split(",")]
            for m in REPEAT_LINE.finditer(path.read_text())}


def pooled(paths: list[Path]) -> str:
    base: list[float] = []
    values: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    for path in paths:
        runs = repeats(path)
        if "off" not in runs:
            raise SystemExit(f"{path}: no repeats of the off variant")
        base += runs["off"]
        for name, vs in runs.items():
            if name == "off":
                continue
            values.setdefault(name, []).extend(vs)
            ratios.setdefault(name, []).extend(v / b - 1 for b, v in zip(runs["off"], vs))
    lines = [f"{len(paths)} files, {len(base)} rounds; off median {statistics.median(base):.3f} ms",
             "", "| limits | paired median | quartiles | geometric mean | ratio of medians |",
             "| --- | --- | --- | --- | --- |"]
    for name, rs in ratios.items():
        q1, _, q3 = statistics.quantiles(rs, n=4)
        geo = statistics.geometric_mean([1 + r for r in rs]) - 1
        of_medians = statistics.median(values[name]) / statistics.median(base) - 1
        lines.append(f"| {name} | {100 * statistics.median(rs):+.1f}% | {100 * q1:+.1f}%"
                     f" .. {100 * q3:+.1f}% | {100 * geo:+.1f}% | {100 * of_medians:+.1f}% |")
    return "\n".join(lines)


def main() -> int:
    paths = [Path(p) for p in sys.argv[1:]]
    if not paths:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    print(pooled(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
