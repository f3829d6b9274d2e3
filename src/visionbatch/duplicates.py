"""Duplicates (issue 34): which images are in a collection twice, at any size, as stages
over files that a driver runs as tasks (each a bounded unit of work, redone by rewriting
the same file).

plan      the SOURCE (a DEST classified with ``--embeddings``, or any Parquet table of
          paths and embeddings) as *units*: runs of its parts / row groups, ``unit_rows``
          rows at most, with each row's global ordinal (parts in listing order, rows in
          order). The plan is a small JSON-able dict; the driver holds it and nothing per row.
sample    per unit: a few of its unit-length vectors, for training (bounded in all)
train     faiss k-means on the sample: ``nlist`` centroids, and an HNSW graph over them
          (the IVF coarse quantizer); buckets of cells from the sample's counts
assign    per unit: each row's nearest centroid (its *home* cell) and every other cell
          whose border is near enough that a duplicate of the row could live there (a
          *visit*), spilled sorted by cell to ``cells/unit-U.parquet`` (a row group per
          bucket) with the vector as float16; the row's path, digest, image area and
          given label to ``rows/unit-U.parquet``; rows per cell to ``cells/unit-U.counts.npy``
cells     (``duplicate_cells``) per task: a bucket (consecutive cells packed up to
          ``cell_rows`` rows, a row group in each unit's spill), or a pair of blocks of
          one oversized cell; exact cosine (faiss ``IndexFlatIP`` range search) of the
          task's rows against its home rows, pairs >= threshold to ``pairs/task-T.parquet``
group     (``duplicate_groups``) pairs and equal digests joined into groups without
          chaining, the output table and its summary

The border rule (why pairs are not lost between cells): for centroids c_A, c_B and
f(x) = |x - c_B|^2 - |x - c_A|^2, linear in x, two vectors a and b with cosine >= t are at
most delta = sqrt(2 - 2t) apart, so f(a) - f(b) = 2 (a - b).(c_A - c_B) <= 2 delta |c_A - c_B|.
A row at home in A is spilled to cell B too when f <= delta |c_A - c_B|: then of a pair at
home in A and B, a is in B or b is in A, and the pair is compared in one of the two cells
(whichever cell the HNSW quantizer calls home). In 512-d the rule passes many cells at
t = 0.75, so a row goes to its home and at most ``cells_per_row`` - 1 more that pass it,
nearest first, out of the VISIT_CANDIDATES nearest; the rows cut short are counted
(``visits_cut``) and recall is measured (benchmarks/duplicates_scale.py), not assumed.

Work dir layout (all files named by their unit or task: a redo overwrites)::

    centroids.npy                       (nlist, d) float32
    quantizer.faiss                     an HNSW graph over the centroids
    buckets.npy                         cell bounds of the buckets (a cell task reads one)
    rows/unit-000000.parquet            ordinal, path, digest, area, given_label (every row)
    cells/unit-000000.parquet           cell, ordinal, home, vector (float16 bytes; sorted by cell, ordinal)
    cells/unit-000000.counts.npy        rows (homes and visits) per cell, int64[nlist]
    pairs/task-000000.parquet           a < b (ordinals), similarity
"""

from __future__ import annotations

import math
import os
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from visionbatch.config import DuplicatesConfig
from visionbatch.destination import Destination, job_schema
from visionbatch.duplicate_cells import pack_cells, publish, unit_file, write_parquet
from visionbatch.errors import DestinationError, UsageError
from visionbatch.storage import Storage

# Rows per cell that nlist aims at: the cells cost r * (N / nlist) * d per row (r: cells a
# row is spilled to), the same per row at any N; see choose_cells.
CELL_TARGET_ROWS = 2500
# How many nearest centroids assign tests for visits (a row is spilled to at most
# DuplicatesConfig.cells_per_row of them: home first, then the nearest that pass the margin
# rule): in 512-d the rule passes most of 16 tested cells at t = 0.8, while the second
# nearest alone finds 99.6% and two more 100% of the planted pairs of
# benchmarks/duplicates_scale.py (cosine >= 0.85).
VISIT_CANDIDATES = 8
# k-means sample: 16 points per centroid (k-means only partitions here: a lopsided cell
# costs time, never recall), at most 500,000 points: 1 GB of float32 at d = 512.
TRAIN_POINTS_PER_CELL = 16
MAX_TRAIN_POINTS = 500_000
KMEANS_ITERATIONS = 10
HNSW_NEIGHBOURS, HNSW_SEARCH = 32, 64
_SAMPLE_SEED = 34


