"""Export: the original images of chosen result rows, as a data set to train on or to review.

``visionbatch export DEST --to OUT --format webdataset|imagefolder|labelstudio``, rows
chosen by ``--where`` (SQL), ``--per-class N``, ``--label-issues`` and ``--dedup`` (all
that apply):

select  DuckDB runs ``--where`` (checked on its parse tree to be one row-level predicate,
        in a connection that can open no file) over each committed part file of DEST, one part in
        memory at a time (read as every reader of DEST reads it: any format, any
        storage), and spills the matching rows (never error rows) to a local file;
        over the spill, DuckDB keeps the rows ``label-issues`` flagged (a semi-join on
        DEST/_derived/label_issues.parquet), drops every duplicate group's members but
        its kept one (``--dedup``: an anti-join on DEST/_derived/duplicates/), and keeps
        the ``--per-class`` least confident (QUALIFY row_number() OVER (PARTITION BY
        label ORDER BY score) <= N), within a memory limit, in DEST's order. The selection is written once, to OUT/_selection.parquet,
        in row groups of ``--shard-size`` rows: row group i is export shard i, so a
        resumed export does exactly the same rows.
shards  :func:`export_shard` (a task on the engine) reads its row group and each row's
        original bytes with the readers classify used: files, ``s3://`` and URLs by
        their path; tar members and Parquet cells through the classify job's own shard
        of them (listed again, and checked against DEST's digests): a part file's rows
        are its shard's samples in order, so a row's index in its part is its sample's
        (the one exact address: a Parquet cell's row path may be only the file name its
        image struct carries).
        It writes its output under names made from the shard's number, so a repeated
        shard rewrites the same files: exactly once by construction.
commit  the driver lists finished shards in OUT/_manifest.json (:class:`manifest.Manifest`,
        with the export's options: ``--resume`` with others is refused), then _SUCCESS.

The driver holds one part file while selecting, then per shard a record: its memory
grows with the number of shards, never with the number of rows.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from visionbatch.config import DEFAULT_READ_TIMEOUT_S, ExportConfig
from visionbatch.destination import DUPLICATES, LABEL_ISSUES, CommandOutput, Destination, job_schema
from visionbatch.driver import Driver, Run, progress_bar
from visionbatch.engines import make_engine
from visionbatch.errors import DestinationError, UsageError
from visionbatch.labelstudio import REVIEWED_LABEL, Reviews, labeling_config, predicted_labels, read_reviews, task
from visionbatch.lease import Fence
from visionbatch.results import EMBEDDING, KEY_COLUMN
from visionbatch.samples import Reading, read_ahead, shard_samples
from visionbatch.shards import AnyShard, InputSpec, iter_shards, paths_digest
from visionbatch.sources import IMAGE_EXTENSIONS
from visionbatch.storage import Storage, canonical_uri, describe, within
from visionbatch.writer import CommitRecord

SELECTION = "_selection.parquet"
TASKS = "tasks.json"  # labelstudio: every task, merged from TASK_PARTS/<shard>.json at the end
TASK_PARTS = "_tasks"
LABELING_CONFIG = "labeling_config.xml"  # labelstudio: the project's labeling interface, its choices the tasks' labels
METADATA = "metadata.jsonl"  # imagefolder: a line per image, merged from METADATA_PARTS/<shard>.jsonl at the end
METADATA_PARTS = "_metadata"
IMAGES = "images"  # labelstudio: the image files its tasks point to
# fiftyone: FiftyOneImageClassificationDataset's data/ and labels files, {"classes": [...], "labels": {uuid: target}},
# one per label field, each merged from its shards' pieces (<folder>/<shard>.json: {uuid: target}) at the end
FIFTYONE_DATA = "data"
FIFTYONE_LABELS = {"labels.json": "_labels", "predictions.json": "_predictions"}  # ground truth; predictions
EXPORTED_FILE = "exported_file"  # the selection's column: a row's file, relative to OUT (a tar member: tar#member)
FILE_PARTS = "_files"  # each shard's EXPORTED_FILE values (written with its images), merged into SELECTION at the end
PART, ROW = "_part", "_row"  # a selected row's part file (its shard id) and index in it
SELECT_MEMORY = "256MB"  # DuckDB's memory limit while selecting; beyond it, it spills to disk
# What a sample's .json (webdataset) and its metadata.jsonl line (imagefolder) carry, where the row has it.
SAMPLE_FIELDS = ("path", "label", "score", "top_k_labels", "top_k_scores", "true_label", "true_label_score",
                 REVIEWED_LABEL)
_FORMATS = {"JPEG": ".jpg", "TIFF": ".tif"}  # Pillow's format name -> extension, where not .<name>


class ExportOutput(CommandOutput):
    command, first_file = "export", SELECTION


# --------------------------------------------------------------------------- select


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


_NO_EXTENSIONS = {"autoload_known_extensions": False, "autoinstall_known_extensions": False}


def _connect(work: str, files: bool = True):
    """A DuckDB connection that spills to ``work``; ``files=False``: one that can touch no
    other file and load no extension, its settings locked (it runs the user's --where)."""
    import duckdb

    db = duckdb.connect(config=_NO_EXTENSIONS)
    db.execute(f"SET memory_limit = '{SELECT_MEMORY}'")
    db.execute(f"SET temp_directory = {_quoted(work)}")
    if not files:
        db.execute("SET enable_external_access = false")
        db.execute("SET lock_configuration = true")
    return db


# What a --where predicate is made of (DuckDB's parse-tree classes): a row's columns,
# constants, operators and function calls; no subquery, no parameter, no star.
_PREDICATE_NODES = {"COLUMN_REF", "CONSTANT", "COMPARISON", "CONJUNCTION", "OPERATOR", "FUNCTION", "CAST", "TYPE",
                    "BETWEEN", "CASE", "COLLATE", "LAMBDA"}
_UNLOCATED = re.compile(r'"query_location(_length)?": *\d+')


def selection_query(where: str | None) -> str:
    """The query that picks a part's rows (table ``results``): ``--where`` as the one
    predicate of one SELECT, checked on DuckDB's own parse tree (the exact text that runs)
    to hold only row-level expressions and scalar functions; else a UsageError saying why."""
    if not where:
        return "SELECT * FROM results"
    query = f"SELECT * FROM results WHERE {where}"
    import duckdb

    with duckdb.connect(config=_NO_EXTENSIONS) as db:
        tree, bare = (json.loads(db.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
                      for sql in (query, "SELECT * FROM results"))
        # Scalar functions, and macros that query no table (a few of the pg_* ones do).
        scalar = {name for (name,) in db.execute(
            "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type = 'scalar' "
            "OR (function_type = 'macro' AND macro_definition NOT ILIKE '%select%')").fetchall()}
    refused = f"--where {where!r} is refused: "
    one_row = "a predicate tests one row's columns, with operators and scalar functions"
    if tree["error"]:
        raise UsageError(refused + f"it is not one SQL predicate ({tree['error_message']}); {one_row}")
    if len(tree["statements"]) != 1:
        raise UsageError(refused + f"it is several statements; {one_row}")
    node = tree["statements"][0]["node"]
    predicate = node.get("where_clause")
    if _UNLOCATED.sub("", json.dumps({**node, "where_clause": None})) != _UNLOCATED.sub(
            "", json.dumps(bare["statements"][0]["node"])):
        raise UsageError(refused + f"a clause follows the predicate; {one_row}")

    def check(item) -> None:
        if isinstance(item, list):
            for value in item:
                check(value)
        elif isinstance(item, dict):
            kind = item.get("class")
            if kind is not None and kind not in _PREDICATE_NODES:
                raise UsageError(refused + f"it holds a {kind.lower()}; {one_row}")
            if kind == "FUNCTION" and item["function_name"] not in scalar:
                raise UsageError(refused + f"{item['function_name']}() is not a scalar function; {one_row}")
            for value in item.values():
                check(value)

    check(predicate)
    return query


def _rows_of_parts(destination: Destination, reviews: Reviews | None) -> Iterator[pa.Table]:
    """Each committed part's rows (no embeddings), with its reviewed label (``reviews``), its
    shard id and each row's index in it."""
    manifest = destination.finished_manifest()
    schema = job_schema(manifest["job"])
    for shard, record in sorted(manifest["shards"].items()):
        rows = destination.read_part(record["file"], record["rows"], schema)
        if EMBEDDING in rows.column_names:
            rows = rows.drop_columns([EMBEDDING])
        if KEY_COLUMN not in rows.column_names:
            rows = rows.append_column(KEY_COLUMN, pa.nulls(rows.num_rows, pa.string()))
        if reviews is not None:
            rows = rows.append_column(REVIEWED_LABEL, reviews.lookup(rows.column("path")))
        yield (rows.append_column(PART, pa.array([shard] * rows.num_rows, pa.string()))
               .append_column(ROW, pa.array(range(rows.num_rows), pa.int64())))


def select(destination: Destination, config: ExportConfig, query: str, reviews: Reviews | None, work: str) -> str:
    """The chosen rows of DEST, in its order, as a local Parquet file in row groups of
    ``config.shard_size`` rows; returns its path. ``query``: :func:`selection_query`'s,
    run over each part's rows but error rows in a connection that can touch no file; one
    that DuckDB cannot run is a UsageError that names DuckDB's error and the columns there are."""
    issues = None
    if config.label_issues:
        name = destination.label_issues_file()
        if name is None:
            raise DestinationError(f"{destination.uri} has no {LABEL_ISSUES}: run visionbatch label-issues "
                                   f"{destination.uri} first")
        issues = os.path.join(work, "label_issues.parquet")
        destination.copy_file(name, issues)
    duplicates = None
    if config.dedup:
        if not destination.exists(DUPLICATES):
            raise DestinationError(f"{destination.uri} has no {DUPLICATES}: run visionbatch duplicates "
                                   f"{destination.uri} first")
        duplicates = os.path.join(work, "duplicates.parquet")
        destination.copy_file(DUPLICATES, duplicates)
    spill, chosen = os.path.join(work, "matching.parquet"), os.path.join(work, "chosen.parquet")
    writer, schema = None, None
    with _connect(work, files=False) as db:
        try:
            for part in _rows_of_parts(destination, reviews):
                db.register("results", part.filter(pc.is_null(part.column("error"))))
                try:
                    matching = db.sql(query).to_arrow_table()
                except Exception as err:  # duckdb.Error: a binder or conversion error
                    raise UsageError(f"--where {config.where!r}: {describe(err)}; the columns are: "
                                     f"{', '.join(name for name in part.column_names if name not in (PART, ROW))}"
                                     ) from None
                finally:
                    db.unregister("results")
                if writer is None:
                    schema = matching.schema
                    writer = pq.ParquetWriter(spill, schema)
                writer.write_table(matching.cast(schema))
        finally:
            if writer is not None:
                writer.close()
    if writer is None:  # a job with no rows
        pq.write_table(pa.table({PART: pa.array([], pa.string())}), chosen)
        return chosen
    conditions = []
    if issues:
        conditions.append(f"path IN (SELECT path FROM read_parquet({_quoted(issues)}))")
    if duplicates:  # a group's other members: a deduplicated set keeps its kept member alone
        conditions.append(f"path NOT IN (SELECT path FROM read_parquet({_quoted(duplicates)}) WHERE NOT keep)")
    query = f"SELECT * FROM read_parquet({_quoted(spill)})" + "".join(
        f" {'WHERE' if i == 0 else 'AND'} {condition}" for i, condition in enumerate(conditions))
    if config.per_class:
        query += f" QUALIFY row_number() OVER (PARTITION BY label ORDER BY score, {PART}, {ROW}) <= {config.per_class}"
    unsized = os.path.join(work, "sorted.parquet")
    with _connect(work) as db:
        db.execute(f"COPY ({query} ORDER BY {PART}, {ROW}) TO {_quoted(unsized)} (FORMAT parquet)")
    return _in_shards(pq.ParquetFile(unsized), chosen, config.shard_size)


def _in_shards(rows: pq.ParquetFile, path: str, size: int) -> str:
    """Rewrite ``rows`` with row groups of exactly ``size`` rows (the last one fewer): an
    export shard each. Holds at most ``size`` rows and one batch."""
    with pq.ParquetWriter(path, rows.schema_arrow) as writer:
        pending: list[pa.RecordBatch] = []
        held = 0
        for batch in rows.iter_batches(batch_size=size):
            pending.append(batch)
            held += batch.num_rows
            while held >= size:
                table = pa.Table.from_batches(pending)
                writer.write_table(table.slice(0, size), row_group_size=size)
                rest = table.slice(size)
                pending, held = rest.to_batches(), rest.num_rows
        if held:
            writer.write_table(pa.Table.from_batches(pending), row_group_size=size)
    return path


# --------------------------------------------------------------------------- where the bytes are


def _container_parts(selection: pq.ParquetFile, table_job: bool) -> list[list[str]]:
    """Per row group (export shard), the part files (shard ids) of its rows that came
    from a tar or a table: rows with a WebDataset key, or every row of a table job."""
    per_shard = []
    for group in range(selection.num_row_groups):
        rows = selection.read_row_group(group, columns=[PART, KEY_COLUMN])
        if not table_job:
            rows = rows.filter(pc.is_valid(rows.column(KEY_COLUMN)))
        per_shard.append(sorted(set(rows.column(PART).to_pylist())))
    return per_shard


def _containers(listed: InputSpec, committed: dict[str, dict], needed: set[str],
                storage: Storage) -> dict[str, AnyShard]:
    """The classify job's tar and table shards named in ``needed``, listed again as it
    listed them (``listed``; their digests must still be DEST's: else the input changed)."""
    if not needed:
        return {}
    from visionbatch.sources import ListingCounts

    found: dict[str, AnyShard] = {}
    for shard in iter_shards(listed, storage, ListingCounts()):
        if shard.id in needed:
            if shard.digest != committed[shard.id]["digest"]:
                break
            found[shard.id] = shard
            if len(found) == len(needed):
                return found
    missing = sorted(needed - set(found))
    raise DestinationError(f"the input of {listed.sources[0]} changed since DEST was written (shard {missing[0]}"
                           f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}): its images cannot "
                           "be found as they were classified")


