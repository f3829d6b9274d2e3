"""Shards: stable ids, idempotent part files, resume that skips committed shards, the manifest."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

import visionbatch
from visionbatch.destination import Destination, part_name, read_results
from visionbatch.errors import DestinationError, JobError, Superseded
from visionbatch.lease import Lease
from visionbatch.manifest import Manifest
from visionbatch.results import ROW_COLUMN, SHARD_COLUMN, SHARD_ROWS_COLUMN, conform
from visionbatch.shards import InputSpec, ShardPlanner, iter_shards
from visionbatch.sources import ListingCounts
from visionbatch.storage import Storage
from visionbatch.writer import ShardWriter, write_shard


def _spec(root, shard_size=5, limit=None, from_list=False) -> InputSpec:
    return InputSpec(sources=(str(root),), from_list=from_list, shard_size=shard_size, limit=limit, cwd="/")


def _shards(spec):
    return list(iter_shards(spec, Storage(), ListingCounts()))


def test_shard_ids_and_contents_are_stable(image_tree):
    first, again = _shards(_spec(image_tree)), _shards(_spec(image_tree))
    assert [s.id for s in first] == ["000-0000000", "000-0000001", "000-0000002"]
    assert [(s.id, s.paths, s.digest) for s in first] == [(s.id, s.paths, s.digest) for s in again]
    assert [len(s.paths) for s in first] == [5, 5, 2]
    assert len({p for s in first for p in s.paths}) == 12
    assert [len(s.paths) for s in _shards(_spec(image_tree, limit=7))] == [5, 2]


def test_each_source_numbers_its_own_shards(image_tree, tmp_path):
    paths = [p for s in _shards(_spec(image_tree)) for p in s.paths]
    (tmp_path / "list.txt").write_text("\n".join(paths[:3]) + "\n")
    spec = InputSpec(sources=(str(tmp_path / "list.txt"), str(tmp_path / "list.txt")), from_list=True,
                     shard_size=2, limit=None, cwd="/")
    assert [s.id for s in _shards(spec)] == ["000-0000000", "000-0000001", "001-0000000", "001-0000001"]


def test_planner_skips_committed_shards_and_refuses_a_changed_input(image_tree):
    shards = _shards(_spec(image_tree))
    planner = ShardPlanner(_spec(image_tree), Storage())
    planner.start(committed={shards[1].id: shards[1].digest})
    handed = []
    while (shard := planner.next()) is not None:
        handed.append(shard.id)
    assert handed == [shards[0].id, shards[2].id]
    assert planner.status()["already_done"] == 5 and planner.status()["listing_done"]
    assert [s.id for s in planner.unfinished()] == handed  # nothing committed yet
    planner.mark_committed(handed[:1])
    assert [s.id for s in planner.unfinished()] == handed[1:]

    changed = ShardPlanner(_spec(image_tree), Storage())
    changed.start(committed={shards[0].id: "0" * 16})
    assert changed.next() is None
    assert f"shard {shards[0].id} (from {shards[0].paths[0]}) now holds other files" in \
        changed.status()["input_changed"]
    # Files removed from the end: a committed shard the listing no longer makes.
    gone = ShardPlanner(_spec(image_tree), Storage())
    gone.start(committed={"000-0000009": "0" * 16})
    while gone.next() is not None:
        pass
    message = gone.status()["input_changed"]
    assert "000-0000009" in message and "no longer in it" in message and "new DEST" in message


def _block(shard: str, rows: list[int], total: int) -> pa.Table:
    n = len(rows)
    return pa.table({SHARD_COLUMN: [shard] * n, ROW_COLUMN: pa.array(rows, pa.int32()),
                     SHARD_ROWS_COLUMN: pa.array([total] * n, pa.int32()),
                     "path": [f"/img/{shard}/{r}.jpg" for r in rows], "error": [None] * n,
                     "label": ["cat"] * n, "score": pa.array([0.5] * n, pa.float32()),
                     "top_k_labels": [["cat", "dog"]] * n, "true_label": pa.array([None] * n, pa.string()),
                     "decode_seconds": np.full(n, 0.01), "predict_seconds": np.full(n, 0.02)})


def test_writer_commits_a_shard_once_whole_and_rewrites_the_same_file(tmp_path):
    writer = ShardWriter(str(tmp_path), Storage(), "parquet")
    out = writer(_block("000-0000007", [2, 0], total=3))
    assert out.column("commit").to_pylist() == [None] and not list(tmp_path.iterdir())
    out = writer(_block("000-0000007", [0, 2], total=3))  # a retried task delivers rows again
    assert out.column("rows_in").to_pylist() == [0]
    record = json.loads(writer(_block("000-0000007", [1], total=3)).column("commit")[0].as_py())
    assert record["file"] == part_name("000-0000007", "parquet") and record["rows"] == 3
    assert record["counts"]["predicted"] == 3 and record["counts"]["stage_seconds"]
    first = (tmp_path / record["file"]).read_bytes()
    table = Destination(str(tmp_path)).read_parts([record["file"]])
    assert table.column("path").to_pylist() == [f"/img/000-0000007/{r}.jpg" for r in range(3)]  # shard order

    # The same shard done again (a duplicated task) writes the same name: still one file, same rows.
    again = json.loads(ShardWriter(str(tmp_path), Storage(), "parquet")(_block("000-0000007", [0, 1, 2], 3))
                       .column("commit")[0].as_py())
    assert again["digest"] == record["digest"]
    assert [p.name for p in tmp_path.iterdir()] == [record["file"]]
    assert (tmp_path / record["file"]).read_bytes() == first


def test_manifest_refuses_other_options_and_contradictions(tmp_path):
    destination = Destination(str(tmp_path))
    manifest = Manifest.open(destination, {"model": "a", "top_k": 5}, overwrite=False, resume=False)
    manifest.add(write_shard(destination, "000-0000000", conform(pa.table({"path": ["/a.jpg"]})), "parquet"))
    manifest.write()
    with pytest.raises(DestinationError, match="already holds results"):
        Manifest.open(destination, {"model": "a", "top_k": 5}, overwrite=False, resume=False)
    with pytest.raises(DestinationError, match="model: 'a' there, 'b' now; top_k: 5 there, 2 now"):
        Manifest.open(destination, {"model": "b", "top_k": 2}, overwrite=False, resume=True)
    resumed = Manifest.open(destination, {"model": "a", "top_k": 5}, overwrite=False, resume=True)
    assert list(resumed.shards) == ["000-0000000"]
    with pytest.raises(DestinationError, match="contradict"):
        Manifest.open(destination, {"model": "a", "top_k": 5}, overwrite=True, resume=True)
    with pytest.raises(DestinationError, match="no completed results"):
        read_results(str(tmp_path))  # committed progress, but the job never finished


def test_resume_redoes_only_uncommitted_shards(image_tree, tiny_vit, tmp_path):
    dest = tmp_path / "out"
    first = visionbatch.run([str(image_tree)], str(dest), model=tiny_vit, shard_size=5, progress=False)
    assert first.images_found == 12 and first.shards == 3
    manifest = json.loads((dest / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 12
    assert sorted(manifest["shards"]) == ["000-0000000", "000-0000001", "000-0000002"]
    assert all(s["counts"]["predicted"] == s["rows"] for s in manifest["shards"].values())

    # What an interrupted run leaves: two shards committed, the third's part file
    # written but never committed, no _SUCCESS; and one committed part file damaged since.
    _uncommit(dest, "000-0000002")
    damaged = dest / manifest["shards"]["000-0000001"]["file"]
    damaged.write_bytes(damaged.read_bytes()[:100])
    kept = {name: os.stat(dest / name).st_mtime_ns for name in (manifest["shards"]["000-0000000"]["file"],)}
    with pytest.raises(JobError, match="--resume"):
        visionbatch.run([str(image_tree)], str(dest), model=tiny_vit, shard_size=5, progress=False)
    with pytest.raises(JobError, match="shard_size: 5 there, 4 now"):
        visionbatch.run([str(image_tree)], str(dest), model=tiny_vit, shard_size=4, resume=True, progress=False)

    resumed = visionbatch.run([str(image_tree)], str(dest), model=tiny_vit, shard_size=5, resume=True, progress=False)
    assert resumed.already_done == 5 and resumed.images_found == 12 and resumed.predicted == 12
    assert {name: os.stat(dest / name).st_mtime_ns for name in kept} == kept  # not rewritten
    # The damaged shard is redone under the resumed job's generation; the damaged file, a stray, is removed.
    assert not damaged.exists() and sorted(p.name for p in dest.glob("part-*")) == sorted(
        record["file"] for record in json.loads((dest / "_manifest.json").read_text())["shards"].values())
    paths = read_results(str(dest)).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 12


def _uncommit(dest, shard: str) -> None:
    """Make a finished DEST what an interrupted run leaves: ``shard``'s part file written
    but not committed, no _SUCCESS."""
    manifest = json.loads((dest / "_manifest.json").read_text())
    del manifest["shards"][shard]
    manifest["complete"] = False
    (dest / "_manifest.json").write_text(json.dumps(manifest))
    (dest / "_SUCCESS").unlink()


def test_resume_knows_a_source_by_any_spelling(image_tree, tiny_vit, tmp_path, monkeypatch):
    """The same folder spelled relative, with ./ and a trailing slash, is the same job
    (--resume continues it); another folder with the same files is not."""
    dest = tmp_path / "out"
    visionbatch.run([str(image_tree)], str(dest), model=tiny_vit, shard_size=5, progress=False)
    _uncommit(dest, "000-0000002")
    monkeypatch.chdir(image_tree.parent)
    spelled = f"./{image_tree.name}/"
    resumed = visionbatch.run([spelled], str(dest), model=tiny_vit, shard_size=5, resume=True, progress=False)
    assert resumed.already_done == 10 and resumed.images_found == resumed.predicted == 12
    paths = read_results(str(dest)).column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 12
    other = shutil.copytree(image_tree, tmp_path / "other")
    with pytest.raises(JobError, match=f"sources: \\['{image_tree}'\\] there, \\['{other}'\\] now"):
        visionbatch.run([str(other)], str(dest), model=tiny_vit, shard_size=5, resume=True, progress=False)


def test_resume_knows_a_list_file_by_any_spelling_and_where_its_paths_are_from(image_tree, tiny_vit, tmp_path,
                                                                               monkeypatch):
    """A list file is known by its canonical path too; its relative entries are taken
    from the working directory, which is then part of the job: from another one, the
    same list names other files, and --resume is refused."""
    (tmp_path / "list.txt").write_text("".join(f"{p.relative_to(tmp_path)}\n" for p in sorted(image_tree.rglob("*.jpg"))))
    dest = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    first = visionbatch.run([str(tmp_path / "list.txt")], str(dest), model=tiny_vit, from_list=True, progress=False)
    resumed = visionbatch.run(["list.txt"], str(dest), model=tiny_vit, from_list=True, resume=True, progress=False)
    assert resumed.already_done == first.images_found > 0
    monkeypatch.chdir(image_tree)
    with pytest.raises(JobError, match=f"input.cwd: '{tmp_path}' there, '{image_tree}' now"):
        visionbatch.run([str(tmp_path / "list.txt")], str(dest), model=tiny_vit, from_list=True, resume=True,
                        progress=False)


def test_rows_carry_their_files_sha256(image_tree, tiny_vit, tmp_path):
    """The same bytes under two paths have one digest (exact duplicates need no
    embeddings); an empty file has the digest of no bytes, and its error row."""
    import hashlib

    first = sorted(image_tree.rglob("*.jpg"))[0]
    shutil.copy(first, first.parent / "copy-of-first.jpg")
    (first.parent / "empty.jpg").write_bytes(b"")
    dest = tmp_path / "out"
    visionbatch.run([str(image_tree)], str(dest), model=tiny_vit, progress=False)
    rows = {row["path"]: row for row in read_results(str(dest)).to_pylist()}
    assert rows[str(first)]["sha256"] == rows[str(first.parent / "copy-of-first.jpg")]["sha256"] == \
        hashlib.sha256(first.read_bytes()).hexdigest()
    assert rows[str(first.parent / "empty.jpg")]["sha256"] == hashlib.sha256(b"").hexdigest()
    assert rows[str(first.parent / "empty.jpg")]["error"].startswith("empty_file")
    assert len({row["sha256"] for row in rows.values()}) == len(rows) - 1  # but the copy, each its own


def test_a_dest_of_an_older_manifest_version_is_refused_on_resume_and_still_read(image_tree, tiny_vit, tmp_path):
    """A DEST written before the job's record held its input whole (manifest version 3)
    is never resumed into, mixed with this version's record: --resume says what to do;
    its finished results stay readable."""
    dest = tmp_path / "out"
    first = visionbatch.run([str(image_tree)], str(dest), model=tiny_vit, progress=False)
    manifest = json.loads((dest / "_manifest.json").read_text())
    listed = manifest["job"].pop("input")
    manifest["job"].update(sources=listed["sources"], from_list=False, list_cwd=None, follow_symlinks=False,
                           shard_size=listed["shard_size"], limit=None, image_column=None, url_column=None,
                           label_column=None)
    (dest / "_manifest.json").write_text(json.dumps({**manifest, "version": 3}))
    with pytest.raises(JobError, match=r"older visionbatch \(manifest version 3; this one writes 4\).*--overwrite"):
        visionbatch.run([str(image_tree)], str(dest), model=tiny_vit, resume=True, progress=False)
    assert read_results(str(dest)).num_rows == first.images_found > 0


@pytest.mark.parametrize("fmt,damage", [("parquet", "truncated"), ("csv", "cut at a row boundary"),
                                        ("parquet", "missing")])
def test_readers_verify_every_part_file(fmt, damage, tmp_path):
    from conftest import write_finished_dest
    from visionbatch.cli import main

    rows = conform(pa.table({"path": [f"/img/{i}.jpg" for i in range(6)], "error": ["read_error: gone"] * 6}))
    write_finished_dest(Destination(str(tmp_path)), rows, fmt, shard_size=3)
    part = tmp_path / part_name("000-0000001", fmt)
    if damage == "truncated":
        part.write_bytes(part.read_bytes()[:-40])
    elif damage == "missing":
        part.unlink()
    else:
        part.write_text("".join(part.read_text().splitlines(keepends=True)[:3]))  # header + 2 of 3 rows
    with pytest.raises(DestinationError, match=part.name):
        read_results(str(tmp_path))
    for command in (["evaluate", str(tmp_path)], ["report", str(tmp_path), "--html", str(tmp_path / "r.html")]):
        assert main(command) == 1


def test_a_stale_job_is_fenced_off_and_its_late_commit_refused(tmp_path, monkeypatch):
    """Job A holds DEST's lease (generation 1) and commits a shard; B takes the lease over
    (generation 2: A's counts as stale), replaces DEST and finishes. A's heartbeat stops
    renewing, and a late beat of A's is undone by B's; A's writes and deletes raise
    Superseded naming B; a manifest of A's that lands anyway (written between a check and
    the write) makes readers refuse DEST instead of reading A's results."""
    rows = conform(pa.table({"path": ["/a.jpg", "/b.jpg"]}))
    a = Lease.take(Destination(str(tmp_path)), overwrite=False, resume=False)  # no heartbeat: A is paused
    stale = Manifest(a.fenced(), {"job": "a"})
    stale.add(write_shard(stale.destination, "000-0000000", rows, "parquet"))
    stale.write()
    monkeypatch.setattr("visionbatch.destination.LEASE_STALE_S", 0.0)  # A's lease, renewed or not, counts as stale
    b = Lease.take(Destination(str(tmp_path)), overwrite=True, resume=False)
    b.confirm()
    assert not a.renew() and a.lost["id"] == b.holder["id"] == json.loads((tmp_path / "_lease.json").read_text())["id"]
    a._write()  # a beat of A's that read its own lease just before B took over
    assert b.renew() and json.loads((tmp_path / "_lease.json").read_text())["id"] == b.holder["id"]
    newer = Manifest.open(b.fenced(), {"job": "b"}, overwrite=True, resume=False)
    newer.add(write_shard(newer.destination, "000-0000000", rows.slice(1), "parquet"))
    newer.write(complete=True)
    assert [record["file"] for record in newer.shards.values()] == ["part-000-0000000.g2.parquet"]

    named = f"holder {b.holder['id']}, pid {os.getpid()} on {b.holder['host']}, lease generation 2"
    for attempt in (a.check, lambda: write_shard(stale.destination, "000-0000001", rows, "parquet"), stale.write,
                    lambda: stale.write(complete=True), stale.destination.clear):
        with pytest.raises(Superseded, match=named):
            attempt()
    assert read_results(str(tmp_path)).column("path").to_pylist() == ["/b.jpg"]
    assert sorted(p.name for p in tmp_path.glob("part-*")) == ["part-000-0000000.g2.parquet"]

    a.release()  # leaves B's lease as it is
    b.release()
    assert json.loads((tmp_path / "_lease.json").read_text())["id"] == b.holder["id"]
    monkeypatch.setattr(stale.destination, "check_fence", lambda: None)  # a write whose check passed before B came
    stale.write()
    with pytest.raises(DestinationError, match="written by a stale job \\(lease generation 1\\) after the job of "
                                               "generation 2 finished"):
        read_results(str(tmp_path))
