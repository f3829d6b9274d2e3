"""Sinks: result rows to local disk or object storage, one part file per shard,
committed so that readers never see half-written output.

Layout of DEST::

    part-<shard>.g<generation>.<ext>
                         one shard's result rows (parquet, csv or jsonl), written by the
                         job whose lease had that generation
    _manifest.json       the job (its options), its lease generation, and every committed
                         shard: its part file, row count, digest of its paths and its counts
    _SUCCESS             written last, when every shard is committed (with the generation)
    _lease.json          which job holds DEST (one at a time), or held it last (released)
    _summary.json        the job's summary
    _metrics.json        its metrics (evaluate)
    _derived/            tables derived from the results: label_issues.parquet, rows
                         whose given label looks wrong (label_issues)
    .huggingface.yaml    which files are which, for Hugging Face datasets and the Hub:
                         the result parts (the default config), each derived table
                         (Parquet DESTs)

Every name but the part files starts with "_" (temporary names with "."), the names
Parquet readers skip: DEST reads as a plain dataset (pandas.read_parquet(DEST),
pyarrow.dataset.dataset(DEST), DuckDB and polars on DEST/part-*.parquet). Derived
tables sit one folder down, where a glob over DEST's top level does not reach them.

Workers write part files (:class:`ShardWriter`): under a hidden temporary name, then
renamed (locally) or uploaded whole (an object store shows an object only once its
upload completes). A part's name comes from its shard and the job's lease generation, so
a retried or repeated shard rewrites the same file: exactly once by construction. The
driver commits: it records finished shards in the manifest (:class:`Manifest`) at least
every ``flush_seconds`` and at the end; readers and ``--resume`` trust only the shards
it lists.

Fencing: a job's writes carry its lease's generation (:class:`Fence`), a number that
grows with every job that takes DEST. Before a file of a job appears in DEST (and before
it deletes any), the job reads the lease and stops (:class:`Superseded`) where a newer
generation holds it; a stale job's late part, written between that check and the
rename, has its own generation in its name, so it never replaces a part a newer job
committed, and it is listed by no manifest.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from visionbatch.counts import merge_counts
from visionbatch.counts import metric_counts as metric_counts_of
from visionbatch.results import (EMBEDDING, LABEL_COLUMNS, MODEL_TRACEBACK, RESULT_SCHEMA, ROW_COLUMN, SHARD_COLUMN,
                                 SHARD_DIGEST_COLUMN, SHARD_ROWS_COLUMN, conform, result_schema)
from visionbatch.shards import paths_digest
from visionbatch.storage import Storage, describe, is_remote
from visionbatch.summary import shard_counts

EXTENSIONS = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
SUMMARY = "_summary.json"
METRICS_FILE = "_metrics.json"  # evaluate's metrics
DERIVED = "_derived"
LABEL_ISSUES = f"{DERIVED}/label_issues.parquet"
DUPLICATES = f"{DERIVED}/duplicates.parquet"  # visionbatch duplicates' groups; label-issues reads them
DERIVED_TABLES = {"label_issues": LABEL_ISSUES}  # a Hugging Face config each, where present
# A dataset card's YAML on its own (datasets >= 2.17 and the Hub read it as README.md's):
# a README.md in DEST would be read as a part by pandas.read_parquet(DEST) and pyarrow's
# dataset discovery, which skip only names starting with "_" or ".".
HUB_CONFIG = ".huggingface.yaml"
LABEL_ISSUES_BEFORE = "_label_issues.parquet"  # where label-issues wrote it before DERIVED: still read
# 3: rows carry true_label_score; --resume across versions is refused, so no DEST mixes
# part files with and without it.
MANIFEST_VERSION = 3
EMBEDDINGS_KEY = "embeddings"  # in the manifest's job record: {"width", "normalized"}, or null
_OWN_FILES = (MANIFEST, SUCCESS, SUMMARY, METRICS_FILE, LABEL_ISSUES_BEFORE, HUB_CONFIG)
_LIST_COLUMNS = ("top_k_labels", "top_k_scores", EMBEDDING)
log = logging.getLogger("visionbatch")


class DestinationError(Exception):
    """DEST cannot be used as asked (holds results, unreachable, nothing to read)."""


class Superseded(DestinationError):
    """A newer job took DEST over from this one (its lease went stale): it writes nothing more."""


def part_name(shard: str, fmt: str, generation: int | None = None) -> str:
    """A shard's part file; a fenced job's carries its lease generation."""
    tagged = f"{shard}.g{generation}" if generation is not None else shard
    return f"part-{tagged}{EXTENSIONS[fmt]}"


def part_glob(fmt: str) -> str:
    """The glob that selects DEST's result parts and nothing else."""
    return part_name("*", fmt)


