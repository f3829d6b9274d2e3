"""DEST, the results folder (local disk or object storage): its layout, its files, and
reading what a job committed there, so that readers never see half-written output.

Layout of DEST::

    part-<shard>.g<generation>.<ext>
                         one shard's result rows (parquet, csv or jsonl), written by the
                         job whose lease had that generation (:mod:`visionbatch.writer`)
    _manifest.json       the job (its options), its lease generation, and every committed
                         shard: its part file, row count, digest of its paths and its counts
                         (:mod:`visionbatch.manifest`)
    _SUCCESS             written last, when every shard is committed (with the generation)
    _lease.json          which job holds DEST (one at a time), or held it last (released)
                         (:mod:`visionbatch.lease`)
    _summary.json        the job's summary
    _metrics.json        its metrics (evaluate)
    _derived/            tables derived from the results: label_issues.parquet, rows
                         whose given label looks wrong (label_issues); duplicates/, the
                         duplicates command's OUT (duplicates.parquet: the groups)
    .huggingface.yaml    which files are which, for Hugging Face datasets and the Hub:
                         the result parts (the default config), each derived table
                         (Parquet DESTs)

Every name but the part files starts with "_" (temporary names with "."), the names
Parquet readers skip: DEST reads as a plain dataset (pandas.read_parquet(DEST),
pyarrow.dataset.dataset(DEST), DuckDB and polars on DEST/part-*.parquet). Derived
tables sit one folder down, where a glob over DEST's top level does not reach them.

A file appears whole or not at all (:meth:`Destination.write_bytes`: a hidden temporary
name, then renamed locally; uploaded whole to an object store, which shows an object only
once its upload completes). A :class:`Destination` with a fence (:class:`visionbatch.lease.Fence`)
checks the lease before each file appears and each delete; readers trust only the shards
a finished job's manifest lists, and refuse DEST while a newer job's live lease says it is
being replaced.

This module imports none of writer, manifest and lease: they build on it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import time
import uuid
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from visionbatch.errors import DestinationError
from visionbatch.results import EMBEDDING, LABEL_COLUMNS, RESULT_SCHEMA, SHA256, conform, result_schema
from visionbatch.storage import Storage, describe, is_remote

EXTENSIONS = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
SUMMARY = "_summary.json"
METRICS_FILE = "_metrics.json"  # evaluate's metrics
DERIVED = "_derived"
LABEL_ISSUES = f"{DERIVED}/label_issues.parquet"
READ_TRIES = 4  # reads of DEST's own small files on object storage (Destination.read_bytes)
# visionbatch duplicates' OUT for a DEST (its manifest, summary and groups), and the groups'
# table in any OUT; label-issues reads a DEST's
DUPLICATES_OUT, DUPLICATES_TABLE = f"{DERIVED}/duplicates", "duplicates.parquet"
DUPLICATES = f"{DUPLICATES_OUT}/{DUPLICATES_TABLE}"
DERIVED_TABLES = {"label_issues": LABEL_ISSUES, "duplicates": DUPLICATES}  # a Hugging Face config each, where present
# A dataset card's YAML on its own (datasets >= 2.17 and the Hub read it as README.md's):
# a README.md in DEST would be read as a part by pandas.read_parquet(DEST) and pyarrow's
# dataset discovery, which skip only names starting with "_" or ".".
HUB_CONFIG = ".huggingface.yaml"
LABEL_ISSUES_BEFORE = "_label_issues.parquet"  # where label-issues wrote it before DERIVED: still read
EMBEDDINGS_KEY = "embeddings"  # in the manifest's job record: {"width", "normalized"}, or null
LEASE = "_lease.json"  # the lease file (visionbatch.lease)
# A lease not renewed for this long belongs to a dead (or paused) job: the lease's holder
# and DEST's readers judge a writer by it. Tests shorten it through the environment, so
# that a takeover needs seconds, not minutes.
LEASE_STALE_S = float(os.environ.get("VISIONBATCH_LEASE_STALE_S", "60"))
_OWN_FILES = (MANIFEST, SUCCESS, SUMMARY, METRICS_FILE, LABEL_ISSUES_BEFORE, HUB_CONFIG)
_LIST_COLUMNS = ("top_k_labels", "top_k_scores", EMBEDDING)


def part_name(shard: str, fmt: str, generation: int | None = None) -> str:
    """A shard's part file; a fenced job's carries its lease generation."""
    tagged = f"{shard}.g{generation}" if generation is not None else shard
    return f"part-{tagged}{EXTENSIONS[fmt]}"


def part_glob(fmt: str) -> str:
    """The glob that selects DEST's result parts and nothing else."""
    return part_name("*", fmt)


def encode_part(table: pa.Table, fmt: str) -> bytes:
    """A part file's bytes: ``table``'s rows in the format ``fmt``."""
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
    """The result schema of the job a manifest records (plan.job_identity)."""
    embeddings = job.get(EMBEDDINGS_KEY)
    schema = result_schema(embeddings and embeddings["width"])
    # A job recorded before rows carried their file's digest: its parts have no such column.
    return schema if job.get(SHA256) else schema.remove(schema.get_field_index(SHA256))


