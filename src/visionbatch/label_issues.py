"""Label issues: which given labels look wrong, found in bounded memory (confident learning).

Confident learning (Northcutt et al.; cleanlab) doubts a row's given label when another
class's probability clears that class's threshold (the mean probability the model gives
the class over the rows labelled with it) and beats the given label. cleanlab holds an
N x K matrix of probabilities; here the result rows carry all that is needed
(``true_label_score`` and the top-k), read one committed part file at a time:

pass 1  per class, the sum and count of ``true_label_score`` over its labelled rows
        (two columns read per part) -> one threshold per class (K numbers)
pass 2  per part, the rows where a top-k class other than the given one scores at least
        its own threshold and more than the given label; the best such class is the
        suggested label. Only flagged rows are kept, streamed to a spill file on local disk
rank    DuckDB orders the spill by ``self_confidence`` (the given label's score,
        ascending; ties by path) within a memory limit, spilling to disk, and writes
        ``DEST/_derived/label_issues.parquet``

Memory holds one part's columns, the K thresholds and the K counts; the sort is
DuckDB's. A class outside a row's top-k cannot be suggested: one that beats the given
label and clears its own threshold is almost always near the top.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from visionbatch.destination import LABEL_ISSUES, LABEL_ISSUES_BEFORE, Destination
from visionbatch.errors import DestinationError
from visionbatch.manifest import ROWS_WITH_TRUE_LABEL_SCORE
from visionbatch.results import TRUE_LABEL_SCORE
from visionbatch.storage import Storage

# A class's threshold is a Bayesian average: (sum of its scores + PRIOR_ROWS * shared) /
# (its rows + PRIOR_ROWS), where shared is the mean over every labelled row. A class with
# one labelled row would otherwise take that one image's score as its threshold, a bar
# set by luck for every row that might belong to the class; with a prior of a few rows,
# a class's own mean outweighs the shared one only once it has more rows than the prior.
PRIOR_ROWS = 5
SORT_MEMORY = "256MB"  # DuckDB's memory limit while ranking; beyond it, it spills to disk
ISSUES_SCHEMA = pa.schema([
    pa.field("path", pa.string()),
    pa.field("given_label", pa.string()),
    pa.field("suggested_label", pa.string()),
    pa.field("self_confidence", pa.float32()),  # the model's probability of the given label
    pa.field("rank", pa.int64()),  # 1 = most likely wrong
])
_SCORE_COLUMNS = ("true_label", TRUE_LABEL_SCORE)
_ROW_COLUMNS = ("path", *_SCORE_COLUMNS, "top_k_labels", "top_k_scores")


@dataclass(frozen=True)
class Thresholds:
    """Per-class thresholds over the given labels (``labels``), and the shared one that
    classes with few rows lean on and classes never given use."""

    labels: pa.Array  # the given labels, distinct
    rows: np.ndarray  # labelled rows per label
    thresholds: np.ndarray
    shared: float

    @classmethod
    def from_parts(cls, parts: Iterable[pa.Table], prior_rows: float = PRIOR_ROWS) -> "Thresholds":
        """From the (true_label, true_label_score) columns of result rows, part by part."""
        sums = []
        for part in parts:
            scored = part.filter(pc.is_valid(part.column(TRUE_LABEL_SCORE)))
            # Summed in float64: float32 sums drift over millions of rows.
            scored = pa.table({"true_label": scored.column("true_label"),
                               "score": scored.column(TRUE_LABEL_SCORE).cast(pa.float64())})
            part_sums = scored.group_by("true_label").aggregate([("score", "sum"), ("score", "count")])
            key = part_sums.schema.get_field_index("true_label")
            sums.append(part_sums.set_column(key, "true_label", part_sums.column(key).cast(pa.string())))
        total = pa.concat_tables(sums).group_by("true_label").aggregate([("score_sum", "sum"), ("score_count", "sum")])
        rows = total.column("score_count_sum").to_numpy()
        if not rows.sum():
            raise DestinationError("no labelled rows with a true_label_score: label-issues needs the true labels "
                                   "(classify with --labels dirs or --label-column)")
        sums_of = total.column("score_sum_sum").to_numpy()
        shared = float(sums_of.sum() / rows.sum())
        return cls(total.column("true_label").combine_chunks(), rows,
                   (sums_of + prior_rows * shared) / (rows + prior_rows), shared)

    def index_of(self, labels: pa.Array) -> np.ndarray:
        """Each label's index into ``labels``; -1 for a label never given. Dictionary-encoded
        labels are looked up once per distinct name."""
        if pa.types.is_dictionary(labels.type):
            return self.index_of(labels.dictionary)[labels.indices.to_numpy()]
        return pc.fill_null(pc.index_in(labels, value_set=self.labels), -1).to_numpy(zero_copy_only=False)


def flag_rows(part: pa.Table, thresholds: Thresholds) -> pa.Table:
    """The rows of ``part`` whose given label looks wrong: a top-k class other than the
    given one scores at least its own threshold and more than the given label (the best
    such class is suggested). Columns: ISSUES_SCHEMA's but ``rank``."""
    rows = part.filter(pc.is_valid(part.column(TRUE_LABEL_SCORE)))
    given = thresholds.index_of(rows.column("true_label").combine_chunks())
    self_confidence = rows.column(TRUE_LABEL_SCORE).to_numpy()
    top_labels = rows.column("top_k_labels").combine_chunks()
    owner = np.repeat(np.arange(rows.num_rows), pc.list_value_length(top_labels).to_numpy(zero_copy_only=False))
    labels = top_labels.flatten()
    classes = thresholds.index_of(labels)
    scores = rows.column("top_k_scores").combine_chunks().flatten().to_numpy()
    threshold = np.where(classes >= 0, thresholds.thresholds[classes], thresholds.shared)
    beats = (classes != given[owner]) & (scores >= threshold) & (scores > self_confidence[owner])
    hits = np.flatnonzero(beats)
    # The top-k are best first: a row's first hit is its best-scoring other class.
    flagged, first = np.unique(owner[hits], return_index=True)
    return pa.table({
        "path": rows.column("path").take(flagged),
        "given_label": rows.column("true_label").take(flagged).cast(pa.string()),
        "suggested_label": labels.take(hits[first]).cast(pa.string()),
        "self_confidence": pa.array(self_confidence[flagged], pa.float32()),
    })


