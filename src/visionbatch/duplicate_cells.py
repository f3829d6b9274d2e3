"""The cells stage of ``duplicates``: exact cosine among the rows of a bucket of cells
(or of two blocks of an oversized cell), read from each unit's spill, and the plan of
those tasks from the rows each cell got. See ``duplicates`` for the whole."""

from __future__ import annotations

import math
import os
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def publish(temporary: str, path: str, check_fence: Callable[[], None] | None) -> None:
    """A work file appears whole (a rename), and only while the job still holds its OUT
    (``check_fence`` reads OUT's lease, and raises Superseded where a newer job took it):
    a stale job's task writes nothing into the work dir a newer job goes on with."""
    if check_fence is not None:
        try:
            check_fence()
        except BaseException:
            os.remove(temporary)
            raise
    os.replace(temporary, path)


def write_parquet(path: str, table: pa.Table, check_fence: Callable[[], None] | None = None, **options) -> None:
    """Written whole or not at all (a redone task overwrites it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(table, path + ".tmp", **options)
    publish(path + ".tmp", path, check_fence)


def unit_file(work: str, folder: str, unit: int, suffix: str = ".parquet") -> str:
    """A unit's file in the work dir (its spill, its rows, its counts)."""
    return os.path.join(work, folder, f"unit-{unit:06d}{suffix}")


def pairs_file(work: str, task: int) -> str:
    """A cell task's pairs in the work dir (the group stage reads them all)."""
    return os.path.join(work, "pairs", f"task-{task:06d}.parquet")


def cell_counts(work: str, units: int) -> np.ndarray:
    """Rows (homes and visits) per cell over all ``units`` (numbered 0..units-1), from their counts files."""
    return sum(np.load(unit_file(work, "cells", unit, ".counts.npy")) for unit in range(units))


def plan_cell_tasks(counts: np.ndarray, bounds: np.ndarray, cell_rows: int) -> list[dict]:
    """Cell tasks from the rows each cell got: per bucket, its cells packed up to
    ``cell_rows`` rows (one task where the estimate held), and for a cell over that one
    task per pair of its ``cell_rows`` blocks (i <= j): ``{"task", "bucket", "cells": [lo,
    hi], "blocks": [i, j] or None}``. Deterministic in the counts."""
    tasks = [{"bucket": bucket, **task} for bucket, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
             for task in pack_cells(counts, cell_rows, lo, hi)]
    return [{"task": i, **task} for i, task in enumerate(tasks)]


def pack_cells(counts: np.ndarray, cell_rows: int, lo: int, hi: int) -> list[dict]:
    """Cells lo..hi-1 as runs of consecutive cells of at most ``cell_rows`` rows, and the
    block pairs of each cell over that."""
    tasks, start, packed = [], lo, 0
    for cell in range(lo, hi):
        rows = float(counts[cell])
        if rows > cell_rows:
            if packed:
                tasks.append({"cells": [start, cell], "blocks": None})
            blocks = math.ceil(rows / cell_rows)
            tasks += [{"cells": [cell, cell + 1], "blocks": [i, j]} for i in range(blocks) for j in range(i, blocks)]
            start, packed = cell + 1, 0
        elif packed + rows > cell_rows:
            tasks.append({"cells": [start, cell], "blocks": None})
            start, packed = cell, rows
        else:
            packed += rows
    if packed:
        tasks.append({"cells": [start, hi], "blocks": None})
    return tasks


def _task_rows(work: str, units: int, task: dict, cell_rows: int) -> Iterator[pa.RecordBatch]:
    """The rows of the task's cells, unit by unit (so in ordinal order within a cell), read
    from the bucket's row group of each unit; for a block task only the rows of its two
    blocks, streamed (the cell may be any size)."""
    bounds = np.load(os.path.join(work, "buckets.npy"))
    lo, hi = task["cells"]
    whole = (lo, hi) == (bounds[task["bucket"]], bounds[task["bucket"] + 1])
    wanted = sorted({block * cell_rows for block in task["blocks"] or ()})
    position = 0
    for unit in range(units):
        in_buckets = np.add.reduceat(np.load(unit_file(work, "cells", unit, ".counts.npy")), bounds[:-1])
        if not in_buckets[task["bucket"]]:
            continue
        row_group = int(np.count_nonzero(in_buckets[:task["bucket"]]))  # row groups: the unit's non-empty buckets
        for batch in pq.ParquetFile(unit_file(work, "cells", unit)).iter_batches(row_groups=[row_group]):
            if not whole:
                cell = batch.column("cell")
                batch = batch.filter(pc.and_(pc.greater_equal(cell, lo), pc.less(cell, hi)))
            if task["blocks"] is None:
                yield batch
                continue
            for start in wanted:  # the parts of this batch inside either block
                begin, end = max(start, position), min(start + cell_rows, position + len(batch))
                if begin < end:
                    yield batch.slice(begin - position, end - begin)
            position += len(batch)


