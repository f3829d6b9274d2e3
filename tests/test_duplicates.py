"""The duplicates stages (issue 34) on real Parquet files with real faiss and DuckDB:
planted pairs, no chaining, pairs across cell borders, an oversized cell, exact digests,
the same groups on a rerun, DEST with and without embeddings, another tool's table."""

from __future__ import annotations

import json
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_finished_dest
from runs import kill_session

pytest.importorskip("faiss")

from visionbatch.config import DuplicatesConfig  # noqa: E402
from visionbatch.duplicates import VISIT_CANDIDATES  # noqa: E402
from visionbatch.duplicates_job import run_duplicates  # noqa: E402
from visionbatch.errors import UsageError  # noqa: E402
from visionbatch.results import RESULT_SCHEMA, result_schema  # noqa: E402
from visionbatch.destination import EMBEDDINGS_KEY, Destination  # noqa: E402
from visionbatch.manifest import Manifest  # noqa: E402
from visionbatch.writer import write_shard  # noqa: E402

DIM = 128


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def near_copy(rng, vector: np.ndarray, cosine: float) -> np.ndarray:
    """A unit vector at exactly ``cosine`` to ``vector``."""
    noise = rng.standard_normal(len(vector)).astype(np.float32)
    noise = unit(noise - noise @ vector * vector)
    return unit(vector * cosine + noise * np.sqrt(1 - cosine ** 2))


