"""The engine contract: what every engine must do, through the real command, on each
engine in ENGINES (a new engine is one more name there, and its case in ``engine``).

- exactly once through a kill -9 of the job and ``--resume``;
- a decoder that kills its process gives that file a ``worker_crash`` row, the rest predicted;
- SIGTERM and Ctrl-C: exit 130, the committed rows kept, ``--resume`` finishes;
- the lease: a second job on the same DEST (local or S3) is refused, naming the holder;
- special files (FIFOs) refused at once;
- object storage (a moto S3 server) in and out, the same rows as local disk;
- WebDataset tars (a corrupt member, a truncated tar), Parquet tables, http(s) URLs;
- export: the selected rows' original bytes, each once.

Every job is a ``visionbatch`` process (``runs.Run``). The Ray engine's jobs join one
Ray for the module (a head node started once, as test_cluster's, with ``--address``):
a Ray started per job would cost each case its start. Its cases share an xdist group,
so one worker of a parallel suite runs them beside that Ray.
"""

from __future__ import annotations

import json
import os
import signal
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

import visionbatch
from visionbatch.cli import main
from visionbatch.destination import SUMMARY, Destination, read_results

from conftest import WNIDS, write_image
from runs import (HELD_AFTER_FIRST_COMMIT, JOB_IMAGES, Run, check_exactly_once, committed_parts, expected_paths,
                  ignored_signals, kill_session, no_tmp_files, rows_on_disk, source_and_dest, wait_session_gone,
                  write_job_images)
from test_cluster import Cluster
from test_export import _by_path, _expected, _median, _tar_samples
from test_inputs import _add, _by_file, _same_predictions, pack_tars, write_image_tables

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds a run's processes through /proc")

ENGINES = ["local", "ray"]

N_IMAGES = JOB_IMAGES
SHARD_SIZE = 8
# A decoder dies (os._exit, as a segfault would) on any file whose path holds this
# (decode's failpoint): every process of every engine here carries it, and only the
# worker_crash case names a file so.
CRASH_MARKER = "kills-its-decoder"
FAILPOINT = {"VISIONBATCH_FAILPOINT_EXIT_ON": CRASH_MARKER}


@dataclass
class EngineUnderTest:
    name: str
    options: list[str]  # the command-line options that run a job on it
    env: dict = field(default_factory=dict)  # what its jobs' processes need besides the test's environment

    def run(self, start, args: list, folder: Path, code: int | None = 0, timeout: float = 300,
            env: dict | None = None) -> Run:
        """``visionbatch`` with ``args`` (and ``env``) on this engine; with ``code``, waited for and checked."""
        run = start([*args, *self.options], folder, {**self.env, **(env or {})})
        if code is not None:
            assert run.wait(timeout) == code, f"{self.name}: exit {run.proc.returncode}\n{run.stderr}"
        return run


@pytest.fixture(scope="module")
def ray_cluster():
    """One Ray (a head node, 2 CPUs) for the module's Ray cases; its workers carry the failpoint."""
    cluster = Cluster()
    cluster.env.update(FAILPOINT)
    try:
        yield cluster.start(second_node=False)
    finally:
        cluster.stop()


@pytest.fixture(params=[pytest.param(name, marks=[pytest.mark.xdist_group(f"contract-{name}")] if name != "local"
                                     else []) for name in ENGINES])
