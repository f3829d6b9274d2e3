"""Collections as the libraries users get them from write them: Hugging Face ``datasets``
Parquet (hub layout with ClassLabel features, and a plain ``to_parquet`` of image paths),
``webdataset`` shards (compressed tars) and img2dataset's output layout. Each is made by
the library itself, classified through the real command and a real local Ray, and
compared with the same images classified as loose files.

img2dataset is not installed for these tests (it pulls in opencv, albumentations, wandb
and older webdataset/pandas); its output layout is written here with webdataset's own
TarWriter (as img2dataset writes its tars) and pyarrow (its Parquet columns)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visionbatch.cli import main
from visionbatch.destination import SUMMARY, read_results
from visionbatch.imagenet import imagenet_classes, imagenet_wnids
from visionbatch.samples import Reading, shard_samples
from visionbatch.shards import TableShard
from visionbatch.storage import Storage

from test_inputs import _same_predictions

datasets = pytest.importorskip("datasets")
wds = pytest.importorskip("webdataset")

def _first_name(label: str) -> str:
    return label.split(",")[0].strip()


@pytest.fixture(scope="module")
def loose(sample_dir, tmp_path_factory) -> Path:
    """Every eighth sample image whose class's first name is no other class's (so that a
    class named by it is one class), copied as loose files in their WordNet-id folders."""
    first_names = [_first_name(name).lower() for _, name in imagenet_classes()]
    unique = {wnid for wnid, name in imagenet_classes() if first_names.count(_first_name(name).lower()) == 1}
    files = [f for f in sorted(sample_dir.rglob("*.JPEG")) if f.parent.name in unique][::8]
    root = tmp_path_factory.mktemp("loose") / "images"
    for file in files:
        (root / file.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, root / file.parent.name / file.name)
    return root


@pytest.fixture(scope="module")
def loose_results(loose, tiny_vit, tmp_path_factory) -> dict[str, dict]:
    """The loose files' rows by file name, and their job's summary under ``None``."""
    dest = tmp_path_factory.mktemp("loose-out") / "out"
    assert main(["classify", str(loose), "--model", tiny_vit, "--output", str(dest), "-q"]) == 0
    rows = {Path(row["path"]).name: row for row in read_results(str(dest)).to_pylist()}
    return {**rows, None: json.loads((dest / SUMMARY).read_text())}


def _files(loose: Path) -> list[Path]:
    return sorted(loose.rglob("*.JPEG"))


def _classify(source: Path, dest: Path, model: str, *options: str) -> dict[str, dict]:
    """Run the command; rows by the last part of their ``path`` (a file's or member's name, a row number)."""
    assert main(["classify", str(source), "--model", model, "--output", str(dest), "-q", *options]) == 0
    return {row["path"].rpartition("/")[2].rpartition("#")[2]: row for row in read_results(str(dest)).to_pylist()}


def _same_as_loose(rows: dict[str, dict], loose_results: dict[str, dict], true_labels: bool = True) -> None:
    _same_predictions(rows, {name: row for name, row in loose_results.items() if name is not None}, true_labels)


# --------------------------------------------------------------------------- Hugging Face datasets


def _hub_dataset(files: list[Path], names: list[str], name_of: dict[str, str], folder: Path) -> Path:
    """``files`` as the hub stores a dataset: image bytes embedded (``path``: the file's
    name), a ClassLabel ``label`` over ``names``, in ``data/train-0000X-of-00002.parquet``."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": f.read_bytes(), "path": f.name} for f in files],
         "label": [names.index(name_of[f.parent.name]) for f in files]}, features=features)
    data = folder / "data"
    data.mkdir(parents=True)
    for i in range(2):
        ds.shard(2, i, contiguous=True).to_parquet(str(data / f"train-{i:05d}-of-00002.parquet"))
    return data


