"""Listing sources and writing/reading results, on real files."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visionbatch.sinks import Destination, ResultWriter, read_results, RESULT_SCHEMA
from visionbatch.sources import SourceError, list_images, resolve

from conftest import write_image


def test_folder_listing_is_recursive_and_counts_non_images(image_tree):
    (image_tree / "folder.jpg").mkdir()  # a folder named like an image is not a file
    listing = list_images((str(image_tree),))
    assert len(listing.paths) == 12 and listing.skipped_non_image == 1
    assert listing.paths == sorted(listing.paths)
    assert any(p.endswith(".PNG") for p in listing.paths)  # extensions are case-insensitive


def test_glob_and_single_file(image_tree):
    pngs = list_images((str(image_tree / "*" / "*.PNG"),))
    assert len(pngs.paths) == 4
    one = list_images((pngs.paths[0],))
    assert one.paths == pngs.paths[:1]


def test_from_list_text_csv_parquet(image_tree, tmp_path):
    paths = list_images((str(image_tree),)).paths[:3]
    (tmp_path / "list.txt").write_text("\n".join(paths) + "\n\n")
    (tmp_path / "list.csv").write_text("path,other\n" + "".join(f'"{p}",1\n' for p in paths))
    pq.write_table(pa.table({"path": paths}), tmp_path / "list.parquet")
    for name in ("list.txt", "list.csv", "list.parquet"):
        assert list_images((str(tmp_path / name),), from_list=True).paths == paths


def test_missing_source_and_embedded_secret_are_refused(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        list_images((str(tmp_path / "nope"),))
    with pytest.raises(SourceError, match="embedded credentials") as err:
        resolve("s3://AKIAXXX:supersecret@bucket/x")
    assert "supersecret" not in str(err.value)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_results_round_trip(fmt, tmp_path):
    rows = pa.table({
        "path": ["a.jpg", "b.jpg"], "label": ["cat", None], "label_id": [3, None], "score": [0.5, None],
        "top_k_labels": [["cat", "dog"], None], "top_k_scores": [[0.5, 0.25], None], "true_label": ["cat", None],
        "correct": [True, None], "error": [None, "empty_file: file has 0 bytes"], "width": [10, None], "height": [5, None],
    })
    destination = Destination(str(tmp_path / "dest"))
    assert not destination.has_results()
    writer = ResultWriter(destination, fmt)
    writer.write(rows)
    manifest = writer.commit()
    assert manifest["rows"] == 2 and destination.has_results()
    back = read_results(str(tmp_path / "dest"))
    assert back.schema == RESULT_SCHEMA
    assert back.to_pylist() == rows.cast(RESULT_SCHEMA).to_pylist()
    assert not [p for p in (tmp_path / "dest").iterdir() if p.name.endswith(".tmp")]