def planted(rows: int, pairs: int, seed: int = 0) -> tuple[np.ndarray, set[frozenset[int]]]:
    """Clustered random vectors (cosine well under 0.75 between any two) where row 2i+1 of
    the first 2 * ``pairs`` rows is a near copy (cosine 0.8-0.98) of a row far from it."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((20, DIM)))
    vectors = unit(centres[rng.integers(0, 20, rows)] + 2.0 * unit(rng.standard_normal((rows, DIM))))
    truth = set()
    for i in range(pairs):
        original, copy = rows - 1 - i, 2 * i + 1
        vectors[copy] = near_copy(rng, vectors[original], rng.uniform(0.8, 0.98))
        truth.add(frozenset((copy, original)))
    return vectors, truth


def write_table(folder, vectors: np.ndarray, files: int = 2, path_column: str = "image_path",
                embedding_column: str = "clip_embedding", **columns) -> str:
    """Another tool's table: ``files`` Parquet files of row groups of 500 rows,
    embeddings as variable-size lists."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        path_column: [f"img/{i:05d}.jpg" for i in range(len(vectors))],
        embedding_column: pa.ListArray.from_arrays(pa.array(np.arange(0, (len(vectors) + 1) * DIM, DIM, dtype=np.int32)),
                                                   pa.array(vectors.ravel())),
        **columns,
    })
    size = -(-len(vectors) // files)
    for i in range(files):
        pq.write_table(table.slice(i * size, size), folder / f"part-{i}.parquet", row_group_size=500)
    return str(folder)


def groups_of(output) -> list[set[int]]:
    rows = pq.read_table(output).to_pylist()
    groups: dict[int, set[int]] = {}
    for row in rows:
        groups.setdefault(row["group"], set()).add(int(row["path"][4:9]))
    return list(groups.values())


def pairs_of(groups: list[set[int]]) -> set[frozenset[int]]:
    return {frozenset((a, b)) for group in groups for a in group for b in group if a < b}


def run(tmp_path, source: str, name: str = "run", **options) -> tuple[dict, str]:
    options.setdefault("embedding_column", "clip_embedding")
    options.setdefault("path_column", "image_path")
    out = tmp_path / f"{name}-out"
    summary = run_duplicates(DuplicatesConfig(source, output=str(out), work_dir=str(tmp_path / f"{name}-work"),
                                              **options))
    return summary, str(out / "duplicates.parquet")


def test_planted_pairs_across_cells_and_files_are_found(tmp_path):
    vectors, truth = planted(3000, 60)
    source = write_table(tmp_path / "table", vectors)
    summary, output = run(tmp_path, source, cells=12, unit_rows=700, cells_per_row=VISIT_CANDIDATES)
    assert pairs_of(groups_of(output)) == truth
    assert summary["groups"] == 60 and summary["images_in_groups"] == 120 and summary["images_dropped"] == 60
    assert summary["stats"]["units"] == 6 and summary["stats"]["cells"] >= 12
    table = pq.read_table(output)
    assert table.schema.names == ["path", "group", "keep", "similarity", "kind", "given_label"]
    keep = table.filter(table.column("keep"))
    assert keep.num_rows == 60 and all(s == 1.0 for s in keep.column("similarity").to_pylist())
    # the kept member: the first in ordinal order (no sizes known); the other's cosine to it
    for row in table.filter(pa.compute.invert(table.column("keep"))).to_pylist():
        copy = int(row["path"][4:9])
        original = next(iter(next(pair for pair in truth if copy in pair) - {copy}))
        assert row["similarity"] == pytest.approx(float(vectors[copy] @ vectors[original]), abs=2e-3)


def test_pairs_whose_rows_are_at_home_in_different_cells_are_found(tmp_path):
    """Many small cells: a share of the planted pairs has its two rows at home in two
    cells; each is compared where one of them visits (the margin rule alone: every cell
    it passes among the tested ones; with the default cap, most)."""
    vectors, truth = planted(3000, 150, seed=1)
    source = write_table(tmp_path / "table", vectors)
    capped, output = run(tmp_path, source, name="capped", cells=60)
    assert len(pairs_of(groups_of(output)) & truth) >= 0.9 * len(truth)
    assert not (tmp_path / "capped-work").exists()  # removed once done
    summary, output = run(tmp_path, source, cells=60, cells_per_row=VISIT_CANDIDATES, keep_work=True)
    assert summary["stats"]["visits"] > capped["stats"]["visits"]
    spilled = pa.concat_tables(pq.read_table(file, columns=["cell", "ordinal", "home"])
                               for file in sorted((tmp_path / "run-work" / "cells").glob("*.parquet")))
    homes = spilled.filter(spilled.column("home")).to_pydict()
    home_of = dict(zip(homes["ordinal"], homes["cell"]))
    across = {pair for pair in truth if len({home_of[row] for row in pair}) == 2}
    assert len(across) >= 10
    assert across <= pairs_of(groups_of(output))
    assert pairs_of(groups_of(output)) == truth


def test_no_chaining_every_member_is_within_the_threshold_of_its_kept_member(tmp_path):
    """A~B and B~C but A not~C: with A the largest image, the group is {A, B} and C is in
    none; with B the largest, {A, B, C} (both within the threshold of B)."""
    rng = np.random.default_rng(2)
    others = unit(rng.standard_normal((40, DIM)))
    a = others[0]
    b = near_copy(rng, a, 0.85)
    # c: in the plane of a and b, on b's far side from a: cos(b, c) = 0.85, cos(a, c) ~ 0.45
    across = unit(b - (b @ a) * a)
    angle = np.arccos(0.85)
    c = unit(np.cos(2 * angle) * a + np.sin(2 * angle) * across)
    assert c @ b == pytest.approx(0.85, abs=1e-4) and c @ a < 0.5
    vectors = np.concatenate([[a, b, c], others[1:]])
    for largest, expected in ((0, [{0, 1}]), (1, [{0, 1, 2}])):
        width = np.full(len(vectors), 10, dtype=np.int32)
        width[largest] = 20
        source = write_table(tmp_path / f"chain-{largest}", vectors, files=1,
                             width=width, height=np.full(len(vectors), 10, dtype=np.int32))
        _, output = run(tmp_path, source, name=f"chain-{largest}", threshold=0.8)
        assert groups_of(output) == expected
        rows = pq.read_table(output).to_pylist()
        kept = [int(row["path"][4:9]) for row in rows if row["keep"]]
        assert kept == [largest]
        for row in rows:
            assert float(vectors[int(row["path"][4:9])] @ vectors[largest]) >= 0.8 - 1e-3


def test_an_oversized_cell_is_compared_in_blocks_with_the_same_pairs(tmp_path):
    vectors, truth = planted(1800, 40, seed=3)
    source = write_table(tmp_path / "table", vectors)
    summary, output = run(tmp_path, source, cells=1, cell_rows=500)
    assert summary["stats"]["cell_tasks"] == 10  # 4 blocks of 500 rows: 4 + 3 + 2 + 1 block pairs
    assert pairs_of(groups_of(output)) == truth
    _, whole = run(tmp_path, source, name="whole", cells=1)
    blocked, whole = pq.read_table(output), pq.read_table(whole)
    assert blocked.drop_columns("similarity").equals(whole.drop_columns("similarity"))
    # the same dot products, summed in another order by BLAS
    np.testing.assert_allclose(blocked.column("similarity"), whole.column("similarity"), atol=1e-5)


def test_exact_duplicates_by_digest_merge_with_near_groups(tmp_path):
    vectors, truth = planted(1000, 10, seed=4)
    digests = [f"d{i}" for i in range(1000)]
    # rows 100, 200 and 300: byte-identical copies of row 1 (the copy in planted pair 0);
    # rows 400 and 401: an exact pair with nothing near
    for row in (100, 200, 300):
        vectors[row], digests[row] = vectors[1], digests[1]
    vectors[401], digests[401] = vectors[400], digests[400]
    labels = [f"class{i % 7}" for i in range(1000)]
    source = write_table(tmp_path / "table", vectors, sha256=digests, true_label=labels)
    summary, output = run(tmp_path, source)
    rows = pq.read_table(output).to_pylist()
    assert len({row["path"] for row in rows}) == len(rows)  # no image twice
    group = {int(row["path"][4:9]): row for row in rows}
    assert group[1]["group"] == group[100]["group"] == group[200]["group"] == group[999]["group"]
    assert [group[i]["kind"] for i in (1, 100, 200, 300)] == ["near", "exact", "exact", "exact"]
    assert group[1]["keep"] and group[999]["similarity"] < 1
    assert group[400]["kind"] == group[401]["kind"] == "exact" and group[400]["keep"]
    assert group[401]["similarity"] == 1.0
    assert group[1]["given_label"] == "class1"
    assert summary["groups"] == 11 and summary["exact_groups"] == 1
    assert summary["images_in_groups"] == 10 * 2 + 3 + 2

    # without embeddings: exact groups alone
    plain = write_table(tmp_path / "plain", vectors, sha256=digests, embedding_column="unused")
    summary, output = run(tmp_path, plain, name="plain", embedding_column="embedding")
    assert sorted(map(sorted, groups_of(output))) == [[1, 100, 200, 300], [400, 401]]
    assert summary["exact_groups"] == summary["groups"] == 2


def test_killed_then_resumed_on_the_other_engine_the_same_groups(tmp_path, start):
    """kill -9 mid-run (past training, the stages' tasks on the local engine's worker
    processes), then --resume on Ray: the tasks not committed run, those committed are
    kept, and the groups are those of a run never stopped."""
    vectors, truth = planted(6000, 60, seed=5)
    source = write_table(tmp_path / "table", vectors, files=4)
    options = ["--embedding-column", "clip_embedding", "--path-column", "image_path", "--unit-rows", "250",
               "--cell-rows", "500", "-q"]
    out = tmp_path / "out"
    first = start(["duplicates", source, "--output", out, *options], tmp_path / "first")
    first.wait_for_commit(out, more_than=len(vectors) // 250 + 1)  # every sample, training, an assign or more
    kill_session(first)
    committed = Destination(str(out)).manifest()["shards"]
    assert "train" in committed and not (out / "_SUCCESS").exists()
    resumed = start(["duplicates", source, "--output", out, "--resume", "--engine", "ray", *options],
                    tmp_path / "resumed")
    assert resumed.wait(300) == 0, resumed.stderr
    _, whole = run(tmp_path, source, name="whole", unit_rows=250, cell_rows=500)
    assert pq.read_table(out / "duplicates.parquet").equals(pq.read_table(whole))
    assert pairs_of(groups_of(whole)) == truth
    done = Destination(str(out)).manifest()["shards"]
    assert {key: done[key] for key in committed} == committed  # kept, not done again
    assert not (out / "_work").exists()


def write_dest(folder, rows: list[dict], width: int | None) -> str:
    """A finished DEST (two parts), with embeddings where ``width``."""
    destination = Destination(str(folder))
    schema = result_schema(width) if width else RESULT_SCHEMA
    import dataclasses

    from visionbatch.shards import InputSpec

    listed = InputSpec(sources=(), from_list=False, shard_size=60, limit=None, cwd="")  # export re-reads rows by path
    manifest = Manifest(destination, {"test": True, "format": "parquet", "input": dataclasses.asdict(listed),
                                      EMBEDDINGS_KEY: width and {"width": width, "normalized": False}})
    table = pa.Table.from_pylist(rows, schema=schema)
    for seq, start in enumerate(range(0, len(rows), 60)):
        manifest.add(write_shard(destination, f"000-{seq:07d}", table.slice(start, 60), "parquet", schema=schema))
    manifest.write(complete=True)
    return destination.uri


def test_a_dest_with_embeddings_keeps_the_largest_image(tmp_path):
    vectors, truth = planted(100, 5, seed=6)
    rows = [{"path": f"img/{i:05d}.jpg", "label": "x", "true_label": f"c{i % 3}", "width": 100 + i, "height": 50,
             "embedding": (vectors[i] * 3).tolist()} for i in range(len(vectors))]
    rows[50] = {"path": "img/00050.jpg", "error": "decode_error: broken"}  # no embedding: left out
    dest = write_dest(tmp_path / "dest", rows, DIM)
    summary, output = run(tmp_path, dest, embedding_column="embedding", path_column="path")
    assert pairs_of(groups_of(output)) == truth
    for row in pq.read_table(output).to_pylist():
        if row["keep"]:  # the larger of the two: the later ordinal (width 100 + i)
            ordinal = int(row["path"][4:9])
            assert ordinal == max(next(pair for pair in truth if ordinal in pair))
            assert row["given_label"] == f"c{ordinal % 3}"


def test_a_dest_without_embeddings_refuses_near_duplicates(tmp_path):
    """classify's rows carry their file's sha256: a DEST without embeddings still has its
    exact duplicates; near-duplicates are refused with what to do."""
    rows = [{"path": f"img/{i}.jpg", "label": "x", "width": 8, "height": 8, "sha256": f"{i % 8:064x}"}
            for i in range(10)]  # 0 and 8, 1 and 9: the same bytes
    destination = Destination(str(tmp_path / "dest"))
    write_finished_dest(destination, pa.Table.from_pylist(rows, schema=RESULT_SCHEMA))
    with pytest.raises(UsageError, match="--embeddings"):
        run(tmp_path, destination.uri, find="all", embedding_column="embedding", path_column="path")
    summary, output = run(tmp_path, destination.uri, "exact", embedding_column="embedding", path_column="path")
    groups = pq.read_table(output).to_pylist()
    assert sorted((row["path"], row["keep"], row["kind"]) for row in groups) == [
        ("img/0.jpg", True, "exact"), ("img/1.jpg", True, "exact"), ("img/8.jpg", False, "exact"),
        ("img/9.jpg", False, "exact")]
    table = tmp_path / "plain"
    table.mkdir()
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"]}), table / "part-0.parquet")
    with pytest.raises(UsageError, match="nothing to compare"):
        run(tmp_path, str(table), "plain", embedding_column="embedding", path_column="path")
    unset = tmp_path / "unset.parquet"  # one file, not a folder; its embeddings all null
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "embedding": pa.array([None, None], pa.list_(pa.float32()))}),
                   unset)
    with pytest.raises(UsageError, match="no row has an embedding"):
        run(tmp_path, str(unset), "unset", embedding_column="embedding", path_column="path")