def _encode(table: pa.Table, fmt: str) -> bytes:
    sink = io.BytesIO()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, sink, compression="zstd")
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        # CSV has no lists: top-k columns (and embeddings) are written as JSON arrays.
        for name in (name for name in _LIST_COLUMNS if name in table.column_names):
            encoded = pa.array([None if v is None else json.dumps(v) for v in table.column(name).to_pylist()], pa.string())
            table = table.set_column(table.schema.get_field_index(name), name, encoded)
        pacsv.write_csv(table, sink)
    elif fmt == "jsonl":
        for row in table.to_pylist():
            sink.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return sink.getvalue()


def _selected(schema: pa.Schema, columns: tuple[str, ...]) -> pa.Schema:
    """The ``columns`` of ``schema``, class names dictionary-encoded (LABEL_COLUMNS)."""
    names = pa.dictionary(pa.int32(), pa.string())
    fields = [schema.field(name) for name in columns]
    return pa.schema([field.with_type(pa.list_(names) if pa.types.is_list(field.type) else names)
                      if field.name in LABEL_COLUMNS else field for field in fields])


def _require(names: list[str], wanted: list[str] | tuple[str, ...]) -> None:
    """A ValueError unless a part file has every column a reader wants (a file of another
    schema, put in a part's place, is damage)."""
    missing = [name for name in wanted if name not in names]
    if missing:
        raise ValueError(f"not this job's results: no column {', '.join(missing)}")


def _decode(data: bytes, fmt: str, schema: pa.Schema, columns: tuple[str, ...] | None = None) -> pa.Table:
    """A part file's rows in ``schema``, then the job's own columns; ``columns``: only
    these result columns (from Parquet, only they are read), class names dictionary-encoded.
    A part that lacks one of them is a ValueError."""
    wanted = columns or schema.names
    if fmt == "parquet":
        import pyarrow.parquet as pq

        _require(pq.read_schema(io.BytesIO(data)).names, wanted)
        encoded = [f"{name}.list.element" if pa.types.is_list(schema.field(name).type) else name
                   for name in LABEL_COLUMNS if name in (columns or ())]
        table = pq.ParquetFile(io.BytesIO(data), read_dictionary=encoded).read(columns=columns and list(columns))
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        types = {f.name: (pa.string() if f.name in _LIST_COLUMNS else f.type) for f in schema}
        table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True))
        _require(table.column_names, wanted)
        for name in (name for name in _LIST_COLUMNS if name in schema.names):
            decoded = [None if v is None else json.loads(v) for v in table.column(name).to_pylist()]
            table = table.set_column(table.schema.get_field_index(name), name,
                                     pa.array(decoded, schema.field(name).type))
    else:
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        if rows:
            _require(set().union(*rows), wanted)
        extra = list(dict.fromkeys(name for row in rows for name in row if name not in schema.names))
        with_extra = pa.schema([*schema, *(pa.field(name, pa.string()) for name in extra)]) if extra else schema
        table = pa.Table.from_pylist(rows, schema=with_extra)
    if columns is not None:
        return conform(table, _selected(schema, columns), extra=())
    return conform(table, schema, extra=None)


def job_schema(job: dict) -> pa.Schema:
    """The result schema of the job a manifest records (pipeline.job_identity)."""
    embeddings = job.get(EMBEDDINGS_KEY)
    return result_schema(embeddings and embeddings["width"])


def _format_of(name: str) -> str:
    for fmt, ext in EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    raise DestinationError(f"unknown result file type: {name}")


