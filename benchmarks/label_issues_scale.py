"""Scale benchmark of ``visionbatch label-issues`` (issue 20): peak memory and rows/s.

    python benchmarks/label_issues_scale.py [--rows 10000000] [--classes 1000] [--shard-rows 100000]
                                            [--noise 0.05] [--work DIR] [--json FILE]

Writes a finished DEST of synthetic result rows the way a job writes them (one part file
per shard through the writer stage's own ``write_shard``, then the manifest) into a temporary
folder, deleted afterwards, or into ``--work`` (kept; reused when it holds a DEST of that
size); then runs ``visionbatch label-issues DEST`` as a subprocess and reports its wall time, rows/s and peak RSS (the child's ru_maxrss:
the whole process, Python, pyarrow and DuckDB included).

The rows: a given label (uniform over the classes), the model right with probability
0.9 at a top-1 score drawn from U(0.5, 0.99), and ``--noise`` of the given labels
replaced by another class (the model still sees the real one); top-5 labels and scores
best first; ``true_label_score`` the given label's score (below the 5th where it is not
in the top-5). Paths look like an object store's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TOP_K = 5


def synthetic_rows(rng, start: int, n: int, names: pa.Array, noise: float) -> pa.Table:
    """``n`` result rows (module docstring), numbered from ``start``."""
    k_classes = len(names)
    real = rng.integers(0, k_classes, n)
    given = np.where(rng.random(n) < noise, (real + rng.integers(1, k_classes, n)) % k_classes, real)
    # Top-5: the real class first where the model is right, else a random other class.
    right = rng.random(n) < 0.9
    top = np.empty((n, TOP_K), dtype=np.int64)
    top[:, 0] = np.where(right, real, (real + rng.integers(1, k_classes, n)) % k_classes)
    for j in range(1, TOP_K):  # distinct from the first (others may repeat rarely: harmless here)
        top[:, j] = (top[:, 0] + rng.integers(1, k_classes, n)) % k_classes
    first = rng.uniform(0.5, 0.99, n)
    shares = np.sort(rng.dirichlet(np.ones(TOP_K), n)[:, 1:], axis=1)[:, ::-1]  # the rest, best first
    scores = np.column_stack([first, shares * (1 - first)[:, None] * 0.9]).astype(np.float32)
    in_top = top == given[:, None]
    true_score = np.where(in_top.any(1), (scores * in_top).sum(1), scores[:, -1] * 0.5).astype(np.float32)
    offsets = pa.array(np.arange(0, (n + 1) * TOP_K, TOP_K, dtype=np.int32))
    given_names = names.take(pa.array(given))
    label = names.take(pa.array(top[:, 0]))
    numbers = pc.cast(pa.array(np.arange(start, start + n)), pa.string())
    return pa.table({
        "path": pc.binary_join_element_wise("s3://bucket/train/", given_names, "/", numbers, ".JPEG", ""),
        "label": label,
        "label_id": pa.array(top[:, 0]),
        "score": pa.array(scores[:, 0]),
        "top_k_labels": pa.ListArray.from_arrays(offsets, names.take(pa.array(top.ravel()))),
        "top_k_scores": pa.ListArray.from_arrays(offsets, pa.array(scores.ravel())),
        "true_label": given_names,
        "correct": pc.equal(label, given_names),
        "true_label_score": pa.array(true_score),
        "error": pa.nulls(n, pa.string()),
        "width": pa.array(np.full(n, 500, np.int32)),
        "height": pa.array(np.full(n, 375, np.int32)),
    })


def write_dest(dest: Path, rows: int, classes: int, shard_rows: int, noise: float) -> None:
    from visionbatch.destination import Destination
    from visionbatch.imagenet import imagenet_id2label
    from visionbatch.manifest import Manifest
    from visionbatch.writer import write_shard

    id2label = imagenet_id2label()
    names = pa.array([id2label.get(i, f"class {i}") for i in range(classes)], pa.string())
    destination = Destination(str(dest))
    manifest = Manifest(destination, {"benchmark": "label-issues", "rows": rows, "classes": classes})
    rng = np.random.default_rng(0)
    for seq, start in enumerate(range(0, rows, shard_rows)):
        part = synthetic_rows(rng, start, min(shard_rows, rows - start), names, noise)
        manifest.add(write_shard(destination, f"000-{seq:07d}", part, "parquet"))
        print(f"\rwrote {start + part.num_rows:,} rows", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    manifest.write(complete=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--work", type=Path, help="where DEST goes (kept, and reused if it holds as many rows)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="label-issues-bench-"))
    dest = work / f"dest-{args.rows}x{args.classes}"
    manifest = dest / "_manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text())["rows"] == args.rows):
        shutil.rmtree(dest, ignore_errors=True)
        started = time.perf_counter()
        write_dest(dest, args.rows, args.classes, args.shard_rows, args.noise)
        print(f"DEST written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "visionbatch.cli", "label-issues", str(dest)],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(done.stdout, done.stderr, sep="", end="")
    if done.returncode:
        return done.returncode
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    figures = {"rows": args.rows, "classes": args.classes, "parts": -(-args.rows // args.shard_rows),
               "seconds": round(seconds, 1), "rows_per_s": round(args.rows / seconds),
               "peak_rss_mb": round(peak_mb), "dest_mb": round(sum(f.stat().st_size for f in dest.iterdir()) / 2**20)}
    for name, value in figures.items():
        print(f"{name}: {value}")
    if args.json:
        args.json.write_text(json.dumps(figures))
    if not args.work:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
