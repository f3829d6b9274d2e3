"""label-issues: planted label errors are found and ranked first, on a long tail as in
dense classes, duplicate groups whose labels disagree flag and raise rows, thresholds
survive long tails, the command writes its file; true_label_score is the model's probability of the
true label (checked against transformers through a real job)."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest

from conftest import write_finished_dest, write_image
from visionbatch.cli import main
from visionbatch.destination import DUPLICATES, LABEL_ISSUES, LABEL_ISSUES_BEFORE, MANIFEST, Destination, read_results
from visionbatch.label_issues import DUPLICATE_CONFLICT, ISSUES_SCHEMA, MODEL_DISAGREES, Thresholds
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
    assert {row["reason"] for row in found} == {MODEL_DISAGREES}
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


def test_a_singleton_class_leans_on_the_shared_means(tmp_path):
    rows, _ = planted_rows()
    part = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    thresholds = Thresholds.from_parts([part.slice(0, 20), part.slice(20)])  # part sums add up
    by_label = dict(zip(thresholds.labels.to_pylist(), thresholds.thresholds))
    labelled = [row for row in rows if row["true_label"] and not row.get("error")]
    shared = np.mean([row[TRUE_LABEL_SCORE] for row in labelled])
    assert thresholds.shared == pytest.approx(shared)
    assert by_label[SINGLETON] == pytest.approx((0.99 + 5 * shared) / 6)
    cats = [row[TRUE_LABEL_SCORE] for row in labelled if row["true_label"] == "cat"]
    assert by_label["cat"] == pytest.approx((sum(cats) + 5 * shared) / (len(cats) + 5))
    # The expected log score leaves the row out: the yak's lone row expects the shared mean.
    shared_log = np.mean(np.log([row[TRUE_LABEL_SCORE] for row in labelled]))
    yak, cat = thresholds.index_of(pa.array([SINGLETON, "cat"]))
    assert thresholds.typicality(np.array([yak]), np.array([0.99]))[0] == pytest.approx(np.log(0.99) - shared_log)
    others = np.log(cats[1:])
    expected = (others.sum() + 5 * shared_log) / (len(others) + 5)
    assert thresholds.typicality(np.array([cat]), np.array([cats[0]]))[0] == pytest.approx(np.log(cats[0]) - expected)


def _ranked(tmp_path, rows: list[dict]) -> list[dict]:
    dest = write_dest(tmp_path / "dest", rows)
    assert main(["label-issues", dest]) == 0
    return pq.read_table(f"{dest}/{LABEL_ISSUES}").to_pylist()


def test_a_long_tail_flags_every_disagreement_ranked_by_the_given_labels_probability(tmp_path):
    """One image per class: the model is right but unsure (0.4) on some moved labels, below
    the shared threshold that confident learning would ask of it; they are still flagged,
    and ranked before a confident mistake of the model on a right label (given 0.2)."""
    classes = [f"class{i:02d}" for i in range(20)]
    rows = []
    for i, c in enumerate(classes):
        rest = classes[(i + 1) % 20]
        rows.append(_row(f"{c}.jpg", {c: 0.9, rest: 0.05}, c))
    rows[0] = _row("mistake.jpg", {classes[1]: 0.75, classes[0]: 0.2}, classes[0])
    moved = {"moved-0.jpg": (classes[5], classes[9], 0.4, 1e-4), "moved-1.jpg": (classes[6], classes[3], 0.95, 1e-3),
             "moved-2.jpg": (classes[7], classes[2], 0.35, 0.01)}
    for path, (real, given, top, score) in moved.items():
        rows[classes.index(real)] = _row(path, {real: top, classes[0]: 0.3, given: score}, given)
    found = _ranked(tmp_path, rows)
    assert [row["path"] for row in found] == ["moved-0.jpg", "moved-1.jpg", "moved-2.jpg", "mistake.jpg"]
    assert [row["suggested_label"] for row in found] == [classes[5], classes[6], classes[7], classes[1]]


def test_a_class_the_model_finds_hard_does_not_crowd_the_top(tmp_path):
    """Tens of rows per class: every owl the model takes for a fox (owl at 0.05), rightly
    labelled; a cat moved to dog gets dog at 0.08, a dog's usual 0.9 being far above. The
    moved row ranks first, though its given label's probability is higher."""
    rows = [_row(f"owl/{i}.jpg", {"fox": 0.6, "owl": 0.05 + 0.001 * i}, "owl") for i in range(20)]
    rows += [_row(f"{c}/{i}.jpg", {c: 0.9, "owl": 0.02}, c) for c in ("cat", "dog", "fox") for i in range(20)]
    rows.append(_row("dog/moved.jpg", {"cat": 0.85, "dog": 0.08}, "dog"))
    found = _ranked(tmp_path, rows)
    assert found[0]["path"] == "dog/moved.jpg" and found[0]["suggested_label"] == "cat"
    assert len(found) == 21  # the owls are flagged too, after it


