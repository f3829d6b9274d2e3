"""The write stage: a shard's result rows to its part file in DEST, and the commit
record the driver takes (:mod:`visionbatch.manifest` commits it).

Workers write part files (:class:`ShardWriter`, in the driver's process on the local
engine, a Ray actor on Ray): under a hidden temporary name, then renamed (locally) or
uploaded whole (an object store shows an object only once its upload completes). A part's
name comes from its shard and the job's lease generation, so a retried or repeated shard
rewrites the same file: exactly once by construction. A fenced writer's writes check the
lease first (:class:`visionbatch.lease.Fence`); a stale job's late part, written between
that check and the rename, has its own generation in its name, so it never replaces a
part a newer job committed, and it is listed by no manifest.
"""

from __future__ import annotations

import json
from typing import Required, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visionbatch.destination import Destination, encode_part, part_name
from visionbatch.errors import DestinationError, Superseded
from visionbatch.lease import Fence
from visionbatch.results import (MODEL_TRACEBACK, RESULT_SCHEMA, ROW_COLUMN, SHARD_COLUMN, SHARD_DIGEST_COLUMN,
                                 SHARD_ROWS_COLUMN, conform)
from visionbatch.shards import paths_digest
from visionbatch.storage import Storage
from visionbatch.summary import shard_counts


class CommitRecord(TypedDict, total=False):
    """What a finished unit of a committed run tells the driver (``driver.Run.commit``),
    kept in the manifest under its ``shard`` (classify's shards; export's shards and
    duplicates' tasks too, with counts of their own)."""

    shard: Required[str]  # the key: a shard's id, an export shard's number, a duplicates task
    file: Required[str]  # what it wrote (a part file: once the run completes, others are strays)
    rows: Required[int]  # rows it finished (the stop message counts them)
    counts: Required[dict]  # its counts (a classify shard's "metrics" are summed by the manifest)
    digest: str  # classify: its listing's digest, checked on --resume
    missing_example: str | None  # export: a row whose image could not be read
    model_traceback: str  # classify (results.MODEL_TRACEBACK): the model's failure, for the driver's log only


def write_shard(destination: Destination, shard: str, table: pa.Table, fmt: str, labelled: bool = True,
                schema: pa.Schema = RESULT_SCHEMA, extra: tuple[str, ...] = ()) -> CommitRecord:
    """Write one whole shard's rows (in shard order) as its part file, with the job's
    ``extra`` columns that the rows have; returns its commit record. The digest is the
    shard's own where its rows carry it (a tar's rows are not its listing), else that
    of the rows' paths."""
    table = table.sort_by(ROW_COLUMN) if ROW_COLUMN in table.column_names else table
    rows = conform(table, schema, extra)
    name = part_name(shard, fmt, destination.generation)
    destination.write_bytes(name, encode_part(rows, fmt))
    digest = (table.column(SHARD_DIGEST_COLUMN)[0].as_py() if SHARD_DIGEST_COLUMN in table.column_names
              else paths_digest(rows.column("path").to_pylist()))
    record: CommitRecord = {"shard": shard, "file": name, "rows": rows.num_rows, "digest": digest,
                            "counts": shard_counts(table, labelled)}
    if MODEL_TRACEBACK in table.column_names:  # for the driver's log, not the manifest
        record[MODEL_TRACEBACK] = pc.drop_null(table.column(MODEL_TRACEBACK))[0].as_py()
    return record


class ShardWriter:
    """The write stage (one Ray actor): gathers each shard's rows, which arrive in
    several blocks, and writes the shard's part file once it is whole.

    Returns one small record per block: the shard, how many new rows it brought and,
    when the shard became whole, the commit record (JSON) for the driver. A row that
    arrives twice (a retried task) is kept once. A shard is whole once its size is
    known (a tar's comes with its last rows) and every row up to it has arrived.
    """

    def __init__(self, dest: str, storage: Storage, fmt: str, labelled: bool = True, schema: pa.Schema = RESULT_SCHEMA,
                 extra: tuple[str, ...] = (), fence: "Fence | None" = None):
        self.destination = Destination(dest, storage, fence)
        self.fmt, self.labelled, self.schema, self.extra = fmt, labelled, schema, extra
        self.pending: dict[str, list[pa.Table]] = {}
        self.seen: dict[str, np.ndarray] = {}
        self.sizes: dict[str, int] = {}

    def arguments(self) -> tuple:
        """The arguments that make this writer again (in another process)."""
        return (self.destination.uri, self.destination.storage, self.fmt, self.labelled, self.schema, self.extra,
                self.destination.fence)

    def discard(self, shards: list[str]) -> None:
        """Forget the rows gathered of these shards (their task died; they are done again)."""
        for shard in shards:
            self.pending.pop(shard, None)
            self.seen.pop(shard, None)
            self.sizes.pop(shard, None)

    def unseen(self, shard: str, size: int) -> list[int]:
        """The rows of ``shard`` (``size`` of them) that have not arrived."""
        seen = self.seen.get(shard, np.zeros(0, dtype=bool))
        return [row for row in range(size) if row >= len(seen) or not seen[row]]

    def __call__(self, table: pa.Table) -> pa.Table:
        shards, rows_in, commits = [], [], []
        shard_column = table.column(SHARD_COLUMN)
        for shard in pc.unique(shard_column).to_pylist():
            part = table.filter(pc.equal(shard_column, shard))
            rows = part.column(ROW_COLUMN).to_numpy()
            size = pc.max(part.column(SHARD_ROWS_COLUMN)).as_py()
            if size >= 0:
                self.sizes[shard] = size
            seen = self.seen.get(shard, np.zeros(0, dtype=bool))
            if rows.max() >= len(seen):
                seen = np.concatenate([seen, np.zeros(rows.max() + 1 - len(seen), dtype=bool)])
            self.seen[shard] = seen
            fresh = ~seen[rows]
            if not fresh.all():
                part, rows = part.filter(pa.array(fresh)), rows[fresh]
            seen[rows] = True
            self.pending.setdefault(shard, []).append(part)
            record = None
            if self.sizes.get(shard) == len(seen) and seen.all():
                del self.seen[shard], self.sizes[shard]
                whole = pa.concat_tables(self.pending.pop(shard), promote_options="default")
                try:
                    record = json.dumps(write_shard(self.destination, shard, whole, self.fmt, self.labelled,
                                                    self.schema, self.extra))
                except DestinationError as err:  # the driver stops the job, keeping what it committed
                    record = json.dumps({"shard": shard, "write_error": str(err),
                                         "superseded": isinstance(err, Superseded)})
            shards.append(shard)
            rows_in.append(len(rows))
            commits.append(record)
        return pa.table({"shard": pa.array(shards, pa.string()), "rows_in": pa.array(rows_in, pa.int64()),
                         "commit": pa.array(commits, pa.string())})
