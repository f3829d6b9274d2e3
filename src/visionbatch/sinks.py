"""Sinks: result rows to local disk or object storage, committed so readers never see
half-written output.

Layout of DEST::

    part-<run>-<seq>.<ext>   result files (parquet, csv or jsonl)
    _SUCCESS                 JSON manifest: format, files with row counts, total rows
    summary.json             the job's summary (written by the pipeline)

A part file becomes visible whole or not at all: locally it is written under a
temporary name and renamed; on S3/GCS an object appears only when its upload completes.
``_SUCCESS`` is written last; readers trust only the files it lists. Part files
without a manifest are the committed progress of an interrupted job (``--resume``).
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from visionbatch.sources import is_remote, resolve

RESULT_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("label", pa.string()),
        pa.field("label_id", pa.int64()),
        pa.field("score", pa.float32()),
        pa.field("top_k_labels", pa.list_(pa.string())),
        pa.field("top_k_scores", pa.list_(pa.float32())),
        pa.field("true_label", pa.string()),
        pa.field("correct", pa.bool_()),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
)

EXTENSIONS = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}
MANIFEST = "_SUCCESS"
SUMMARY = "summary.json"
_LIST_COLUMNS = ("top_k_labels", "top_k_scores")
# Destination.write_bytes's temporary names: "<name>.<8 hex>.tmp".
_PARTIAL_WRITE = re.compile(r"^(part-.+|_SUCCESS|summary\.json|metrics\.json)\.[0-9a-f]{8}\.tmp$")


class DestinationError(Exception):
    """DEST cannot be used as asked (holds results, unreachable, nothing to read)."""


def conform(table: pa.Table) -> pa.Table:
    """Select and cast to RESULT_SCHEMA, adding all-null columns that are absent."""
    columns = []
    for field in RESULT_SCHEMA:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=RESULT_SCHEMA)


def _encode(table: pa.Table, fmt: str) -> bytes:
    sink = io.BytesIO()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, sink, compression="zstd")
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        # CSV has no lists: top-k columns are written as JSON arrays.
        for name in _LIST_COLUMNS:
            encoded = pa.array([None if v is None else json.dumps(v) for v in table.column(name).to_pylist()], pa.string())
            table = table.set_column(table.schema.get_field_index(name), name, encoded)
        pacsv.write_csv(table, sink)
    elif fmt == "jsonl":
        for row in table.to_pylist():
            sink.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return sink.getvalue()


def _decode(data: bytes, fmt: str) -> pa.Table:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return conform(pq.read_table(io.BytesIO(data)))
    if fmt == "csv":
        import pyarrow.csv as pacsv

        types = {f.name: (pa.string() if f.name in _LIST_COLUMNS else f.type) for f in RESULT_SCHEMA}
        table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True))
        for name in _LIST_COLUMNS:
            decoded = [None if v is None else json.loads(v) for v in table.column(name).to_pylist()]
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(decoded, RESULT_SCHEMA.field(name).type))
        return conform(table)
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    return conform(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA))


@dataclass
class _Part:
    name: str
    rows: int


class Destination:
    """A results folder (local or object storage) and the files in it."""

    def __init__(self, uri: str, s3_endpoint: str | None = None):
        self.uri = uri.rstrip("/")
        self.fs, self.root = resolve(self.uri, s3_endpoint)
        self.remote = is_remote(uri)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _files(self) -> list[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except (OSError, pa.ArrowException) as err:
            raise DestinationError(f"cannot list {self.uri}: {err}") from err
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)

    def part_files(self) -> list[str]:
        return [name for name in self._files() if name.startswith("part-") and not name.endswith(".tmp")]

    def has_results(self) -> bool:
        files = self._files()
        return MANIFEST in files or any(name.startswith("part-") for name in files)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._path(name)) as stream:
            return stream.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a file so that it appears whole or not at all."""
        if self.remote:  # an object is visible only once its upload completes
            with self.fs.open_output_stream(self._path(name)) as out:
                out.write(data)
            return
        self.fs.create_dir(self.root, recursive=True)
        tmp = self._path(f"{name}.{uuid.uuid4().hex[:8]}.tmp")
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, self._path(name))

    def remove_partial_writes(self) -> None:
        """Delete the temporary files of writes that a killed run cut short (local only)."""
        if self.remote:
            return
        for name in self._files():
            if _PARTIAL_WRITE.match(name):
                self.fs.delete_file(self._path(name))

    def clear(self) -> None:
        """Remove visionbatch's own files (results, manifest, summary, report data)."""
        for name in self._files():
            if name.startswith("part-") or name in (MANIFEST, SUMMARY, "metrics.json"):
                self.fs.delete_file(self._path(name))

    def manifest(self) -> dict | None:
        if MANIFEST not in self._files():
            return None
        return json.loads(self.read_bytes(MANIFEST))

    def read_table(self, names: list[str] | None = None) -> pa.Table:
        """Rows from the given part files (default: those the manifest lists)."""
        if names is None:
            manifest = self.manifest()
            if manifest is None:
                raise DestinationError(
                    f"no completed results in {self.uri} (no {MANIFEST}); an interrupted job resumes with --resume"
                )
            names = [f["name"] for f in manifest["files"]]
        tables = [_decode(self.read_bytes(name), _format_of(name)) for name in names]
        return pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()


def _format_of(name: str) -> str:
    for fmt, ext in EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    raise DestinationError(f"unknown result file type: {name}")


def read_results(dest: str, s3_endpoint: str | None = None) -> pa.Table:
    """All committed result rows of DEST as one table with RESULT_SCHEMA."""
    return Destination(dest, s3_endpoint).read_table()


class ResultWriter:
    """Buffers result rows and commits them to DEST in whole part files."""

    def __init__(
        self,
        destination: Destination,
        fmt: str = "parquet",
        rows_per_file: int = 100_000,
        flush_seconds: float = 30.0,
    ):
        self.destination = destination
        self.fmt = fmt
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.parts: list[_Part] = []
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._last_flush = time.monotonic()
        self.seconds = 0.0  # time spent encoding and writing

    def write(self, table: pa.Table) -> None:
        self._buffer.append(conform(table))
        self._buffered += table.num_rows
        if self._buffered >= self.rows_per_file or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffered:
            return
        started = time.monotonic()
        table = pa.concat_tables(self._buffer)
        self._buffer, self._buffered = [], 0
        name = f"part-{self.run_id}-{len(self.parts):05d}{EXTENSIONS[self.fmt]}"
        self.destination.write_bytes(name, _encode(table, self.fmt))
        self.parts.append(_Part(name, table.num_rows))
        self.seconds += time.monotonic() - started

    def commit(self, earlier_parts: list[_Part] | None = None) -> dict:
        """Flush, then write the manifest listing every part file of the job."""
        self.flush()
        self.destination.remove_partial_writes()  # left by an interrupted run that this one resumed
        files = list(earlier_parts or []) + self.parts
        manifest = {
            "format": self.fmt,
            "rows": sum(p.rows for p in files),
            "files": [{"name": p.name, "rows": p.rows} for p in files],
        }
        self.destination.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
        return manifest
