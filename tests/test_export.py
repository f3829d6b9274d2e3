"""export: the chosen rows' original bytes, in each format, from each kind of input, exactly
once across a kill -9 and --resume. Real jobs, real files, the libraries that read the
formats (webdataset, datasets' imagefolder, Label Studio's documented import schema)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import SAMPLE_DIR, WNIDS
from runs import kill_session, session_processes
from visionbatch.cli import main
from visionbatch.destination import LABEL_ISSUES, MANIFEST, read_results
from visionbatch.export import LABELING_CONFIG, SELECTION, TASKS, safe_name
from visionbatch.storage import within

N_IMAGES = 24


def _write_colored(path: Path, seed: int) -> Path:
    """A small JPEG of one noisy colour: the tiny model's labels vary with the colour."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.integers(0, 256, 3) + rng.integers(-40, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-images")
    for i in range(N_IMAGES):
        _write_colored(root / WNIDS[i % 4] / f"img {i}.jpg", seed=i)
    return root


@pytest.fixture(scope="module")
def job(images, tiny_vit, tmp_path_factory) -> tuple[Path, pa.Table]:
    """A finished classify job over ``images`` (five shards), and its result rows."""
    dest = tmp_path_factory.mktemp("export-job") / "dest"
    assert main(["classify", str(images), "--model", tiny_vit, "--output", str(dest), "-q", "--shard-size", "5"]) == 0
    return dest, read_results(str(dest))


def _median(table: pa.Table) -> float:
    """A threshold that selects some rows but not all (the tiny model's scores are low:
    the acceptance's 0.5 would select every row)."""
    return float(np.median(table.column("score").to_numpy()))


def _expected(table: pa.Table, threshold: float) -> dict[str, dict]:
    """The rows ``score < threshold`` selects, computed without export's code."""
    return {row["path"]: row for row in table.to_pylist() if row["error"] is None and row["score"] < threshold}


def _export(dest, out, *options) -> None:
    assert main(["export", str(dest), "--to", str(out), "-q", *map(str, options)]) == 0


