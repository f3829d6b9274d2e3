"""Inputs that are not loose image files: WebDataset tars and Parquet tables of image
bytes, through the real command against the same images as loose files (the S3 case on
the moto server), and the helpers that make them. What every engine must do with tars,
tables, URLs and special files is in test_engine_contract.py."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visionbatch.cli import main
from visionbatch.destination import read_results
from visionbatch.imagenet import imagenet_wnids
from visionbatch.samples import Reading, tar_samples
from visionbatch.shards import TarShard
from visionbatch.storage import Storage



def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def pack_tars(files: list[Path], folder: Path, count: int) -> dict[str, Path]:
    """``files`` (in class folders named by WordNet id) packed into ``count`` WebDataset
    tars, each sample an image and its class index (``.cls``); returns row path -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    members = {}
    per_tar = -(-len(files) // count)
    for t in range(count):
        tar = folder / f"shard-{t:02d}.tar"
        with tarfile.open(tar, "w") as archive:
            for i, file in enumerate(files[t * per_tar:(t + 1) * per_tar]):
                key = f"{t:02d}{i:04d}"
                _add(archive, f"{key}.jpg", file.read_bytes())
                _add(archive, f"{key}.cls", str(index[file.parent.name]).encode())
                _add(archive, f"{key}.json", b"{}")
                members[f"{tar}#{key}.jpg"] = file
    return members


def _by_file(table: pa.Table, files: dict[str, Path] | None = None) -> dict[str, dict]:
    """Rows keyed by the loose file they came from."""
    return {str(files[row["path"]] if files else row["path"]): row for row in table.to_pylist()}


def _same_predictions(ours: dict[str, dict], loose: dict[str, dict], true_labels: bool = True) -> None:
    assert ours.keys() == loose.keys()
    for name, row in ours.items():
        assert row["error"] is None, row
        assert row["label"] == loose[name]["label"] and row["top_k_labels"] == loose[name]["top_k_labels"]
        assert row["score"] == pytest.approx(loose[name]["score"], abs=1e-5)
        if true_labels:
            assert row["true_label"] == loose[name]["true_label"] is not None


# --------------------------------------------------------------------------- WebDataset


def test_tar_samples_keys_labels_and_breaks(tmp_path):
    """Read without Ray: one sample per image member, keyed as webdataset keys them; a
    corrupt member is passed on (decode makes its error), a cut one is said."""
    tar = tmp_path / "a.tar"
    with tarfile.open(tar, "w") as archive:
        _add(archive, "d/x.0.jpg", b"jpeg bytes")  # key: up to the first dot of the base name
        _add(archive, "d/x.cls", b"7\n")
        _add(archive, "y.png", b"png bytes")
        _add(archive, "y.txt", b"tench")
        _add(archive, "z.json", b"{}")
    reading = Reading(Storage(), label_column="cls")
    whole = tar.read_bytes()

    def samples(data: bytes) -> list[tuple]:
        tar.write_bytes(data)
        shard = TarShard("000-0000000", str(tar), len(data), 0)
        return [(s.path.partition("#")[2], s.data, s.label, s.key) for s in tar_samples(shard, reading)]

    assert samples(whole) == [("d/x.0.jpg", b"jpeg bytes", b"7\n", "d/x"), ("y.png", b"png bytes", None, "y")]
    # Each member is a 512-byte header and its data in 512-byte blocks: y.png's header is at 2048.
    cut = samples(whole[:2048 + 100])  # inside y.png's header
    assert cut[0][:2] == ("d/x.0.jpg", b"jpeg bytes") and cut[1][0] == "@2048" and cut[1][1].startswith("truncated:")
    cut = samples(whole[:2048 + 512 + 4])  # inside y.png's data
    assert cut[-1][0] == "y.png" and cut[-1][1].startswith("truncated: the tar ends inside this member")
    assert len(cut) == 2
    assert samples(b"not a tar" * 100)[0][1].startswith("read_error: not a tar file")


@pytest.mark.slow
def test_webdataset_tars_match_loose_files_local_and_s3(sample_files, sample_results, tiny_vit, tmp_path, s3_server):
    members = pack_tars(sample_files, tmp_path / "tars", 4)
    dest = tmp_path / "out"
    assert main(["classify", str(tmp_path / "tars"), "--model", tiny_vit, "--output", str(dest), "-q",
                 "--label-column", "cls"]) == 0
    table = read_results(str(dest))
    paths = table.column("path").to_pylist()
    assert table.num_rows == 200 and len(set(paths)) == 200 and set(paths) == set(members)
    assert table.column("key").to_pylist() == [p.rpartition("#")[2].partition(".")[0] for p in paths]
    _same_predictions(_by_file(table, members), sample_results)
    manifest = json.loads((dest / "_manifest.json").read_text())
    assert len(manifest["shards"]) == 4 and manifest["complete"]

    # The same tars in a bucket, read as a prefix.
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="wds")
    for tar in sorted((tmp_path / "tars").iterdir()):
        client.upload_file(str(tar), "wds", f"train/{tar.name}")
    s3_dest = tmp_path / "s3-out"
    assert main(["classify", "s3://wds/train/", "--model", tiny_vit, "--output", str(s3_dest), "-q",
                 "--label-column", "cls", "--s3-endpoint", s3_server]) == 0
    remote = read_results(str(s3_dest))
    by_member = {f"s3://wds/train/{Path(p.partition('#')[0]).name}#{p.partition('#')[2]}": f
                 for p, f in members.items()}
    _same_predictions(_by_file(remote, by_member), sample_results)


# --------------------------------------------------------------------------- Parquet tables of images


def write_image_tables(files: list[Path], folder: Path) -> tuple[Path, Path]:
    """The files as a Hugging Face datasets-style Parquet (struct ``image`` of bytes and
    path, int ``label``, and a ``caption``), and as a plain one (binary ``jpg``, the
    class name in ``name``), in row groups of 30."""
    from visionbatch.imagenet import imagenet_classes

    index = {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}
    names = dict(imagenet_classes())
    folder.mkdir(parents=True, exist_ok=True)
    hf = pa.table({
        "image": pa.array([{"bytes": f.read_bytes(), "path": str(f)} for f in files],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "label": pa.array([index[f.parent.name] for f in files], pa.int64()),
        "caption": [f"a photo of {f.stem}" for f in files],
    })
    plain = pa.table({"jpg": pa.array([f.read_bytes() for f in files], pa.binary()),
                      "name": [names[f.parent.name].split(",")[0] for f in files]})
    pq.write_table(hf, folder / "hf.parquet", row_group_size=30)
    (folder / "plain").mkdir()
    pq.write_table(plain, folder / "plain" / "part-0.parquet", row_group_size=30)
    return folder / "hf.parquet", folder / "plain"


def test_keep_columns_that_collide_are_refused(tmp_path, capfd):
    assert main(["classify", str(tmp_path), "--output", str(tmp_path / "o"), "--image-column", "image",
                 "--keep-columns", "caption,label"]) == 2
    assert "--keep-columns: label would collide" in capfd.readouterr().err
