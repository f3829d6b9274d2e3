"""label-issues: planted label errors are found and ranked first, thresholds survive long
tails, the command writes its file; true_label_score is the model's probability of the
true label (checked against transformers through a real job)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest

from conftest import write_finished_dest, write_image
from visionbatch.cli import main
from visionbatch.destination import LABEL_ISSUES, LABEL_ISSUES_BEFORE, MANIFEST, Destination, read_results
from visionbatch.label_issues import ISSUES_SCHEMA, Thresholds, flag_rows
from visionbatch.report import write_report
from visionbatch.results import RESULT_SCHEMA, TRUE_LABEL_SCORE

CLASSES = ["cat", "dog", "fox", "owl"]
PER_CLASS = 12
SINGLETON = "yak"  # one labelled row: a long tail's class
TOP_K = 3


def _row(path: str, probabilities: dict[str, float], given: str | None) -> dict:
    ranked = sorted(probabilities.items(), key=lambda item: -item[1])[:TOP_K]
    return {"path": path, "label": ranked[0][0], "score": ranked[0][1],
            "top_k_labels": [label for label, _ in ranked], "top_k_scores": [score for _, score in ranked],
            "true_label": given, "correct": None if given is None else ranked[0][0] == given,
            TRUE_LABEL_SCORE: None if given is None else probabilities.get(given, 0.0), "width": 8, "height": 8}


def _probabilities(rng, truth: str, confidence: float) -> dict[str, float]:
    """``confidence`` on ``truth``, the rest spread over the other classes."""
    others = [c for c in [*CLASSES, SINGLETON] if c != truth]
    rest = rng.dirichlet(np.ones(len(others))) * (1 - confidence)
    return {truth: confidence, **dict(zip(others, rest.tolist()))}


def planted_rows() -> tuple[list[dict], dict[str, str]]:
    """Rows of a labelled job with some given labels made wrong; returns them and the
    planted rows' path -> the class the image really shows."""
    rng = np.random.default_rng(0)
    rows, planted = [], {}
    for c in CLASSES:
        for i in range(PER_CLASS):
            rows.append(_row(f"{c}/{i}.jpg", _probabilities(rng, c, rng.uniform(0.6, 0.95)), c))
    rows.append(_row(f"{SINGLETON}/0.jpg", _probabilities(rng, SINGLETON, 0.99), SINGLETON))
    # Wrong labels: the model sees the real class, the row says another one. The last one
    # really is a yak: its 0.9 falls short of the yak's lone labelled row (0.99), so a
    # per-class threshold alone would miss it.
    for i, (real, given, confidence) in enumerate([("dog", "cat", 0.9), ("fox", "owl", 0.8), ("cat", "dog", 0.85),
                                                    (SINGLETON, "cat", 0.9)]):
        path = f"{given}/planted-{i}.jpg"
        rows.append(_row(path, _probabilities(rng, real, confidence), given))
        planted[path] = real
    rows.append(_row("unlabelled.jpg", _probabilities(rng, "dog", 0.5), None))
    rows.append({"path": "broken.jpg", "error": "decode_error: broken", "true_label": "cat"})
    order = rng.permutation(len(rows))
    return [rows[i] for i in order], planted


def write_dest(path, rows: list[dict], fmt: str = "parquet") -> str:
    destination = Destination(str(path))
    write_finished_dest(destination, pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), fmt, shard_size=16)
    return destination.uri


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_planted_errors_are_flagged_and_ranked_first(fmt, tmp_path, capfd):
    rows, planted = planted_rows()
    dest = write_dest(tmp_path / "dest", rows, fmt)
    assert main(["label-issues", dest]) == 0
    issues = pq.read_table(f"{dest}/{LABEL_ISSUES}")
    assert [(f.name, f.type) for f in issues.schema] == [(f.name, f.type) for f in ISSUES_SCHEMA]
    found = issues.to_pylist()
    assert {row["path"]: row["suggested_label"] for row in found} == planted
    assert [row["rank"] for row in found] == list(range(1, len(found) + 1))
    confidences = [row["self_confidence"] for row in found]
    assert confidences == sorted(confidences)
    out = capfd.readouterr().out
    assert f"label issues      {len(planted)} of {len(rows) - 2} labelled rows" in out
    assert "cat" in out.split("flagged")[1]  # the per-class counts: cat was given twice wrongly
    # DEST still reads as a plain dataset of result rows, and as visionbatch's results.
    assert read_results(dest).num_rows == len(rows)
    if fmt == "parquet":
        assert pyarrow.dataset.dataset(dest).count_rows() == len(rows)
        datasets = pytest.importorskip("datasets")  # the result parts; the issues table apart
        cache = str(tmp_path / "hf-cache")
        assert datasets.load_dataset(dest, split="train", cache_dir=cache).num_rows == len(rows)
        assert datasets.load_dataset(dest, "label_issues", split="train", cache_dir=cache).to_list() == found


def _dest_with_images(tmp_path) -> tuple[str, dict[str, str]]:
    """A DEST of the planted rows whose planted images exist (the report and export show them)."""
    rows, planted = planted_rows()
    images = tmp_path / "images"
    rows = [{**row, "path": str(images / row["path"])} for row in rows]
    for i, path in enumerate(planted):
        write_image(images / path, seed=i)
    return write_dest(tmp_path / "dest", rows), {str(images / path): real for path, real in planted.items()}


