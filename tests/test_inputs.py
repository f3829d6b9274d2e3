"""Inputs that are not loose image files: WebDataset tars, Parquet tables of image bytes,
http(s) URLs. Each through the real command and a real local Ray, against the same
images as loose files; the S3 cases on the moto server, the URL cases on a real HTTP
server on 127.0.0.1."""

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
from visionbatch.destination import SUMMARY, read_results
from visionbatch.imagenet import imagenet_wnids
from visionbatch.samples import Reading, tar_samples
from visionbatch.shards import TarShard
from visionbatch.storage import Storage

from conftest import WNIDS, write_image
from test_faults import _check_exactly_once, _rows_on_disk, kill_session, slow_vit, start  # noqa: F401 (fixtures)


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


@pytest.fixture(scope="module")
def sample_files(sample_dir) -> list[Path]:
    return sorted(sample_dir.rglob("*.JPEG"))


@pytest.fixture(scope="module")
def loose_results(sample_dir, tiny_vit, tmp_path_factory) -> dict[str, dict]:
    """The sample images classified as loose files: what every other input must give."""
    dest = tmp_path_factory.mktemp("loose") / "out"
    assert main(["classify", str(sample_dir), "--model", tiny_vit, "--output", str(dest), "-q"]) == 0
    return _by_file(read_results(str(dest)))


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
def test_webdataset_tars_match_loose_files_local_and_s3(sample_files, loose_results, tiny_vit, tmp_path, s3_server):
    members = pack_tars(sample_files, tmp_path / "tars", 4)
    dest = tmp_path / "out"
    assert main(["classify", str(tmp_path / "tars"), "--model", tiny_vit, "--output", str(dest), "-q",
                 "--label-column", "cls"]) == 0
    table = read_results(str(dest))
    paths = table.column("path").to_pylist()
    assert table.num_rows == 200 and len(set(paths)) == 200 and set(paths) == set(members)
    assert table.column("key").to_pylist() == [p.rpartition("#")[2].partition(".")[0] for p in paths]
    _same_predictions(_by_file(table, members), loose_results)
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
    _same_predictions(_by_file(remote, by_member), loose_results)