@pytest.mark.slow
@pytest.mark.parametrize("naming", ["wordnet ids", "class names"])
def test_datasets_class_labels_mean_their_own_names(naming, loose, loose_results, tiny_vit, tmp_path, capfd):
    files = _files(loose)
    if naming == "wordnet ids":
        name_of = {f.parent.name: f.parent.name for f in files}
    else:  # "tench", "goldfish", ...: the model's labels by their first synonym
        name_of = {wnid: _first_name(name) for wnid, name in imagenet_classes()}
    names = sorted({name_of[f.parent.name] for f in files}, reverse=True)  # an order unrelated to the model's
    data = _hub_dataset(files, names, name_of, tmp_path / naming)
    capfd.readouterr()
    rows = _classify(data, tmp_path / "out", tiny_vit, "--image-column", "image", "--label-column", "label")
    assert "class indices" not in capfd.readouterr().err  # names, not indices: nothing to warn about
    _same_as_loose(rows, loose_results)
    summary = json.loads((tmp_path / "out" / SUMMARY).read_text())
    assert summary["labelled"] == len(files) and summary["top1"] == loose_results[None]["top1"]


@pytest.mark.slow
def test_integer_labels_without_names_are_class_indices_and_said(loose, loose_results, tiny_vit, tmp_path, capfd):
    files = _files(loose)
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    pq.write_table(pa.table({"image": [f.read_bytes() for f in files], "label": [index[f.parent.name] for f in files]}),
                   tmp_path / "t.parquet")
    capfd.readouterr()
    rows = _classify(tmp_path / "t.parquet", tmp_path / "out", tiny_vit, "--image-column", "image",
                     "--label-column", "label")
    warned = [line for line in capfd.readouterr().err.splitlines() if "class indices" in line]
    assert len(warned) == 1 and "--label-column label" in warned[0]
    _same_as_loose({files[int(row)].name: result for row, result in rows.items()}, loose_results)


@pytest.mark.slow
def test_plain_to_parquet_reads_each_image_from_its_path(loose, loose_results, tiny_vit, tmp_path):
    """``cast_column("image", Image())`` of file paths, then ``to_parquet()``: the structs
    hold {bytes: null, path}; each row is read from its path, as the file itself is."""
    files = _files(loose)
    ds = datasets.Dataset.from_dict({"image": [str(f) for f in files]}).cast_column("image", datasets.Image())
    ds.to_parquet(str(tmp_path / "images.parquet"))
    assert pq.read_table(tmp_path / "images.parquet").column("image")[0].as_py()["bytes"] is None
    rows = _classify(tmp_path / "images.parquet", tmp_path / "out", tiny_vit, "--image-column", "image")
    _same_as_loose(rows, loose_results)  # true labels from the files' folders, as for the loose files
    assert {row["path"] for row in rows.values()} == {str(f) for f in files}


def test_image_paths_are_read_with_the_limits_and_errors_of_files(loose, tmp_path, monkeypatch):
    """Relative paths are taken from the table's folder; a file gone since, and one over
    --max-bytes, are the read_error rows a loose file would give (read without Ray)."""
    folder = tmp_path / "dataset"
    shutil.copytree(loose, folder)
    files = _files(folder)[:2]
    gone = folder / "gone" / "missing.jpg"
    gone.parent.mkdir()
    shutil.copy(files[0], gone)
    monkeypatch.chdir(folder)  # datasets opens relative paths from where it runs: the dataset's folder
    ds = datasets.Dataset.from_dict({"image": [str(f.relative_to(folder)) for f in [*files, gone]]})
    table_file = folder / "relative.parquet"
    ds.cast_column("image", datasets.Image()).to_parquet(str(table_file))
    gone.unlink()
    monkeypatch.chdir(tmp_path)
    shard = TableShard("000-0000000", str(table_file), table_file.stat().st_size, 0, 0, 0, 3, 0)
    smallest = min(f.stat().st_size for f in files)
    for max_bytes in (None, smallest - 1):
        samples = list(shard_samples(shard, Reading(Storage(), max_bytes, image_column="image"))[0])
        assert [s.path for s in samples] == [*map(str, files), str(gone)]
        assert samples[2].data.startswith("read_error:") and "No such file" in samples[2].data
        if max_bytes is None:
            assert [s.data for s in samples[:2]] == [f.read_bytes() for f in files]
        else:
            assert f"read_error: larger than {max_bytes} bytes (--max-bytes)" in [s.data for s in samples[:2]]


