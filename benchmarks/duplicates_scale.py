"""The duplicates stages (issue 34) at scale: N x 512-d embeddings in a Parquet table that
another tool wrote, with planted near-duplicate pairs among clustered distractors.

    python benchmarks/duplicates_scale.py --rows 10000000 [--workers 2] [--work DIR] [--keep]
    python benchmarks/duplicates_scale.py --rows 200000          # a quick look

Writes the table a chunk at a time (never all of it in memory): files of 1M rows, row
groups of 50k, columns ``image_path`` (string) and ``clip_embedding`` (list<float32>),
as clip-retrieval or img2dataset with an embedding step might. Distractors: 10,000
clusters around 100 super-centres (so that clusters, and cells, border each other), each
row its cluster's centre plus noise, cosines between rows of one cluster about 0.3-0.7.
Planted pairs: every 50th row of a chunk is an edited copy (cosine 0.85-0.99 to it) of a
row of the chunk before, so pairs cross units and files; 2% of rows, N / 50 pairs.

Then ``visionbatch duplicates`` with default settings (``run_duplicates``: the committed
run on the local engine, its tasks a worker process per core, this process bound to
``--workers`` cores), and reports:
pair precision and recall against the planted pairs (pairs of one output group), wall
time and the seconds of each stage, peak memory (``PeakMemory``: each process's VmHWM,
the driver's and the largest worker's, and the largest sum of resident sets seen; the
table is written in a process of its own first), disk used by the work dir, and the rate in rows per second per core (wall time x workers) and per
CPU second of the driver and workers (the same on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

DIM = 512
CHUNK = 100_000
ROW_GROUP = 50_000  # a unit (50,000 rows by default) is whole row groups
FILE_ROWS = 1_000_000
CLUSTERS, SUPERS = 10_000, 100
PLANT_EVERY = 50


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def centres(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0])
    supers = _unit(rng.standard_normal((SUPERS, DIM), dtype=np.float32))
    noise = _unit(rng.standard_normal((CLUSTERS, DIM), dtype=np.float32))
    return _unit(supers[rng.integers(0, SUPERS, CLUSTERS)] + 0.9 * noise).astype(np.float32)


def base_chunk(seed: int, chunk: int, rows: int, centre: np.ndarray) -> np.ndarray:
    """The distractors of one chunk: cluster centre plus noise of a spread per cluster."""
    rng = np.random.default_rng([seed, 1, chunk])
    cluster = rng.integers(0, CLUSTERS, rows)
    spread = 0.7 + 0.9 * ((cluster * 2654435761) % 1000) / 1000  # per cluster: |noise| 0.7-1.6
    noise = _unit(rng.standard_normal((rows, DIM), dtype=np.float32)) * spread[:, None].astype(np.float32)
    return _unit(centre[cluster] + noise).astype(np.float32)


def chunk_vectors(seed: int, chunk: int, chunks: int, rows: int, centre: np.ndarray) -> tuple[np.ndarray, list]:
    """A chunk's rows, and its planted pairs (global row numbers): row p (p % 50 == 0) is
    a copy of the previous chunk's row p + 1 (the first chunk's copies come from the last)."""
    vectors = base_chunk(seed, chunk, rows, centre)
    previous = (chunk - 1) % chunks
    originals = base_chunk(seed, previous, rows, centre)
    rng = np.random.default_rng([seed, 2, chunk])
    planted = np.arange(0, rows - 1, PLANT_EVERY)
    cosine = rng.uniform(0.85, 0.99, len(planted)).astype(np.float32)
    scale = np.sqrt(1 / cosine ** 2 - 1)
    # noise orthogonal to the original, so the copy's cosine is the one drawn
    noise = rng.standard_normal((len(planted), DIM), dtype=np.float32)
    source = originals[planted + 1]
    noise = _unit(noise - (noise * source).sum(1, keepdims=True) * source)
    vectors[planted] = _unit(source + scale[:, None] * noise)
    pairs = [(chunk * rows + int(p), previous * rows + int(p) + 1) for p in planted]
    return vectors, pairs


def write_table(folder: Path, rows: int, seed: int) -> set[frozenset[int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    chunks = rows // CHUNK
    centre = centres(seed)
    truth, writer = set(), None
    for chunk in range(chunks):
        if chunk * CHUNK % FILE_ROWS == 0:
            if writer:
                writer.close()
            writer = None
        vectors, pairs = chunk_vectors(seed, chunk, chunks, CHUNK, centre)
        truth |= {frozenset(pair) for pair in pairs}
        first = chunk * CHUNK
        table = pa.table({
            "image_path": [f"s3://photos/{(first + i) // 1000:06d}/{first + i:09d}.jpg" for i in range(CHUNK)],
            "clip_embedding": pa.ListArray.from_arrays(pa.array(np.arange(0, (CHUNK + 1) * DIM, DIM, dtype=np.int32)),
                                                       pa.array(vectors.ravel())),
        })
        if writer is None:
            writer = pq.ParquetWriter(folder / f"embeddings-{chunk * CHUNK // FILE_ROWS:05d}.parquet", table.schema)
        writer.write_table(table, row_group_size=ROW_GROUP)
    writer.close()
    return truth


def _cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (the engine's workers,
    once it closes their pool): the work itself, whatever else the cores ran."""
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in used)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, from /proc (each one's parent in its stat line)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, up in parent.items() if up in frontier]
        found += children
        frontier = children
    return found


class PeakMemory:
    """Peak memory of this process and its workers while the block runs: each process's
    own high-water mark (VmHWM: exact, read every half second while it lives), and the
    largest sum of their resident sets seen at one look (sampled)."""

    def __init__(self):
        self.hwm: dict[int, int] = {}  # pid -> VmHWM, kB
        self.total = 0
        self._stop = threading.Event()

    def _look(self) -> None:
        total = 0
        for pid in [os.getpid(), *_descendants(os.getpid())]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            fields = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
                      if line.startswith(("VmHWM", "VmRSS"))}
            self.hwm[pid] = max(self.hwm.get(pid, 0), fields.get("VmHWM", 0))
            total += fields.get("VmRSS", 0)
        self.total = max(self.total, total)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self._look()

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._look()

    def figures(self) -> dict:
        me = os.getpid()
        workers = [kb for pid, kb in self.hwm.items() if pid != me]
        return {"peak_rss_driver_mb": round(self.hwm.get(me, 0) / 1024),
                "peak_rss_worker_mb": round(max(workers, default=0) / 1024),
                "peak_rss_all_processes_mb": round(self.total / 1024)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="a multiple of 100,000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="default: a temporary folder, removed after")
    parser.add_argument("--keep", action="store_true", help="keep the table (reused by a next run of this --work)")
    args = parser.parse_args(argv)
    import pyarrow.parquet as pq

    from visionbatch.config import DEFAULT_DUPLICATE_THRESHOLD, DuplicatesConfig
    from visionbatch.duplicates_job import run_duplicates

    work = args.work or Path(tempfile.mkdtemp(prefix="duplicates-scale-"))
    table, stages, out = work / f"table-{args.rows}", work / "stages", work / "out"
    output = out / "duplicates.parquet"
    started = time.perf_counter()
    truth_file = table / "_truth.npy"
    if not truth_file.exists():  # in a process of its own: this one's peak memory is the run's alone
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as writer:
            planted = writer.submit(write_table, table, args.rows, args.seed).result()
        np.save(truth_file, np.array([sorted(pair) for pair in planted]))
    truth = {frozenset(pair) for pair in np.load(truth_file).tolist()}
    written = time.perf_counter() - started
    shutil.rmtree(stages, ignore_errors=True)

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.workers])  # the engine: a worker per core
    cpu_before = _cpu_seconds()
    began = time.perf_counter()
    with PeakMemory() as memory:
        summary = run_duplicates(DuplicatesConfig(str(table), output=str(out), embedding_column="clip_embedding",
                                                  path_column="image_path", work_dir=str(stages), keep_work=True,
                                                  overwrite=True))
    seconds = time.perf_counter() - began
    cpu = _cpu_seconds() - cpu_before
    disk = sum(f.stat().st_size for f in stages.rglob("*") if f.is_file())
    found_rows = pq.read_table(output, columns=["path", "group"]).to_pydict()
    ordinal = [int(p.rsplit("/", 1)[1].split(".")[0]) for p in found_rows["path"]]
    by_group: dict[int, list[int]] = {}
    for row, group in zip(ordinal, found_rows["group"]):
        by_group.setdefault(group, []).append(row)
    found = {frozenset((a, b)) for members in by_group.values() for i, a in enumerate(members) for b in members[i + 1:]}
    hits = len(found & truth)
    cores = args.workers
    rate = args.rows / seconds / cores
    figures = {
        "rows": args.rows, "dim": DIM, "workers": cores, "planted_pairs": len(truth),
        "precision": round(hits / max(len(found), 1), 4), "recall": round(hits / len(truth), 4),
        "seconds": round(seconds, 1), "stage_seconds": summary["stage_seconds"], "table_written_s": round(written, 1),
        "rows_per_s_per_core": round(rate), "cpu_seconds": round(cpu), "rows_per_cpu_second": round(args.rows / cpu),
        **memory.figures(),
        "work_dir_gb": round(disk / 1e9, 2), "threshold": DEFAULT_DUPLICATE_THRESHOLD,
        "hours_100m_on_64_cores": round(100_000_000 / (rate * 64) / 3600, 2),
        "summary": summary,
    }
    print(json.dumps(figures, indent=1))
    shutil.rmtree(stages, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(table, ignore_errors=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