def engine(request) -> EngineUnderTest:
    if request.param == "local":
        return EngineUnderTest("local", ["--engine", "local"], dict(FAILPOINT))
    if request.param == "ray":
        cluster = request.getfixturevalue("ray_cluster")
        return EngineUnderTest("ray", ["--engine", "ray", "--address", cluster.address],
                               {name: cluster.env[name] for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
    raise AssertionError(f"no set-up for the engine {request.param!r}")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_job_images(tmp_path_factory.mktemp("contract-images"))


def _classify(source, model: str, dest, *more) -> list:
    return ["classify", source, "--model", model, "--output", dest, "--shard-size", SHARD_SIZE, "-q", *more]


def _one_stop_line(run: Run) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in run.stderr, run.stderr
    return lines[0]


def _every_part_once(dest: Path, expected: int) -> None:
    """No part file on disk (listed in the manifest or not) repeats a path, and none is missing."""
    everything = rows_on_disk(dest, Destination(str(dest)).part_files())
    assert len(everything) == len(set(everything)) == expected


# --------------------------------------------------------------------------- kill -9, --resume


@pytest.mark.slow
def test_kill_9_then_resume_writes_every_row_once(engine, tiny_vit, tmp_path, start):
    """kill -9 of a job (its whole process group) after its first commit, over 15
    WebDataset tars; then --resume: every image member exactly once, the committed tars
    not redone, nothing half-written left."""
    files = [write_image(tmp_path / "img" / WNIDS[i % 4] / f"{i:03d}.jpg", seed=500 + i) for i in range(N_IMAGES)]
    members = pack_tars(files, tmp_path / "tars", 15)
    dest = tmp_path / "out"
    args = _classify(tmp_path / "tars", tiny_vit, dest, "--label-column", "cls")
    first = engine.run(start, args, tmp_path / "run1", code=None, env=HELD_AFTER_FIRST_COMMIT)
    first.wait_for_commit(dest)
    kill_session(first, grace=10)
    committed = rows_on_disk(dest)
    assert 0 < len(committed) < len(members) and len(committed) == len(set(committed))
    assert not (dest / "_SUCCESS").exists() and not (dest / SUMMARY).exists()

    engine.run(start, [*args, "--resume"], tmp_path / "run2")
    table = check_exactly_once(dest, set(members))
    assert table.num_rows == len(members)
    assert table.column("error").null_count == len(members) and table.column("key").null_count == 0
    summary = json.loads((dest / SUMMARY).read_text())
    assert summary["already_done"] == len(committed) and summary["images_found"] == len(members)
    assert summary["labelled"] == len(members)
    _every_part_once(dest, len(members))
    no_tmp_files(dest)


# --------------------------------------------------------------------------- a decoder that kills its worker


@pytest.mark.slow
def test_a_decoder_that_kills_its_worker_gives_a_worker_crash_row(engine, images, tiny_vit, tmp_path, start):
    root = tmp_path / "images"
    for source in sorted(images.rglob("*.jpg"))[:40]:
        (root / source.parent.name).mkdir(parents=True, exist_ok=True)
        (root / source.parent.name / source.name).write_bytes(source.read_bytes())
    culprit = write_image(root / WNIDS[1] / f"img037-{CRASH_MARKER}.jpg", size=(64, 48), seed=37)
    expected = expected_paths(root)
    dest = tmp_path / "out"
    run = engine.run(start, _classify(root, tiny_vit, dest), tmp_path / "run")
    assert not wait_session_gone(run)

    table = check_exactly_once(dest, expected)
    rows = {row["path"]: row for row in table.to_pylist()}
    assert rows[str(culprit)]["error"].startswith("worker_crash:"), rows[str(culprit)]["error"]
    assert rows[str(culprit)]["label"] is None
    others = [row for path, row in rows.items() if path != str(culprit)]
    assert all(row["error"] is None and row["label"] for row in others), [r for r in others if r["error"]][:3]
    summary = json.loads((dest / SUMMARY).read_text())
    assert summary["failed"] == 1 and summary["errors_by_kind"] == {"worker_crash": 1}
    assert summary["predicted"] == len(expected) - 1
    assert "Traceback" not in run.stderr
    no_tmp_files(dest)


# --------------------------------------------------------------------------- SIGTERM, Ctrl-C


@pytest.mark.slow
def test_sigterm_and_ctrl_c_exit_130_keep_what_was_committed_and_resume(engine, images, tiny_vit, tmp_path, start):
    """SIGTERM to the command's pid (``kill PID``, a container stop) after a commit, then
    --resume stopped by Ctrl-C (SIGINT to the process group, what a terminal sends)
    after a commit of its own, then --resume to the end: each stop exits 130 with one
    line saying how to resume, leaves no process behind and keeps its rows; the last
    run gives every image exactly once."""
    dest = tmp_path / "out"
    expected = expected_paths(images)
    args = _classify(images, tiny_vit, dest)
    kept: list[list[str]] = []
    left_behind: set[str] = set()  # processes of a stopped run's session alive 15 s after it exited
    for attempt, (resume, stop) in enumerate([([], "sigterm"), (["--resume"], "ctrl-c")]):
        run = engine.run(start, [*args, *resume], tmp_path / f"run{attempt}", code=None, env=HELD_AFTER_FIRST_COMMIT)
        run.wait_for_commit(dest, more_than=len(committed_parts(dest)))
        # What would make a signal look lost without being lost: a run that ended before it
        # came, or one started with the signal ignored.
        assert run.proc.poll() is None, f"the run ended before it could be stopped:\n{run.stderr}"
        assert not ignored_signals(run.pid), "the run was started with a stop signal ignored"
        if stop == "sigterm":
            os.kill(run.pid, signal.SIGTERM)
        else:
            os.killpg(run.pid, signal.SIGINT)
        assert run.wait(300) == 130, f"{stop}: exit {run.proc.returncode}\n{run.stderr}"
        _one_stop_line(run)
        left_behind.update({f"{stop}: {command}" for _, command in wait_session_gone(run).values()})
        assert not (dest / "_SUCCESS").exists()
        kept.append(rows_on_disk(dest))
        assert len(kept[-1]) == len(set(kept[-1])) and set(kept[-1]) < expected
        assert len(kept[-1]) > (len(kept[-2]) if len(kept) > 1 else 0), f"{stop}: no rows committed before it"
        assert set(kept[0]) <= set(kept[-1]), "a stop lost rows an earlier run had committed"

    resumed = engine.run(start, [*args, "--resume"], tmp_path / "last")
    assert not wait_session_gone(resumed)
    table = check_exactly_once(dest, expected)
    assert table.column("error").null_count == len(expected)
    summary = json.loads((dest / SUMMARY).read_text())
    assert summary["already_done"] == len(kept[-1])
    _every_part_once(dest, len(expected))
    no_tmp_files(dest)
    assert not left_behind, f"the stopped runs left processes behind: {sorted(left_behind)}"


# --------------------------------------------------------------------------- the lease


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_jobs_into_one_dest_only_one_runs(where, engine, images, tiny_vit, s3_server, tmp_path, start):
    """Started together: one holds DEST's lease and runs, the other exits 1 naming the
    holder; every file ends up exactly once."""
    source, dest, endpoint, expected, more = source_and_dest(where, images, sorted(images.rglob("*.jpg"))[:24],
                                                             s3_server, tmp_path)
    runs = [engine.run(start, _classify(source, tiny_vit, dest, *more), tmp_path / f"run{i}", code=None)
            for i in range(2)]
    codes = [run.wait(300) for run in runs]
    assert sorted(codes) == [0, 1], [run.stderr for run in runs]
    loser = runs[codes.index(1)]
    assert "in use by another job (pid" in loser.stderr, loser.stderr
    table = check_exactly_once(dest, expected, s3_endpoint=endpoint)
    assert table.column("error").null_count == len(expected)
    assert json.loads(Destination(str(dest), endpoint).read_bytes("_lease.json"))["released"]


# --------------------------------------------------------------------------- special files


def test_special_files_are_refused_at_once(engine, tmp_path, tiny_vit, start):
    """A FIFO read as a list, a SOURCE, a Parquet table or a label map would wait forever
    for a writer (or fail with a misleading error): each is refused, the job ends with
    exit 1 and says what the path is. The wait's timeout only guards against a hang."""
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
        run = engine.run(start, ["classify", *options, *model], tmp_path / name, code=1, timeout=120)
        assert message in run.stderr, (name, run.stderr)
    assert not list(tmp_path.glob("dest/part-*"))


# --------------------------------------------------------------------------- object storage


@pytest.mark.slow
def test_s3_in_and_out_gives_the_rows_of_local_disk(engine, image_tree, s3_server, tiny_vit, tmp_path, start, capfd):
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"vb-contract-{engine.name}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    client.create_bucket(Bucket=bucket)
    for path in image_tree.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"val/{path.relative_to(image_tree).as_posix()}")
    # The rows of local disk, as the reference: one in-process run (the local engine) for
    # every engine's case, where a job of the engine under test would cost a Ray case
    # another Ray job.
    local_dest = tmp_path / "local"
    visionbatch.run([str(image_tree)], str(local_dest), model=tiny_vit, progress=False)
    s3_dest = f"s3://{bucket}/results/run1"
    s3_args = ["classify", f"s3://{bucket}/val/", "--model", tiny_vit, "--output", s3_dest, "--s3-endpoint",
               s3_server, "-q"]
    engine.run(start, s3_args, tmp_path / "run2")
    keys = {obj["Key"] for obj in client.list_objects_v2(Bucket=bucket, Prefix="results/run1/")["Contents"]}
    assert "results/run1/_SUCCESS" in keys and any(k.endswith(".parquet") for k in keys)

    def by_relative_path(table, prefix):
        return {row["path"][len(prefix):]: {k: v for k, v in row.items() if k != "path"} for row in table.to_pylist()}

    images = [p for p in image_tree.rglob("*") if p.is_file() and p.suffix != ".txt"]
    remote_table = check_exactly_once(s3_dest, {f"s3://{bucket}/val/{p.relative_to(image_tree).as_posix()}"
                                                for p in images}, s3_endpoint=s3_server)
    remote = by_relative_path(remote_table, f"s3://{bucket}/val/")
    local = by_relative_path(read_results(str(local_dest)), str(image_tree) + "/")
    assert len(remote) == len(images) == 12 and remote.keys() == local.keys()
    for key in local:
        assert remote[key]["label"] == local[key]["label"] and remote[key]["true_label"] == local[key]["true_label"]
        assert remote[key]["score"] == pytest.approx(local[key]["score"], abs=1e-5)

    # evaluate and refusing to overwrite work against the bucket too
    assert main(["evaluate", s3_dest, "--s3-endpoint", s3_server]) == 0
    assert "top-1 accuracy" in capfd.readouterr().out
    refused = engine.run(start, s3_args, tmp_path / "run3", code=1)
    assert "already holds results" in refused.stderr


# --------------------------------------------------------------------------- WebDataset tars


@pytest.mark.slow
def test_a_corrupt_tar_member_and_a_truncated_tar_are_rows(engine, tmp_path, tiny_vit, start):
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
    engine.run(start, ["classify", tars, "--model", tiny_vit, "--output", dest, "-q", "--labels", "column",
                       "--label-column", "txt", "--shard-size", "2"], tmp_path / "run")
    table = check_exactly_once(dest, {f"{tars}/{name}" for name in ("a.tar#a0.jpg", "a.tar#a1.jpg", "a.tar#a2.jpg",
                                                                    "b.tar#b3.jpg", "b.tar#b4.jpg")})
    rows = {row["path"].rpartition("/")[2]: row for row in table.to_pylist()}
    assert rows["a.tar#a1.jpg"]["error"].split(":")[0] in ("decode_error", "truncated", "not_an_image")
    assert rows["b.tar#b4.jpg"]["error"].startswith("truncated: the tar ends inside this member")
    for name in ("a.tar#a0.jpg", "a.tar#a2.jpg", "b.tar#b3.jpg"):
        assert rows[name]["error"] is None and rows[name]["label"]
    assert rows["a.tar#a0.jpg"]["true_label"] == "tench, Tinca tinca"
    assert json.loads((dest / "_manifest.json").read_text())["complete"]


# --------------------------------------------------------------------------- Parquet tables


@pytest.mark.slow
def test_parquet_image_tables_give_the_rows_of_loose_files(engine, sample_files, sample_results, tiny_vit, tmp_path,
                                                           start):
    files = sample_files[::4]  # 50 of the 200: two row groups, two shards
    loose = {str(f): sample_results[str(f)] for f in files}
    hf, plain = write_image_tables(files, tmp_path / "tables")
    dest = tmp_path / "hf-out"
    run = engine.run(start, ["classify", hf, "--model", tiny_vit, "--output", dest, "--image-column", "image",
                             "--label-column", "label", "--keep-columns", "caption", "--shard-size", "25"],
                     tmp_path / "hf")
    assert "top-1 accuracy" in run.stdout  # accuracy is reported
    table = check_exactly_once(dest, set(loose))  # path: the struct's path field
    assert table.column_names[-1] == "caption"
    _same_predictions(_by_file(table), loose)
    assert all(row["caption"] == f"a photo of {Path(row['path']).stem}" for row in table.to_pylist())
    summary = json.loads((dest / SUMMARY).read_text())
    assert summary["labelled"] == len(files) and summary["top1"] is not None

    dest = tmp_path / "plain-out"
    engine.run(start, ["classify", plain, "--model", tiny_vit, "--output", dest, "--image-column", "jpg",
                       "--label-column", "name", "-q"], tmp_path / "plain")
    file_of = {f"{plain}/part-0.parquet#{i}": f for i, f in enumerate(files)}  # path: file and row
    table = check_exactly_once(dest, set(file_of))
    _same_predictions(_by_file(table, file_of), loose)


# --------------------------------------------------------------------------- URLs


@pytest.fixture
def http_server(sample_files):
    """A real HTTP server on 127.0.0.1 serving sample images, with misbehaving paths;
    yields its base URL. ``/slow`` answers only once the test ends (an Event, no sleeps)."""
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
def test_url_list_downloads_and_typed_failures(engine, http_server, sample_files, sample_results, tiny_vit, tmp_path,
                                               start):
    entries = {f"{http_server}/img/{i}": sample_files[i] for i in range(4)}
    entries[f"{http_server}/flaky/5"] = sample_files[5]  # 500, then 200
    failing = {f"{http_server}/missing.jpg": "HTTP 404", f"{http_server}/slow": "timed out",
               f"{http_server}/big": "larger than 1000000 bytes", f"{http_server}/loop": "too many redirects",
               "file:///etc/passwd": "only http and https"}
    urls = [*entries, *failing]
    (tmp_path / "list.csv").write_text("url,id\n" + "".join(f"{url},{i}\n" for i, url in enumerate(urls)))
    dest = tmp_path / "out"
    engine.run(start, ["classify", tmp_path / "list.csv", "--url-column", "url", "--keep-columns", "id", "--model",
                       tiny_vit, "--output", dest, "-q", "--download-timeout", "1", "--max-bytes", "1000000"],
               tmp_path / "run")
    rows = {row["path"]: row for row in check_exactly_once(dest, set(urls)).to_pylist()}
    assert [rows[url]["id"] for url in urls] == [str(i) for i in range(len(urls))]
    for url, file in entries.items():
        loose = sample_results[str(file)]
        assert rows[url]["error"] is None and rows[url]["label"] == loose["label"]
        assert rows[url]["score"] == pytest.approx(loose["score"], abs=1e-5)
    for url, why in failing.items():
        assert rows[url]["error"].startswith("download_error:") and why in rows[url]["error"], rows[url]["error"]


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def finished_dest(images, tiny_vit, tmp_path_factory):
    """A finished classify job over 24 of ``images`` (local engine), and its result rows."""
    root = tmp_path_factory.mktemp("export-source")
    for source in sorted(images.rglob("*.jpg"))[:24]:
        (root / "images" / source.parent.name).mkdir(parents=True, exist_ok=True)
        (root / "images" / source.parent.name / source.name).write_bytes(source.read_bytes())
    dest = root / "dest"
    assert main(["classify", str(root / "images"), "--model", tiny_vit, "--output", str(dest), "-q",
                 "--shard-size", "5", "--engine", "local"]) == 0
    return dest, read_results(str(dest))


@pytest.mark.slow
def test_export_writes_the_selected_rows_once_with_their_bytes(engine, finished_dest, tmp_path, start):
    dest, table = finished_dest
    threshold = _median(table)
    expected = _expected(table, threshold)
    assert 0 < len(expected) < table.num_rows
    engine.run(start, ["export", dest, "--to", tmp_path / "out", "-q", "--where", f"score < {threshold}",
                       "--shard-size", "4"], tmp_path / "run")
    found = _by_path(_tar_samples(tmp_path / "out"))  # fails on a row exported twice
    assert set(found) == set(expected)
    assert all(image == Path(path).read_bytes() for path, (image, _) in found.items())