def _images(rows: pa.Table, containers: dict[str, AnyShard], reading: Reading) -> Iterator[bytes | str]:
    """Each row's original bytes (or its read error), in order, streamed: a run of rows of
    one part file at a time (files read a few at once; a tar or table shard read once, its
    samples taken by index: the selection is in part order, then row order)."""
    parts, indices, paths = (rows.column(name).to_pylist() for name in (PART, ROW, "path"))
    start = 0
    while start < len(parts):
        end = start
        while end < len(parts) and parts[end] == parts[start]:
            end += 1
        container = containers.get(parts[start])
        if container is None:
            yield from read_ahead(paths[start:end], reading.storage, None, reading.read_timeout)
        else:
            moved = "read_error: {} is no longer where it was classified".format
            samples, _ = shard_samples(container, reading)
            i = start  # the next row to find
            for index, sample in enumerate(samples):
                if index == indices[i]:
                    yield sample.data if sample.path == paths[i] else moved(paths[i])
                    i += 1
                    if i == end:
                        break
            for i in range(i, end):  # the shard ended before them
                yield moved(paths[i])
        start = end


def _extension(path: str, data: bytes) -> str:
    """The file's own extension where it is an image's (as spelled); else the format its bytes show."""
    ext = posixpath.splitext(re.split(r"[/#]", path)[-1])[1]
    if ext.lower() in IMAGE_EXTENSIONS:
        return ext
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return _FORMATS.get(image.format, f".{image.format.lower()}")
    except Exception:  # not an image Pillow knows: the bytes are still written as they are
        return ".bin"