# --------------------------------------------------------------------------- webdataset and img2dataset


@pytest.mark.slow
def test_webdataset_tar_gz_shards(loose, loose_results, tiny_vit, tmp_path, capfd):
    files = _files(loose)
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.ShardWriter(str(shards / "train-%04d.tar.gz"), maxcount=10, verbose=0) as sink:
        for f in files:
            sink.write({"__key__": f.stem, "jpg": f.read_bytes(), "cls": index[f.parent.name]})
    assert len(list(shards.glob("*.tar.gz"))) == -(-len(files) // 10)
    rows = _classify(shards, tmp_path / "out", tiny_vit, "--label-column", "cls")
    assert {row["key"] for row in rows.values()} == {f.stem for f in files}
    _same_as_loose({f.name: rows[f"{f.stem}.jpg"] for f in files}, loose_results)

    # Archives that are not WebDataset shards are refused with the reason, named or met in a folder.
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    shutil.make_archive(str(zipped / "images"), "zip", loose)
    for source in (zipped / "images.zip", zipped):
        capfd.readouterr()
        assert main(["classify", str(source), "--model", tiny_vit, "--output", str(tmp_path / "z")]) == 1
        error = capfd.readouterr().err
        assert "images.zip is an archive that is not read" in error and ".tar.gz" in error, error


@pytest.mark.slow
def test_img2dataset_output_tars_and_parquet(loose, loose_results, tiny_vit, tmp_path):
    """img2dataset's webdataset output (a tar per shard, each sample key.jpg, key.txt,
    key.json, beside a metadata Parquet and stats) and its Parquet output (jpg bytes and
    the sample's key, url, caption, status; a failed download has no jpg)."""
    files = _files(loose)
    out = tmp_path / "img2dataset"
    out.mkdir()
    keys = [f"{i // 10:05d}{i % 10:04d}" for i in range(len(files))]
    for shard in range(-(-len(files) // 10)):
        with wds.TarWriter(str(out / f"{shard:05d}.tar")) as tar:
            for key, f in list(zip(keys, files))[shard * 10:(shard + 1) * 10]:
                tar.write({"__key__": key, "jpg": f.read_bytes(), "txt": f.stem, "json": {"key": key}})
        pq.write_table(pa.table({"key": keys[shard * 10:(shard + 1) * 10]}), out / f"{shard:05d}.parquet")
        (out / f"{shard:05d}_stats.json").write_text("{}")
    rows = _classify(out, tmp_path / "tar-out", tiny_vit, "--labels", "none")
    assert len(rows) == len(files)
    _same_as_loose({f.name: rows[f"{key}.jpg"] for key, f in zip(keys, files)}, loose_results, true_labels=False)

    table = pa.table({"key": [*keys, "failed"], "url": [f"http://host/{f.name}" for f in files] + ["http://host/x"],
                      "caption": [f.name for f in files] + ["gone"],
                      "jpg": pa.array([f.read_bytes() for f in files] + [None], pa.binary()),
                      "status": ["success"] * len(files) + ["failed_to_download"]})
    pq.write_table(table, tmp_path / "00000.parquet")
    dest = tmp_path / "parquet-out"
    assert main(["classify", str(tmp_path / "00000.parquet"), "--model", tiny_vit, "--output", str(dest), "-q",
                 "--image-column", "jpg", "--keep-columns", "key,caption,status", "--labels", "none"]) == 0
    results = read_results(str(dest)).to_pylist()
    assert [row["key"] for row in results] == [*keys, "failed"]
    assert results[-1]["error"].startswith("empty_file") and results[-1]["status"] == "failed_to_download"
    _same_as_loose({row["caption"]: row for row in results[:-1]}, loose_results, true_labels=False)
