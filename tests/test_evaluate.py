"""Metrics against small cases computed by hand, and metrics merged from counts of chunks."""

import copy
import functools
import json
import random

import numpy as np
import pyarrow as pa
import pytest

from visionbatch.counts import merge_counts, metric_counts
from visionbatch.evaluate import compute_metrics, evaluate_dest, format_metrics, metrics_from_counts
from conftest import write_finished_dest
from visionbatch.destination import METRICS_FILE, Destination
from visionbatch.results import RESULT_SCHEMA


def make_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def prediction(true, label, score, top_k=None):
    return {"path": f"/img/{true}-{label}-{score}.jpg", "label": label, "score": score,
            "top_k_labels": top_k or [label], "true_label": true}


# Classes cat, dog, fox; fox is never predicted. Scores avoid the 1/15 bin edges.
MIXED = [
    prediction("cat", "cat", 0.90, ["cat", "dog", "fox", "a", "b"]),  # right
    prediction("cat", "dog", 0.62, ["dog", "cat"]),  # wrong, top-5 hit
    prediction("dog", "dog", 0.81),  # right
    prediction("dog", "cat", 0.71, ["cat", "a", "b", "c", "d", "dog"]),  # wrong, dog 6th: top-5 miss
    prediction("fox", "dog", 0.43, ["dog", "cat", "fox"]),  # wrong, top-5 hit
    prediction(None, "cat", 0.95),  # unlabelled
    {"path": "/img/broken.jpg", "error": "decode: bad header", "true_label": "cat"},
    {"path": "/img/missing.jpg", "error": "read: no such file"},
    {"path": "/img/short.jpg", "error": "decode: truncated"},
]


@pytest.fixture(scope="module")
def mixed():
    return compute_metrics(make_table(MIXED))


def test_counts(mixed):
    assert (mixed["rows"], mixed["labelled"], mixed["unlabelled"], mixed["errors"]) == (9, 5, 1, 3)
    assert mixed["errors_by_kind"] == {"decode": 2, "read": 1}
    assert mixed["schema_version"] == 1


def test_the_summary_counts_each_row_as_the_metrics_do(mixed):
    """A row with an error is an error, never also unlabelled (a URL that answered 404
    has no true label: the summary once counted it as both)."""
    from visionbatch.summary import Summary, shard_counts

    summary = Summary(model="m", device="cpu", dtype="float32")
    summary.add_shard(len(MIXED), shard_counts(make_table(MIXED)))
    assert ((summary.images_found, summary.labelled, summary.unlabelled, summary.failed, summary.errors_by_kind)
            == (mixed["rows"], mixed["labelled"], mixed["unlabelled"], mixed["errors"], mixed["errors_by_kind"]))
    assert (summary.top1, summary.top5) == (mixed["top1"], mixed["top5"])
    assert summary.unmapped_folders == ["img"]


def test_accuracy_excludes_errors_and_unlabelled(mixed):
    assert mixed["top1"] == pytest.approx(2 / 5)
    assert mixed["top5"] == pytest.approx(4 / 5)


def test_per_class(mixed):
    per_class = {c["label"]: c for c in mixed["per_class"]}
    assert list(per_class) == ["cat", "dog", "fox"]
    # cat: predicted for rows 1 and 4, truly cat in rows 1 and 2, right once.
    assert per_class["cat"] == {"label": "cat", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "predicted": 2}
    # dog: predicted for rows 2, 3, 5; truly dog in 3 and 4; right once. F1 = 2PR/(P+R) = 0.4
    assert per_class["dog"]["precision"] == pytest.approx(1 / 3)
    assert per_class["dog"]["recall"] == pytest.approx(1 / 2)
    assert per_class["dog"]["f1"] == pytest.approx(0.4)
    # fox is never predicted: precision 0 rather than undefined.
    assert per_class["fox"] == {"label": "fox", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 0}
    assert mixed["macro_f1"] == pytest.approx((0.5 + 0.4 + 0.0) / 3)


