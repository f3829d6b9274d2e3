"""A damaged DEST is named as damage: a part file of another schema, a manifest gone from
under its _SUCCESS. Every reader (read_results and each command that reads DEST) says
which file and that `classify ... --resume` redoes it (exit 1), and --resume does.
Real jobs, real files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import WNIDS, write_image
from visionbatch.cli import main
from visionbatch.destination import MANIFEST, METRICS_FILE, read_results
from visionbatch.errors import DestinationError

REDO = "rerun the classify command with --resume to redo it"


@pytest.fixture(scope="module")
def finished(tiny_vit, tmp_path_factory) -> tuple[Path, Path, pa.Table]:
    """Eight labelled images classified in two shards: (images, DEST, its rows)."""
    root = tmp_path_factory.mktemp("damage")
    for i in range(8):
        write_image(root / "images" / WNIDS[i % 2] / f"{i}.jpg", seed=i)
    dest = root / "dest"
    assert main(["classify", str(root / "images"), "--model", tiny_vit, "--output", str(dest), "-q",
                 "--shard-size", "4"]) == 0
    return root / "images", dest, read_results(str(dest))


@pytest.fixture
def dest(finished, tmp_path) -> Path:
    """A copy of the finished DEST to damage."""
    copy = tmp_path / "dest"
    shutil.copytree(finished[1], copy)
    return copy


def _readers_say(dest: Path, tmp_path: Path, capfd, message: str) -> None:
    """read_results and every command that reads DEST fail with ``message`` and how to redo it."""
    with pytest.raises(DestinationError) as raised:
        read_results(str(dest))
    assert message in str(raised.value) and REDO in str(raised.value)
    for command in (["evaluate", dest], ["label-issues", dest], ["export", dest, "--to", tmp_path / "out"],
                    ["report", dest, "--html", tmp_path / "report.html"]):
        assert main([str(arg) for arg in command]) == 1, command
        err = capfd.readouterr().err
        assert message in err and REDO in err, (command, err)


def _resume(finished, dest: Path, tiny_vit: str) -> None:
    images, _, table = finished
    assert main(["classify", str(images), "--model", tiny_vit, "--output", str(dest), "-q", "--shard-size", "4",
                 "--resume"]) == 0
    assert read_results(str(dest)).to_pylist() == table.to_pylist()


def test_a_part_of_another_schema_is_damage_and_resume_redoes_it(finished, dest, tiny_vit, tmp_path, capfd):
    part = sorted(dest.glob("part-*.parquet"))[0]
    # A valid Parquet file with the part's row count (its footer agrees with the manifest), of another schema.
    pq.write_table(pa.table({"x": range(pq.read_metadata(part).num_rows)}), part)
    _readers_say(dest, tmp_path, capfd, f"{part} is missing or damaged (not this job's results: no column ")
    _resume(finished, dest, tiny_vit)


def test_a_missing_manifest_is_named(finished, dest, tiny_vit, tmp_path, capfd):
    (dest / MANIFEST).unlink()
    _readers_say(dest, tmp_path, capfd, f"{dest}/{MANIFEST} is missing (though _SUCCESS is there)")
    _resume(finished, dest, tiny_vit)


def test_evaluate_on_a_read_only_dest_prints_the_metrics(finished, tmpfs, capfd):
    disk = tmpfs("disk", "4m")
    dest = disk / "dest"
    shutil.copytree(finished[1], dest)
    (dest / METRICS_FILE).unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert main(["evaluate", str(dest)]) == 0
    out, err = capfd.readouterr()
    assert "top-1 accuracy" in out and "rows               8" in out
    assert f"cannot write {dest}/{METRICS_FILE}: " in err and "Read-only file system" in err
    assert not (dest / METRICS_FILE).exists()


def test_a_dest_being_replaced_is_not_read(dest, capfd):
    """A live lease newer than the results (an --overwrite or --resume at work) keeps
    readers out, with the job named; once it is released, DEST reads again."""
    from visionbatch.destination import Destination
    from visionbatch.lease import Lease

    expected = read_results(str(dest))
    lease = Lease.take(Destination(str(dest)), overwrite=False, resume=True)
    lease.confirm()
    try:
        with pytest.raises(DestinationError, match="is being written by another job .* lease generation 2"):
            read_results(str(dest))
        assert main(["evaluate", str(dest)]) == 1
        assert "is being written by another job" in capfd.readouterr().err
    finally:
        lease.release()
    assert read_results(str(dest)).equals(expected)
