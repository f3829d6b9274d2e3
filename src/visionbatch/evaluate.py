"""Evaluation: accuracy, per-class metrics, confusion and calibration of a job's results.

``evaluate_dest(DEST)`` reads the committed result rows of DEST, computes the metrics
below and writes them to ``DEST/metrics.json``.

Which rows count: a row with an ``error`` is an *error*; a row without an error but with
no ``true_label`` is *unlabelled*; the rest are *labelled* and are the only rows that
enter accuracy, per-class metrics, the confusion matrix and calibration.
``rows == labelled + unlabelled + errors``.

metrics.json schema (``schema_version`` 1); every ratio is a float in [0, 1] or ``null``
when there is nothing to compute it over (e.g. no labelled rows)::

    schema_version           1
    rows                     int, all result rows
    labelled                 int, rows with a true label and no error
    unlabelled               int, rows without a true label and without error
    errors                   int, rows with an error
    errors_by_kind           {kind: int}; kind is the error text before the first ":"
    top_k                    int, longest top_k_labels list (top5 looks at most this deep)
    top1                     float|null, label == true_label over labelled rows
    top5                     float|null, true_label in the first 5 top_k_labels
    macro_precision          float|null, unweighted mean over per_class
    macro_recall             float|null
    macro_f1                 float|null
    mean_confidence_correct  float|null, mean top-1 score of right predictions
    mean_confidence_wrong    float|null, mean top-1 score of wrong predictions
    ece                      float|null, expected calibration error:
                             sum over bins |accuracy - mean score| * bin count / labelled
    calibration_bins         [{lo, hi, count, accuracy, confidence}], 15 equal-width bins
                             of the top-1 score, (lo, hi] (the first also holds 0);
                             accuracy/confidence are null for an empty bin
    per_class                [{label, precision, recall, f1, support, predicted}], sorted
                             by label; classes = true labels and predicted labels of
                             labelled rows; support = labelled rows of that true class,
                             predicted = labelled rows predicted as it; a class never
                             predicted has precision 0
    confusion                {labels: [str], entries: [[true, predicted, count]],
                             omitted_classes: int}: the non-zero cells (diagonal
                             included), largest count first, over ``labels``; when there
                             are more than max_classes classes only the max_classes
                             involved in the most rows are kept and omitted_classes says
                             how many were left out (their cells are not listed)
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from visionbatch.sinks import Destination, read_results

SCHEMA_VERSION = 1
CALIBRATION_BINS = 15
METRICS_FILE = "metrics.json"


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _error_counts(errors: pa.ChunkedArray) -> dict[str, int]:
    failed = pc.drop_null(errors)
    if not len(failed):
        return {}
    kinds = pc.list_element(pc.split_pattern(failed, ":", max_splits=1), 0)
    counted = pc.value_counts(kinds)
    return dict(sorted(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())))


def _top5_hits(top_k_labels: pa.ChunkedArray, truths: pa.ChunkedArray) -> np.ndarray:
    """Whether each row's true label is among its first five top-k labels."""
    first5 = pc.list_slice(top_k_labels, 0, 5)
    flat = pc.list_flatten(first5)
    parents = pc.list_parent_indices(first5)
    hits = pc.equal(flat, pc.take(truths, parents)).to_numpy(zero_copy_only=False)
    rows_hit = np.bincount(parents.to_numpy(zero_copy_only=False)[hits.astype(bool)], minlength=len(truths))
    return rows_hit > 0


def _calibration(scores: np.ndarray, correct: np.ndarray) -> tuple[float | None, list[dict]]:
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    # Bins are (lo, hi]; a score of exactly 0 goes to the first bin.
    bin_of = np.clip(np.searchsorted(edges, scores, side="left") - 1, 0, CALIBRATION_BINS - 1)
    counts = np.bincount(bin_of, minlength=CALIBRATION_BINS)
    right = np.bincount(bin_of, weights=correct, minlength=CALIBRATION_BINS)
    score_sum = np.bincount(bin_of, weights=scores, minlength=CALIBRATION_BINS)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy, confidence = right / counts, score_sum / counts
    bins = [
        {
            "lo": float(edges[b]),
            "hi": float(edges[b + 1]),
            "count": int(counts[b]),
            "accuracy": float(accuracy[b]) if counts[b] else None,
            "confidence": float(confidence[b]) if counts[b] else None,
        }
        for b in range(CALIBRATION_BINS)
    ]
    if not scores.size:
        return None, bins
    filled = counts > 0
    ece = float(np.sum(np.abs(accuracy[filled] - confidence[filled]) * counts[filled]) / scores.size)
    return ece, bins