def choose_cells(rows: int) -> int:
    """nlist = N / CELL_TARGET_ROWS (at most MAX_TRAIN_POINTS / TRAIN_POINTS_PER_CELL).
    With an HNSW graph over the centroids, assigning a row costs about log(nlist) distance
    computations, so more cells cost little there; the cells cost r * (N / nlist) * d per
    row, constant at any N this way (with sqrt(N) cells it would grow as sqrt(N)). Much
    smaller cells have more border: more rows pass the margin rule for more cells."""
    return max(1, min(math.ceil(rows / CELL_TARGET_ROWS), MAX_TRAIN_POINTS // TRAIN_POINTS_PER_CELL))


# -- plan: the source as units ------------------------------------------------------------


def is_dest(destination: Destination) -> bool:
    if destination.fs.get_file_info(destination.root).type != pafs.FileType.Directory:
        return False  # a Parquet file (or nothing: the listing says so)
    try:
        return destination.manifest() is not None
    except DestinationError:
        return True  # a damaged manifest is a DEST's: reading its parts says what is wrong


def plan_source(config: DuplicatesConfig) -> dict:
    """The source's units and what its rows carry: ``{"source", "kind": "dest"|"table",
    "job" (a DEST's job record), "units": [{"unit", "first", "rows", "pieces": [{"file",
    "rows", "row_groups"}]}], "rows", "columns": {role: column or None}, "dim"}``."""
    storage = Storage(config.s3_endpoint)
    destination = Destination(config.source, storage)
    if is_dest(destination):
        manifest, shards = destination.committed_parts()
        schema, job = job_schema(manifest["job"]), manifest["job"]
        pieces = [{"file": shard["file"], "rows": shard["rows"], "row_groups": None} for shard in shards]
    else:
        files = _parquet_files(destination)
        if not files:
            raise UsageError(f"no Parquet files in {config.source}")
        schema, job, pieces = None, None, []
        for name in files:
            with destination.fs.open_input_file(f"{destination.root}/{name}" if name else destination.root) as file:
                metadata = pq.ParquetFile(file).metadata
            schema = schema or metadata.schema.to_arrow_schema()
            pieces += [{"file": name, "rows": metadata.row_group(i).num_rows, "row_groups": [i]}
                       for i in range(metadata.num_row_groups)]
    columns = {"path": config.path_column, "embedding": config.embedding_column, "digest": config.digest_column,
               "label": config.label_column, "width": "width", "height": "height"}
    columns = {role: name if name in schema.names else None for role, name in columns.items()}
    if columns["path"] is None:
        raise UsageError(f"{config.source} has no column {config.path_column!r} (--path-column)")
    dim = None
    if columns["embedding"] is not None:
        kind = schema.field(columns["embedding"]).type
        if not (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind)):
            raise UsageError(f"column {columns['embedding']!r} is {kind}, not a list of floats")
        dim = kind.list_size if pa.types.is_fixed_size_list(kind) else None
    units, first = [], 0
    for piece in pieces:  # consecutive pieces of one file (row groups), or parts, up to unit_rows
        last = units[-1] if units else None
        if last and last["rows"] + piece["rows"] <= config.unit_rows and \
                (job is not None or last["pieces"][-1]["file"] == piece["file"]):
            if job is None:
                last["pieces"][-1]["row_groups"] += piece["row_groups"]
                last["pieces"][-1]["rows"] += piece["rows"]
            else:
                last["pieces"].append(piece)
            last["rows"] += piece["rows"]
        else:
            units.append({"unit": len(units), "first": first, "rows": piece["rows"], "pieces": [dict(piece)]})
        first += piece["rows"]
    return {"source": destination.uri, "s3_endpoint": config.s3_endpoint, "kind": "dest" if job else "table",
            "job": job, "units": units, "rows": first, "columns": columns, "dim": dim}


def _parquet_files(destination: Destination) -> list[str]:
    """A table's Parquet files relative to its folder, in listing order (sorted), leaving
    out hidden and underscore names as Spark and Arrow do ("" where it is one file)."""
    info = destination.fs.get_file_info(destination.root)
    if info.type == pafs.FileType.File:
        return [""]
    if info.type == pafs.FileType.NotFound:
        raise UsageError(f"{destination.uri} does not exist")
    found = destination.fs.get_file_info(pafs.FileSelector(destination.root, recursive=True))
    names = [f.path[len(destination.root) + 1:] for f in found if f.type == pafs.FileType.File]
    return sorted(n for n in names if n.endswith(".parquet")
                  and not any(part.startswith(("_", ".")) for part in n.split("/")))


# Rows a unit is read in at a time: Parquet's decoding of a list column holds several
# times its values while it runs (a 50k-row unit of 512 floats read whole: 0.5 GB).
READ_BATCH_ROWS = 4096


def read_unit_batches(plan: dict, unit: dict, roles: Iterable[str]) -> Iterable[pa.RecordBatch]:
    """A unit's rows, a bounded batch at a time (a DEST's part at a time), the columns of
    ``roles`` present in the source (named by role)."""
    wanted = {role: plan["columns"][role] for role in roles if plan["columns"][role]}
    destination = Destination(plan["source"], Storage(plan["s3_endpoint"]))
    columns = list(wanted.values())
    for piece in unit["pieces"]:
        if plan["kind"] == "dest":
            table = destination.read_part(piece["file"], piece["rows"], job_schema(plan["job"]), tuple(columns))
            for batch in table.select(columns).to_batches():
                yield pa.RecordBatch.from_arrays(batch.columns, names=list(wanted))
            continue
        path = f"{destination.root}/{piece['file']}" if piece["file"] else destination.root
        with destination.fs.open_input_file(path) as file:
            # streamed: a row group's column chunk is read a buffer at a time, not whole
            reader = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 20)
            for batch in reader.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=piece["row_groups"],
                                             columns=columns):
                yield pa.RecordBatch.from_arrays(batch.select(columns).columns, names=list(wanted))