@pytest.mark.slow
def test_corrupt_member_and_truncated_tar(tmp_path, tiny_vit):
    tars = tmp_path / "tars"
    tars.mkdir()
    good = [write_image(tmp_path / "img" / f"{i}.jpg", seed=i).read_bytes() for i in range(6)]
    with tarfile.open(tars / "a.tar", "w") as archive:
        for i in range(3):
            _add(archive, f"a{i}.jpg", good[i] if i != 1 else b"\xff\xd8 not really a jpeg" * 10)
            _add(archive, f"a{i}.txt", b"tench")
    with tarfile.open(tmp_path / "whole.tar", "w") as archive:
        for i in range(3, 6):
            _add(archive, f"b{i}.jpg", good[i])
    b4_data = 512 + -(-len(good[3]) // 512) * 512 + 512  # a header, b3's data in 512-byte blocks, b4's header
    (tars / "b.tar").write_bytes((tmp_path / "whole.tar").read_bytes()[:b4_data + len(good[4]) // 2])
    dest = tmp_path / "out"
    assert main(["classify", str(tars), "--model", tiny_vit, "--output", str(dest), "-q",
                 "--labels", "column", "--label-column", "txt", "--shard-size", "2"]) == 0
    rows = {row["path"].rpartition("/")[2]: row for row in read_results(str(dest)).to_pylist()}
    assert sorted(rows) == ["a.tar#a0.jpg", "a.tar#a1.jpg", "a.tar#a2.jpg", "b.tar#b3.jpg", "b.tar#b4.jpg"]
    assert rows["a.tar#a1.jpg"]["error"].split(":")[0] in ("decode_error", "truncated", "not_an_image")
    assert rows["b.tar#b4.jpg"]["error"].startswith("truncated: the tar ends inside this member")
    for name in ("a.tar#a0.jpg", "a.tar#a2.jpg", "b.tar#b3.jpg"):
        assert rows[name]["error"] is None and rows[name]["label"]
    assert rows["a.tar#a0.jpg"]["true_label"] == "tench, Tinca tinca"
    assert json.loads((dest / "_manifest.json").read_text())["complete"]


@pytest.mark.slow
def test_webdataset_job_killed_then_resumed_gives_every_row_once(tmp_path, slow_vit, start):
    """kill -9 of a WebDataset job after its first committed tar, then --resume: every
    image member exactly once, the committed tars not redone."""
    files = [write_image(tmp_path / "img" / WNIDS[i % 4] / f"{i:03d}.jpg", seed=500 + i) for i in range(120)]
    members = pack_tars(files, tmp_path / "tars", 15)
    dest = tmp_path / "out"
    # --shard-size caps the blocks between stages (Ray Data gathers a task's small blocks
    # up to that size), so these small tars reach the writer a few at a time.
    args = ["classify", tmp_path / "tars", "--model", slow_vit, "--output", dest, "-q", "--label-column", "cls",
            "--shard-size", "8"]
    first = start(args, tmp_path / "run1")
    first.wait_for_commit(dest)
    kill_session(first, grace=10)
    committed = _rows_on_disk(dest)
    assert 0 < len(committed) < len(members) and len(committed) == len(set(committed))
    resumed = start([*args, "--resume"], tmp_path / "run2")
    assert resumed.wait(300) == 0, resumed.stderr
    table = _check_exactly_once(dest, set(members))
    assert table.column("error").null_count == len(members) and table.column("key").null_count == 0
    summary = json.loads((dest / SUMMARY).read_text())
    assert summary["already_done"] == len(committed) and summary["images_found"] == len(members)
    assert summary["labelled"] == len(members)


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


@pytest.mark.slow
def test_parquet_image_tables_match_loose_files(sample_files, loose_results, tiny_vit, tmp_path, capfd):
    hf, plain = write_image_tables(sample_files, tmp_path / "tables")
    dest = tmp_path / "hf-out"
    assert main(["classify", str(hf), "--model", tiny_vit, "--output", str(dest), "--image-column", "image",
                 "--label-column", "label", "--keep-columns", "caption", "--shard-size", "25"]) == 0
    assert "top-1 accuracy" in capfd.readouterr().out  # accuracy is reported
    table = read_results(str(dest))
    assert table.column_names[-1] == "caption" and table.num_rows == 200
    _same_predictions(_by_file(table), loose_results)  # path: the struct's path field
    assert all(row["caption"] == f"a photo of {Path(row['path']).stem}" for row in table.to_pylist())
    summary = json.loads((dest / SUMMARY).read_text())
    assert summary["labelled"] == 200 and summary["top1"] is not None

    dest = tmp_path / "plain-out"
    assert main(["classify", str(plain), "--model", tiny_vit, "--output", str(dest), "--image-column", "jpg",
                 "--label-column", "name", "-q"]) == 0
    table = read_results(str(dest))
    file_of = {f"{plain}/part-0.parquet#{i}": f for i, f in enumerate(sample_files)}  # path: file and row
    _same_predictions(_by_file(table, file_of), loose_results)


def test_keep_columns_that_collide_are_refused(tmp_path, capfd):
    assert main(["classify", str(tmp_path), "--output", str(tmp_path / "o"), "--image-column", "image",
                 "--keep-columns", "caption,label"]) == 2
    assert "--keep-columns: label would collide" in capfd.readouterr().err


def test_special_files_are_refused_at_once(tmp_path, tiny_vit, start):
    """A FIFO read as a list, a SOURCE, a Parquet table or a label map would wait forever
    for a writer (or fail with a misleading error): each is refused, the job ends with
    exit 1 and says what the path is. The wait's timeout only guards against a hang."""
    import os

    write_image(tmp_path / "images" / WNIDS[0] / "a.jpg", seed=0)
    fifo = tmp_path / "f.fifo"
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "t.parquet")
    model = ["--model", tiny_vit, "--output", tmp_path / "dest", "-q"]
    cases = {
        "list": ([fifo, "--from-list"], f"list file {fifo} is not a regular file (a FIFO): name a file or a folder"),
        "source": ([fifo], f"source {fifo} is not a regular file (a FIFO): name a file or a folder"),
        "table": ([tmp_path / "t.parquet", "--image-column", "image"],
                  f"source {tmp_path / 't.parquet'} is not a regular file (a FIFO)"),
        "label-map": ([tmp_path / "images", "--label-map", fifo],
                      f"cannot read --label-map {fifo}: not a regular file (a FIFO)"),
    }
    for name, (options, message) in cases.items():
        run = start(["classify", *options, *model], tmp_path / name)
        assert run.wait(120) == 1, (name, run.stderr)
        assert message in run.stderr, (name, run.stderr)
    assert not list(tmp_path.glob("dest/part-*"))


# --------------------------------------------------------------------------- URLs


@pytest.fixture
def http_server(sample_files):
    """A real HTTP server on 127.0.0.1 serving sample images, with misbehaving paths;
    yields its base URL. ``/slow`` answers only once the test ends (an Event, no sleeps)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    release = threading.Event()
    hits: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path.startswith("/img/") or (self.path.startswith("/flaky/") and hits[self.path] > 1):
                body = sample_files[int(self.path.rpartition("/")[2])].read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path.startswith("/flaky/"):
                self.send_error(500)
            elif self.path == "/slow":
                release.wait()
                self.close_connection = True  # the client gave up long ago
            elif self.path == "/big":  # no Content-Length: the cap applies as the body streams
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            elif self.path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_error(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_url_list_downloads_and_typed_failures(http_server, sample_files, loose_results, tiny_vit, tmp_path):
    entries = {f"{http_server}/img/{i}": sample_files[i] for i in range(4)}
    entries[f"{http_server}/flaky/5"] = sample_files[5]  # 500, then 200
    failing = {f"{http_server}/missing.jpg": "HTTP 404", f"{http_server}/slow": "timed out",
               f"{http_server}/big": "larger than 1000000 bytes", f"{http_server}/loop": "too many redirects",
               "file:///etc/passwd": "only http and https"}
    urls = [*entries, *failing]
    (tmp_path / "list.csv").write_text("url,id\n" + "".join(f"{url},{i}\n" for i, url in enumerate(urls)))
    dest = tmp_path / "out"
    assert main(["classify", str(tmp_path / "list.csv"), "--url-column", "url", "--keep-columns", "id",
                 "--model", tiny_vit, "--output", str(dest), "-q", "--download-timeout", "1",
                 "--max-bytes", "1000000"]) == 0
    rows = {row["path"]: row for row in read_results(str(dest)).to_pylist()}
    assert sorted(rows) == sorted(urls)
    assert [rows[url]["id"] for url in urls] == [str(i) for i in range(len(urls))]
    for url, file in entries.items():
        loose = loose_results[str(file)]
        assert rows[url]["error"] is None and rows[url]["label"] == loose["label"]
        assert rows[url]["score"] == pytest.approx(loose["score"], abs=1e-5)
    for url, why in failing.items():
        assert rows[url]["error"].startswith("download_error:") and why in rows[url]["error"], rows[url]["error"]