def _tar_samples(out: Path) -> list[dict]:
    import webdataset as wds

    urls = sorted(str(tar) for tar in out.glob("*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False)) if urls else []


def _by_path(samples: list[dict]) -> dict[str, tuple[bytes, dict]]:
    """webdataset's samples by their row's path: (the image member's bytes, the .json)."""
    found = {}
    for sample in samples:
        meta = json.loads(sample["json"])
        (image,) = [value for key, value in sample.items() if not key.startswith("__") and key not in ("json", "cls")]
        assert meta["path"] not in found, f"{meta['path']} exported twice"
        assert "." not in sample["__key__"]
        found[meta["path"]] = (image, meta)
    return found


# --------------------------------------------------------------------------- the three formats


def test_webdataset(job, tmp_path, capfd):
    dest, table = job
    threshold = _median(table)
    expected = _expected(table, threshold)
    assert 0 < len(expected) < table.num_rows
    out = tmp_path / "out"
    _export(dest, out, "--format", "webdataset", "--where", f"score < {threshold}", "--shard-size", "4")
    samples = _tar_samples(out)
    found = _by_path(samples)
    assert set(found) == set(expected)
    # .cls: the predicted class's index, as webdataset decodes a class.
    assert {json.loads(sample["json"])["path"]: int(sample["cls"]) for sample in samples} == {
        path: row["label_id"] for path, row in expected.items()}
    for path, (image, meta) in found.items():
        assert image == Path(path).read_bytes()
        row = expected[path]
        assert all(isinstance(value, float) for value in (meta["score"], meta["true_label_score"],
                                                          *meta["top_k_scores"]))  # typed numbers, not text
        assert meta["label"] == row["label"] and meta["true_label"] == row["true_label"]
        assert meta["top_k_labels"] == row["top_k_labels"]
        assert meta["score"] == pytest.approx(row["score"]) and meta["true_label_score"] == pytest.approx(
            row["true_label_score"])
    assert len(list(out.glob("*.tar"))) == -(-len(expected) // 4)
    # Run again without --resume or --overwrite: refused; with --overwrite: the same export.
    assert main(["export", str(dest), "--to", str(out), "-q", "--where", f"score < {threshold}"]) == 1
    _export(dest, out, "--overwrite", "--where", f"score < {threshold}", "--shard-size", "4")
    assert set(_by_path(_tar_samples(out))) == set(expected)
    # --resume with other options: refused, naming them.
    assert main(["export", str(dest), "--to", str(out), "-q", "--resume", "--where", "score < 0.01",
                 "--shard-size", "4"]) == 1
    assert "--resume with other options" in capfd.readouterr().err
    # --overwrite replaces an earlier export, never a classify job's DEST (a copy of one: DEST itself overlaps).
    other_dest = tmp_path / "other-dest"
    shutil.copytree(dest, other_dest)
    assert main(["export", str(dest), "--to", str(other_dest), "-q", "--overwrite"]) == 1
    assert "holds files that no export wrote (_SUCCESS, _manifest.json" in capfd.readouterr().err
    assert read_results(str(other_dest)).num_rows == table.num_rows


def test_out_and_dest_are_kept_apart(job, capfd):
    """OUT inside DEST would make DEST unreadable as a dataset (a reader meets the tars);
    DEST inside OUT would mix the export with DEST's files. Refused before either is touched."""
    dest, table = job
    before = sorted(dest.rglob("*"))
    for out, to in ((dest, dest / "exp"), (dest, dest.parent), (dest, dest / "." / "exp" / ".."),
                    ("s3://bucket/dest", "s3://anonymous@bucket/dest/exp/"), ("s3://bucket/dest/", "S3://bucket")):
        assert main(["export", str(out), "--to", str(to), "-q"]) == 2, (out, to)
        err = capfd.readouterr().err
        assert f"--to {to} and DEST {out} overlap" in err and "export to a folder outside DEST" in err
    assert sorted(dest.rglob("*")) == before
    assert not within(f"{dest}-2", str(dest)) and not within("s3://bucket/dest-2", "s3://bucket/dest")  # siblings


def test_a_folder_of_other_files_is_never_an_export(job, tmp_path, capfd):
    """--resume continues an export only, --overwrite replaces one only; without a flag the
    refusal says what the folder holds."""
    dest, _ = job
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    for flag in ("--resume", "--overwrite", None):
        assert main(["export", str(dest), "--to", str(out), "-q", *([flag] if flag else [])]) == 1
        err = capfd.readouterr().err
        assert f"{out} holds files that no export wrote (notes.txt, photos/): export into an empty or new OUT" in err
        assert "already holds results" not in err
    assert sorted(path.name for path in out.rglob("*")) == ["notes.txt", "photos"]


def test_imagefolder_reads_as_a_hugging_face_dataset(job, tmp_path):
    import datasets

    dest, table = job
    threshold = _median(table)
    expected = _expected(table, threshold)
    out = tmp_path / "out"
    _export(dest, out, "--format", "imagefolder", "--where", f"score < {threshold}", "--shard-size", "4")
    files = sorted(path for path in out.rglob("*.jpg"))
    assert len(files) == len(expected)
    by_bytes = {Path(path).read_bytes(): row for path, row in expected.items()}
    assert len(by_bytes) == len(expected)  # each image distinct: matched by content
    for file in files:
        assert file.parent.name == safe_name(by_bytes[file.read_bytes()]["label"])
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == len(expected)
    # metadata.jsonl: each image keeps its row's truth (datasets joins it by file_name).
    for sample in ds:
        row = expected[sample["path"]]
        assert sample["image"].tobytes() == Image.open(row["path"]).tobytes()
        assert sample["label"] == row["label"] and sample["true_label"] == row["true_label"]
        assert sample["top_k_labels"] == row["top_k_labels"]
        assert sample["score"] == pytest.approx(row["score"])
        assert sample["top_k_scores"] == pytest.approx(row["top_k_scores"])
        assert sample["true_label_score"] == pytest.approx(row["true_label_score"])


# The documented format of a Label Studio import file with pre-annotations, written from
# https://labelstud.io/guide/predictions ("JSON format for pre-annotations": a list of
# tasks, each a `data` object and a `predictions` array; a prediction's `result` items
# carry from_name, to_name, type and value; classification is type "choices" with
# value.choices) and https://labelstud.io/guide/task_format (`model_version`, `score`).
LABEL_STUDIO_IMPORT_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "object", "required": ["image"], "properties": {"image": {"type": "string"}}},
            "predictions": {"type": "array", "items": {
                "type": "object",
                "required": ["result"],
                "properties": {
                    "model_version": {"type": "string"},
                    "score": {"type": "number"},
                    "result": {"type": "array", "items": {
                        "type": "object",
                        "required": ["from_name", "to_name", "type", "value"],
                        "properties": {
                            "from_name": {"type": "string"}, "to_name": {"type": "string"},
                            "type": {"const": "choices"},
                            "value": {"type": "object", "required": ["choices"],
                                      "properties": {"choices": {"type": "array", "items": {"type": "string"},
                                                                 "minItems": 1}}},
                        }}},
                }}},
        },
    },
}


