"""A DEST holds one job's results: whatever the input's links and special files, the
model's weights or the input's changes between runs, every file is there once or the
job is refused. In-process jobs on a real local Ray and real files."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import visionbatch
from visionbatch.destination import SUMMARY, read_results
from visionbatch.errors import JobError

from conftest import WNIDS, save_random_vit, write_image


def _tree_with_links_and_special_files(root):
    """Six images in class folders, `up -> ..`, mutual links a/tob -> ../b and
    b/toa -> ../a, a FIFO and links to /dev/zero and /dev/urandom named like images, and
    `ext -> ../outside` (one more image, out of the tree)."""
    src = root / "src"
    images = [write_image(src / WNIDS[i % 2] / f"img{i}.jpg", seed=i) for i in range(4)]
    images += [write_image(src / "a" / "1.jpg", seed=5), write_image(src / "b" / "2.jpg", seed=6)]
    (src / WNIDS[0] / "up").symlink_to("..")
    (src / "a" / "tob").symlink_to("../b")
    (src / "b" / "toa").symlink_to("../a")
    os.mkfifo(src / WNIDS[0] / "fifo.jpg")
    (src / WNIDS[0] / "zero.jpg").symlink_to("/dev/zero")
    (src / WNIDS[1] / "urandom.jpg").symlink_to("/dev/urandom")
    write_image(root / "outside" / "far.jpg", seed=7)
    (src / "ext").symlink_to("../outside")
    return src, {str(p) for p in images}, {str(src / WNIDS[0] / n) for n in ("fifo.jpg", "zero.jpg")} | {
        str(src / WNIDS[1] / "urandom.jpg")}


@pytest.mark.slow
def test_folder_links_and_special_files(tiny_vit, tmp_path):
    """Acceptance 3 and 4 (folder): one row per file with and without
    --follow-symlinks; FIFOs and devices skipped, counted and named in the summary."""
    src, images, special = _tree_with_links_and_special_files(tmp_path)
    summary = visionbatch.run([str(src)], str(tmp_path / "out"), model=tiny_vit, progress=False)
    paths = read_results(str(tmp_path / "out")).column("path").to_pylist()
    assert len(paths) == len(set(paths)) and set(paths) == images
    assert summary.skipped_special == 3 and set(summary.special_files) == special
    assert summary.skipped_folder_links == 4  # up, tob, toa, ext
    written = json.loads((tmp_path / "out" / SUMMARY).read_text())
    assert set(written["special_files"]) == special and written["skipped_special"] == 3

    followed = visionbatch.run([str(src)], str(tmp_path / "followed"), model=tiny_vit, follow_symlinks=True,
                               progress=False)
    paths = read_results(str(tmp_path / "followed")).column("path").to_pylist()
    assert len(paths) == len(set(paths)) and set(paths) == images | {str(src / "ext" / "far.jpg")}
    assert followed.skipped_folder_links == 3  # up, tob, toa lead back into src: walked there already
    # Following links changes the results: part of the job's identity.
    with pytest.raises(JobError, match="follow_symlinks: False there, True now"):
        visionbatch.run([str(src)], str(tmp_path / "out"), model=tiny_vit, follow_symlinks=True, resume=True,
                        progress=False)


def test_listed_special_files_and_hung_reads_get_error_rows(tiny_vit, tmp_path, silent_server):
    """Acceptance 4 (list): a FIFO, /dev/zero and /dev/urandom named in a list, and a file
    on a server that never answers: the job finishes, each with a typed read_error row."""
    src, images, special = _tree_with_links_and_special_files(tmp_path)
    hung = "s3://bucket/never/answers.jpg"
    listed = sorted(images) + sorted(special) + [hung]
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    summary = visionbatch.run([str(tmp_path / "list.txt")], str(tmp_path / "out"), model=tiny_vit, from_list=True,
                              s3_endpoint=silent_server, read_timeout=1, progress=False)
    rows = {row["path"]: row["error"] for row in read_results(str(tmp_path / "out")).to_pylist()}
    assert sorted(rows) == sorted(listed)
    assert all(rows[path] is None for path in images)
    assert rows[str(src / WNIDS[0] / "fifo.jpg")] == "read_error: not a regular file (a FIFO)"
    assert rows[str(src / WNIDS[0] / "zero.jpg")] == "read_error: not a regular file (a character device)"
    assert rows[str(src / WNIDS[1] / "urandom.jpg")] == "read_error: not a regular file (a character device)"
    assert rows[hung] == "read_error: timed out after 1 s (--read-timeout)"
    assert summary.errors_by_kind == {"read_error": 4} and summary.predicted == len(images)


@pytest.mark.slow
def test_resume_with_other_options_or_weights_is_refused(tiny_vit, image_tree, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_vit, model)
    dest = str(tmp_path / "out")
    visionbatch.run([str(image_tree)], dest, model=str(model), progress=False)
    again = visionbatch.run([str(image_tree)], dest, model=str(model), resume=True, progress=False)
    assert again.already_done == again.images_found == 12  # same model: resumes (nothing left to do)
    # Acceptance 1: other options are refused, each named.
    with pytest.raises(JobError, match="format: 'parquet' there, 'csv' now; top_k: 5 there, 2 now"):
        visionbatch.run([str(image_tree)], dest, model=str(model), top_k=2, format="csv", resume=True,
                        progress=False)
    with pytest.raises(JobError, match=f"model: '{model}' there, '{tiny_vit}' now"):
        visionbatch.run([str(image_tree)], dest, model=tiny_vit, resume=True, progress=False)
    save_random_vit(model, hidden=48, layers=2, heads=3, mlp=96, seed=1)  # retrained: same path, same shapes
    with pytest.raises(JobError, match="--resume with other options .*model_revision: '[0-9a-f]+' there, "
                                       "'[0-9a-f]+' now"):
        visionbatch.run([str(image_tree)], dest, model=str(model), resume=True, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("removed", ["inside a committed shard", "the last shard"])
def test_resume_after_input_files_were_removed_is_refused(removed, tiny_vit, image_tree, tmp_path):
    """Rows of files no longer in the input are not kept silently: the command names the
    shard and says to write to a new DEST (not to --resume, which would fail again)."""
    dest = str(tmp_path / "out")
    visionbatch.run([str(image_tree)], dest, model=tiny_vit, shard_size=5, progress=False)
    shards = json.loads((tmp_path / "out" / "_manifest.json").read_text())["shards"]
    assert sorted(shards) == ["000-0000000", "000-0000001", "000-0000002"]
    ordered = [row["path"] for row in read_results(dest).to_pylist()]  # in shard order
    gone = ordered[1:2] if removed == "inside a committed shard" else ordered[10:]
    for path in gone:
        os.unlink(path)
    with pytest.raises(JobError) as refused:
        visionbatch.run([str(image_tree)], dest, model=tiny_vit, shard_size=5, resume=True, progress=False)
    message = str(refused.value)
    assert message.startswith("the input changed since DEST was written")
    assert ("shard 000-0000000 (from" if removed == "inside a committed shard" else "(000-0000002, ...) are no "
            "longer in it") in message
    assert "new DEST" in message and "--resume" not in message
    assert len(read_results(dest)) == 12  # the finished DEST is left as it was