def safe_name(text: str, limit: int = 100) -> str:
    """``text`` as one file or folder name: no separators, no control characters, not
    hidden, not empty (labels are ImageNet's "tench, Tinca tinca" and anything else)."""
    name = re.sub(r"[/\\\x00-\x1f\x7f]", "_", text).strip()[:limit]
    return "_" + name[1:] if name.startswith(".") else (name or "_")


def _stem(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", posixpath.splitext(re.split(r"[/#]", path)[-1])[0])[:60]


def sample_json(row: dict) -> dict:
    return {name: row[name] for name in SAMPLE_FIELDS if row.get(name) is not None}


# --------------------------------------------------------------------------- export shards


@dataclass(frozen=True)
class ExportTask:
    """One export shard: row group ``shard`` of the selection, and how to write it
    (plain values, shipped to a worker process or a Ray task)."""

    out: str
    storage: Storage
    format: str
    shard: int
    containers: dict  # shard id -> the classify job's tar or table shard, for this shard's rows
    reading: Reading
    image_url_prefix: str
    model: str
    fence: Fence  # OUT's lease, checked before each file appears

    @property
    def id(self) -> str:
        return f"{self.shard:06d}"


class _TarWriter:
    """webdataset: shard-<id>.tar, per sample <key>.<ext>, <key>.json and <key>.cls (the
    predicted class's index, as webdataset's and datasets' decoders read a class); a key
    has no dot: webdataset splits a member's name at its first one."""

    def __init__(self, task: ExportTask, out: ExportOutput, work: str):
        self.out, self.name = out, f"shard-{task.id}.tar"
        self.local = os.path.join(work, self.name)
        self.tar = tarfile.open(self.local, "w", format=tarfile.PAX_FORMAT)

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, row: dict, data: bytes, ext: str) -> str:
        image = f"{key}{ext.lower()}"  # webdataset's decoders go by lower-case extensions
        self._member(image, data)
        self._member(f"{key}.json", json.dumps(sample_json(row), ensure_ascii=False).encode())
        self._member(f"{key}.cls", str(row["label_id"]).encode())
        return f"{self.name}#{image}"

    def close(self) -> str:
        self.tar.close()
        self.out.write_file(self.name, self.local)
        return self.name


class _FolderWriter:
    """imagefolder: <label>/<key>-<original stem><ext> (the key makes names unique; the
    label a reviewed one where the row has it, else the predicted one), and
    the shard's lines of metadata.jsonl in _metadata/<id>.jsonl: per image its file_name
    (relative to OUT, as datasets' imagefolder joins it) and SAMPLE_FIELDS."""

    def __init__(self, task: ExportTask, out: ExportOutput, work: str):
        self.task, self.out, self.folders, self.lines = task, out, {}, []

    def add(self, key: str, row: dict, data: bytes, ext: str) -> str:
        label = safe_name(row.get(REVIEWED_LABEL) or row["label"])
        if label not in self.folders:
            self.folders[label] = self.out.folder(label)
        name = f"{key}-{_stem(row['path'])}{ext}"
        self.folders[label].write_bytes(name, data)
        self.lines.append(json.dumps({"file_name": f"{label}/{name}", **sample_json(row)}, ensure_ascii=False))
        return f"{label}/{name}"

    def close(self) -> str:
        name = f"{self.task.id}.jsonl"
        self.out.folder(METADATA_PARTS).write_bytes(name, "".join(line + "\n" for line in self.lines).encode())
        return f"{METADATA_PARTS}/{name}"


class _LabelStudioWriter:
    """labelstudio: images/<key>-<stem><ext>, and the shard's tasks in _tasks/<id>.json:
    Label Studio's JSON import format, the prediction as a pre-annotation (:func:`labelstudio.task`)."""

    def __init__(self, task: ExportTask, out: ExportOutput, work: str):
        self.task, self.out, self.images, self.tasks = task, out, out.folder(IMAGES), []

    def add(self, key: str, row: dict, data: bytes, ext: str) -> str:
        name = f"{key}-{_stem(row['path'])}{ext}"
        self.images.write_bytes(name, data)
        self.tasks.append(task(f"{self.task.image_url_prefix}{IMAGES}/{name}", row, self.task.model))
        return f"{IMAGES}/{name}"

    def close(self) -> str:
        name = f"{self.task.id}.json"
        self.out.folder(TASK_PARTS).write_bytes(name, json.dumps(self.tasks, ensure_ascii=False).encode())
        return f"{TASK_PARTS}/{name}"


class _FiftyOneWriter:
    """fiftyone: data/<key><ext> (the key is FiftyOne's uuid: the file name without its
    extension) and the shard's targets: the true label (null where unknown) for labels.json,
    {"label", "confidence"} for predictions.json (the target forms FiftyOne's parser reads)."""

    def __init__(self, task: ExportTask, out: ExportOutput, work: str):
        self.task, self.out, self.data = task, out, out.folder(FIFTYONE_DATA)
        self.targets: dict[str, dict] = {folder: {} for folder in FIFTYONE_LABELS.values()}

    def add(self, key: str, row: dict, data: bytes, ext: str) -> str:
        self.data.write_bytes(f"{key}{ext}", data)
        ground_truth, predictions = FIFTYONE_LABELS.values()
        self.targets[ground_truth][key] = row.get("true_label")
        self.targets[predictions][key] = {"label": row["label"], "confidence": row["score"]}
        return f"{FIFTYONE_DATA}/{key}{ext}"

    def close(self) -> str:
        for folder, targets in self.targets.items():
            self.out.folder(folder).write_bytes(f"{self.task.id}.json", json.dumps(targets, ensure_ascii=False).encode())
        return FIFTYONE_DATA


_WRITERS = {"webdataset": _TarWriter, "imagefolder": _FolderWriter, "labelstudio": _LabelStudioWriter,
            "fiftyone": _FiftyOneWriter}


def export_shard(task: ExportTask) -> CommitRecord:
    """Write one export shard's images, and its rows' file names (null: not written) in
    _files/<id>.parquet; its commit record (rows written, rows whose image could not be
    read and the first such row's error)."""
    out = ExportOutput(task.out, task.storage, task.fence)
    with out.open_file(SELECTION) as file:
        rows = pq.ParquetFile(file).read_row_group(task.shard)
    files: list[str | None] = []
    example = None
    with tempfile.TemporaryDirectory(prefix="visionbatch-export-") as work:
        writer = _WRITERS[task.format](task, out, work)
        for i, (row, data) in enumerate(zip(rows.to_pylist(), _images(rows, task.containers, task.reading))):
            if isinstance(data, str):
                files.append(None)
                example = example or f"{row['path']}: {data}"
                continue
            files.append(writer.add(f"{task.id}-{i:06d}", row, data, _extension(row["path"], data)))
        file_name = writer.close()
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({EXPORTED_FILE: pa.array(files, pa.string())}), sink)
    out.folder(FILE_PARTS).write_bytes(f"{task.id}.parquet", sink.getvalue().to_pybytes())
    written = sum(name is not None for name in files)
    return {"shard": task.id, "file": file_name, "rows": written, "counts": {"missing": len(files) - written},
            "missing_example": example}