def test_labelstudio_tasks_follow_the_documented_import_format(job, tiny_vit, tmp_path):
    import jsonschema

    dest, table = job
    threshold = _median(table)
    expected = _expected(table, threshold)
    out = tmp_path / "out"
    _export(dest, out, "--format", "labelstudio", "--where", f"score < {threshold}", "--shard-size", "4",
            "--image-url-prefix", "http://files.example/export/")
    tasks = json.loads((out / TASKS).read_text())
    jsonschema.validate(tasks, LABEL_STUDIO_IMPORT_SCHEMA)
    assert sorted(task["data"]["path"] for task in tasks) == sorted(expected)
    for task in tasks:
        row = expected[task["data"]["path"]]
        image = task["data"]["image"]
        assert image.startswith("http://files.example/export/images/")
        assert (out / image.removeprefix("http://files.example/export/")).read_bytes() == Path(row["path"]).read_bytes()
        (prediction,) = task["predictions"]
        assert prediction["result"][0]["value"]["choices"] == [row["label"]]
        assert prediction["score"] == pytest.approx(row["score"])
        assert prediction["model_version"] == Path(tiny_vit).name  # the model's name, not a path of this machine
    # The labeling config: the names the predictions use, its choices exactly the tasks' labels.
    import xml.etree.ElementTree as ElementTree

    view = ElementTree.parse(out / LABELING_CONFIG).getroot()
    assert view.find("Image").attrib == {"name": "image", "value": "$image"}
    choices = view.find("Choices")
    assert choices.attrib["name"] == "label" and choices.attrib["toName"] == "image"
    assert [choice.attrib["value"] for choice in choices] == sorted({row["label"] for row in expected.values()})


def test_labeling_config_has_each_repeated_class_name_once_and_says_so(images, tmp_path, capfd):
    """ImageNet names classes 134 and 517 "crane": a label is one <Choice>, and the export
    says which labels stand for several classes (a reviewer's answer cannot tell them apart)."""
    import xml.etree.ElementTree as ElementTree

    from conftest import save_random_vit

    model = save_random_vit(tmp_path / "model", hidden=48, layers=2, heads=3, mlp=96, seed=4, head_scale=20.0,
                            labels=["crane", "tench, Tinca tinca", "crane", "tabby, tabby cat"])
    dest, out = tmp_path / "dest", tmp_path / "out"
    assert main(["classify", str(images), "--model", model, "--output", str(dest), "-q", "--labels", "none"]) == 0
    table = read_results(str(dest))
    labels = set(table.column("label").to_pylist())
    assert {0, 2} <= set(table.column("label_id").to_pylist()) and len(labels) > 1  # both cranes, and another
    capfd.readouterr()
    _export(dest, out, "--format", "labelstudio")
    choices = [choice.attrib["value"] for choice in ElementTree.parse(out / LABELING_CONFIG).getroot().find("Choices")]
    assert choices == sorted(labels)
    assert ("labeling config: 'crane' names the model's classes 0, 2: one <Choice> each, so a reviewer's answer "
            "cannot tell those classes apart") in capfd.readouterr().err


