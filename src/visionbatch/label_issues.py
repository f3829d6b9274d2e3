"""Label issues: which given labels look wrong, found in bounded memory.

A row is flagged when the model's top-1 differs from its given label, or when the row
sits in a duplicate group (``visionbatch duplicates``) whose members give another label
more often than the row's own (or as often, and the model's top-1 is not the row's label
either): a duplicate conflict. Flagged rows are ranked by how
surprising the given label's probability (``true_label_score``, from the model's full
output, so known also where the label is outside the top-k) is for its class:

    typicality = log p(given) - expected log p(given) for the class
    expected   = (sum of log p over the class's other rows + PRIOR_ROWS * shared mean log p)
                 / (the class's other rows + PRIOR_ROWS)

lowest first. With one image per class (a long tail) expected is the shared mean and the
rank is the given label's probability; with tens per class it is measured against the
class's other rows (leave-one-out: a wrong row does not vouch for itself), so a class the
model finds hard does not crowd the top with rows whose labels are right. A duplicate
conflict lowers typicality by CONFLICT_WEIGHT. The suggested label is the class confident
learning (Northcutt et al.; cleanlab) picks, a top-k class other than the given one that
scores at least its own threshold (the mean probability the model gives the class over
the rows labelled with it) and more than the given label, else the model's top-1; for a
duplicate conflict, the label the group's other members give most.

Why not confident learning's flags alone: they require the other class to clear its
threshold, and with one or a few images per class the model is often right but not that
sure; its flags missed a third of the moved labels (benchmarks/RESULTS.md). Every flag
it raises is among ours (an other class scoring more than the given label means the
given label is not the top-1). Why not margin (top-1 score - given score): it ranks the
model's confident mistakes on correctly labelled images first.

pass 1  per class, the row count and the sums of ``true_label_score`` and of its log
        over its labelled rows (two columns read per part) -> thresholds, expectations
pass 2  per part, the rows the model disagrees with and the members of duplicate groups
        whose labels disagree (where ``DEST/_derived/duplicates/duplicates.parquet`` exists; picked
        out by a hash of the path), streamed to a spill file on local disk
rank    DuckDB joins the members with their groups' label votes, orders the flagged rows
        within a memory limit, spilling to disk, and writes
        ``DEST/_derived/label_issues.parquet``

Memory holds one part's columns, a few numbers per class and 8 bytes per member of a
group whose labels disagree; the joins and the sort are DuckDB's.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from visionbatch.destination import DUPLICATES, LABEL_ISSUES, LABEL_ISSUES_BEFORE, Destination
from visionbatch.errors import DestinationError
from visionbatch.manifest import ROWS_WITH_TRUE_LABEL_SCORE
from visionbatch.results import TRUE_LABEL_SCORE
from visionbatch.storage import Storage

# A class's threshold and expected log score are Bayesian averages: (the class's own sum +
# PRIOR_ROWS * the shared mean) / (its rows + PRIOR_ROWS). A class with one labelled row
# would otherwise take that one image's score as its bar, set by luck; with a prior of a
# few rows, a class's own rows outweigh the shared mean only once there are more of them.
PRIOR_ROWS = 5
# A duplicate whose given label its group outvotes counts as much as the model giving the
# label 1,000 times less probability than its class leads one to expect: near-identical
# images that people filed elsewhere are strong evidence, and the model may share the error.
CONFLICT_WEIGHT = math.log(1000)
SCORE_FLOOR = 1e-12  # log of a probability that underflowed to 0
SORT_MEMORY = "256MB"  # DuckDB's memory limit while ranking; beyond it, it spills to disk
MODEL_DISAGREES, DUPLICATE_CONFLICT = "model_disagrees", "duplicate_conflict"
ISSUES_SCHEMA = pa.schema([
    pa.field("path", pa.string()),
    pa.field("given_label", pa.string()),
    pa.field("suggested_label", pa.string()),
    pa.field("self_confidence", pa.float32()),  # the model's probability of the given label
    pa.field("reason", pa.string()),  # MODEL_DISAGREES or DUPLICATE_CONFLICT (the group outvotes the label)
    pa.field("rank", pa.int64()),  # 1 = most likely wrong
])
# Pass 2's rows: ISSUES_SCHEMA's first four, the rank's key, whether the model disagrees and
# a number of the row's own (a path may be listed twice).
SPILL_SCHEMA = pa.schema([*ISSUES_SCHEMA][:4] + [pa.field("typicality", pa.float64()), pa.field("disagrees", pa.bool_()),
                                                 pa.field("row_id", pa.int64())])
_SCORE_COLUMNS = ("true_label", TRUE_LABEL_SCORE)
_ROW_COLUMNS = ("path", *_SCORE_COLUMNS, "top_k_labels", "top_k_scores")


@dataclass(frozen=True)
class Thresholds:
    """Per class of the given labels (``labels``): its rows, its threshold and the sum of
    its log scores; the shared means that classes with few rows lean on and classes never
    given use."""

    labels: pa.Array  # the given labels, distinct
    rows: np.ndarray  # labelled rows per label
    thresholds: np.ndarray
    log_sums: np.ndarray  # sum of log true_label_score per label
    shared: float
    shared_log: float
    prior_rows: float

    @classmethod
    def from_parts(cls, parts: Iterable[pa.Table], prior_rows: float = PRIOR_ROWS) -> "Thresholds":
        """From the (true_label, true_label_score) columns of result rows, part by part."""
        sums = []
        for part in parts:
            scored = part.filter(pc.is_valid(part.column(TRUE_LABEL_SCORE)))
            # Summed in float64: float32 sums drift over millions of rows.
            score = scored.column(TRUE_LABEL_SCORE).cast(pa.float64())
            scored = pa.table({"true_label": scored.column("true_label"), "score": score,
                               "log_score": pc.ln(pc.max_element_wise(score, SCORE_FLOOR))})
            part_sums = scored.group_by("true_label").aggregate([("score", "sum"), ("score", "count"),
                                                                 ("log_score", "sum")])
            key = part_sums.schema.get_field_index("true_label")
            sums.append(part_sums.set_column(key, "true_label", part_sums.column(key).cast(pa.string())))
        total = pa.concat_tables(sums).group_by("true_label").aggregate(
            [("score_sum", "sum"), ("score_count", "sum"), ("log_score_sum", "sum")])
        rows = total.column("score_count_sum").to_numpy()
        if not rows.sum():
            raise DestinationError("no labelled rows with a true_label_score: label-issues needs the true labels "
                                   "(classify with --labels dirs or --label-column)")
        score_sums, log_sums = total.column("score_sum_sum").to_numpy(), total.column("log_score_sum_sum").to_numpy()
        shared = float(score_sums.sum() / rows.sum())
        return cls(total.column("true_label").combine_chunks(), rows,
                   (score_sums + prior_rows * shared) / (rows + prior_rows), log_sums, shared,
                   float(log_sums.sum() / rows.sum()), prior_rows)

    def index_of(self, labels: pa.Array) -> np.ndarray:
        """Each label's index into ``labels``; -1 for a label never given. Dictionary-encoded
        labels are looked up once per distinct name."""
        if pa.types.is_dictionary(labels.type):
            return self.index_of(labels.dictionary)[labels.indices.to_numpy()]
        return pc.fill_null(pc.index_in(labels, value_set=self.labels), -1).to_numpy(zero_copy_only=False)

    def typicality(self, given: np.ndarray, self_confidence: np.ndarray) -> np.ndarray:
        """log p(given) less the log its class's other rows lead one to expect (module
        docstring); ``given``: indices into ``labels``. Below 0: less than expected."""
        own = np.log(np.maximum(self_confidence.astype(np.float64), SCORE_FLOOR))
        others = self.rows[given] - 1
        return own - (self.log_sums[given] - own + self.prior_rows * self.shared_log) / (others + self.prior_rows)


def flag_rows(part: pa.Table, thresholds: Thresholds, also: np.ndarray | None = None) -> pa.Table:
    """The labelled rows of ``part`` whose top-1 is not the given label, and those ``also``
    marks (a mask over ``part``'s rows: members of duplicate groups whose labels disagree),
    with SPILL_SCHEMA's columns but ``row_id``."""
    scored = pc.fill_null(pc.and_(pc.is_valid(part.column(TRUE_LABEL_SCORE)),
                                  pc.greater(pc.list_value_length(part.column("top_k_labels")), 0)), False)
    rows = part.filter(scored)
    top_labels = rows.column("top_k_labels").combine_chunks()
    lengths = pc.list_value_length(top_labels).to_numpy(zero_copy_only=False)
    given = thresholds.index_of(rows.column("true_label").combine_chunks())
    self_confidence = rows.column(TRUE_LABEL_SCORE).to_numpy()
    owner = np.repeat(np.arange(rows.num_rows), lengths)
    labels = top_labels.flatten()
    classes = thresholds.index_of(labels)
    scores = rows.column("top_k_scores").combine_chunks().flatten().to_numpy()
    top = np.cumsum(lengths) - lengths  # each row's top-1 in ``labels`` (the top-k are best first)
    disagrees = classes[top] != given
    # Confident learning's suggestion: the best top-k class that clears its own threshold
    # and beats the given label (a row's first such), else the top-1.
    threshold = np.where(classes >= 0, thresholds.thresholds[classes], thresholds.shared)
    beats = (classes != given[owner]) & (scores >= threshold) & (scores > self_confidence[owner])
    hits = np.flatnonzero(beats)
    suggestion = top.copy()
    with_hit, first = np.unique(owner[hits], return_index=True)
    suggestion[with_hit] = hits[first]
    kept = np.flatnonzero(disagrees if also is None else disagrees | also[scored.to_numpy(zero_copy_only=False)])
    return pa.table({
        "path": rows.column("path").take(kept),
        "given_label": rows.column("true_label").take(kept).cast(pa.string()),
        "suggested_label": labels.take(suggestion[kept]).cast(pa.string()),
        "self_confidence": pa.array(self_confidence[kept], pa.float32()),
        "typicality": thresholds.typicality(given[kept], self_confidence[kept]),
        "disagrees": disagrees[kept],
    }, schema=SPILL_SCHEMA.remove(SPILL_SCHEMA.get_field_index("row_id")))


@dataclass
class LabelIssues:
    """What ``find_label_issues`` found: rows read, labelled rows and flagged rows per given
    label, flagged rows that a duplicate group's labels outvote."""

    dest: str
    rows: int
    labels: list[str]
    labelled: list[int]  # per label
    flagged: list[int]  # per label
    conflicts: int | None = None  # None: DEST has no duplicates table

    @property
    def total_flagged(self) -> int:
        return sum(self.flagged)

    def format(self, max_classes: int = 20) -> str:
        labelled = sum(self.labelled)
        share = self.total_flagged / labelled if labelled else 0.0
        lines = [f"label issues      {self.total_flagged:,} of {labelled:,} labelled rows ({share:.1%}; "
                 f"{self.rows:,} rows read) -> {self.dest}/{LABEL_ISSUES}"]
        if self.conflicts is not None:
            lines.append(f"duplicate groups  {self.conflicts:,} flagged rows outvoted by their group's labels "
                         f"({DUPLICATES})")
        worst = sorted((row for row in zip(self.flagged, self.labelled, self.labels) if row[0]),
                       key=lambda row: (-row[0], row[2]))
        if worst:
            lines.append(f"{'given label':<32} {'flagged':>9} {'labelled':>9}")
            lines += [f"{label[:32]:<32} {flagged:>9,} {of:>9,}" for flagged, of, label in worst[:max_classes]]
            if len(worst) > max_classes:
                lines.append(f"... and {len(worst) - max_classes} more classes with flagged rows")
        return "\n".join(lines)


def _quoted(path: str) -> str:
    return "'" + path.replace("'", "''") + "'"


def _connect(work: str):
    import duckdb

    db = duckdb.connect()
    db.execute(f"SET memory_limit = '{SORT_MEMORY}'")
    db.execute(f"SET temp_directory = {_quoted(work)}")
    db.execute("SET preserve_insertion_order = false")
    return db


class DuplicateConflicts:
    """The members of DEST's duplicate groups whose given labels disagree (``table``: a
    local copy of its duplicates table), each with the other labels of its group. Pass 2
    picks them out of each part by a hash of the path (8 bytes per such member held), so
    the spill holds them and the flagged rows, not every row."""

    def __init__(self, db, table: str):
        self.db = db
        # Each member, each other label of its group, and how many members give it and its own.
        self.other_labels = f"""
            WITH labelled AS (SELECT path, "group", given_label FROM read_parquet({_quoted(table)})
                              WHERE given_label IS NOT NULL),
                 votes AS (SELECT "group", given_label AS label, count(*) AS members FROM labelled GROUP BY ALL)
            SELECT m.path, v.label, v.members, own.members AS own_members
            FROM labelled m
            JOIN votes own ON own."group" = m."group" AND own.label = m.given_label
            JOIN votes v ON v."group" = m."group" AND v.label <> m.given_label"""
        self.hashes = np.sort(db.sql(f"SELECT DISTINCT hash(path) AS h FROM ({self.other_labels})").fetchnumpy()["h"])

    def may_hold(self, paths: pa.ChunkedArray) -> np.ndarray:
        """Which of ``paths`` may be members (a hash collision lets in a row the join drops)."""
        if not len(self.hashes):
            return np.zeros(len(paths), bool)
        self.db.register("part_paths", pa.table({"path": paths, "i": np.arange(len(paths))}))
        hashes = self.db.sql("SELECT hash(path) AS h FROM part_paths ORDER BY i").fetchnumpy()["h"]
        self.db.unregister("part_paths")
        order = np.argsort(hashes)  # sorted needles: searchsorted walks the table once, cache-friendly
        found = np.minimum(np.searchsorted(self.hashes, hashes[order]), len(self.hashes) - 1)
        members = np.empty(len(hashes), bool)
        members[order] = self.hashes[found] == hashes[order]
        return members

    def rows(self, spill: str) -> str:
        """The spill's rows with, for a member, the label its group's other members give
        most (ties: the model's suggestion, then by name) and whether it outvotes the row's
        own: more members give it, or as many and the model disagrees with the given label too."""
        return f"""
            WITH votes AS (SELECT s.row_id, m.label AS vote,
                                  m.members > m.own_members OR (m.members = m.own_members AND s.disagrees) AS conflict
                           FROM read_parquet({_quoted(spill)}) s JOIN ({self.other_labels}) m USING (path)
                           QUALIFY row_number() OVER (PARTITION BY s.row_id ORDER BY m.members DESC,
                                                      m.label = s.suggested_label DESC, m.label) = 1)
            SELECT s.*, vote, coalesce(conflict, false) AS conflict
            FROM read_parquet({_quoted(spill)}) s LEFT JOIN votes USING (row_id)"""


def _rank(db, rows: str, out: str) -> pa.Table:
    """Order the flagged ones of ``rows`` (a query: the spill's columns, ``vote`` and
    ``conflict``) and number them (module docstring) into ``out``: DuckDB's external sort
    within SORT_MEMORY. Returns the flagged rows per given label and reason."""
    db.execute(f"""
        COPY (SELECT path, given_label,
                     CASE WHEN conflict THEN vote ELSE suggested_label END AS suggested_label,
                     self_confidence,
                     CASE WHEN conflict THEN '{DUPLICATE_CONFLICT}' ELSE '{MODEL_DISAGREES}' END AS reason,
                     row_number() OVER (ORDER BY typicality - {CONFLICT_WEIGHT} * conflict::INT, path) AS rank
              FROM ({rows}) WHERE disagrees OR conflict ORDER BY rank)
        TO {_quoted(out)} (FORMAT parquet, COMPRESSION zstd)""")
    return db.sql(f"SELECT given_label, reason, count(*) AS flagged FROM read_parquet({_quoted(out)}) "
                  "GROUP BY ALL").to_arrow_table()


def find_label_issues(dest: str, s3_endpoint: str | None = None) -> LabelIssues:
    """Flag the rows of a finished DEST whose given label looks wrong (module docstring)
    and write them, ranked, to ``DEST/_derived/label_issues.parquet``."""
    destination = Destination(dest, Storage(s3_endpoint))
    manifest = destination.finished_manifest()
    if manifest.get("version", 0) < ROWS_WITH_TRUE_LABEL_SCORE:
        raise DestinationError(f"{destination.uri} was written by an older visionbatch, whose rows lack "
                               f"{TRUE_LABEL_SCORE}: classify again (into a new DEST, or with --overwrite)")
    thresholds = Thresholds.from_parts(destination.committed_rows(_SCORE_COLUMNS))
    rows = spilled = 0
    with tempfile.TemporaryDirectory(prefix="visionbatch-label-issues-") as work, _connect(work) as db:
        spill, out = os.path.join(work, "flagged.parquet"), os.path.join(work, "ranked.parquet")
        conflicts = None
        if destination.exists(DUPLICATES):
            destination.copy_file(DUPLICATES, os.path.join(work, "duplicates.parquet"))
            conflicts = DuplicateConflicts(db, os.path.join(work, "duplicates.parquet"))
        with pq.ParquetWriter(spill, SPILL_SCHEMA) as writer:
            for part in destination.committed_rows(_ROW_COLUMNS):
                rows += part.num_rows
                members = conflicts.may_hold(part.column("path")) if conflicts else None
                candidates = flag_rows(part, thresholds, members)
                if candidates.num_rows:
                    row_ids = np.arange(spilled, spilled + candidates.num_rows)
                    writer.write_table(candidates.append_column("row_id", pa.array(row_ids)))
                    spilled += candidates.num_rows
        counts = _rank(db, conflicts.rows(spill) if conflicts else
                       f"SELECT *, NULL AS vote, false AS conflict FROM read_parquet({_quoted(spill)})", out)
        destination.write_file(LABEL_ISSUES, out)
    if destination.exists(LABEL_ISSUES_BEFORE):  # an older label-issues' table, at DEST's top: globs met it
        destination.delete([LABEL_ISSUES_BEFORE])
    destination.write_hub_config(manifest["job"]["format"])
    flagged = np.zeros(len(thresholds.labels), dtype=np.int64)
    np.add.at(flagged, thresholds.index_of(counts.column("given_label").combine_chunks()),
              counts.column("flagged").to_numpy())
    outvoted = pc.sum(counts.filter(pc.equal(counts.column("reason"), DUPLICATE_CONFLICT)).column("flagged"))
    return LabelIssues(destination.uri, rows, thresholds.labels.to_pylist(), thresholds.rows.tolist(),
                       flagged.tolist(), (outvoted.as_py() or 0) if conflicts else None)