def test_confusion_triples(mixed):
    confusion = mixed["confusion"]
    assert confusion["labels"] == ["cat", "dog", "fox"]
    assert sorted(map(tuple, confusion["entries"])) == [
        ("cat", "cat", 1), ("cat", "dog", 1), ("dog", "cat", 1), ("dog", "dog", 1), ("fox", "dog", 1)
    ]
    assert confusion["omitted_classes"] == 0


def test_confidence_and_ece(mixed):
    assert mixed["mean_confidence_correct"] == pytest.approx((0.90 + 0.81) / 2)
    assert mixed["mean_confidence_wrong"] == pytest.approx((0.62 + 0.71 + 0.43) / 3)
    # Each labelled score falls in its own bin: ECE = mean |correct - score|.
    assert mixed["ece"] == pytest.approx((0.10 + 0.62 + 0.19 + 0.71 + 0.43) / 5)
    assert sum(b["count"] for b in mixed["calibration_bins"]) == 5
    assert len(mixed["calibration_bins"]) == 15


def test_ece_with_a_shared_bin():
    # 0.90 and 0.92 share bin (14/15 - 1/15, 14/15]: accuracy 0.5, confidence 0.91.
    # 0.30 is alone in its bin: accuracy 1. ECE = |0.5 - 0.91| * 2/3 + |1 - 0.30| * 1/3.
    metrics = compute_metrics(make_table([
        prediction("cat", "cat", 0.90), prediction("cat", "dog", 0.92), prediction("dog", "dog", 0.30),
    ]))
    assert metrics["ece"] == pytest.approx(0.41 * 2 / 3 + 0.70 / 3)
    shared = next(b for b in metrics["calibration_bins"] if b["count"] == 2)
    assert (shared["accuracy"], shared["confidence"]) == (0.5, pytest.approx(0.91))