@pytest.mark.parametrize("fmt", ["webdataset", "imagefolder", "labelstudio"])
def test_the_selection_names_each_exported_file(job, tmp_path, fmt):
    """_selection.parquet's exported_file joins each chosen row to its file in OUT (a tar
    member as tar#member), as a user would join them with DuckDB."""
    import tarfile

    import duckdb

    dest, table = job
    expected = _expected(table, _median(table))
    out = tmp_path / "out"
    _export(dest, out, "--format", fmt, "--where", f"score < {_median(table)}", "--shard-size", "4")
    joined = duckdb.sql(f"SELECT path, exported_file FROM read_parquet('{out / SELECTION}')").fetchall()
    assert sorted(path for path, _ in joined) == sorted(expected)
    assert len({name for _, name in joined}) == len(joined)
    for path, name in joined:
        if fmt == "webdataset":
            tar, member = name.split("#")
            with tarfile.open(out / tar) as archive:
                data = archive.extractfile(member).read()
        else:
            data = (out / name).read_bytes()
        assert data == Path(path).read_bytes()


# FiftyOneImageClassificationDataset, as FiftyOne documents it (docs.voxel51.com, "Importing data into
# FiftyOne": data/ and labels.json {"classes": [...], "labels": {"<uuid>": <target>}}, a uuid being a file
# of data/ without its extension) and as its importer and ImageClassificationSampleParser read it
# (fiftyone/utils/data/importers.py, parsers.py: a target is null, a class name or id, or a dict with
# "label" and "confidence"; another labels file of the same layout loads with labels_path=).
FIFTYONE_LABELS_SCHEMA = {
    "type": "object", "required": ["labels"],
    "properties": {
        "classes": {"type": ["array", "null"], "items": {"type": "string"}},
        "labels": {"type": "object", "additionalProperties": {"anyOf": [
            {"type": "null"}, {"type": "string"}, {"type": "integer"},
            {"type": "object", "required": ["label"],
             "properties": {"label": {"type": ["string", "integer"]}, "confidence": {"type": ["number", "null"]}}}]}},
    },
}


def test_fiftyone_classification_layout(job, tmp_path):
    """FiftyOne's image classification layout with the ground truth (labels.json) and the
    predictions (predictions.json) as separate label fields over the same data/:
    ``Dataset.from_dir(OUT, FiftyOneImageClassificationDataset, label_field="ground_truth")``
    then ``merge_dir(..., labels_path="predictions.json", label_field="predictions")``."""
    import jsonschema

    dest, table = job
    expected = _expected(table, _median(table))
    out = tmp_path / "out"
    _export(dest, out, "--format", "fiftyone", "--where", f"score < {_median(table)}", "--shard-size", "4")
    ground_truth, predictions = (json.loads((out / name).read_text()) for name in ("labels.json", "predictions.json"))
    for labels in (ground_truth, predictions):
        jsonschema.validate(labels, FIFTYONE_LABELS_SCHEMA)
    files = {path.stem: path for path in (out / "data").iterdir()}  # the importer's uuid: the name without extension
    assert set(files) == set(ground_truth["labels"]) == set(predictions["labels"])
    by_bytes = {Path(path).read_bytes(): row for path, row in expected.items()}
    assert sorted(row["path"] for row in (by_bytes[file.read_bytes()] for file in files.values())) == sorted(expected)
    for uuid, file in files.items():
        row = by_bytes[file.read_bytes()]
        assert ground_truth["labels"][uuid] == row["true_label"]
        assert predictions["labels"][uuid]["label"] == row["label"]
        assert predictions["labels"][uuid]["confidence"] == pytest.approx(row["score"])
    assert ground_truth["classes"] == sorted({row["true_label"] for row in expected.values()})
    assert predictions["classes"] == sorted({row["label"] for row in expected.values()})


