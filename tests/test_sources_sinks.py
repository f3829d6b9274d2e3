"""Listing sources and writing/reading results, on real files."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visionbatch.destination import Destination, read_results
from visionbatch.results import RESULT_SCHEMA
from visionbatch.sources import ListingCounts, iter_list_file, iter_source
from visionbatch.errors import SourceError
from visionbatch.storage import Storage, canonical_uri

from conftest import write_finished_dest


def _list(uri: str) -> tuple[list[str], ListingCounts]:
    counts = ListingCounts()
    return [path for batch in iter_source(uri, Storage(), counts) for path in batch], counts


def _read_list(uri: str, counts: ListingCounts, cwd: str = "/") -> list[str]:
    return [path for paths, _ in iter_list_file(uri, Storage(), counts, cwd) for path in paths]


def test_folder_listing_is_recursive_and_counts_non_images(image_tree):
    (image_tree / "folder.jpg").mkdir()  # a folder named like an image is not a file
    paths, counts = _list(str(image_tree))
    assert len(paths) == 12 and counts.skipped_non_image == 1
    assert any(p.endswith(".PNG") for p in paths)  # extensions are case-insensitive
    assert paths == _list(str(image_tree))[0]  # the order is fixed: shards depend on it


def test_glob_and_single_file(image_tree):
    pngs, _ = _list(str(image_tree / "*" / "*.PNG"))
    assert len(pngs) == 4
    assert _list(pngs[0])[0] == pngs[:1]


def test_from_list_text_csv_parquet(image_tree, tmp_path):
    paths = _list(str(image_tree))[0][:3]
    (tmp_path / "list.txt").write_text("\n".join(paths) + "\nnotes.txt\n\n")
    (tmp_path / "list.csv").write_text("path,other\n" + "".join(f'"{p}",1\n' for p in paths))
    pq.write_table(pa.table({"path": paths}), tmp_path / "list.parquet")
    for name in ("list.txt", "list.csv", "list.parquet"):
        counts = ListingCounts()
        assert _read_list(str(tmp_path / name), counts) == paths
    assert counts.skipped_non_image == 0


def test_relative_list_entries_resolve_against_the_given_directory(tmp_path):
    (tmp_path / "list.txt").write_text("a/b.jpg\n./c.png\n /x//y/../z.JPEG \ns3://b/k/v.jpg\nnotes.txt\n")
    counts = ListingCounts()
    got = _read_list(str(tmp_path / "list.txt"), counts, cwd="/data")
    assert got == ["/data/a/b.jpg", "/data/c.png", "/x/z.JPEG", "s3://b/k/v.jpg"] and counts.skipped_non_image == 1


def test_missing_source_and_embedded_secret_are_refused(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        _list(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="embedded credentials") as err:
        Storage().resolve("s3://AKIAXXX:supersecret@bucket/x")
    assert "supersecret" not in str(err.value)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_results_round_trip(fmt, tmp_path):
    rows = pa.table({
        "path": ["a.jpg", "b.jpg"], "label": ["cat", None], "label_id": [3, None], "score": [0.5, None],
        "top_k_labels": [["cat", "dog"], None], "top_k_scores": [[0.5, 0.25], None], "true_label": ["cat", None],
        "correct": [True, None], "true_label_score": [0.5, None], "error": [None, "empty_file: file has 0 bytes"],
        "width": [10, None], "height": [5, None], "sha256": ["ab" * 32, None],
    })
    destination = Destination(str(tmp_path / "dest"))
    assert not destination.has_results()
    write_finished_dest(destination, rows, fmt)
    assert destination.has_results() and destination.manifest()["rows"] == 2
    back = read_results(str(tmp_path / "dest"))
    assert back.schema == RESULT_SCHEMA
    assert back.to_pylist() == rows.cast(RESULT_SCHEMA).to_pylist()
    assert not [p for p in (tmp_path / "dest").iterdir() if p.name.endswith(".tmp")]


def _linked_tree(tmp_path):
    """src/ with `up -> ..` and mutual links a/tob -> ../b, b/toa -> ../a; outside/ (out of
    src, reached through src/ext) with a link to itself and one back into src."""
    from conftest import write_image

    src, outside = tmp_path / "src", tmp_path / "outside"
    files = [write_image(src / name, seed=i) for i, name in enumerate(["n01440764/x.jpg", "a/1.jpg", "b/2.jpg"])]
    far = [write_image(outside / "o.jpg", seed=9), write_image(outside / "deep" / "p.jpg", seed=10)]
    (src / "n01440764" / "up").symlink_to("..")
    (src / "a" / "tob").symlink_to("../b")
    (src / "b" / "toa").symlink_to("../a")
    (src / "ext").symlink_to("../outside")
    (outside / "self").symlink_to(".")
    (outside / "deep" / "loop").symlink_to("../../outside")
    (outside / "home").symlink_to("../src")
    return src, [str(p) for p in files], [str(src / "ext" / p.relative_to(outside)) for p in far]


@pytest.mark.parametrize("follow", [False, True])
def test_folder_symlinks_give_every_file_one_path(follow, tmp_path):
    """Not followed by default (counted); followed with --follow-symlinks where they lead
    out of the source, each folder once (by device and inode): cycles are cut."""
    src, inside, beyond = _linked_tree(tmp_path)
    counts = ListingCounts()
    paths = [p for batch in iter_source(str(src), Storage(), counts, follow_symlinks=follow) for p in batch]
    assert len(paths) == len(set(paths))
    assert sorted(paths) == sorted(inside + beyond if follow else inside)
    # Not followed: up, tob, toa, ext; followed: up, tob, toa lead into src, and
    # outside's self, loop (cycles) and home (into src) are cut.
    assert counts.skipped_folder_links == (6 if follow else 4)


def test_canonical_uri_is_one_spelling_per_source(tmp_path, monkeypatch):
    """What a job's identity records: the same folder or prefix in two spellings is one
    source, another is not; what storage cannot read is kept as given."""
    monkeypatch.chdir(tmp_path)
    folder = str(tmp_path / "data")
    assert {canonical_uri(u) for u in ("data", "./data/", "data/../data//", f"file://{folder}/", folder)} == {folder}
    assert canonical_uri("other") != folder
    assert canonical_uri("photos/*/*.jpg") == str(tmp_path / "photos/*/*.jpg")
    assert canonical_uri("s3://bucket/prefix/") == canonical_uri("S3://bucket//prefix") == "s3://bucket/prefix"
    assert canonical_uri("s3://anonymous@bucket/p/") == "s3://anonymous@bucket/p"
    assert canonical_uri("gs://bucket/") == "gs://bucket"
    assert canonical_uri("https://host/list.txt") == "https://host/list.txt"