def test_the_command_writes_a_dests_groups_where_label_issues_export_and_the_report_find_them(tmp_path):
    """visionbatch duplicates DEST: OUT is DEST/_derived/duplicates; DEST's result rows read
    as before (a glob over its top), the groups as DEST's "duplicates" config for Hugging
    Face datasets; export --dedup keeps each group's kept member alone; the report shows
    the largest groups; an OUT holding other files is refused, and left as it was."""
    import subprocess
    import sys
    from pathlib import Path

    import duckdb

    from conftest import write_image
    from visionbatch.report import write_report

    vectors, truth = planted(100, 5, seed=7)
    images = [write_image(tmp_path / "img" / f"{i:05d}.png", size=(8, 8), seed=i) for i in range(len(vectors))]
    rows = [{"path": str(image), "label": "x", "score": 0.5, "true_label": "c", "width": 8, "height": 8,
             "embedding": vectors[i].tolist()} for i, image in enumerate(images)]
    dest = write_dest(tmp_path / "dest", rows, DIM)
    exe = Path(sys.executable).with_name("visionbatch")

    def visionbatch(*args) -> subprocess.CompletedProcess:
        return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300)

    done = visionbatch("duplicates", dest)
    assert done.returncode == 0, done.stderr
    assert "10 images in 5 groups" in done.stdout and "drops 5 images" in done.stdout
    out = tmp_path / "dest" / "_derived" / "duplicates"
    groups = pq.read_table(out / "duplicates.parquet")
    assert {frozenset(int(Path(p).stem) for p in pair) for pair in pairs_of(
        [set(members) for members in _by_group(groups).values()])} == truth
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", "_lease.json", "_manifest.json", "_summary.json",
                                                     "duplicates.parquet"]
    assert duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/dest/*.parquet'").fetchall() == [(100,)]
    datasets = pytest.importorskip("datasets")
    assert datasets.load_dataset(dest, "duplicates", split="train").num_rows == 10

    exported = visionbatch("export", dest, "--to", tmp_path / "deduplicated", "--dedup", "--format", "imagefolder")
    assert exported.returncode == 0, exported.stderr
    kept = {Path(p).name for p in (tmp_path / "deduplicated").rglob("*.png")}
    dropped = {Path(row["path"]).name for row in groups.to_pylist() if not row["keep"]}
    assert len(kept) == 95 and not kept & dropped

    html = write_report(dest, str(tmp_path / "report.html"))
    page = Path(html).read_text()
    assert "Largest duplicate groups (of 5)" in page and page.count("<h3>2 images</h3>") == 5

    again = visionbatch("duplicates", dest)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    finished = visionbatch("duplicates", dest, "--resume")  # nothing left to do: the same summary
    assert finished.returncode == 0 and finished.stdout == done.stdout, finished.stderr
    assert pq.read_table(out / "duplicates.parquet").equals(groups)
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    refused = visionbatch("duplicates", dest, "--output", stranger, "--overwrite")
    assert refused.returncode == 1 and "holds files that no duplicates wrote (notes.txt)" in refused.stderr
    assert (stranger / "notes.txt").exists()


def _by_group(table: pa.Table) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for row in table.to_pylist():
        groups.setdefault(row["group"], []).append(row["path"])
    return groups


def test_from_and_to_object_storage_the_same_groups(tmp_path, s3_server, monkeypatch):
    """Another tool's table in a bucket, OUT in a bucket: the work dir is a local folder in
    the cache named after OUT (removed once done), and the groups are those of local disk."""
    import boto3
    import pyarrow.fs as pafs

    monkeypatch.setenv("VISIONBATCH_CACHE", str(tmp_path / "cache"))
    vectors, truth = planted(1000, 20, seed=8)
    source = write_table(tmp_path / "table", vectors)
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="embeddings")
    s3 = pafs.S3FileSystem(endpoint_override=s3_server.removeprefix("http://"), scheme="http", region="us-east-1")
    pafs.copy_files(source, "embeddings/table", destination_filesystem=s3)
    summary = run_duplicates(DuplicatesConfig("s3://embeddings/table", output="s3://embeddings/groups",
                                              s3_endpoint=s3_server, embedding_column="clip_embedding",
                                              path_column="image_path"))
    assert summary["groups"] == 20
    with s3.open_input_file("embeddings/groups/duplicates.parquet") as file:
        remote = pq.read_table(file)
    _, local = run(tmp_path, source)
    assert remote.equals(pq.read_table(local)) and pairs_of(groups_of(local)) == truth
    assert not list((tmp_path / "cache" / "duplicates").iterdir())  # the work dir, removed


def test_a_task_of_a_run_taken_over_writes_nothing(tmp_path):
    """A task checks OUT's lease before each work file appears: where a newer run holds
    OUT (the work dir is its now), the task raises Superseded naming it and leaves no
    file, not even its temporary one; the holder's own task writes."""
    import time

    from visionbatch.duplicates import plan_source
    from visionbatch.duplicates_job import DuplicatesTask, run_task
    from visionbatch.errors import Superseded
    from visionbatch.lease import Fence

    vectors, _ = planted(600, 5, seed=11)
    config = DuplicatesConfig(write_table(tmp_path / "table", vectors), output=str(tmp_path / "out"),
                              embedding_column="clip_embedding", path_column="image_path")
    plan = plan_source(config)
    source = {key: value for key, value in plan.items() if key != "units"}
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    (out / "_lease.json").write_text(json.dumps({"id": "newer", "host": "elsewhere", "pid": 1, "generation": 2,
                                                 "started": time.time(), "heartbeat": time.time()}))

    def task(holder: str, generation: int) -> DuplicatesTask:
        fence = Fence(str(out), str(out / "_lease.json"), holder, generation)
        return DuplicatesTask("sample", 0, source, len(plan["units"]), str(work), config, True, 4, str(out), fence,
                              plan["units"][0])

    with pytest.raises(Superseded, match="newer"):
        run_task(task("stale", 1))
    assert not [p for p in work.rglob("*") if p.is_file()]
    record = run_task(task("newer", 2))
    assert (work / record["file"]).is_file() and record["counts"]["points"] > 0