# --------------------------------------------------------------------------- choosing rows


def test_per_class_and_label_issues(job, tmp_path, capfd):
    dest, table = job
    rows = [row for row in table.to_pylist() if row["error"] is None]
    least = {}
    for row in sorted(rows, key=lambda row: row["score"]):
        least.setdefault(row["label"], row["path"])
    assert len(least) > 1
    _export(dest, tmp_path / "per-class", "--per-class", "1")
    assert set(_by_path(_tar_samples(tmp_path / "per-class"))) == set(least.values())

    assert main(["export", str(dest), "--to", str(tmp_path / "no-issues"), "--label-issues"]) == 1
    assert f"run visionbatch label-issues {dest} first" in capfd.readouterr().err
    assert main(["label-issues", str(dest)]) == 0
    flagged = set(pq.read_table(dest / LABEL_ISSUES).column("path").to_pylist())
    threshold = _median(table)
    expected = flagged & set(_expected(table, threshold))
    assert expected
    _export(dest, tmp_path / "issues", "--label-issues", "--where", f"score < {threshold}")
    found = _by_path(_tar_samples(tmp_path / "issues"))
    assert set(found) == expected
    assert all(image == Path(path).read_bytes() for path, (image, _) in found.items())


def test_bad_sql_and_nothing_selected(job, tmp_path, capfd):
    dest, table = job
    assert main(["export", str(dest), "--to", str(tmp_path / "bad"), "--where", "scor < 0.5"]) == 2
    err = capfd.readouterr().err
    assert "--where 'scor < 0.5'" in err and "the columns are: path, label" in err
    out = tmp_path / "none"
    assert main(["export", str(dest), "--to", str(out), "--where", "score > 2", "--format", "labelstudio"]) == 0
    assert "nothing selected" in capfd.readouterr().out
    assert json.loads((out / TASKS).read_text()) == [] and (out / "_SUCCESS").exists()


def _attacks(secret: Path) -> dict[str, str]:
    """The issue's attempts, each with why it is refused: a file's contents deciding the
    selection, a file read, a file written by a statement smuggled after the predicate."""
    return {
        f"score < 2 AND (SELECT count(*) FROM read_csv('{secret}', header=false)) = 3": "it holds a subquery",
        f"read_text('{secret}') IS NOT NULL": "read_text() is not a scalar function",
        "1=1); COPY (SELECT 'owned' AS x) TO 'pwned.csv'; SELECT * FROM results WHERE (1=1":
            "it is not one SQL predicate (syntax error",
        "score < 2; COPY (SELECT 'owned' AS x) TO 'pwned.csv'": "it is not one SQL predicate",
        "score < 2 UNION ALL SELECT * FROM results": "a clause follows the predicate",
        "label IN (SELECT label FROM results LIMIT 1)": "it holds a subquery",
    }


def test_a_where_that_is_more_than_a_predicate_is_refused(job, tmp_path, monkeypatch, capfd):
    dest, _ = job
    secret = tmp_path / "secret.csv"
    secret.write_text("a\nb\nc\n")
    monkeypatch.chdir(tmp_path)  # where a smuggled COPY would write pwned.csv
    for i, (where, why) in enumerate(_attacks(secret).items()):
        out = tmp_path / f"out-{i}"
        assert main(["export", str(dest), "--to", str(out), "--where", where]) == 2, where
        assert f"visionbatch: error: --where {where!r} is refused: {why}" in capfd.readouterr().err
        assert not out.exists()  # refused before OUT is touched: nothing was selected
    assert sorted(path.name for path in tmp_path.iterdir()) == ["secret.csv"]