class Destination:
    """A results folder (local or object storage) and the files in it; with a ``fence``,
    as the job holding that fence writes it: each write and delete checks the lease first."""

    def __init__(self, uri: str, storage: Storage | str | None = None, fence: "Fence | None" = None):
        storage = storage if isinstance(storage, Storage) else Storage(storage)
        self.uri = uri.rstrip("/")
        self.storage = storage
        self.fs, self.root = storage.resolve(self.uri)
        self.remote = is_remote(uri)
        self.fence = fence

    @property
    def generation(self) -> int | None:
        """The lease generation this job's writes carry (None: unfenced)."""
        return self.fence and self.fence.generation

    def check_fence(self) -> None:
        """Superseded where a newer job holds the lease of this fence."""
        if self.fence is not None:
            self.fence.check(self.fs)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def listing(self) -> list[pafs.FileInfo]:
        """Everything in the folder, files and folders (nothing where it does not exist yet)."""
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        try:
            try:
                return self.fs.get_file_info(selector)
            except FileNotFoundError:
                # pyarrow's local listing reads the folder, then (the read failed) asks
                # whether it exists: one that another job created in between is reported
                # missing instead of listed. Listed again, it is there.
                return self.fs.get_file_info(selector)
        except (OSError, pa.ArrowException) as err:
            raise DestinationError(f"cannot list {self.uri}: {describe(err)}") from err

    def files(self) -> list[str]:
        return sorted(info.base_name for info in self.listing() if info.type == pafs.FileType.File)

    def part_files(self) -> list[str]:
        return [name for name in self.files() if name.startswith("part-")]

    def has_results(self) -> bool:
        return any(name.startswith("part-") or name in (MANIFEST, SUCCESS) for name in self.files())

    def exists(self, name: str) -> bool:
        """Whether the file ``name`` (a path below DEST) is there."""
        return self.fs.get_file_info(self._path(name)).type == pafs.FileType.File

    def label_issues_file(self) -> str | None:
        """The name of DEST's label issues table (at DEST's top where an older label-issues
        wrote it); None where label-issues has not run."""
        return next((name for name in (LABEL_ISSUES, LABEL_ISSUES_BEFORE) if self.exists(name)), None)

    def open_file(self, name: str):
        """A file in DEST for random access (a Parquet file's footer, then some of it)."""
        return self.fs.open_input_file(self._path(name))

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._path(name)) as stream:
            return stream.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a file so that it appears whole or not at all; a failure (a full disk, a
        read-only mount, no permission) is a DestinationError naming the file."""
        self._store(name, lambda out: out.write(data))

    def write_file(self, name: str, local_path: str) -> None:
        """Copy a local file in, as :meth:`write_bytes` writes (streamed: it may be large)."""
        def copy(out) -> None:
            with open(local_path, "rb") as source:
                while chunk := source.read(1 << 20):
                    out.write(chunk)

        self._store(name, copy)

    def copy_file(self, name: str, local_path: str) -> None:
        """Copy a file out to local disk, streamed (the reverse of :meth:`write_file`)."""
        with self.fs.open_input_stream(self._path(name)) as source, open(local_path, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)

    def _store(self, name: str, fill) -> None:
        try:
            self._write(name, fill)
        except (OSError, pa.ArrowException) as err:
            raise DestinationError(f"cannot write {self.uri}/{name}: {describe(err)}") from None

    def _write(self, name: str, fill) -> None:
        """``fill(stream)`` writes the file's contents."""
        if self.remote:  # an object is visible only once its upload completes: fenced before it starts
            self.check_fence()
            with self.fs.open_output_stream(self._path(name)) as out:
                fill(out)
            return
        folder, base = posixpath.split(name)
        self.fs.create_dir(self._path(folder).rstrip("/"), recursive=True)
        tmp = self._path(posixpath.join(folder, f".{base}.{uuid.uuid4().hex[:8]}.tmp"))  # hidden: readers skip it
        try:
            with self.fs.open_output_stream(tmp) as out:
                fill(out)
            self.check_fence()  # the last moment before the file appears
            self.fs.move(tmp, self._path(name))
        except BaseException:
            with contextlib.suppress(OSError, pa.ArrowException):
                self.fs.delete_file(tmp)
            raise

    def check_writable(self) -> None:
        """Fail before any work where results could not be written (read-only, full,
        no permission, no such bucket)."""
        probe = f".visionbatch-probe-{uuid.uuid4().hex[:8]}"
        try:
            self._write(probe, lambda out: out.write(b"probe"))
            self.delete([probe])
        except (OSError, pa.ArrowException) as err:
            raise DestinationError(f"cannot write results to {self.uri}: {describe(err)}") from None

    def delete(self, names) -> None:
        self.check_fence()
        for name in names:
            self.fs.delete_file(self._path(name))

    def remove_strays(self, keep: set[str]) -> None:
        """Delete part files no committed shard owns and temporary files of cut-short
        writes (what killed runs leave behind)."""
        self.delete(name for name in self.files()
                    if (name.startswith("part-") and name not in keep) or (name.startswith(".") and name.endswith(".tmp")))

    def clear(self) -> None:
        """Remove visionbatch's own files (results, manifest, summary, metrics, derived tables)."""
        self.delete(name for name in self.files() if name.startswith("part-") or name in _OWN_FILES
                    or (name.startswith(".") and name.endswith(".tmp")))
        if self.fs.get_file_info(self._path(DERIVED)).type == pafs.FileType.Directory:
            self.fs.delete_dir(self._path(DERIVED))

    def write_hub_config(self, fmt: str) -> None:
        """Write HUB_CONFIG: ``datasets.load_dataset(DEST)`` gives the result rows (the
        default config) and each derived table present (a config named after it). Only
        for Parquet parts: datasets guesses CSV and JSON columns' types file by file (a
        column null throughout one part fails), and reads every config with the builder
        of the first one's files."""
        if fmt != "parquet":
            return
        configs = [{"config_name": "default", "default": True, "data_files": part_glob(fmt)}]
        configs += [{"config_name": name, "data_files": path} for name, path in DERIVED_TABLES.items()
                    if self.exists(path)]
        body = json.dumps({"configs": configs}, indent=2)  # JSON is YAML
        self.write_bytes(HUB_CONFIG, f"# visionbatch: which files are which (Hugging Face datasets)\n{body}\n".encode())

    def read_parts(self, names: list[str], schema: pa.Schema = RESULT_SCHEMA) -> pa.Table:
        tables = [_decode(self.read_bytes(name), _format_of(name), schema) for name in names]
        return pa.concat_tables(tables, promote_options="permissive") if tables else schema.empty_table()

    def manifest(self) -> dict | None:
        if MANIFEST not in self.files():
            return None
        try:
            return json.loads(self.read_bytes(MANIFEST))
        except ValueError as err:
            raise DestinationError(f"{self.uri}/{MANIFEST} is damaged ({describe(err)})") from None

    def read_part(self, name: str, rows: int, schema: pa.Schema = RESULT_SCHEMA,
                  columns: tuple[str, ...] | None = None) -> pa.Table:
        """One committed part file, checked against the row count the manifest gives it
        (``columns``: only these result columns, class names dictionary-encoded)."""
        try:
            table = _decode(self.read_bytes(name), _format_of(name), schema, columns)
        except (OSError, ValueError, pa.ArrowException) as err:  # missing, cut short, not the format or schema
            raise self._damaged(name, f"is missing or damaged ({describe(err)})") from None
        if table.num_rows != rows:
            raise self._damaged(name, f"holds {table.num_rows} rows where the manifest says {rows}")
        return table

    def _damaged(self, name: str, why: str) -> DestinationError:
        return DestinationError(f"{self.uri}/{name} {why}; rerun the classify command with --resume to redo it")

    def check_part(self, name: str, rows: int, schema: pa.Schema) -> None:
        """Raise DestinationError unless the part file is whole, holds ``rows`` rows and
        the columns of ``schema`` (Parquet: from its footer alone)."""
        if _format_of(name) != "parquet":
            self.read_part(name, rows, schema)
            return
        import pyarrow.parquet as pq

        try:
            with self.fs.open_input_file(self._path(name)) as file:
                metadata = pq.ParquetFile(file).metadata
            _require(metadata.schema.to_arrow_schema().names, schema.names)
        except (OSError, ValueError, pa.ArrowException) as err:
            raise self._damaged(name, f"is missing or damaged ({describe(err)})") from None
        if metadata.num_rows != rows:
            raise self._damaged(name, f"holds {metadata.num_rows} rows where the manifest says {rows}")

    def damaged_parts(self, shards: dict[str, dict], schema: pa.Schema) -> dict[str, str]:
        """Committed shards whose part file is missing, damaged or of another schema than
        ``schema``: shard -> why (checked in parallel: on object storage each check is a request)."""
        from concurrent.futures import ThreadPoolExecutor

        def check(item) -> tuple[str, str | None]:
            shard, record = item
            try:
                self.check_part(record["file"], record["rows"], schema)
            except DestinationError as err:
                return shard, str(err)
            return shard, None

        with ThreadPoolExecutor(16) as pool:
            return {shard: why for shard, why in pool.map(check, shards.items()) if why}

    def finished_manifest(self) -> dict:
        """The manifest of a finished job (DestinationError if the job did not finish)."""
        manifest = self.manifest()
        if manifest is None and SUCCESS in self.files():
            raise self._damaged(MANIFEST, f"is missing (though {SUCCESS} is there): which results were committed "
                                "is unknown")
        if manifest is None or SUCCESS not in self.files():
            raise DestinationError(
                f"no completed results in {self.uri} (no {SUCCESS}); an interrupted job resumes with --resume")
        # A manifest older than _SUCCESS is a stale job's commit landing after the newer job
        # finished (one newer is a --resume at work on a finished DEST).
        finished, committed = json.loads(self.read_bytes(SUCCESS)).get("generation"), manifest.get("generation")
        # A live lease newer than the results: a job (an --overwrite, a --resume) is
        # replacing them; a reader started now could meet its deletes and partial parts.
        writer = _read_lease(self.fs, self._path(LEASE))
        if writer and not writer.get("released") and time.time() - writer.get("heartbeat", 0) <= LEASE_STALE_S \
                and writer.get("generation", 0) > (committed or 0):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(writer.get("started", 0)))
            raise DestinationError(f"{self.uri} is being written by another job (pid {writer.get('pid')} on "
                                   f"{writer.get('host')}, lease generation {writer.get('generation')}, since {when}): "
                                   "run this command again once that job has finished")
        if (committed or 0) < (finished or 0):
            raise DestinationError(f"{self.uri}/{MANIFEST} was written by a stale job (lease generation {committed}) "
                                   f"after the job of generation {finished} finished: its results cannot be "
                                   "trusted; run the job again with --overwrite")
        return manifest

    def committed_parts(self) -> tuple[dict, list[dict]]:
        """A finished job's manifest and its committed shards' records, in shard order."""
        manifest = self.finished_manifest()
        return manifest, sorted(manifest["shards"].values(), key=lambda shard: shard["file"])

    def committed_rows(self, columns: tuple[str, ...] | None = None) -> Iterator[pa.Table]:
        """A finished job's committed parts' rows (``columns``: only these), a part at a
        time, in shard order, each checked as it is read."""
        manifest, shards = self.committed_parts()
        schema = job_schema(manifest["job"])
        for shard in shards:
            yield self.read_part(shard["file"], shard["rows"], schema, columns)

    def committed_metric_counts(self, verify: bool = True) -> dict:
        """The metric counts of a finished job, as its manifest added them up."""
        manifest = self.finished_manifest()
        if verify:
            damaged = self.damaged_parts(manifest["shards"], job_schema(manifest["job"]))
            if damaged:
                raise DestinationError(next(iter(damaged.values())))
        return manifest["metric_counts"]

    def read_table(self) -> pa.Table:
        """The rows of every committed shard of a finished job."""
        manifest, shards = self.committed_parts()
        schema = job_schema(manifest["job"])
        tables = [self.read_part(shard["file"], shard["rows"], schema) for shard in shards]  # checked as read
        return pa.concat_tables(tables, promote_options="permissive") if tables else schema.empty_table()