# --------------------------------------------------------------------------- the driver


@dataclass
class ExportSummary:
    out: str
    format: str
    selected: int
    written: int
    missing: int
    missing_example: str | None
    wall_time_s: float

    def format_lines(self) -> str:
        lines = [f"exported          {self.written:,} of {self.selected:,} selected rows -> {self.out} "
                 f"({self.format}, {self.wall_time_s:.1f} s)"]
        if not self.selected:
            lines.append("nothing selected: the export is empty")
        if self.missing:
            lines.append(f"not exported      {self.missing:,} rows whose image could not be read "
                         f"(first: {self.missing_example})")
        return "\n".join(lines)


def model_name(ref: str) -> str:
    """A model as a label names it: a hub id as it is, a local folder by its name (not a
    path of this machine)."""
    return posixpath.basename(ref.rstrip("/")) if os.path.isabs(ref) or os.path.exists(ref) else ref


def export_identity(config: ExportConfig, dest_manifest: dict, reviews: Reviews | None) -> dict:
    """Everything that changes an export's output: --resume with another is refused."""
    shards = dest_manifest["shards"]
    reviewed = reviews and paths_digest(f"{path}\t{label}" for path, label in zip(
        *(reviews.labels.column(name).to_pylist() for name in reviews.labels.column_names)))
    return {"export": True, "dest": canonical_uri(config.dest),
            "dest_digest": paths_digest(f"{shard} {record['digest']} {record['rows']}"
                                        for shard, record in sorted(shards.items())),
            "format": config.format, "where": config.where, "per_class": config.per_class,
            "label_issues": config.label_issues, "dedup": config.dedup, "reviewed": reviewed, "shard_size": config.shard_size,
            "image_url_prefix": config.image_url_prefix if config.format == "labelstudio" else None}