def read_unit(plan: dict, unit: dict, roles: Iterable[str]) -> pa.Table:
    """A unit's rows, the columns of ``roles`` present in the source (named by role)."""
    wanted = [role for role in roles if plan["columns"][role]]
    batches = list(read_unit_batches(plan, unit, wanted))
    return pa.Table.from_batches(batches) if batches else pa.table({role: [] for role in wanted})


def unit_vectors(plan: dict, unit: dict) -> tuple[np.ndarray, np.ndarray]:
    """(valid, vectors): which of a unit's rows have an embedding, and theirs at unit
    length (float32, one row per valid row). A null or all-zero embedding is not valid.
    Read a batch at a time into one array, normalised in place: the vectors are held
    about once."""
    valid, vectors, at = [], None, 0
    for batch in read_unit_batches(plan, unit, ["embedding"]):
        embeddings = batch.column(0)
        valid.append(np.asarray(embeddings.is_valid().to_numpy(zero_copy_only=False)))
        values = embeddings.flatten()  # each non-null list's values, in order
        present = int(np.count_nonzero(valid[-1]))
        if not present:
            continue
        if vectors is None:
            vectors = np.empty((unit["rows"], plan["dim"] or len(values) // present), dtype=np.float32)
        vectors[at:at + present] = values.to_numpy(zero_copy_only=False).reshape(present, vectors.shape[1])
        at += present
    valid = np.concatenate(valid) if valid else np.zeros(0, dtype=bool)
    if vectors is None:
        return valid, np.zeros((0, plan["dim"] or 0), dtype=np.float32)
    vectors = vectors[:at]
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))  # no squared copy of the vectors
    nonzero = norms > 0
    if not nonzero.all():
        valid[np.flatnonzero(valid)[~nonzero]] = False
        vectors, norms = vectors[nonzero], norms[nonzero]
    vectors /= norms[:, None]
    return valid, vectors


# -- sample and train -----------------------------------------------------------------------


def sample_stage(plan: dict, unit: dict, points: int) -> np.ndarray:
    """About ``points`` * (unit rows / all rows) of the unit's vectors, chosen by a seed of
    the unit's own (a redo picks the same)."""
    _, vectors = unit_vectors(plan, unit)
    share = min(len(vectors), math.ceil(points * unit["rows"] / max(plan["rows"], 1)))
    chosen = np.random.default_rng([_SAMPLE_SEED, unit["unit"]]).choice(len(vectors), share, replace=False)
    return vectors[np.sort(chosen)]