def test_the_where_connection_reaches_no_file(tmp_path):
    """The second wall, should a predicate get past the parser: the connection that runs
    it can open no file and cannot be given access back."""
    import duckdb

    from visionbatch.export import _connect

    (tmp_path / "secret.csv").write_text("a\nb\n")
    (tmp_path / "work").mkdir()  # its spill folder, the one folder it may use
    with _connect(str(tmp_path / "work"), files=False) as db:
        for sql in (f"SELECT * FROM read_csv('{tmp_path / 'secret.csv'}')",
                    f"COPY (SELECT 1 AS x) TO '{tmp_path / 'pwned.csv'}'", "SET enable_external_access = true",
                    "INSTALL httpfs"):
            with pytest.raises(duckdb.Error):
                db.execute(sql)
    assert not (tmp_path / "pwned.csv").exists()


def test_legitimate_predicates(job, tmp_path):
    dest, table = job
    rows = [row for row in table.to_pylist() if row["error"] is None]
    threshold = _median(table)
    some = rows[0]["top_k_labels"][1]
    cases = {  # a predicate, and the same test in Python
        f"list_contains(top_k_labels, {some!r}) OR score * 2 + 0 >= {2 * threshold}":
            lambda row: some in row["top_k_labels"] or row["score"] * 2 >= 2 * threshold,
        f"label LIKE '%, %' AND NOT (label IN ({rows[0]['label']!r}, 'tench, Tinca tinca')) AND true_label IS NOT NULL":
            lambda row: ", " in row["label"] and row["label"] not in (rows[0]["label"], "tench, Tinca tinca"),
    }
    for i, (where, test) in enumerate(cases.items()):
        expected = {row["path"] for row in rows if test(row)}
        assert 0 < len(expected) < len(rows), where
        _export(dest, tmp_path / f"out-{i}", "--where", where)
        assert set(_by_path(_tar_samples(tmp_path / f"out-{i}"))) == expected, where


def test_to_object_storage(job, s3_server, tmp_path):
    """OUT on S3, written through pyarrow's filesystem as DEST is: the same rows, the same bytes."""
    import boto3
    import pyarrow.fs as pafs

    dest, table = job
    threshold = _median(table)
    expected = _expected(table, threshold)
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="exports")
    _export(dest, "s3://exports/out", "--where", f"score < {threshold}", "--shard-size", "4", "--s3-endpoint",
            s3_server)
    local = tmp_path / "from-s3"
    local.mkdir()
    pafs.copy_files("exports/out", str(local), source_filesystem=pafs.S3FileSystem(
        endpoint_override=s3_server.removeprefix("http://"), scheme="http", region="us-east-1"))
    found = _by_path(_tar_samples(local))
    assert set(found) == set(expected)
    assert all(image == Path(path).read_bytes() for path, (image, _) in found.items())


def test_a_vanished_image_is_left_out_and_counted(images, tmp_path, capfd):
    """From a CSV DEST (any result format reads): a row whose file is gone since it was
    classified is not exported, and the summary says so."""
    from conftest import write_finished_dest
    from visionbatch.destination import Destination
    from visionbatch.results import RESULT_SCHEMA

    files = sorted(images.rglob("*.jpg"))[:5]
    gone = tmp_path / "gone.jpg"
    rows = [{"path": str(path), "label": "cat", "score": 0.1 * (i + 1), "top_k_labels": ["cat"],
             "top_k_scores": [0.1 * (i + 1)]} for i, path in enumerate([*files, gone])]
    rows.append({"path": str(tmp_path / "broken.jpg"), "error": "decode_error: broken"})
    dest = tmp_path / "dest"
    write_finished_dest(Destination(str(dest)), pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), "csv", 3)
    out = tmp_path / "out"
    assert main(["export", str(dest), "--to", str(out), "--format", "imagefolder"]) == 0
    assert sorted(path.read_bytes() for path in (out / "cat").iterdir()) == sorted(f.read_bytes() for f in files)
    assert f"not exported      1 rows whose image could not be read (first: {gone}: read_error" in capfd.readouterr().out
    chosen = pq.read_table(out / SELECTION, columns=["path", "exported_file"])
    selection = dict(zip(*(column.to_pylist() for column in chosen.columns)))
    assert selection[str(gone)] is None
    assert sorted((out / selection[str(path)]).read_bytes() for path in files) == sorted(f.read_bytes() for f in files)