def read_results(dest: str, s3_endpoint: str | None = None) -> pa.Table:
    """All committed result rows of DEST as one table: the job's result schema (with
    ``embedding`` where it made them), then its own columns (``key``, kept input columns)."""
    return Destination(dest, Storage(s3_endpoint)).read_table()


def write_shard(destination: Destination, shard: str, table: pa.Table, fmt: str, labelled: bool = True,
                schema: pa.Schema = RESULT_SCHEMA, extra: tuple[str, ...] = ()) -> dict:
    """Write one whole shard's rows (in shard order) as its part file, with the job's
    ``extra`` columns that the rows have; returns its commit record. The digest is the
    shard's own where its rows carry it (a tar's rows are not its listing), else that
    of the rows' paths."""
    table = table.sort_by(ROW_COLUMN) if ROW_COLUMN in table.column_names else table
    rows = conform(table, schema, extra)
    name = part_name(shard, fmt, destination.generation)
    destination.write_bytes(name, _encode(rows, fmt))
    digest = (table.column(SHARD_DIGEST_COLUMN)[0].as_py() if SHARD_DIGEST_COLUMN in table.column_names
              else paths_digest(rows.column("path").to_pylist()))
    record = {"shard": shard, "file": name, "rows": rows.num_rows, "digest": digest,
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


class Manifest:
    """The driver's record of a job in DEST: its options and its committed shards."""

    def __init__(self, destination: Destination, job: dict, shards: dict[str, dict] | None = None,
                 metric_counts: dict | None = None, runtime: dict | None = None):
        self.destination = destination
        self.job = job
        self.runtime = runtime  # what ran the model and its certificate (runtime.ModelPaths.report)
        self.shards: dict[str, dict] = dict(shards or {})
        self.metric_counts = metric_counts or {}  # of the committed shards, added up (see evaluate)
        self.saved_rows = self.rows  # rows the manifest in DEST lists
        self._written_at = time.monotonic()
        self._write_seconds = 0.0

    @classmethod
    def open(cls, destination: Destination, job: dict, *, overwrite: bool, resume: bool) -> "Manifest":
        """The manifest a job starts from: empty, or (``resume``) the committed shards of
        an interrupted run of the same job."""
        if overwrite and resume:
            raise DestinationError("--overwrite and --resume contradict each other: choose one")
        if not destination.has_results():
            return cls(destination, job)
        if overwrite:
            destination.clear()
            return cls(destination, job)
        if not resume:
            raise DestinationError(f"{destination.uri} already holds results: pass --overwrite to replace them "
                                   "or --resume to continue")
        earlier = destination.manifest() or {"job": job, "shards": {}}
        if earlier.get("version", MANIFEST_VERSION) != MANIFEST_VERSION:
            raise DestinationError(f"{destination.uri} was written by another version of visionbatch; "
                                   "write to a new DEST or pass --overwrite")
        if "runtime" in job and "runtime" not in earlier["job"]:  # a job from before --runtime: torch ran it
            earlier["job"]["runtime"] = "torch"
        differing = sorted(key for key in set(job) | set(earlier["job"]) if job.get(key) != earlier["job"].get(key))
        if differing:
            raise DestinationError(
                f"--resume with other options than the job in {destination.uri}: "
                + "; ".join(f"{key}: {earlier['job'].get(key)!r} there, {job.get(key)!r} now" for key in differing))
        shards = dict(earlier["shards"])
        metric_counts = earlier.get("metric_counts")
        damaged = destination.damaged_parts(shards, job_schema(job))
        if damaged:
            log.warning("%d committed part file(s) in %s are missing or damaged; their shards are redone",
                        len(damaged), destination.uri)
            for shard in damaged:
                del shards[shard]
            # Counts cannot be taken back out of the sum: count the whole parts again (rare).
            metric_counts = None
            for record in shards.values():
                part = destination.read_part(record["file"], record["rows"], job_schema(job))
                metric_counts = merge_counts(metric_counts, metric_counts_of(part))
        return cls(destination, job, shards, metric_counts, earlier.get("runtime"))

    @property
    def certified_path(self) -> str | None:
        """The model path an earlier run certified (a resumed job keeps it), None where none was decided."""
        runtime = self.runtime or {}
        certificate = runtime.get("certificate")
        if certificate is None:
            return runtime.get("path")  # no certificate to take (torch only), or itself a resumed choice
        return certificate["chosen"] if certificate["decided"] else None

    @property
    def rows(self) -> int:
        return sum(shard["rows"] for shard in self.shards.values())

    def add(self, record: dict) -> None:
        counts = dict(record["counts"])
        if "metrics" in counts:  # a classify job's shard (an export's has none)
            self.metric_counts = merge_counts(self.metric_counts, counts.pop("metrics"))
        self.shards[record["shard"]] = {**{key: value for key, value in record.items()
                                           if key not in ("shard", MODEL_TRACEBACK)}, "counts": counts}

    def due(self, every_seconds: float) -> bool:
        """Time to commit again: at least every ``every_seconds``, and more often while
        the manifest is cheap to write (at most a tenth of the time goes to writing it)."""
        elapsed = time.monotonic() - self._written_at
        return elapsed >= min(every_seconds, max(1.0, 10 * self._write_seconds))

    def write(self, complete: bool = False) -> None:
        """Commit: the shards listed here are the job's results (``complete``: all of them).
        With no shard to list and the job unfinished, DEST is left without a manifest."""
        if not self.shards and not complete:
            if MANIFEST in self.destination.files():
                self.destination.delete([MANIFEST])
            return
        body = {"version": MANIFEST_VERSION, "complete": complete, "job": self.job, "rows": self.rows,
                "shards": self.shards, "metric_counts": self.metric_counts, "runtime": self.runtime,
                "generation": self.destination.generation}
        started = time.monotonic()
        self.destination.write_bytes(MANIFEST, json.dumps(body, separators=(",", ":")).encode())
        self.saved_rows = self.rows
        self._written_at = time.monotonic()
        self._write_seconds = self._written_at - started
        if complete:
            self.destination.remove_strays({shard["file"] for shard in self.shards.values()})
            self.destination.write_bytes(SUCCESS, json.dumps({"rows": self.rows, "shards": len(self.shards),
                                                              "generation": self.destination.generation}).encode())


LEASE = "_lease.json"
# One not renewed for this long belongs to a dead (or paused) job. Tests shorten it through
# the environment, so that a takeover needs seconds, not minutes.
LEASE_STALE_S = float(os.environ.get("VISIONBATCH_LEASE_STALE_S", "60"))
LEASE_RENEW_S = LEASE_STALE_S / 6  # a live job rewrites its lease this often
LEASE_SETTLE_S = 1.0  # between writing a lease and reading it back (longer than any two writes race)


def _read_lease(fs: pafs.FileSystem, path: str) -> dict | None:
    """The lease file at ``path``, or None where there is none. Storage errors are
    retried (the SDK's own retries can run out on a flaky store) and then raised."""
    for attempt in range(3):
        try:
            with fs.open_input_stream(path) as stream:
                return json.loads(stream.read())
        except FileNotFoundError:
            return None
        except ValueError:  # not JSON: written by something else
            return None
        except (OSError, pa.ArrowException) as err:
            with contextlib.suppress(OSError, pa.ArrowException):
                if fs.get_file_info(path).type == pafs.FileType.NotFound:
                    return None
            if attempt == 2:
                raise DestinationError(f"cannot read {path}: {describe(err)}") from None
            time.sleep(0.5 * (attempt + 1))
    return None


@dataclass(frozen=True)
class Fence:
    """A job's fencing token: its lease's holder id and generation, and where the lease
    is (DEST, and the lease's path on its filesystem). Plain values: it travels to writer
    processes."""

    dest: str
    lease: str
    holder: str
    generation: int

    def newer_holder(self, lease: dict | None) -> dict | None:
        """The lease of the job that took DEST from this one ({} where the lease file is
        gone); None while this job holds it, or where only an older generation wrote over
        it (a stale job's heartbeat: the newer generation wins, and rewrites its lease)."""
        if lease is None:
            return {}
        if lease.get("id") == self.holder or lease.get("generation", 0) < self.generation:
            return None
        return lease

    def check(self, fs: pafs.FileSystem) -> None:
        """Read the lease; Superseded, naming the newer job, where it is no longer this job's."""
        newer = self.newer_holder(_read_lease(fs, self.lease))
        if newer is not None:
            raise superseded(self.dest, newer)


def superseded(where: str, lease: dict) -> Superseded:
    """The error of a job whose DEST (``where``) a newer job (``lease``) took over."""
    if not lease:
        return Superseded(f"{where} is no longer this job's: its lease file is gone (removed by something other "
                          "than visionbatch); this job stopped without writing more")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.get("started", 0)))
    return Superseded(
        f"{where} was taken over by a newer job (holder {lease.get('id')}, pid {lease.get('pid')} on "
        f"{lease.get('host')}, lease generation {lease.get('generation')}, since {when}) while this job's lease "
        f"was stale (not renewed for {LEASE_STALE_S:.0f} s: the process was paused or cut off); this job stopped "
        "without writing more, and DEST holds that job's results")