@dataclass
class LabelIssues:
    """What ``find_label_issues`` found: rows read, labelled rows, flagged rows per given label."""

    dest: str
    rows: int
    labels: list[str]
    labelled: list[int]  # per label
    flagged: list[int]  # per label

    @property
    def total_flagged(self) -> int:
        return sum(self.flagged)

    def format(self, max_classes: int = 20) -> str:
        labelled = sum(self.labelled)
        share = self.total_flagged / labelled if labelled else 0.0
        lines = [f"label issues      {self.total_flagged:,} of {labelled:,} labelled rows ({share:.1%}; "
                 f"{self.rows:,} rows read) -> {self.dest}/{LABEL_ISSUES}"]
        worst = sorted((row for row in zip(self.flagged, self.labelled, self.labels) if row[0]),
                       key=lambda row: (-row[0], row[2]))
        if worst:
            lines.append(f"{'given label':<32} {'flagged':>9} {'labelled':>9}")
            lines += [f"{label[:32]:<32} {flagged:>9,} {of:>9,}" for flagged, of, label in worst[:max_classes]]
            if len(worst) > max_classes:
                lines.append(f"... and {len(worst) - max_classes} more classes with flagged rows")
        return "\n".join(lines)


def _rank(spill: str, out: str, work: str) -> None:
    """Order the flagged rows by self_confidence (ties by path) and number them, with
    DuckDB: an external sort within SORT_MEMORY."""
    import duckdb

    def quoted(path: str) -> str:
        return "'" + path.replace("'", "''") + "'"

    with duckdb.connect() as db:
        db.execute(f"SET memory_limit = '{SORT_MEMORY}'")
        db.execute(f"SET temp_directory = {quoted(work)}")
        db.execute("SET preserve_insertion_order = false")
        db.execute(f"""
            COPY (SELECT path, given_label, suggested_label, self_confidence,
                         row_number() OVER (ORDER BY self_confidence, path) AS rank
                  FROM read_parquet({quoted(spill)}) ORDER BY rank)
            TO {quoted(out)} (FORMAT parquet, COMPRESSION zstd)""")


def find_label_issues(dest: str, s3_endpoint: str | None = None) -> LabelIssues:
    """Flag the rows of a finished DEST whose given label looks wrong (module docstring)
    and write them, ranked, to ``DEST/_derived/label_issues.parquet``."""
    destination = Destination(dest, Storage(s3_endpoint))
    manifest = destination.finished_manifest()
    if manifest.get("version", 0) < ROWS_WITH_TRUE_LABEL_SCORE:
        raise DestinationError(f"{destination.uri} was written by an older visionbatch, whose rows lack "
                               f"{TRUE_LABEL_SCORE}: classify again (into a new DEST, or with --overwrite)")
    thresholds = Thresholds.from_parts(destination.committed_rows(_SCORE_COLUMNS))
    flagged = np.zeros(len(thresholds.labels), dtype=np.int64)
    rows = 0
    with tempfile.TemporaryDirectory(prefix="visionbatch-label-issues-") as work:
        spill, out = os.path.join(work, "flagged.parquet"), os.path.join(work, "ranked.parquet")
        with pq.ParquetWriter(spill, ISSUES_SCHEMA.remove(ISSUES_SCHEMA.get_field_index("rank"))) as writer:
            for part in destination.committed_rows(_ROW_COLUMNS):
                rows += part.num_rows
                issues = flag_rows(part, thresholds)
                if issues.num_rows:
                    writer.write_table(issues)
                flagged += np.bincount(thresholds.index_of(issues.column("given_label").combine_chunks()),
                                       minlength=len(flagged))
        _rank(spill, out, work)
        destination.write_file(LABEL_ISSUES, out)
    if destination.exists(LABEL_ISSUES_BEFORE):  # an older label-issues' table, at DEST's top: globs met it
        destination.delete([LABEL_ISSUES_BEFORE])
    destination.write_hub_config(manifest["job"]["format"])
    return LabelIssues(destination.uri, rows, thresholds.labels.to_pylist(), thresholds.rows.tolist(), flagged.tolist())