# --------------------------------------------------------------------------- other inputs


def test_from_webdataset_tars_and_parquet_tables(images, tiny_vit, tmp_path):
    """Tar members and Parquet cells (binary, and the hub's {bytes, path} struct whose
    row path is only a file name) come out with their own bytes."""
    import datasets
    import webdataset as wds

    files = sorted(images.rglob("*.jpg"))
    tars = tmp_path / "tars"
    tars.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(tars / f"{shard:05d}.tar")) as tar:
            for i, file in list(enumerate(files))[shard::2]:
                tar.write({"__key__": f"s{i:04d}", "jpg": file.read_bytes(), "txt": file.parent.name})
    pq.write_table(pa.table({"jpg": [file.read_bytes() for file in files], "name": [f.name for f in files]}),
                   tmp_path / "binary.parquet", row_group_size=10)
    hub = tmp_path / "hub"
    hub.mkdir()
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files]},
                               features=features).to_parquet(str(hub / "train.parquet"))
    cases = [(tars, []), (tmp_path / "binary.parquet", ["--image-column", "jpg"]),
             (hub, ["--image-column", "image"])]
    members = _tar_members(tars)
    original = {  # a row's path -> the bytes its image came from
        tars: members.__getitem__,
        tmp_path / "binary.parquet": lambda path: files[int(path.rpartition("#")[2])].read_bytes(),  # <file>#<row>
        hub: lambda path: next(f for f in files if f.name == path).read_bytes(),  # the struct's path: a name
    }
    for source, options in cases:
        dest, out = tmp_path / f"dest-{source.name}", tmp_path / f"out-{source.name}"
        assert main(["classify", str(source), "--model", tiny_vit, "--output", str(dest), "-q", "--labels", "none",
                     "--shard-size", "7", *options]) == 0
        table = read_results(str(dest))
        threshold = _median(table)
        expected = _expected(table, threshold)
        _export(dest, out, "--where", f"score < {threshold}", "--shard-size", "3")
        found = _by_path(_tar_samples(out))
        assert set(found) == set(expected), source
        assert all(image == original[source](path) for path, (image, _) in found.items()), source


def _tar_members(folder: Path) -> dict[str, bytes]:
    import tarfile

    members = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                members[f"{path}#{member.name}"] = tar.extractfile(member).read()
    return members


@pytest.mark.skipif(not SAMPLE_DIR.is_dir(), reason=f"sample images not found at {SAMPLE_DIR}")
def test_sample_images_to_each_format(lite0_dir, tmp_path):
    """The issue's own case: real ImageNet weights over the sample images, the rows the
    model is unsure of (``score < 0.5``), to each format."""
    import jsonschema

    dest = tmp_path / "dest"
    assert main(["classify", str(SAMPLE_DIR), "--model", str(lite0_dir), "--output", str(dest), "-q",
                 "--shard-size", "50"]) == 0
    table = read_results(str(dest))
    expected = _expected(table, 0.5)
    assert 0 < len(expected) < table.num_rows  # some, not all: the threshold means something here
    sources = sorted(Path(path).read_bytes() for path in expected)
    for fmt in ("webdataset", "imagefolder", "labelstudio"):
        out = tmp_path / fmt
        _export(dest, out, "--where", "score < 0.5", "--shard-size", "16", "--format", fmt)
        if fmt == "webdataset":
            found = _by_path(_tar_samples(out))
            assert set(found) == set(expected)
            assert all(image == Path(path).read_bytes() for path, (image, _) in found.items())
            assert all(meta["label"] == expected[path]["label"] for path, (_, meta) in found.items())
        else:
            images = out / "images" if fmt == "labelstudio" else out
            assert sorted(path.read_bytes() for path in images.rglob("*.JPEG")) == sources
        if fmt == "imagefolder":  # a folder per predicted label
            assert sorted(path.parent.name for path in out.rglob("*.JPEG")) == sorted(
                safe_name(row["label"]) for row in expected.values())
        if fmt == "labelstudio":
            tasks = json.loads((out / TASKS).read_text())
            jsonschema.validate(tasks, LABEL_STUDIO_IMPORT_SCHEMA)
            assert sorted(task["data"]["path"] for task in tasks) == sorted(expected)