def run_export(config: ExportConfig, progress=None) -> ExportSummary:
    """Export the chosen rows' images from DEST to OUT (module docstring); ``progress``:
    the stream for the progress bar (None: no bar)."""
    storage = Storage(config.s3_endpoint)
    export = ExportJob(config, storage, progress)
    return Driver(export, export.out, overwrite=config.overwrite, resume=config.resume,
                  flush_seconds=config.flush_seconds)()


class ExportJob:
    """The export command's part of a committed run (:class:`visionbatch.driver.Command`).
    What can be refused without touching OUT is refused here, before the driver claims it."""

    name = "export"

    def __init__(self, config: ExportConfig, storage: Storage, progress):
        self.config, self.storage, self.progress = config, storage, progress
        self.started = time.monotonic()
        self.destination, self.out = Destination(config.dest, storage), ExportOutput(config.to, storage)
        self.query = selection_query(config.where)  # a --where that is not one predicate is refused before OUT is touched
        for inner, outer in ((config.to, config.dest), (config.dest, config.to)):
            if within(inner, outer):  # DEST would no longer read as a dataset, or OUT would mix its files with DEST's
                raise UsageError(f"--to {config.to} and DEST {config.dest} overlap ({inner} is inside {outer}): "
                                 "export to a folder outside DEST")
        self.reviews = read_reviews(config.reviewed, storage) if config.reviewed else None
        self.dest_manifest = self.destination.finished_manifest()
        from visionbatch.plan import recorded_classes, recorded_input_spec  # the model's configs: only where needed

        self.listed = recorded_input_spec(self.dest_manifest["job"])  # what the classify job listed
        # The model's classes (from its config), for what the labeling config and the reviews are checked against.
        self.classes = (recorded_classes(self.dest_manifest["job"])
                        if config.format == "labelstudio" or self.reviews else None)
        if self.reviews is not None:
            _warn_unknown(self.reviews, self.classes)
        self.out.check_own()
        self.engine = None

    def prepare(self) -> None:
        pass  # the engine starts once there are shards to export (a resumed export may have none)

    def identity(self) -> dict:
        return export_identity(self.config, self.dest_manifest, self.reviews)

    def failure(self, err: BaseException) -> str | None:
        return self.engine.failure(err) if self.engine is not None else None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def work(self, run: Run) -> ExportSummary:
        config, manifest, out = self.config, run.manifest, run.destination
        if not manifest.shards or SELECTION not in out.files():  # nothing done yet: choose the rows (again)
            manifest.shards.clear()
            with tempfile.TemporaryDirectory(prefix="visionbatch-export-") as work:
                out.write_file(SELECTION, select(self.destination, config, self.query, self.reviews, work))
        with out.open_file(SELECTION) as file:
            selection = pq.ParquetFile(file)
            selected = selection.metadata.num_rows
            parts = _container_parts(selection, bool(self.listed.image_column))
        job = self.dest_manifest["job"]
        containers = _containers(self.listed, self.dest_manifest["shards"], {part for shard in parts for part in shard},
                                 self.storage)
        reading = Reading(self.storage, image_column=self.listed.image_column, read_timeout=DEFAULT_READ_TIMEOUT_S)
        tasks = [ExportTask(out.uri, self.storage, config.format, shard, {part: containers[part] for part in mine},
                            reading, config.image_url_prefix, model_name(job.get("model") or ""), out.fence)
                 for shard, mine in enumerate(parts) if f"{shard:06d}" not in manifest.shards]
        done = sum(record["rows"] + record["counts"]["missing"] for record in manifest.shards.values())
        bar = progress_bar(self.progress, "export", initial=done, total=selected)
        try:
            if tasks:
                self.engine = make_engine(config, model=False)
                for record in self.engine.map_tasks(export_shard, tasks, config.max_retries, config.address):
                    if record is not None:
                        run.commit(record)
                        bar.update(record["rows"] + record["counts"]["missing"])
                    run.tick()
        finally:
            bar.close()
        if config.format in _MERGED:
            _merge(out, config.format, len(parts))
        if config.format == "fiftyone":
            _merge_fiftyone(out, len(parts))
        _name_files(out, len(parts))
        if config.format == "labelstudio":
            _write_labeling_config(out, len(parts), self.classes)
        run.write(complete=True)
        records = manifest.shards.values()
        return ExportSummary(config.to, config.format, selected, sum(record["rows"] for record in records),
                             sum(record["counts"]["missing"] for record in records),
                             next((record["missing_example"] for record in records if record["missing_example"]),
                                  None),
                             time.monotonic() - self.started)