def train_stage(sample: np.ndarray, cells: int, work: str, threshold: float, rows: int, cell_rows: int,
                cells_per_row: int, check_fence: Callable[[], None] | None = None) -> dict:
    """k-means on the sample: the centroids, to ``work/centroids.npy``, and an HNSW graph
    over them (the coarse quantizer), to ``work/quantizer.faiss``; and the buckets, to
    ``work/buckets.npy``: consecutive cells whose rows (homes and visits, estimated from
    the sample) add up to at most ``cell_rows``, what one cell task reads.
    Returns ``{"cells", "buckets"}``."""
    import faiss


    centroids = _balanced_centroids(sample, min(cells, len(sample)), rows)
    cells = len(centroids)
    quantizer = faiss.IndexHNSWFlat(sample.shape[1], HNSW_NEIGHBOURS)
    quantizer.add(centroids)
    nearest, visits, _ = _candidate_cells(sample, centroids, quantizer, threshold, cells_per_row)
    estimate = np.bincount(nearest[visits], minlength=cells) * (rows / len(sample))
    bounds = np.unique([task["cells"][0] for task in pack_cells(estimate, cell_rows, 0, cells)] + [0, cells])
    save_npy(os.path.join(work, "centroids.npy"), centroids, check_fence)
    faiss.write_index(quantizer, os.path.join(work, "quantizer.faiss.tmp"))
    publish(os.path.join(work, "quantizer.faiss.tmp"), os.path.join(work, "quantizer.faiss"), check_fence)
    save_npy(os.path.join(work, "buckets.npy"), bounds, check_fence)
    return {"cells": cells, "buckets": len(bounds) - 1}


def _kmeans(points: np.ndarray, cells: int) -> np.ndarray:
    import faiss

    kmeans = faiss.Kmeans(points.shape[1], cells, niter=KMEANS_ITERATIONS, seed=_SAMPLE_SEED,
                          min_points_per_centroid=1, max_points_per_centroid=TRAIN_POINTS_PER_CELL, verbose=False)
    kmeans.train(points)
    return kmeans.centroids


def _balanced_centroids(sample: np.ndarray, cells: int, rows: int) -> np.ndarray:
    """k-means centroids, where a cell would hold more than twice CELL_TARGET_ROWS (by the
    sample) replaced by a k-means of its own sample points: in high dimensions k-means
    leaves a few hub cells with much of the data, and a cell costs its rows squared."""
    import faiss

    centroids = _kmeans(sample, cells)
    limit = 2 * CELL_TARGET_ROWS * len(sample) / rows  # in sample points
    for _ in range(3):
        home = faiss.knn(sample, centroids, 1)[1][:, 0]
        counts = np.bincount(home, minlength=len(centroids))
        oversized = np.flatnonzero(counts > max(limit, 2))
        if not len(oversized):
            break
        split = [_kmeans(sample[home == cell], math.ceil(counts[cell] / limit * 2)) for cell in oversized]
        centroids = np.concatenate([np.delete(centroids, oversized, axis=0), *split]).astype(np.float32)
    return centroids