# --------------------------------------------------------------------------- kill -9, then --resume


class _GatedFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; once the gate closes, only ``free`` more requests are answered
    and the others wait for it to open: an export stops mid-way on an event, not a time."""

    gate = threading.Event()
    free = 0
    lock = threading.Lock()

    def do_GET(self):
        with self.lock:
            allowed = type(self).free > 0 or self.gate.is_set()
            type(self).free -= 0 if self.gate.is_set() else 1
        if not allowed:
            self.gate.wait()
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def gated_server(images):
    _GatedFiles.gate.set()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_GatedFiles, directory=str(images)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    _GatedFiles.gate.set()
    server.shutdown()


def test_kill_9_then_resume_exports_every_row_once(images, gated_server, tiny_vit, tmp_path, start):
    files = sorted(images.rglob("*.jpg"))
    urls = [f"{gated_server}/{file.relative_to(images).as_posix().replace(' ', '%20')}" for file in files]
    (tmp_path / "urls.txt").write_text("".join(f"{url}\n" for url in urls))
    dest, out = tmp_path / "dest", tmp_path / "out"
    assert main(["classify", str(tmp_path / "urls.txt"), "--from-list", "--model", tiny_vit, "--output", str(dest),
                 "-q", "--labels", "none"]) == 0
    by_url = dict(zip(urls, files))
    with _GatedFiles.lock:
        _GatedFiles.free = 3
        _GatedFiles.gate.clear()
    args = ["export", dest, "--to", out, "--shard-size", "1", "-q"]
    run = start(args, tmp_path / "run1")
    deadline = time.monotonic() + 120
    while not _committed(out):  # the event: the manifest lists a committed shard
        assert run.proc.poll() is None, run.stderr
        assert time.monotonic() < deadline, "no shard committed"
        time.sleep(0.05)
    kill_session(run)
    committed = _committed(out)
    assert 0 < len(committed) < len(files)
    # Resumed, stopped again (Ctrl-C: exit 130, what finished committed), resumed to the end.
    with _GatedFiles.lock:
        _GatedFiles.free = 2
    run = start([*args, "--resume"], tmp_path / "run2")
    while len(_committed(out)) < len(committed) + 1:
        assert run.proc.poll() is None, run.stderr
        assert time.monotonic() < deadline, "no shard committed"
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGINT)
    assert run.wait(60) == 130, run.stderr
    assert "rerun the same command with --resume" in run.stderr
    # Resumed again, a worker process killed while it holds a shard: its tasks go again.
    with _GatedFiles.lock:
        _GatedFiles.free = 0
    resumed = start([*args, "--resume"], tmp_path / "run3")
    while not (workers := [pid for pid, (_, command) in session_processes(resumed.pid).items()
                           if "spawn_main" in command]):
        assert resumed.proc.poll() is None, resumed.stderr
        assert time.monotonic() < deadline, "no worker process"
        time.sleep(0.05)
    os.kill(workers[0], signal.SIGKILL)
    _GatedFiles.gate.set()
    assert resumed.wait(120) == 0, resumed.stderr
    assert "a worker process died" in resumed.stderr
    found = _by_path(_tar_samples(out))
    assert set(found) == set(urls)
    assert all(image == by_url[url].read_bytes() for url, (image, _) in found.items())
    assert pq.ParquetFile(out / SELECTION).metadata.num_row_groups == len(files)


def _committed(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text())["shards"]
    except (OSError, ValueError):
        return {}

