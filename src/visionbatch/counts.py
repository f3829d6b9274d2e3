"""Counting result rows for metrics: the pure part that the writer (a shard's counts,
kept in the manifest), the summary and ``evaluate`` (the metrics) all use.

Metrics come from counts, so that a job never has to re-read its rows:
``metric_counts(rows)`` turns any slice of result rows (a shard) into small, JSON-safe
counts; ``merge_counts`` adds counts of disjoint slices (associative, in any order);
``evaluate.metrics_from_counts`` turns the counts of all rows into the metrics. The counts::

    rows, labelled, errors   int
    errors_by_kind           {kind: int}
    top_k                    int, longest top_k_labels list (merged by max)
    top1_hits, top5_hits     int, labelled rows right at top-1 / within the first 5
    score_sum_correct        float, sum of the top-1 score of right predictions
    score_sum_wrong          float, the same over wrong predictions
    calibration_bins         {count: [int], correct: [int], score_sum: [float]}, one
                             entry per bin (CALIBRATION_BINS equal-width bins of the top-1 score)
    confusion                {true label: {predicted label: int}}, labelled rows only;
                             per-class support, predicted and true positives are its
                             row sums, column sums and diagonal
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visionbatch.results import RESULT_SCHEMA

CALIBRATION_BINS = 15
# Bins of the top-1 score are (lo, hi]; a score of exactly 0 goes to the first bin.
CALIBRATION_EDGES = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
# A row without an error always has a prediction; this stand-in only guards odd input.
NO_PREDICTION = "<no prediction>"
# Counts that merge by addition; top_k (a max) and the dict and list counts merge apart.
SUMMED_COUNTS = ("rows", "labelled", "errors", "top1_hits", "top5_hits", "score_sum_correct", "score_sum_wrong")


def _error_counts(errors: pa.ChunkedArray) -> dict[str, int]:
    failed = pc.drop_null(errors)
    if not len(failed):
        return {}
    kinds = pc.list_element(pc.split_pattern(failed, ":", max_splits=1), 0)
    counted = pc.value_counts(kinds)
    return dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist()))


def _top5_hits(top_k_labels: pa.ChunkedArray, truths: pa.ChunkedArray) -> int:
    """How many rows have their true label among their first five top-k labels."""
    first5 = pc.list_slice(top_k_labels, 0, 5)
    parents = pc.list_parent_indices(first5)
    matches = pc.equal(pc.list_flatten(first5), pc.take(truths, parents))
    # Count rows, not matches: a row may list its true label twice.
    return pc.count_distinct(pc.filter(parents, matches)).as_py()


def _calibration_counts(scores: np.ndarray, correct: np.ndarray) -> dict[str, list]:
    bin_of = np.clip(np.searchsorted(CALIBRATION_EDGES, scores, side="left") - 1, 0, CALIBRATION_BINS - 1)
    return {
        "count": np.bincount(bin_of, minlength=CALIBRATION_BINS).tolist(),
        "correct": np.bincount(bin_of[correct], minlength=CALIBRATION_BINS).tolist(),
        "score_sum": np.bincount(bin_of, weights=scores, minlength=CALIBRATION_BINS).tolist(),
    }


def _confusion_counts(truths: pa.ChunkedArray, predictions: pa.ChunkedArray) -> dict[str, dict[str, int]]:
    cells = pa.table({"true": truths, "predicted": predictions}).group_by(["true", "predicted"]).aggregate(
        [([], "count_all")]
    )
    confusion: dict[str, dict[str, int]] = {}
    for true, predicted, count in zip(*(cells.column(name).to_pylist() for name in ("true", "predicted", "count_all"))):
        confusion.setdefault(true, {})[predicted] = count
    return confusion


def metric_counts(table: pa.Table) -> dict:
    """The counts (module docstring) of result rows (RESULT_SCHEMA), e.g. of one shard.

    JSON-safe, and small: they grow with the classes met, not with the rows.
    """
    errors = table.column("error")
    labelled = table.filter(pc.and_(pc.is_null(errors), pc.is_valid(table.column("true_label"))))
    truths = labelled.column("true_label")
    predictions = pc.fill_null(labelled.column("label"), NO_PREDICTION)
    correct = pc.equal(truths, predictions).to_numpy(zero_copy_only=False)
    scores = pc.fill_null(labelled.column("score"), 0.0).to_numpy(zero_copy_only=False).astype(np.float64)
    return {
        "rows": table.num_rows,
        "labelled": labelled.num_rows,
        "errors": len(errors) - errors.null_count,
        "errors_by_kind": _error_counts(errors),
        "top_k": pc.max(pc.list_value_length(table.column("top_k_labels"))).as_py() or 0,
        "top1_hits": int(correct.sum()),
        "top5_hits": _top5_hits(labelled.column("top_k_labels"), truths),
        "score_sum_correct": float(scores[correct].sum()),
        "score_sum_wrong": float(scores[~correct].sum()),
        "calibration_bins": _calibration_counts(scores, correct),
        "confusion": _confusion_counts(truths, predictions),
    }


def _add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    total = dict(a)
    for key, count in b.items():
        total[key] = total.get(key, 0) + count
    return total


def merge_counts(a: dict | None, b: dict | None) -> dict:
    """The counts of two disjoint sets of rows together, as a new dict (neither argument
    changes). Associative and commutative, up to float rounding and key order, so shards
    merge in any order; ``None`` or ``{}`` stands for no rows, a start for a running total.
    """
    if not a or not b:
        no_rows = metric_counts(RESULT_SCHEMA.empty_table())
        a, b = a or no_rows, b or no_rows
    merged = {key: a[key] + b[key] for key in SUMMED_COUNTS}
    merged["top_k"] = max(a["top_k"], b["top_k"])
    merged["errors_by_kind"] = _add(a["errors_by_kind"], b["errors_by_kind"])
    a_bins, b_bins = a["calibration_bins"], b["calibration_bins"]
    merged["calibration_bins"] = {name: [x + y for x, y in zip(a_bins[name], b_bins[name])] for name in a_bins}
    a_cells, b_cells = a["confusion"], b["confusion"]
    merged["confusion"] = {true: _add(a_cells.get(true, {}), b_cells.get(true, {})) for true in {**a_cells, **b_cells}}
    return merged