def save_npy(path: str, array: np.ndarray, check_fence: Callable[[], None] | None = None) -> None:
    """Written whole or not at all (a killed task leaves no half file for a reader)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as file:
        np.save(file, array)
    publish(path + ".tmp", path, check_fence)


# -- assign -------------------------------------------------------------------------------


def assign_stage(plan: dict, unit: dict, work: str, threshold: float, near: bool, cells_per_row: int,
                 check_fence: Callable[[], None] | None = None) -> dict:
    """Spill one unit: its rows' facts to ``rows/``, and (``near``) each vector to its home
    cell and the cells it visits, to ``cells/``. Returns ``{"unit", "vectors", "visits",
    "visits_cut"}``."""
    table = read_unit(plan, unit, ["path", "digest", "label", "width", "height"])
    ordinals = np.arange(unit["first"], unit["first"] + unit["rows"], dtype=np.int64)
    area = (pc.multiply(table.column("width").cast(pa.int64()), table.column("height").cast(pa.int64()))
            if "width" in table.column_names and "height" in table.column_names else pa.nulls(len(table), pa.int64()))
    rows = pa.table({
        "ordinal": ordinals,
        "path": table.column("path").cast(pa.string()),
        "digest": table.column("digest").cast(pa.string()) if "digest" in table.column_names
        else pa.nulls(len(table), pa.string()),
        "area": area,
        "given_label": table.column("label").cast(pa.string()) if "label" in table.column_names
        else pa.nulls(len(table), pa.string()),
    })
    write_parquet(unit_file(work, "rows", unit["unit"]), rows, check_fence)
    result = {"unit": unit["unit"], "vectors": 0, "visits": 0, "visits_cut": 0}
    if not near:
        return result
    del table, rows
    valid, vectors = unit_vectors(plan, unit)
    import faiss

    centroids = np.load(os.path.join(work, "centroids.npy"))
    quantizer = faiss.read_index(os.path.join(work, "quantizer.faiss"))
    nearest, visits, cut = _candidate_cells(vectors, centroids, quantizer, threshold, cells_per_row)
    members, rank = np.nonzero(visits)  # a row (its index among the vectors) per spilled copy
    cells, home = nearest[members, rank].astype(np.int32), rank == 0
    del nearest, visits
    order = np.lexsort((members, cells))  # by cell, then ordinal (members index rows in order)
    cells, members, home = cells[order], members[order], home[order]
    dim = vectors.shape[1]
    half = vectors.astype(np.float16)  # before the take: the copies (r per row) are made of the smaller array
    del vectors
    spilled = pa.table({
        "cell": pa.array(cells, pa.int32()),
        "ordinal": pa.array(ordinals[valid][members]),
        "home": pa.array(home),
        # a row's float16 values as one fixed-size binary value: Parquet keeps no levels per
        # float for it (a list column's, written and read, hold several times the values)
        "vector": pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * dim), len(members),
                                                       [None, pa.py_buffer(half[members])]),
    })
    del half
    # One row group per bucket that has rows here: a cell task reads its bucket's alone.
    bounds = np.load(os.path.join(work, "buckets.npy"))
    starts = np.searchsorted(cells, bounds)
    path = unit_file(work, "cells", unit["unit"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with pq.ParquetWriter(path + ".tmp", spilled.schema, compression="none") as writer:
        for begin, end in zip(starts[:-1], starts[1:]):
            if end > begin:
                writer.write_table(spilled.slice(begin, end - begin), row_group_size=end - begin)
    publish(path + ".tmp", path, check_fence)
    save_npy(unit_file(work, "cells", unit["unit"], ".counts.npy"),
             np.bincount(cells, minlength=len(centroids)).astype(np.int64), check_fence)
    return {**result, "vectors": int(np.count_nonzero(valid)), "visits": int(len(cells) - np.count_nonzero(valid)),
            "visits_cut": cut}


def _margin(threshold: float) -> float:
    """delta: the largest distance between unit vectors with cosine >= threshold; float16
    rounding of the spilled vectors is within the slack added."""
    return math.sqrt(max(0.0, 2.0 - 2.0 * threshold)) + 1e-3


def _candidate_cells(vectors: np.ndarray, centroids: np.ndarray, quantizer, threshold: float, cells_per_row: int
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """(nearest, visits, cut): each row's VISIT_CANDIDATES nearest centroids (home first,
    from the HNSW quantizer), which of them it is spilled to (the margin rule in the
    module's docstring, at most ``cells_per_row``, home always), and how many rows the
    rule would have spilled to more cells than that."""
    quantizer.hnsw.efSearch = HNSW_SEARCH
    distances, nearest = quantizer.search(vectors, min(VISIT_CANDIDATES, len(centroids)))
    delta = _margin(threshold)
    visits = np.zeros(nearest.shape, dtype=bool)
    visits[:, 0] = True
    for start in range(0, len(vectors), 2048):  # the centroid gather, a bounded block at a time
        block = slice(start, start + 2048)
        between = np.linalg.norm(centroids[nearest[block, 1:]] - centroids[nearest[block, :1]], axis=2)
        visits[block, 1:] = distances[block, 1:] - distances[block, :1] <= delta * between
    visits &= nearest >= 0  # HNSW found fewer than asked
    cut = int(np.count_nonzero(visits.sum(1) > cells_per_row))
    visits &= np.cumsum(visits, axis=1) <= cells_per_row
    return nearest, visits, cut
