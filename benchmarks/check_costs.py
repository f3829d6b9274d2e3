"""Two small per-job costs the test suite used to print (and never assert): what counting
a shard's metrics costs, and what proving a processor's fast path at start-up costs.

    python benchmarks/check_costs.py [--repeat 20]

1. ``metric_counts`` on 1,000 result rows over 1,000 classes (ImageNet-like: many
   confusion cells), the best and the median of ``--repeat`` calls after a warm-up;
   the writer runs it once per shard.
2. ``resolve_checked_spec`` (resolve a processor's config, then check it against the
   processor on the synthetic images) for four families, the best of three after a
   first call that pays one-off imports; every job runs it once at start-up.

Results go to benchmarks/RESULTS.md ("Check costs").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

FAMILIES_TIMED = ["vit", "convnext-224", "segformer", "donut-swin"]


def metric_counts_ms(repeat: int) -> tuple[float, float]:
    from test_evaluate import random_table

    from visionbatch.counts import metric_counts

    shard = random_table(1000, 1000, seed=5)
    metric_counts(shard)  # warm-up
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        metric_counts(shard)
        runs.append(time.perf_counter() - started)
    runs.sort()
    return runs[0] * 1e3, runs[len(runs) // 2] * 1e3


def check_ms(family: str) -> float:
    from test_preprocess_families import FAMILIES

    from visionbatch.preprocess import resolve_checked_spec

    processor = FAMILIES[family]()
    resolve_checked_spec(processor)  # one-off imports
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        spec, reason = resolve_checked_spec(processor)
        seconds.append(time.perf_counter() - started)
        assert spec is not None, reason
    return min(seconds) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    best, median = metric_counts_ms(args.repeat)
    print(f"metric_counts: {best:.2f} ms per 1000 rows x 1000 classes (best of {args.repeat}, median {median:.2f} ms)")
    for family in FAMILIES_TIMED:
        print(f"resolve_checked_spec({family}): {check_ms(family):.0f} ms (best of 3)")


if __name__ == "__main__":
    main()