def test_single_class():
    metrics = compute_metrics(make_table([prediction("cat", "cat", s) for s in (0.5, 0.7, 0.9)]))
    assert metrics["top1"] == metrics["top5"] == 1.0
    assert metrics["per_class"] == [{"label": "cat", "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3, "predicted": 3}]
    assert metrics["confusion"]["entries"] == [["cat", "cat", 3]]
    assert metrics["mean_confidence_wrong"] is None
    assert metrics["ece"] == pytest.approx(1 - 0.7)


def test_no_labelled_rows():
    metrics = compute_metrics(make_table(MIXED[5:]))
    assert (metrics["labelled"], metrics["unlabelled"], metrics["errors"]) == (0, 1, 3)
    for key in ("top1", "top5", "ece", "macro_f1", "mean_confidence_correct", "mean_confidence_wrong"):
        assert metrics[key] is None, key
    assert metrics["per_class"] == [] and metrics["confusion"]["entries"] == []
    assert "n/a" in format_metrics(metrics)


def test_empty_table():
    metrics = compute_metrics(RESULT_SCHEMA.empty_table())
    assert metrics["rows"] == 0 and metrics["top1"] is None


def test_max_classes_keeps_the_busiest():
    # Rows involving each class (true or predicted): a 6, c 4, b 2, d 2.
    rows = [prediction("a", "a", 0.9)] * 3 + [prediction("b", "c", 0.5)] * 2 + [prediction("c", "c", 0.6), prediction("d", "d", 0.6)]
    metrics = compute_metrics(make_table(rows), max_classes=2)
    assert metrics["confusion"] == {"labels": ["a", "c"], "entries": [["a", "a", 3], ["c", "c", 1]], "omitted_classes": 2}
    assert len(metrics["per_class"]) == 4  # per-class metrics are never cut


def test_format_metrics_worst_first_and_capped(mixed):
    text = format_metrics(mixed, max_rows=2)
    assert "top-1 accuracy     40.0%  (2/5)" in text
    assert "top-5 accuracy     80.0%" in text
    assert "decode: 2, read: 1" in text
    class_lines = [line.split()[0] for line in text.splitlines() if line.split()[:1] in (["cat"], ["dog"], ["fox"])]
    assert class_lines == ["fox", "dog"]  # F1 0.0, then 0.4; cat (0.5) is cut
    assert text.splitlines()[-1] == "... 1 more class"


def test_evaluate_dest_writes_metrics_json(tmp_path):
    write_finished_dest(Destination(str(tmp_path)), make_table(MIXED))
    metrics = evaluate_dest(str(tmp_path))
    assert json.loads((tmp_path / METRICS_FILE).read_text()) == metrics
    assert metrics["top1"] == pytest.approx(0.4) and metrics["errors"] == 3


def random_table(n_rows: int, n_classes: int, seed: int) -> pa.Table:
    """Result rows with random labels, top-k lists and scores; some errors, some unlabelled."""
    rng = np.random.default_rng(seed)
    classes = [f"class{i}" for i in range(n_classes)]
    rows = []
    for i in range(n_rows):
        if rng.random() < 0.1:
            rows.append({"path": f"/img/{i}.jpg", "error": str(rng.choice(["decode_error: bad", "read_error: gone"]))})
            continue
        top_k = [str(c) for c in rng.choice(classes, size=int(rng.integers(1, min(7, n_classes) + 1)), replace=False)]
        true = None if rng.random() < 0.1 else str(rng.choice(classes))
        rows.append(prediction(true, top_k[0], float(rng.random()), top_k))
    return make_table(rows)


def assert_metrics_close(actual, expected, where="metrics"):
    """Equal, with floats within 1e-9; dict keys in the same order."""
    if isinstance(expected, dict):
        assert list(actual) == list(expected), where
        for key in expected:
            assert_metrics_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_metrics_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=0, abs=1e-9), where
    else:
        assert actual == expected, where


def uneven_chunks(table: pa.Table, seed: int) -> list[pa.Table]:
    cuts = sorted(random.Random(seed).sample(range(1, table.num_rows), 6))
    bounds = [0, *cuts, table.num_rows]
    return [table.slice(start, end - start) for start, end in zip(bounds, bounds[1:])]


@pytest.fixture(scope="module")
def random_rows():
    return random_table(400, 8, seed=1)


def test_merged_chunk_counts_give_the_whole_tables_metrics(random_rows):
    expected = compute_metrics(random_rows, max_classes=5)  # 5 < 8 classes: the confusion is cut too
    assert expected["errors"] and expected["unlabelled"] and expected["confusion"]["omitted_classes"] == 3
    chunk_counts = [metric_counts(chunk) for chunk in uneven_chunks(random_rows, seed=2)]
    before = copy.deepcopy(chunk_counts)

    shuffled = random.Random(3).sample(chunk_counts, len(chunk_counts))
    running_total = functools.reduce(merge_counts, shuffled, None)
    assert_metrics_close(metrics_from_counts(running_total, max_classes=5), expected)

    # Another grouping: merge pairs, then pairs of pairs (starting from {} this time).
    level = chunk_counts
    while len(level) > 1:
        level = [merge_counts(level[i], level[i + 1] if i + 1 < len(level) else {}) for i in range(0, len(level), 2)]
    assert_metrics_close(metrics_from_counts(level[0], max_classes=5), expected)
    assert chunk_counts == before  # merging changes neither argument


def test_counts_survive_json(random_rows):
    chunks = uneven_chunks(random_rows, seed=4)
    through_json = [json.loads(json.dumps(metric_counts(chunk))) for chunk in chunks]
    merged = functools.reduce(merge_counts, reversed(through_json), None)
    assert_metrics_close(metrics_from_counts(json.loads(json.dumps(merged))), compute_metrics(random_rows))


def test_counts_of_no_rows():
    assert metrics_from_counts(merge_counts(None, {})) == compute_metrics(RESULT_SCHEMA.empty_table())