class Lease:
    """One live job per DEST: a lease file naming its holder (id, host, pid) and its
    generation, renewed by a heartbeat thread; a second job is refused while the lease
    is fresh, and a lease whose holder is dead (stale, released, or its pid gone on this
    host) is taken over with the next generation. A released lease stays in DEST (marked
    released), so that generations only grow and a stale job can name its successor.

    pyarrow's filesystems have no exclusive create (nor S3 conditional writes), so
    taking a lease is write, settle, read back: of two jobs that start together the
    later write wins and the other sees a foreign holder and stops. The settle time
    overlaps the job's start-up (Ray, the model's configs). The generation is the job's
    fencing token (:class:`Fence`): its writes check it, and the heartbeat stops renewing
    once a newer generation holds DEST (:meth:`check` then raises).
    """

    def __init__(self, destination: "Destination"):
        self.destination = destination
        self.holder = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.time()}
        self.lost: dict | None = None  # the newer job's lease, once the heartbeat has seen one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        return _read_lease(self.destination.fs, self.destination._path(LEASE))

    def _write(self, **more) -> None:
        self.destination.write_bytes(LEASE, json.dumps({**self.holder, "heartbeat": time.time(), **more}).encode())

    @property
    def fence(self) -> Fence:
        return Fence(self.destination.uri, self.destination._path(LEASE), self.holder["id"], self.holder["generation"])

    def fenced(self) -> "Destination":
        """DEST as this job writes it: each write and delete checks the lease first."""
        destination = self.destination
        return type(destination)(destination.uri, destination.storage, self.fence)

    def _alive(self, lease: dict) -> bool:
        if lease.get("released") or time.time() - lease.get("heartbeat", 0) > LEASE_STALE_S:
            return False
        if lease.get("host") == self.holder["host"]:
            try:
                os.kill(int(lease["pid"]), 0)
            except ProcessLookupError:
                return False
            except (PermissionError, ValueError, KeyError):
                pass
        return True

    def _refuse(self, lease: dict) -> DestinationError:
        seen = time.time() - lease.get("heartbeat", 0)
        return DestinationError(f"{self.destination.uri} is in use by another job (pid {lease.get('pid')} on "
                                f"{lease.get('host')}, last seen {seen:.0f} s ago): wait for it to end, or "
                                "write to another DEST")

    def claim(self) -> None:
        """Write our lease, one generation past the last, unless a live job holds DEST
        (call :meth:`confirm` later)."""
        current = self._read()
        if current and current["id"] != self.holder["id"] and self._alive(current):
            raise self._refuse(current)
        self.holder["generation"] = (current or {}).get("generation", 0) + 1
        self._write()

    def confirm(self) -> None:
        """After the settle time: still ours? Then keep it fresh until :meth:`release`."""
        time.sleep(max(0.0, self.holder["started"] + LEASE_SETTLE_S - time.time()))
        current = self._read()
        if current is None:  # gone meanwhile (removed by hand): take it again
            self.claim()
            current = self._read()
        if current is None or current["id"] != self.holder["id"]:
            raise self._refuse(current or {})
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="visionbatch-lease")
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            with contextlib.suppress(Exception):  # a missed beat is retried; 6 in a row make it stale
                if not self.renew():
                    return

    def renew(self) -> bool:
        """Rewrite our lease (also over one an older generation wrote), unless a newer job
        holds DEST: then never again (False; :meth:`check` raises from then on)."""
        newer = self.fence.newer_holder(self._read())
        if newer is not None:  # taken over while this job was paused
            self.lost = newer
            return False
        self._write()
        return True

    def check(self) -> None:
        """Superseded once the heartbeat has seen a newer job hold DEST (no I/O: for every
        event the driver takes; the writes check the lease themselves)."""
        if self.lost is not None:
            raise superseded(self.destination.uri, self.lost)

    @classmethod
    def take(cls, destination: "Destination", overwrite: bool, resume: bool) -> "Lease":
        """Before any work: refuse a DEST that holds results unless told what to do with
        them, or that cannot be written; then claim it (:meth:`confirm` later)."""
        if destination.has_results() and not (overwrite or resume):
            raise DestinationError(f"{destination.uri} already holds results: pass --overwrite to replace them "
                                   "or --resume to continue")
        destination.check_writable()
        lease = cls(destination)
        lease.claim()
        return lease

    def release(self) -> None:
        """Mark our lease released (a newer one stays as it is): the next job takes DEST
        at once, with the next generation."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self._read()
        if current is not None and current["id"] == self.holder["id"]:
            with contextlib.suppress(Exception):
                self._write(released=time.time())