def compute_metrics(table: pa.Table, max_classes: int = 1000) -> dict:
    """Metrics of result rows (RESULT_SCHEMA); see the module docstring for the keys."""
    errors = table.column("error")
    ok = pc.is_null(errors)
    labelled_mask = pc.and_(ok, pc.is_valid(table.column("true_label")))
    labelled = table.filter(labelled_mask)
    n_labelled, n_errors = labelled.num_rows, len(errors) - errors.null_count

    truths = labelled.column("true_label")
    y_true = np.asarray(truths.to_pylist(), dtype=object)
    # A row without an error always has a prediction; the stand-in only guards odd input.
    y_pred = np.asarray(pc.fill_null(labelled.column("label"), "<no prediction>").to_pylist(), dtype=object)
    scores = pc.fill_null(labelled.column("score"), 0.0).to_numpy(zero_copy_only=False).astype(np.float64)
    correct = y_true == y_pred
    top_k = pc.max(pc.list_value_length(table.column("top_k_labels"))).as_py() if table.num_rows else None

    metrics: dict = {
        "schema_version": SCHEMA_VERSION,
        "rows": table.num_rows,
        "labelled": n_labelled,
        "unlabelled": table.num_rows - n_errors - n_labelled,
        "errors": n_errors,
        "errors_by_kind": _error_counts(errors),
        "top_k": top_k or 0,
        "top1": _mean(correct.astype(np.float64)),
        "top5": _mean(_top5_hits(labelled.column("top_k_labels"), truths).astype(np.float64)) if n_labelled else None,
        "mean_confidence_correct": _mean(scores[correct]),
        "mean_confidence_wrong": _mean(scores[~correct]),
    }
    metrics["ece"], metrics["calibration_bins"] = _calibration(scores, correct.astype(np.float64))

    classes = sorted(set(y_true) | set(y_pred))
    per_class: list[dict] = []
    confusion = {"labels": [], "entries": [], "omitted_classes": 0}
    if classes:
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=classes, zero_division=0
        )
        predicted = dict(zip(*np.unique(y_pred, return_counts=True)))
        per_class = [
            {
                "label": label,
                "precision": float(p),
                "recall": float(r),
                "f1": float(f),
                "support": int(s),
                "predicted": int(predicted.get(label, 0)),
            }
            for label, p, r, f, s in zip(classes, precision, recall, f1, support)
        ]
        kept = classes
        if len(classes) > max_classes:  # a dense matrix over every class could be huge
            involvement = {c["label"]: c["support"] + c["predicted"] for c in per_class}
            kept = sorted(sorted(classes, key=lambda c: -involvement[c])[:max_classes])
        with warnings.catch_warnings():  # sklearn warns about any 1x1 matrix, even one asked for
            warnings.filterwarnings("ignore", message="A single label was found")
            matrix = confusion_matrix(y_true, y_pred, labels=kept)
        rows, cols = np.nonzero(matrix)
        order = np.lexsort((cols, rows, -matrix[rows, cols]))
        confusion = {
            "labels": list(kept),
            "entries": [[kept[rows[i]], kept[cols[i]], int(matrix[rows[i], cols[i]])] for i in order],
            "omitted_classes": len(classes) - len(kept),
        }
    metrics["macro_precision"] = _mean(np.array([c["precision"] for c in per_class]))
    metrics["macro_recall"] = _mean(np.array([c["recall"] for c in per_class]))
    metrics["macro_f1"] = _mean(np.array([c["f1"] for c in per_class]))
    metrics["per_class"] = per_class
    metrics["confusion"] = confusion
    return metrics


def _ratio(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{value * 100:.1f}%" if percent else f"{value:.3f}"


def worst_classes_first(per_class: list[dict]) -> list[dict]:
    """Per-class rows by F1, lowest first; among equals the larger class first."""
    return sorted(per_class, key=lambda c: (c["f1"], -c["support"], c["label"]))


def format_metrics(metrics: dict, max_rows: int = 20) -> str:
    """A plain-text report: headline numbers, then per-class rows worst first."""
    n = metrics["labelled"]
    errors = metrics["errors"]
    kinds = ", ".join(f"{k}: {v}" for k, v in metrics["errors_by_kind"].items())
    lines = [
        f"top-1 accuracy     {_ratio(metrics['top1'])}" + (f"  ({round(metrics['top1'] * n)}/{n})" if n else ""),
        f"top-5 accuracy     {_ratio(metrics['top5'])}",
        f"macro F1           {_ratio(metrics['macro_f1'], percent=False)}",
        f"ECE (15 bins)      {_ratio(metrics['ece'], percent=False)}",
        f"mean confidence    right {_ratio(metrics['mean_confidence_correct'], False)}"
        f"   wrong {_ratio(metrics['mean_confidence_wrong'], False)}",
        f"rows               {metrics['rows']}  (labelled {n}, unlabelled {metrics['unlabelled']}, "
        f"errors {errors}{f': {kinds}' if errors else ''})",
    ]
    per_class = worst_classes_first(metrics["per_class"])
    if per_class:
        width = max(5, *(len(c["label"]) for c in per_class[:max_rows]))
        lines += ["", f"{'class':<{width}}  precision  recall     f1  support  predicted"]
        for c in per_class[:max_rows]:
            lines.append(
                f"{c['label']:<{width}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:5.3f}"
                f"  {c['support']:7d}  {c['predicted']:9d}"
            )
        if len(per_class) > max_rows:
            more = len(per_class) - max_rows
            lines.append(f"... {more} more class{'es' if more > 1 else ''}")
    return "\n".join(lines)


def evaluate_dest(dest: str, s3_endpoint: str | None = None) -> dict:
    """Compute the metrics of DEST's results and write them to DEST/metrics.json."""
    metrics = compute_metrics(read_results(dest, s3_endpoint))
    Destination(dest, s3_endpoint).write_bytes(METRICS_FILE, json.dumps(metrics, indent=1).encode())
    return metrics