def _format_of(name: str) -> str:
    for fmt, ext in EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    raise DestinationError(f"unknown result file type: {name}")


# On object storage a lease found missing (or not JSON) is read once more, this much
# later: an overwrite that is not atomic (seen with moto's server under load: no such key,
# or two JSON objects back to back) would otherwise show a job a lease being rewritten as
# one that is gone.
LEASE_REREAD_S = 0.5


def read_lease(fs: pafs.FileSystem, path: str) -> dict | None:
    """The lease file at ``path``, or None where there is none or it is not JSON (see
    LEASE_REREAD_S). Storage errors are retried (the SDK's own retries can run out on a
    flaky store) and then raised."""
    missing_seen = isinstance(fs, pafs.LocalFileSystem)  # a local rename replaces a file at once
    for attempt in range(4):
        try:
            with fs.open_input_stream(path) as stream:
                return json.loads(stream.read())
        except (FileNotFoundError, ValueError):  # ValueError: not JSON (written by something else, or cut)
            missing = True
        except (OSError, pa.ArrowException) as err:
            missing = False
            with contextlib.suppress(OSError, pa.ArrowException):
                missing = fs.get_file_info(path).type == pafs.FileType.NotFound
            if not missing and attempt >= 2:
                raise DestinationError(f"cannot read {path}: {describe(err)}") from None
        if missing:
            if missing_seen:
                return None
            missing_seen = True
            time.sleep(LEASE_REREAD_S)
        else:
            time.sleep(0.5 * (attempt + 1))
    return None


def fresh_lease(lease: dict) -> bool:
    """Whether a lease's holder may still be at work: not released, and renewed within
    LEASE_STALE_S."""
    return not lease.get("released") and time.time() - lease.get("heartbeat", 0) <= LEASE_STALE_S


class Destination:
    """A results folder (local or object storage) and the files in it; with a ``fence``
    (a :class:`visionbatch.lease.Fence`: its ``generation``, and ``check(fs)``, which raises
    Superseded), as the job holding that fence writes it: each write and delete checks the
    lease first."""

    def __init__(self, uri: str, storage: Storage | str | None = None, fence=None):
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
        """A small file of DEST, whole. On object storage a read is tried up to
        READ_TRIES times: the AWS SDK retries a 503 before the body starts, but one met
        while it streams a body ends the read ("INTERNAL_FAILURE ... Failed to flush
        response stream"), and a manifest or lease read is what a whole command hangs on."""
        attempt = 1
        while True:
            try:
                with self.fs.open_input_stream(self._path(name)) as stream:
                    return stream.read()
            except FileNotFoundError:
                raise
            except OSError:
                if not self.remote or attempt == READ_TRIES:
                    raise
            time.sleep(0.1 * 2 ** attempt)
            attempt += 1

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
        writer = read_lease(self.fs, self._path(LEASE))
        if writer and fresh_lease(writer) and writer.get("generation", 0) > (committed or 0):
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


class CommandOutput(Destination):
    """OUT of a command other than classify (``export``, ``duplicates``): unlike DEST it holds
    folders and files of any name, each written whole before the task that wrote it commits."""

    command: str  # the command's name, a key its job record holds
    first_file: str  # what it writes to OUT before its first commit (and so before its manifest)

    def entries(self) -> list[pafs.FileInfo]:
        """What OUT holds but its lease and the temporary files of writes under way."""
        return [info for info in self.listing() if info.base_name != LEASE and not info.base_name.startswith(".")]

    def has_results(self) -> bool:
        return bool(self.entries())

    def check_own(self) -> None:
        """Refuse an OUT that holds files this command did not write (a user's folder, a
        classify job's DEST): no flag mixes its output into them or deletes them. Its own
        OUT has its manifest, or (stopped before its first commit) its first file, before
        any other file."""
        entries = self.entries()
        names = {info.base_name for info in entries}
        if not entries or (self.manifest() or {}).get("job", {}).get(self.command) or (
                MANIFEST not in names and self.first_file in names):
            return
        shown = sorted(info.base_name + ("/" if info.type == pafs.FileType.Directory else "") for info in entries)
        raise DestinationError(f"{self.uri} holds files that no {self.command} wrote ({', '.join(shown[:5])}"
                               f"{f' and {len(shown) - 5} more' if len(shown) > 5 else ''}): {self.command} into an "
                               f"empty or new OUT (--overwrite replaces, and --resume continues, only what "
                               f"{self.command} wrote)")

    def clear(self) -> None:
        """Remove an earlier run's output (:meth:`check_own` refused anything else)."""
        self.check_fence()
        for info in self.entries():
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(info.path)
            else:
                self.fs.delete_file(info.path)

    def damaged_parts(self, shards: dict[str, dict], schema: pa.Schema) -> dict[str, str]:
        return {}  # a task's files are all written, whole, before it commits

    def folder(self, name: str) -> Destination:
        return Destination(f"{self.uri}/{name}", self.storage, self.fence)

