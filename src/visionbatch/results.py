"""The result row: its columns, its error kinds and what "correct" means, stated once.

Every stage that makes rows and every reader of DEST imports this module.
"""

from __future__ import annotations

import pyarrow as pa

from visionbatch.errors import UsageError

TRUE_LABEL_SCORE = "true_label_score"

RESULT_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string()),
        pa.field("label", pa.string()),
        pa.field("label_id", pa.int64()),
        pa.field("score", pa.float32()),
        pa.field("top_k_labels", pa.list_(pa.string())),
        pa.field("top_k_scores", pa.list_(pa.float32())),
        pa.field("true_label", pa.string()),
        pa.field("correct", pa.bool_()),  # label == true_label; null where either is unknown
        # The model's probability of true_label, from its full output (not only the top-k);
        # null where the truth is unknown or on error.
        pa.field(TRUE_LABEL_SCORE, pa.float32()),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        # The file's bytes' SHA-256 (hex; null where they could not be read): the same
        # image under two paths (visionbatch duplicates' exact groups).
        pa.field("sha256", pa.string()),
    ]
)
SHA256 = "sha256"  # the column, and the job record's key that says its rows carry it (destination.job_schema)

EMBEDDING = "embedding"


def result_schema(embedding_width: int | None = None) -> pa.Schema:
    """The result row: RESULT_SCHEMA, and with ``embedding_width`` (--embeddings) one more
    column, the image's embedding (float32, that wide; null on error)."""
    if not embedding_width:
        return RESULT_SCHEMA
    return RESULT_SCHEMA.append(pa.field(EMBEDDING, pa.list_(pa.float32(), embedding_width)))


# Columns of class names: few distinct values over many rows. Readers that ask for some
# columns only get these dictionary-encoded (destination.Destination.read_part): each name once.
LABEL_COLUMNS = ("label", "top_k_labels", "true_label")

# The model stage's own columns, a subset of RESULT_SCHEMA.
PREDICTION_FIELDS = [RESULT_SCHEMA.field(name) for name in ("label", "label_id", "score", "top_k_labels", "top_k_scores")]

# ``error`` is null or "<kind>: <message>"; the kinds, in the order a file meets them.
ERROR_KINDS = (
    "read_error",  # missing, unreadable, unreachable
    "download_error",  # an http(s) URL that failed (status, timeout, size, redirects) or a refused scheme
    "empty_file",
    "not_an_image",
    "too_large",  # more pixels than --max-pixels, from the header
    "truncated",
    "decode_error",
    "preprocess_error",
    "model_error",  # the forward pass failed on this file's batch
    "worker_crash",  # every attempt at this file killed its worker or failed its task
)

# Columns that travel with each row inside the pipeline, never written to DEST: which
# shard a row belongs to, its index in that shard and the shard's size (so that the
# writer knows when a shard is whole), and the seconds each stage spent on it.
# A shard whose size is only known once read (a WebDataset tar) says -1 until its last block.
SHARD_COLUMN, ROW_COLUMN, SHARD_ROWS_COLUMN = "shard", "row", "shard_rows"
SHARD_DIGEST_COLUMN = "shard_digest"  # what the manifest checks on --resume (see shards.Shard.digest)
STAGE_COLUMNS = {"decode_seconds": "read, decode and preprocess (task-seconds)",
                 "predict_seconds": "model (actor- or lane-seconds)"}
# The traceback of a model_error, for the driver's log (not written to DEST).
MODEL_TRACEBACK = "model_traceback"


def error_kind(error: str) -> str:
    return error.split(":", 1)[0]


def conform(table: pa.Table, schema: pa.Schema = RESULT_SCHEMA, extra: tuple[str, ...] | None = ()) -> pa.Table:
    """Select and cast to ``schema`` (a :func:`result_schema`), adding all-null columns
    that are absent, then the job's own columns (``extra``: those of them the table has,
    with their types; None: every other column the table has, as a reader of DEST wants)."""
    columns, fields = [], list(schema)
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    for name in (table.column_names if extra is None else extra):
        if name in table.column_names and name not in schema.names:
            columns.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


# --------------------------------------------------------------------------- a job's own columns
# After the result schema's columns, a job's results may carry columns of its input: the
# WebDataset sample key (tar jobs), and the input columns named by --keep-columns (table
# and list jobs, which have no key).
KEY_COLUMN = "key"  # a WebDataset sample's __key__


def job_columns(keep_columns: tuple[str, ...]) -> tuple[str, ...]:
    """The input columns a job writes after the result schema's (each where its rows have it)."""
    return tuple(dict.fromkeys((KEY_COLUMN, *keep_columns)))


def check_keep_columns(keep_columns: tuple[str, ...], embeddings: bool = False) -> None:
    """Refuse kept input columns whose names a column of the job's rows already has: a
    result column (``embedding`` where the job asks for it) or the pipeline's own."""
    taken = {*RESULT_SCHEMA.names, *([EMBEDDING] if embeddings else []), SHARD_COLUMN, ROW_COLUMN, SHARD_ROWS_COLUMN,
             SHARD_DIGEST_COLUMN, *STAGE_COLUMNS, MODEL_TRACEBACK}
    clash = [name for name in keep_columns if name in taken]
    if clash:
        raise UsageError(f"--keep-columns: {', '.join(clash)} would collide with result column(s) of the same name; "
                         "rename the input column(s) or leave them out")