def cell_stage(work: str, units: int, task: dict, threshold: float, cell_rows: int,
               check_fence: Callable[[], None] | None = None) -> int:
    """Exact cosine among one task's rows: pairs of ordinals (a < b) with similarity >=
    ``threshold`` where at least one of the two is at home in the cell (a pair of two
    visitors is compared in a home cell of one of them), to ``pairs/task-T.parquet``.
    Returns how many pairs (a pair compared in two cells is in both files)."""
    batches = list(_task_rows(work, units, task, cell_rows))
    found = []
    if batches and task["blocks"] is None:
        # unit by unit, each sorted by cell: sorted again, so that each cell's rows are together
        table = pa.Table.from_batches(batches).sort_by([("cell", "ascending"), ("ordinal", "ascending")])
        cells = table.column("cell").to_numpy()
        bounds = np.flatnonzero(np.diff(cells)) + 1
        for start, end in zip([0, *bounds.tolist()], [*bounds.tolist(), len(cells)]):
            found.append(_pairs(table.slice(start, end - start), None, threshold))
    elif batches:
        table, (i, j) = pa.Table.from_batches(batches), task["blocks"]
        # _task_rows yields block i's rows before block j's where i < j; i == j: one block
        first = table.slice(0, min(cell_rows, len(table)))
        if i == j:
            found.append(_pairs(first, None, threshold))
        else:
            second = table.slice(len(first))
            found.append(_pairs(first, second, threshold))
            found.append(_pairs(second.filter(pc.invert(second.column("home"))), first, threshold))
    pairs = pa.concat_tables(found) if found else _PAIRS_SCHEMA.empty_table()
    write_parquet(pairs_file(work, task["task"]), pairs, check_fence)
    return len(pairs)


_PAIRS_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("similarity", pa.float32())])


def _vectors(rows: pa.Table) -> np.ndarray:
    """The spilled vectors (float16 bytes, a fixed-size binary value per row) as float32."""
    column = rows.column("vector").combine_chunks()
    width = _width(rows)
    half = np.frombuffer(column.buffers()[1], dtype=np.float16)[column.offset * width:(column.offset + len(column)) * width]
    return half.reshape(len(column), width).astype(np.float32)


def _width(rows: pa.Table) -> int:
    return rows.schema.field("vector").type.byte_width // 2


def _pairs(queries: pa.Table, others: pa.Table | None, threshold: float) -> pa.Table:
    """Pairs >= threshold of a row of ``queries`` and a row at home in ``others`` (None:
    in ``queries``, each pair once). A pair of two visitors is compared in a home cell of
    one of them, so only home rows are searched: a cell costs its rows times its homes."""
    import faiss

    base = queries if others is None else others
    at_home = base.column("home").to_numpy(zero_copy_only=False)
    if len(queries) == 0 or not at_home.any():
        return _PAIRS_SCHEMA.empty_table()
    homes = np.flatnonzero(at_home)
    index = faiss.IndexFlatIP(_width(base))
    index.add(_vectors(base.take(homes)))
    limits, similarity, matched = index.range_search(_vectors(queries), threshold)
    query = np.repeat(np.arange(len(queries)), np.diff(limits).astype(np.int64))
    matched = homes[matched]
    if others is None:  # two homes: once (query first); a visitor and a home: always
        keep = ~queries.column("home").to_numpy(zero_copy_only=False)[query] | (query < matched)
        keep &= query != matched
    else:
        keep = np.ones(len(query), dtype=bool)
    a = queries.column("ordinal").to_numpy()[query[keep]]
    b = base.column("ordinal").to_numpy()[matched[keep]]
    return pa.table({"a": np.minimum(a, b), "b": np.maximum(a, b),
                     "similarity": np.minimum(similarity[keep], 1.0).astype(np.float32)}, schema=_PAIRS_SCHEMA)