def test_report_shows_the_suspected_label_errors(tmp_path):
    dest, planted = _dest_with_images(tmp_path)
    report = tmp_path / "report.html"
    write_report(dest, str(report))
    assert "Suspected label errors" not in report.read_text()  # label-issues has not run
    assert main(["label-issues", dest]) == 0
    write_report(dest, str(report))
    section = report.read_text().split("Suspected label errors")[1].split("</section>")[0]
    assert section.startswith(f" ({len(planted)})")
    assert section.count('src="data:image/jpeg') == len(planted)
    first = pq.read_table(f"{dest}/{LABEL_ISSUES}").to_pylist()[0]
    assert (f"given: {first['given_label']}</span><br><span class=\"right\">suggested: {first['suggested_label']}"
            in section.split("#2,")[0])


def test_label_issues_where_an_older_version_wrote_them(tmp_path):
    """A DEST whose label issues sit at its top (as label-issues wrote them before _derived/):
    the report and export still read them, and label-issues run again moves them down."""
    dest, planted = _dest_with_images(tmp_path)
    assert main(["label-issues", dest]) == 0
    (tmp_path / "dest" / LABEL_ISSUES).rename(tmp_path / "dest" / LABEL_ISSUES_BEFORE)
    report = tmp_path / "report.html"
    write_report(dest, str(report))
    assert f"Suspected label errors ({len(planted)})" in report.read_text()
    assert f"DEST/{LABEL_ISSUES_BEFORE}" in report.read_text()
    out = tmp_path / "export"
    assert main(["export", dest, "--to", str(out), "--format", "imagefolder", "--label-issues", "-q"]) == 0
    assert len(list(out.glob("*/*.jpg"))) == len(planted)  # the flagged rows: the planted ones
    assert main(["label-issues", dest]) == 0
    assert (tmp_path / "dest" / LABEL_ISSUES).exists() and not (tmp_path / "dest" / LABEL_ISSUES_BEFORE).exists()


def test_a_singleton_class_leans_on_the_shared_threshold(tmp_path):
    rows, planted = planted_rows()
    part = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    thresholds = Thresholds.from_parts([part.slice(0, 20), part.slice(20)])  # part sums add up
    by_label = dict(zip(thresholds.labels.to_pylist(), thresholds.thresholds))
    labelled = [row for row in rows if row["true_label"] and not row.get("error")]
    shared = np.mean([row[TRUE_LABEL_SCORE] for row in labelled])
    assert thresholds.shared == pytest.approx(shared)
    assert by_label[SINGLETON] == pytest.approx((0.99 + 5 * shared) / 6)
    cats = [row[TRUE_LABEL_SCORE] for row in labelled if row["true_label"] == "cat"]
    assert by_label["cat"] == pytest.approx((sum(cats) + 5 * shared) / (len(cats) + 5))
    # Without the prior, the yak's lone row (0.99) sets a bar the mislabelled yak (0.9) misses.
    alone = Thresholds.from_parts([part], prior_rows=0)
    missed = set(planted) - set(flag_rows(part, alone).column("path").to_pylist())
    assert [planted[path] for path in missed] == [SINGLETON]


def test_refuses_a_dest_without_scores_or_labels(tmp_path, capfd):
    rows, _ = planted_rows()
    old = write_dest(tmp_path / "old", rows)
    manifest = json.loads((tmp_path / "old" / MANIFEST).read_text())
    (tmp_path / "old" / MANIFEST).write_text(json.dumps({**manifest, "version": 2}))
    assert main(["label-issues", old]) == 1
    assert f"older visionbatch, whose rows lack {TRUE_LABEL_SCORE}" in capfd.readouterr().err
    unlabelled = write_dest(tmp_path / "unlabelled", [{**row, "true_label": None, TRUE_LABEL_SCORE: None}
                                                      for row in rows])
    assert main(["label-issues", unlabelled]) == 1
    assert "label-issues needs the true labels" in capfd.readouterr().err
    assert not (tmp_path / "unlabelled" / LABEL_ISSUES).exists()


def test_true_label_score_is_the_models_probability_of_the_true_label(image_tree, tiny_vit, tmp_path, capfd):
    """Through a real job: the score equals the softmax of transformers' own forward pass
    at the true label's class, including where that class is not in the top-k."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    dest = tmp_path / "dest"
    assert main(["classify", str(image_tree), "--model", tiny_vit, "--output", str(dest), "--top-k", "2",
                 "--exact-decode", "-q"]) == 0
    table = read_results(str(dest)).to_pylist()
    processor = AutoImageProcessor.from_pretrained(tiny_vit)
    model = AutoModelForImageClassification.from_pretrained(tiny_vit).eval()
    outside_top_k = 0
    for row in table:
        with Image.open(row["path"]) as image, torch.no_grad():
            logits = model(**processor(image.convert("RGB"), return_tensors="pt")).logits[0]
        expected = torch.softmax(logits, -1)[model.config.label2id[row["true_label"]]].item()
        assert row[TRUE_LABEL_SCORE] == pytest.approx(expected, rel=1e-3, abs=1e-6)
        outside_top_k += row["true_label"] not in row["top_k_labels"]
    assert len(table) == 12 and outside_top_k > 0
    assert main(["label-issues", str(dest)]) == 0
    assert (dest / LABEL_ISSUES).exists() and "label issues" in capfd.readouterr().out