# Formats whose shards each write a piece of one file: (the pieces' folder, the file, a JSON array?)
_MERGED = {"labelstudio": (TASK_PARTS, TASKS, True), "imagefolder": (METADATA_PARTS, METADATA, False)}


def _merge(out: ExportOutput, fmt: str, shards: int) -> None:
    """The shards' pieces as one file, streamed (a piece at a time): labelstudio's task
    lists as one JSON array, imagefolder's metadata lines as one JSON-lines file."""
    folder, name, array = _MERGED[fmt]
    parts = out.folder(folder)
    with tempfile.TemporaryDirectory(prefix="visionbatch-export-") as work:
        merged = os.path.join(work, name)
        with open(merged, "wb") as file:
            file.write(b"[" if array else b"")
            first = True
            for shard in range(shards):
                body = parts.read_bytes(f"{shard:06d}{posixpath.splitext(name)[1]}")
                if array:
                    body = body.strip()[1:-1].strip()
                if body:
                    file.write(body if first or not array else b"," + body)
                    first = False
            file.write(b"]" if array else b"")
        out.write_file(name, merged)


def _merge_fiftyone(out: ExportOutput, shards: int) -> None:
    """Each FiftyOne labels file from its shards' pieces, streamed (a piece at a time), its
    classes the labels its targets name, sorted."""
    for name, folder in FIFTYONE_LABELS.items():
        pieces, classes = out.folder(folder), set()
        with tempfile.TemporaryDirectory(prefix="visionbatch-export-") as work:
            merged = os.path.join(work, name)
            with open(merged, "w", encoding="utf-8") as file:
                file.write('{"labels": {')
                first = True
                for shard in range(shards):
                    targets = json.loads(pieces.read_bytes(f"{shard:06d}.json"))
                    for key, target in targets.items():
                        label = target["label"] if isinstance(target, dict) else target
                        if label is not None:
                            classes.add(label)
                        file.write(("" if first else ", ") + f"{json.dumps(key)}: {json.dumps(target, ensure_ascii=False)}")
                        first = False
                file.write(f"}}, \"classes\": {json.dumps(sorted(classes), ensure_ascii=False)}}}")
            out.write_file(name, merged)


