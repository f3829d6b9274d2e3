"""Evaluation: accuracy, per-class metrics, confusion and calibration of a job's results.

``evaluate_dest(DEST)`` computes the metrics below from the counts DEST's manifest
added up shard by shard (after checking the committed part files) and writes them to
``DEST/_metrics.json``.

Which rows count: a row with an ``error`` is an *error*; a row without an error but with
no ``true_label`` is *unlabelled*; the rest are *labelled* and are the only rows that
enter accuracy, per-class metrics, the confusion matrix and calibration.
``rows == labelled + unlabelled + errors``.

Metrics come from the counts of :mod:`visionbatch.counts` (small, JSON-safe, merged
shard by shard): ``metrics_from_counts`` turns the counts of all rows into the metrics;
``compute_metrics(rows)`` is ``metrics_from_counts(metric_counts(rows))``.

_metrics.json schema (``schema_version`` 1); every ratio is a float in [0, 1] or ``null``
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
    reviewed                 only with ``--reviewed FILE`` (a Label Studio JSON export of
                             reviewed tasks, :mod:`visionbatch.labelstudio`): {tasks,
                             skipped, unanswered, reviewed: paths given a label, rows: DEST's
                             rows of those paths (error rows left out), not_in_dest: reviewed
                             paths DEST has no row of, model_right: rows whose label is the
                             reviewed one, model_accuracy, given: rows with a true_label,
                             given_right: those whose true_label is the reviewed one,
                             given_accuracy, unknown_labels: {reviewed label that is none of
                             the model's classes: paths}}
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa

from visionbatch.counts import CALIBRATION_BINS, CALIBRATION_EDGES, metric_counts
from visionbatch.destination import METRICS_FILE, Destination
from visionbatch.errors import DestinationError
from visionbatch.labelstudio import Reviews, read_reviews

SCHEMA_VERSION = 1
REVIEWED = "reviewed"  # the figures against reviewed labels, where asked


def _divide(numerator: float, denominator: int) -> float | None:
    """numerator / denominator, or None when there is nothing to divide over."""
    return numerator / denominator if denominator else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _calibration(bins: dict[str, list], labelled: int) -> tuple[float | None, list[dict]]:
    count = np.array(bins["count"], dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.array(bins["correct"], dtype=np.float64) / count
        confidence = np.array(bins["score_sum"], dtype=np.float64) / count
    rows = [
        {
            "lo": float(CALIBRATION_EDGES[b]),
            "hi": float(CALIBRATION_EDGES[b + 1]),
            "count": int(count[b]),
            "accuracy": float(accuracy[b]) if count[b] else None,
            "confidence": float(confidence[b]) if count[b] else None,
        }
        for b in range(CALIBRATION_BINS)
    ]
    if not labelled:
        return None, rows
    filled = count > 0
    ece = float(np.sum(np.abs(accuracy[filled] - confidence[filled]) * count[filled]) / labelled)
    return ece, rows


def _per_class(confusion: dict[str, dict[str, int]]) -> list[dict]:
    """Per-class rows from the confusion cells, with sklearn's precision_recall_fscore_support
    values (zero_division=0)."""
    support: dict[str, int] = {}
    predicted: dict[str, int] = {}
    true_positives: dict[str, int] = {}
    for true, row in confusion.items():
        support[true] = sum(row.values())
        true_positives[true] = row.get(true, 0)
        for label, count in row.items():
            predicted[label] = predicted.get(label, 0) + count
    per_class = []
    for label in sorted(support.keys() | predicted.keys()):
        n_true, n_predicted, hits = support.get(label, 0), predicted.get(label, 0), true_positives.get(label, 0)
        per_class.append({
            "label": label,
            "precision": hits / n_predicted if n_predicted else 0.0,
            "recall": hits / n_true if n_true else 0.0,
            # F1 as 2TP / (support + predicted), never 0 / 0: every class listed has a row.
            "f1": 2 * hits / (n_true + n_predicted),
            "support": n_true,
            "predicted": n_predicted,
        })
    return per_class


def _confusion(confusion: dict[str, dict[str, int]], per_class: list[dict], max_classes: int) -> dict:
    classes = [c["label"] for c in per_class]
    kept = classes
    if len(classes) > max_classes:  # _metrics.json would hold up to classes² cells
        involvement = {c["label"]: c["support"] + c["predicted"] for c in per_class}
        kept = sorted(sorted(classes, key=lambda c: -involvement[c])[:max_classes])
    kept_set = set(kept)
    entries = [
        [true, predicted, count]
        for true, row in confusion.items() if true in kept_set
        for predicted, count in row.items() if predicted in kept_set
    ]
    entries.sort(key=lambda entry: (-entry[2], entry[0], entry[1]))
    return {"labels": kept, "entries": entries, "omitted_classes": len(classes) - len(kept)}


def metrics_from_counts(counts: dict, max_classes: int = 1000) -> dict:
    """The metrics (module docstring) of all the rows that ``counts`` counted."""
    labelled, right = counts["labelled"], counts["top1_hits"]
    metrics: dict = {
        "schema_version": SCHEMA_VERSION,
        "rows": counts["rows"],
        "labelled": labelled,
        "unlabelled": counts["rows"] - counts["errors"] - labelled,
        "errors": counts["errors"],
        "errors_by_kind": dict(sorted(counts["errors_by_kind"].items())),
        "top_k": counts["top_k"],
        "top1": _divide(right, labelled),
        "top5": _divide(counts["top5_hits"], labelled),
        "mean_confidence_correct": _divide(counts["score_sum_correct"], right),
        "mean_confidence_wrong": _divide(counts["score_sum_wrong"], labelled - right),
    }
    metrics["ece"], metrics["calibration_bins"] = _calibration(counts["calibration_bins"], labelled)
    per_class = _per_class(counts["confusion"])
    for name in ("precision", "recall", "f1"):
        metrics[f"macro_{name}"] = _mean([c[name] for c in per_class])
    metrics["per_class"] = per_class
    metrics["confusion"] = _confusion(counts["confusion"], per_class, max_classes)
    return metrics


def compute_metrics(table: pa.Table, max_classes: int = 1000) -> dict:
    """Metrics of result rows (RESULT_SCHEMA); see the module docstring for the keys."""
    return metrics_from_counts(metric_counts(table), max_classes)


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
    if REVIEWED in metrics:
        lines.append(format_reviewed(metrics[REVIEWED]))
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


def reviewed_metrics(destination: Destination, reviews: Reviews) -> dict:
    """How the model's labels and the given labels of DEST's reviewed rows fare against
    the reviewed labels (the schema's ``reviewed``): a pass over a few columns of one part
    file at a time."""
    import pyarrow.compute as pc

    from visionbatch.plan import recorded_classes

    found: set[str] = set()
    rows = model_right = given = given_right = 0
    for part in destination.committed_rows(("path", "label", "true_label", "error")):
        reviewed = reviews.lookup(part.column("path"))
        kept = pc.and_(pc.is_valid(reviewed), pc.is_null(part.column("error")))
        part, reviewed = part.filter(kept), reviewed.filter(kept)
        found.update(part.column("path").to_pylist())
        rows += part.num_rows
        # Class names come dictionary-encoded: compare them as text.
        label, true_label = (part.column(name).cast(pa.string()) for name in ("label", "true_label"))
        model_right += pc.sum(pc.equal(label, reviewed)).as_py() or 0
        given += pc.sum(pc.is_valid(true_label)).as_py() or 0
        given_right += pc.sum(pc.equal(true_label, reviewed)).as_py() or 0
    classes = recorded_classes(destination.finished_manifest()["job"])
    return {"tasks": reviews.tasks, "skipped": reviews.skipped, "unanswered": reviews.unanswered,
            "reviewed": reviews.labels.num_rows, "rows": rows,
            "not_in_dest": len(set(reviews.labels.column("path").to_pylist()) - found),
            "model_right": model_right, "model_accuracy": _divide(model_right, rows),
            "given": given, "given_right": given_right, "given_accuracy": _divide(given_right, given),
            "unknown_labels": None if classes is None else reviews.unknown(classes)}


def format_reviewed(reviewed: dict) -> str:
    """The reviewed figures as text."""
    lines = [f"reviewed           {reviewed['rows']} rows ({reviewed['reviewed']} paths reviewed of "
             f"{reviewed['tasks']} tasks: {reviewed['skipped']} skipped, {reviewed['unanswered']} unanswered; "
             f"{reviewed['not_in_dest']} not in DEST)",
             f"  model right      {_ratio(reviewed['model_accuracy'])}  ({reviewed['model_right']}/{reviewed['rows']})",
             f"  given right      {_ratio(reviewed['given_accuracy'])}  ({reviewed['given_right']}/{reviewed['given']}"
             " with a given label)"]
    unknown = reviewed["unknown_labels"]
    if unknown:
        lines.append("  not the model's  " + ", ".join(f"{label!r} ({count})" for label, count in unknown.items()))
    elif unknown is None:
        lines.append("  not the model's  unknown: its classes could not be loaded")
    return "\n".join(lines)


def evaluate_dest(dest: str, s3_endpoint: str | None = None, verify: bool = True, must_write: bool = True,
                  reviewed: str | None = None) -> dict:
    """The metrics of DEST's results, written to DEST/_metrics.json: from the counts the
    manifest adds up shard by shard (no pass over the rows), after checking that every
    committed part file is there and whole (``verify``); ``reviewed``: a Label Studio JSON
    export of reviewed tasks, the figures of the rows it reviewed added. ``must_write=False``: a
    _metrics.json that cannot be written (a full disk) is a warning, not an error."""
    destination = Destination(dest, s3_endpoint)
    counts = destination.committed_metric_counts(verify=verify)
    metrics = metrics_from_counts(counts)
    if reviewed:
        metrics[REVIEWED] = reviewed_metrics(destination, read_reviews(reviewed, destination.storage))
    try:
        destination.write_bytes(METRICS_FILE, json.dumps(metrics, indent=1).encode())
    except DestinationError as err:
        if must_write:
            raise
        logging.getLogger("visionbatch").warning("the results are complete, but %s", err)
    return metrics