def _write_duplicates(dest: str, groups: list[list[tuple[str, str | None]]]) -> None:
    """DEST/_derived/duplicates/duplicates.parquet as ``visionbatch duplicates`` writes it: a group's
    first member is the one kept."""
    members = [(path, number, i == 0, given) for number, group in enumerate(groups)
               for i, (path, given) in enumerate(group)]
    table = pa.table({"path": [m[0] for m in members], "group": pa.array([m[1] for m in members], pa.int64()),
                      "keep": [m[2] for m in members], "similarity": pa.array([0.97] * len(members), pa.float32()),
                      "kind": ["near"] * len(members), "given_label": pa.array([m[3] for m in members], pa.string())})
    (Path(dest) / DUPLICATES).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, Path(dest) / DUPLICATES)


def test_duplicate_groups_whose_labels_disagree_flag_and_raise_rows(tmp_path, capfd):
    rows, planted = planted_rows()
    rows += [_row("copies/dog-1.jpg", {"dog": 0.9}, "dog"), _row("copies/dog-2.jpg", {"dog": 0.9}, "dog"),
             # Outvoted by its group, though the model agrees with its label: flagged.
             _row("copies/dog-3.jpg", {"owl": 0.7, "dog": 0.2}, "owl"),
             # A pair whose labels disagree: the member whose label the model doubts too is flagged
             # (its 0.3 would rank after the planted rows on the model alone), not the other.
             _row("pair/a.jpg", {"fox": 0.6, "cat": 0.3}, "cat"), _row("pair/b.jpg", {"fox": 0.6, "cat": 0.3}, "fox")]
    dest = write_dest(tmp_path / "dest", rows)
    _write_duplicates(dest, [[("copies/dog-1.jpg", "dog"), ("copies/dog-2.jpg", "dog"), ("copies/dog-3.jpg", "owl"),
                              ("gone.jpg", "cat"), ("unlabelled.jpg", None)],
                             [("pair/a.jpg", "cat"), ("pair/b.jpg", "fox")],
                             [("cat/0.jpg", "cat"), ("cat/1.jpg", "cat")]])  # labels agree: no evidence
    assert main(["label-issues", dest]) == 0
    found = pq.read_table(f"{dest}/{LABEL_ISSUES}").to_pylist()
    assert [(row["path"], row["suggested_label"], row["reason"]) for row in found[:2]] == [
        ("pair/a.jpg", "fox", DUPLICATE_CONFLICT), ("copies/dog-3.jpg", "dog", DUPLICATE_CONFLICT)]
    assert {row["path"]: row["suggested_label"] for row in found[2:]} == planted
    assert {row["reason"] for row in found[2:]} == {MODEL_DISAGREES}
    assert "duplicate groups  2 flagged rows outvoted by their group's labels" in capfd.readouterr().out


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