def _name_files(out: ExportOutput, shards: int) -> None:
    """SELECTION again, each row group (export shard) with its rows' EXPORTED_FILE from the
    shard's piece: a row group in memory at a time. Run again (a resumed export that
    stopped after it), it replaces the column."""
    pieces = out.folder(FILE_PARTS)
    with tempfile.TemporaryDirectory(prefix="visionbatch-export-") as work:
        named = os.path.join(work, SELECTION)
        with out.open_file(SELECTION) as file:
            selection = pq.ParquetFile(file)
            schema = selection.schema_arrow
            if EXPORTED_FILE in schema.names:
                schema = schema.remove(schema.get_field_index(EXPORTED_FILE))
            with pq.ParquetWriter(named, schema.append(pa.field(EXPORTED_FILE, pa.string()))) as writer:
                for shard in range(shards):
                    rows = selection.read_row_group(shard, columns=schema.names)
                    files = pq.read_table(pa.BufferReader(pieces.read_bytes(f"{shard:06d}.parquet")))
                    writer.write_table(rows.append_column(EXPORTED_FILE, files.column(EXPORTED_FILE)),
                                       row_group_size=max(rows.num_rows, 1))
        out.write_file(SELECTION, named)


def _write_labeling_config(out: ExportOutput, shards: int, classes: list[str] | None) -> None:
    """labelstudio: the labeling interface the tasks' pre-annotations fit, its <Choice>s the
    distinct predicted labels of the tasks; a label that names several of the model's
    ``classes`` (ImageNet's "crane" is classes 134 and 517) is one <Choice>, and said."""
    labels = set()
    for shard in range(shards):
        labels |= predicted_labels(json.loads(out.folder(TASK_PARTS).read_bytes(f"{shard:06d}.json")))
    indices: dict[str, list[int]] = {}
    for index, name in enumerate(classes or ()):
        if name in labels:
            indices.setdefault(name, []).append(index)
    repeated = {label: where for label, where in sorted(indices.items()) if len(where) > 1}
    if repeated:
        logging.getLogger("visionbatch").warning(
            "labeling config: %s: one <Choice> each, so a reviewer's answer cannot tell those classes apart",
            "; ".join(f"{label!r} names the model's classes {', '.join(map(str, indices))}"
                      for label, indices in repeated.items()))
    out.write_bytes(LABELING_CONFIG, labeling_config(labels).encode())


def _warn_unknown(reviews: Reviews, classes: list[str] | None) -> None:
    """Reviewed labels that are none of the model's classes are still used (a reviewer's
    answer); said, so that a typo in an edited labeling config is seen."""
    unknown = reviews.unknown(classes) if classes is not None else {}
    if unknown:
        logging.getLogger("visionbatch").warning(
            "reviewed labels that are none of the model's classes: %s",
            ", ".join(f"{label!r} ({count})" for label, count in unknown.items()))
