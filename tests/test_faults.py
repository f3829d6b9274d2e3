"""Faults, end to end through the real command, real processes and real files.

The promise under test: every input file ends up in the output exactly once (a
prediction or an error row), and an interrupted job resumes without redoing the work it
had committed. Each test prints one ``[faults]`` outcome line (visible with ``-s``):
scenario, rows expected, rows written, duplicate paths, seconds to finish.

Jobs run as ``visionbatch`` subprocesses in a session of their own (``runs.Run``), so
a test can signal or kill a whole run and find every process of it. The faults every
engine must survive (kill -9 and --resume, a decoder that kills its worker, SIGTERM,
the lease) are in test_engine_contract.py, run on each engine; these are the rest.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from visionbatch.destination import METRICS_FILE, SUMMARY, Destination, read_results

from runs import (HELD_AFTER_FIRST_COMMIT, JOB_IMAGES, Run, check_exactly_once, committed_parts, expected_paths,
                  ignored_signals, kill_session, no_tmp_files, rows_on_disk, session_processes, signal_storm,
                  source_and_dest, wait_session_gone, write_job_images)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds a run's processes through /proc")

N_IMAGES = JOB_IMAGES
SHARD_SIZE = 8


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_job_images(tmp_path_factory.mktemp("fault-images"))


# --------------------------------------------------------------------------- checks


def _outcome(scenario: str, expected: int, table, seconds: float, extra: str = "") -> None:
    paths = table.column("path").to_pylist()
    print(f"\n[faults] {scenario}: rows expected {expected}, written {len(paths)}, "
          f"duplicates {len(paths) - len(set(paths))}, {seconds:.1f} s to finish" + (f"; {extra}" if extra else ""))


def _classify_args(images: Path, model: str, dest: Path, *more) -> list:
    return ["classify", images, "--model", model, "--output", dest, "--shard-size", SHARD_SIZE, "-q", *more]


# --------------------------------------------------------------------------- 1. kill -9; actors killed


@pytest.mark.slow
def test_kill_9_of_the_driver_then_resume_on_ray_with_its_actors_killed(images, slow_vit, tmp_path, start):
    """The driver (local engine) SIGKILLed after a commit; then --resume on the Ray
    engine (a DEST written by one engine resumes with the other), whose model actor is
    SIGKILLed (restarted, its tasks retried) and, a commit later, its ShardPlanner actor
    (a new one lists again and skips what is committed): every row once, all predicted.
    (One test for both: a Ray job's start-up is most of its time.)"""
    dest = tmp_path / "out"
    expected = expected_paths(images)
    first = start(_classify_args(images, slow_vit, dest), tmp_path / "run1")
    first.wait_for_commit(dest)
    escaped, lingering = kill_session(first, grace=10)
    assert not session_processes(first.pid), "processes of the killed run are still alive"

    parts_before = committed_parts(dest)
    committed = rows_on_disk(dest, parts_before)
    assert 0 < len(committed) < len(expected), "the kill should land between the first commit and the end"
    assert len(committed) == len(set(committed))
    assert not (dest / "_SUCCESS").exists() and not (dest / SUMMARY).exists()
    # What a kill that lands inside a part file's write leaves: the file under its
    # temporary name, cut short (the rename that publishes it never happened).
    whole = (dest / parts_before[0]).read_bytes()
    cut = dest / ".part-000-0000099.parquet.0badc0de.tmp"
    cut.write_bytes(whole[: len(whole) // 2])

    # Without --resume the command refuses to touch DEST.
    refused = start(_classify_args(images, slow_vit, dest), tmp_path / "run2")
    assert refused.wait(300) == 1 and "--resume" in refused.stderr

    started = time.monotonic()
    resumed = start(_classify_args(images, slow_vit, dest, "--resume", "--engine", "ray"), tmp_path / "run3")
    killed_at = []
    for actor in ("MapBatches(Predictor)", "ShardPlanner"):
        resumed.wait_for_commit(dest, more_than=len(committed_parts(dest)))
        actors = [pid for pid, (_, cmd) in session_processes(resumed.pid).items()
                  if cmd.startswith("ray::") and actor in cmd]
        assert len(actors) == 1, (actor, session_processes(resumed.pid))
        os.kill(actors[0], signal.SIGKILL)
        killed_at.append(len(rows_on_disk(dest)))
    assert killed_at[-1] < len(expected), "the actors should be killed with work left"
    table, summary = _check_resumed(resumed, dest, expected, committed)
    assert summary["images_found"] == len(expected) and summary["predicted"] == len(expected)
    assert summary["failed"] == 0
    # Finished work is not redone: the resumed run's own part files hold only the rest,
    # and no part file on disk (listed in the manifest or not) repeats a path.
    on_disk = Destination(str(dest)).part_files()
    assert on_disk == committed_parts(dest)  # parts no committed shard owns were removed
    new_parts = [name for name in on_disk if name not in parts_before]
    assert sorted(rows_on_disk(dest, new_parts)) == sorted(expected - set(committed))
    _outcome("kill -9 of the driver (local engine), then --resume (Ray engine) with its model actor, then its "
             "ShardPlanner actor SIGKILLed", len(expected), table, time.monotonic() - started,
             f"{len(committed)} rows committed before the kill (already_done {summary['already_done']}); "
             f"{len(escaped)} processes outside the killed group, {len(lingering)} of them still alive "
             f"after the 10 s grace (those are killed by pid); {killed_at} rows committed when the actors were killed")


@pytest.mark.slow
def test_kill_9_of_the_driver_takes_its_processes_with_it(images, tiny_vit, tmp_path, start):
    """The driver (local engine) SIGKILLed mid-job, alone: its decode workers and
    multiprocessing's resource tracker are gone within 10 s, not reparented to PID 1."""
    dest = tmp_path / "out"
    run = start(_classify_args(images, tiny_vit, dest), tmp_path / "run", HELD_AFTER_FIRST_COMMIT)
    run.wait_for_commit(dest)
    children = {pid: cmd for pid, (_, cmd) in session_processes(run.pid).items() if pid != run.pid}
    assert any("multiprocessing.spawn" in cmd for cmd in children.values()), children
    assert any("resource_tracker" in cmd for cmd in children.values()), children
    os.kill(run.pid, signal.SIGKILL)
    run.proc.wait()
    killed = time.monotonic()
    while (alive := set(children) & set(session_processes(run.pid))) and time.monotonic() - killed < 10:
        time.sleep(0.1)
    assert not alive, f"still alive 10 s after the driver's kill: {[children[pid] for pid in alive]}"
    print(f"\n[faults] kill -9 of the driver: its {len(children)} processes gone "
          f"{time.monotonic() - killed:.1f} s after it")


def _resume_and_check(start, images, model, dest, run_dir, expected, committed, *more):
    """Run ``--resume`` into ``dest`` and check it (see _check_resumed)."""
    started = time.monotonic()
    resumed = start(_classify_args(images, model, dest, "--resume", *more), run_dir)
    table, summary = _check_resumed(resumed, dest, expected, committed)
    return table, summary, time.monotonic() - started


def _check_resumed(resumed: Run, dest, expected, committed):
    """A ``--resume`` run into ``dest``: exit 0, nothing left running, every image exactly
    once and predicted, the committed rows counted as already done, no part file
    repeating a path, no temporary file left."""
    assert resumed.wait(300) == 0, resumed.stderr
    assert not wait_session_gone(resumed)
    table = check_exactly_once(dest, expected)
    assert table.column("error").null_count == len(expected)
    summary = json.loads((dest / SUMMARY).read_text())
    assert summary["already_done"] == len(committed) > 0
    everything = rows_on_disk(dest, Destination(str(dest)).part_files())
    assert len(everything) == len(set(everything)) == len(expected)
    no_tmp_files(dest)
    return table, summary


# --------------------------------------------------------------------------- 2. more stop signals (one Ctrl-C, SIGTERM: the contract)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c twice", "sighup"])
def test_more_stop_signals_exit_130(how, images, tiny_vit, tmp_path, start):
    """A second Ctrl-C while the first one's stop is under way, or SIGHUP (a closed
    terminal): exit 130 with the one line that says what was kept. (Before the SIGHUP,
    kill -USR1 prints where the job waits, and the job goes on.)"""
    dest = tmp_path / "out"
    first = start(_classify_args(images, tiny_vit, dest), tmp_path / "run1", HELD_AFTER_FIRST_COMMIT)
    first.wait_for_commit(dest)
    assert not ignored_signals(first.pid), "the run was started with a stop signal ignored"
    stop_told_from = 0  # where stderr's part about the stop begins
    if how == "sighup":
        stacks = first.stacks()
        assert "in _hold" in stacks and first.proc.poll() is None, stacks
        stop_told_from = len(first.stderr)
        os.kill(first.pid, signal.SIGHUP)
    else:
        os.killpg(first.pid, signal.SIGINT)
        # The event that the first press's stop is under way: the job now ignores the stop
        # signals (/proc's SigIgn). The second press comes then, while the job still runs.
        _wait_until(lambda: first.proc.poll() is not None or signal.SIGINT in ignored_signals(first.pid), 60,
                    "the job ignoring SIGINT once its stop began", every=0.005)
        assert first.proc.poll() is None, f"the job ended before the second press could come:\n{first.stderr}"
        os.killpg(first.pid, signal.SIGINT)
    assert first.wait(300) == 130, first.stderr
    told = first.stderr[stop_told_from:]
    lines = [line for line in told.splitlines() if line.strip()]
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in told, told
    assert not wait_session_gone(first), "the interrupted run left processes behind"
    committed = rows_on_disk(dest)
    assert 0 < len(committed) and len(committed) == len(set(committed))


@pytest.mark.slow
def test_a_storm_of_stop_signals_exits_130(images, slow_vit, tmp_path, start):
    """20 x (Ctrl-C to the process group, then SIGTERM to the driver) from the first
    commit on, in 5 runs: each time exit 130 with the one line that says what was kept,
    never a hang (in the stop or in the interpreter's exit) or a lock's error. The
    signals come 20 ms apart, not the issue's 50: more of them land inside the stop
    (before the fix, 1 run in 8 hung so, at exit, waiting for a decode pool's thread)."""
    exits = []
    for attempt in range(5):
        dest = tmp_path / f"out{attempt}"
        run = start(_classify_args(images, slow_vit, dest), tmp_path / f"run{attempt}")
        run.wait_for_commit(dest)
        assert not ignored_signals(run.pid), "the run was started with a stop signal ignored"
        signalled = time.monotonic()
        exited = signal_storm(run, lambda: 0.02)
        code = run.wait(60)
        exits.append(round(exited or time.monotonic() - signalled, 1))
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert code == 130 and len(lines) == 1, (attempt, code, run.stderr)
        assert lines[0].startswith("visionbatch: error: interrupted; ") and "--resume" in lines[0], lines
        assert not wait_session_gone(run), "the interrupted run left processes behind"
    print(f"\n[faults] signal storms: exit 130 each time, {exits} s after the first signal")


# --------------------------------------------------------------------------- 3. a stopped decode worker


@pytest.mark.slow
def test_a_stopped_worker_loses_its_shards(images, slow_vit, tmp_path, start):
    """kill -STOP of a decode worker mid-job (it holds a shard: the model is the slower
    stage, so each worker waits with one for room in the queue): after --stall-timeout
    seconds of the model waiting, the workers are replaced, their shards done again, and
    the job ends with every row once, predicted."""
    dest = tmp_path / "out"
    expected = expected_paths(images)
    run = start(_classify_args(images, slow_vit, dest, "--stall-timeout", 3), tmp_path / "run")
    run.wait_for_commit(dest)
    worker = next(pid for pid, (_, cmd) in session_processes(run.pid).items() if "spawn_main" in cmd)
    os.kill(worker, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        assert run.wait(300) == 0, run.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
    seconds = time.monotonic() - stopped
    assert "a decode worker sent nothing for" in run.stderr, run.stderr
    table = check_exactly_once(dest, expected)
    assert table.column("error").null_count == len(expected)
    assert not wait_session_gone(run)
    _outcome("kill -STOP of a decode worker, --stall-timeout 3", len(expected), table, seconds,
             "seconds from the stop to the job's end")


# --------------------------------------------------------------------------- 4. flaky object store

_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message><RequestId>FAULT</RequestId></Error>")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
               "expect", "content-length"}


class FlakyS3Proxy(ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of an S3 server that answers every
    ``every``-th request of each method with 503 SlowDown and forwards the others."""

    daemon_threads = True

    def __init__(self, upstream: str, every: int):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        parsed = urllib.parse.urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.every = every
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()
        self.faults: collections.Counter = collections.Counter()
        self.fetched: set[str] = set()  # object paths whose GET was forwarded
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fail_next(self, method: str) -> bool:
        with self.lock:
            self.requests[method] += 1
            fail = self.requests[method] % self.every == 0
            self.faults[method] += fail
            return fail

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()
        self.thread.join(10)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FlakyS3Proxy

    def log_message(self, *args) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        if not any(name.lower() == "content-length" for name, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        body = self._read_body()
        if self.server.fail_next(self.command):
            self._reply(503, "Slow Down", [("Content-Type", "application/xml")], _SLOWDOWN)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        if self.command == "GET" and "?" not in self.path:
            with self.server.lock:
                self.server.fetched.add(urllib.parse.unquote(self.path))
        keep = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP | {"server", "date"}]
        if self.command == "HEAD" and response.getheader("Content-Length") is not None:
            keep.append(("Content-Length", response.getheader("Content-Length")))
        self._reply(response.status, response.reason, keep, data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


@pytest.mark.slow
def test_transient_object_store_errors(images, tiny_vit, s3_server, tmp_path, start):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"vb-faults-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    client.create_bucket(Bucket=bucket)
    files = sorted(images.rglob("*.jpg"))[:24]
    for path in files:
        client.upload_file(str(path), bucket, f"val/{path.relative_to(images).as_posix()}")
    expected = {f"s3://{bucket}/val/{p.relative_to(images).as_posix()}" for p in files}

    clean_dest = f"s3://{bucket}/results/clean"
    clean = start(["classify", f"s3://{bucket}/val/", "--model", tiny_vit, "--output", clean_dest,
                   "--s3-endpoint", s3_server, "--shard-size", SHARD_SIZE, "-q"], tmp_path / "clean")
    assert clean.wait(300) == 0, clean.stderr
    clean_seconds = time.monotonic() - clean.started

    flaky_dest = f"s3://{bucket}/results/flaky"
    with FlakyS3Proxy(s3_server, every=5) as proxy:
        run = start(["classify", f"s3://{bucket}/val/", "--model", tiny_vit, "--output", flaky_dest,
                     "--s3-endpoint", proxy.url, "--shard-size", SHARD_SIZE, "-q"], tmp_path / "flaky")
        assert run.wait(300) == 0, run.stderr
        seconds = time.monotonic() - run.started
    assert not wait_session_gone(run)

    # The faults were real, on reads (by the Ray workers) and on writes (by the driver),
    # and every image went through the proxy: the workers used the endpoint they were given.
    assert sum(proxy.faults.values()) > 0
    assert proxy.faults["GET"] > 0 and proxy.faults["PUT"] + proxy.faults["POST"] > 0, dict(proxy.faults)
    assert {f"/{u[len('s3://'):]}" for u in expected} <= proxy.fetched

    flaky = check_exactly_once(flaky_dest, expected, s3_endpoint=s3_server)
    reference = check_exactly_once(clean_dest, expected, s3_endpoint=s3_server)
    assert flaky.column("error").null_count == len(expected)
    ours = {row["path"]: row for row in flaky.to_pylist()}
    for row in reference.to_pylist():
        other = ours[row["path"]]
        for column in ("label", "label_id", "top_k_labels", "true_label", "error", "width", "height"):
            assert other[column] == row[column], (row["path"], column)
        assert other["score"] == pytest.approx(row["score"], abs=1e-5)
    _outcome(f"S3 behind a proxy answering 1 request in {proxy.every} with 503 SlowDown", len(expected), flaky, seconds,
             f"{sum(proxy.faults.values())} faults injected in {sum(proxy.requests.values())} requests "
             f"({', '.join(f'{m} {n}' for m, n in sorted(proxy.faults.items()))}); "
             f"{clean_seconds:.1f} s without faults")


# --------------------------------------------------------------------------- 5. model fails to load


def test_corrupt_model_config_fails_fast(images, tiny_vit, tmp_path, start):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_vit, broken)
    config_text = (broken / "config.json").read_text()
    (broken / "config.json").write_text(config_text[: len(config_text) // 2])  # cut short: not JSON
    dest = tmp_path / "out"
    run = start(["classify", images, "--model", broken, "--output", dest, "-q"], tmp_path / "run")
    code = run.wait(300)
    seconds = time.monotonic() - run.started  # printed below, not asserted: a busy machine is slow
    assert not wait_session_gone(run)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert code == 1, run.stderr
    assert len(lines) == 1 and lines[0].startswith("visionbatch: error:") and "config" in lines[0], run.stderr
    assert "Traceback" not in run.stderr
    assert not committed_parts(dest)
    print(f"\n[faults] corrupt config.json: exit {code} after {seconds:.1f} s: {lines[0]}")


# --------------------------------------------------------------------------- 6. a stale job is fenced off (two jobs at once: the contract)

LEASE_STALE_S = 3.0  # the fencing test's lease staleness (VISIONBATCH_LEASE_STALE_S): seconds, not a minute


def _wait_until(condition, timeout: float, what: str, every: float = 0.05) -> None:
    """Poll ``condition`` (an event seen from outside a process: a file, a mask in /proc)
    until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout} s")
        time.sleep(every)


def _labels_by_file(table) -> dict[str, str]:
    """A result table's label per image, keyed by the image's class folder and name."""
    return {"/".join(path.split("/")[-2:]): label
            for path, label in zip(table.column("path").to_pylist(), table.column("label").to_pylist())}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_paused_job_taken_over_writes_nothing(where, images, slow_vit, tiny_vit, s3_server, tmp_path, start):
    """Job A is paused (SIGSTOP of its process group) mid-job past its lease's staleness;
    job B takes DEST over with another model and --overwrite; A, continued while B runs,
    exits 1 naming B, and DEST is exactly B's results, read through the manifest or as
    every part file in it."""
    import pyarrow.dataset as pads
    import visionbatch

    source, dest, endpoint, expected, more = source_and_dest(where, images, sorted(images.rglob("*.jpg")),
                                                              s3_server, tmp_path)
    destination = Destination(str(dest), endpoint)
    env = {"VISIONBATCH_LEASE_STALE_S": str(LEASE_STALE_S)}
    more = [*more, "--runtime", "torch"]  # one model path: B's rows and the reference's are alike
    a = start(_classify_args(source, slow_vit, dest, *more), tmp_path / "a", env)
    a.wait_for_commit(dest, endpoint=endpoint)
    os.killpg(a.pid, signal.SIGSTOP)
    a_rows = _labels_by_file(destination.read_parts(committed_parts(dest, endpoint)))
    assert "_SUCCESS" not in destination.files(), "A should be paused mid-job"

    def lease() -> dict:
        """The lease as this reader sees it; {} where it is not JSON (seen once against the
        test's S3 server during B's takeover: two JSON objects back to back), read as
        visionbatch's destination.read_lease reads it, as no lease, and looked at again."""
        with contextlib.suppress(json.JSONDecodeError, OSError):  # OSError: S3 on a key being replaced
            return json.loads(destination.read_bytes("_lease.json"))
        return {}

    _wait_until(lambda: time.time() - lease().get("heartbeat", time.time()) > LEASE_STALE_S + 0.5, 60,
                "A's lease going stale")
    b = start(_classify_args(source, tiny_vit, dest, *more, "--overwrite"), tmp_path / "b", env)

    def b_committed() -> bool:
        # B's --overwrite is removing A's files (S3 answers a GET of a key listed a moment
        # before with RESOURCE_NOT_FOUND, an OSError, where local disk gives FileNotFoundError)
        with contextlib.suppress(OSError):
            return (destination.manifest() or {}).get("generation") == lease().get("generation") == 2
        return False

    _wait_until(lambda: b_committed() or b.proc.poll() is not None, 180, "B's first commit")
    assert b.proc.poll() is None or b_committed(), f"B ended without committing:\n{b.stderr}"
    os.killpg(a.pid, signal.SIGCONT)
    a_code, b_code = a.wait(120), b.wait(300)
    assert (a_code, b_code) == (1, 0), (a.stderr, b.stderr)

    held = lease()  # B's, released
    assert held["pid"] == b.pid and held["generation"] == 2 and held["released"], held
    line = _one_error_line(a)
    assert (f"was taken over by a newer job (holder {held['id']}, pid {b.pid} on {held['host']}, lease generation 2, "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(held['started']))})") in line, line

    visionbatch.run([str(images)], str(tmp_path / "reference"), model=tiny_vit, runtime="torch", progress=False)
    b_rows = _labels_by_file(read_results(str(tmp_path / "reference")))  # B's model on every image
    assert sum(a_rows[name] != b_rows[name] for name in a_rows) > len(a_rows) / 2, "A's labels should differ from B's"
    table = check_exactly_once(dest, expected, s3_endpoint=endpoint)
    assert _labels_by_file(table) == b_rows
    parts = destination.part_files()
    assert parts == committed_parts(dest, endpoint) and all(".g2." in name for name in parts), parts
    every_part = pads.dataset([f"{destination.root}/{name}" for name in parts], filesystem=destination.fs).to_table()
    assert every_part.num_rows == len(b_rows) and _labels_by_file(every_part) == b_rows
    assert json.loads(destination.read_bytes("_SUCCESS"))["generation"] == destination.manifest()["generation"] == 2
    assert not [name for name in destination.files() if name.endswith(".tmp")], destination.files()
    _outcome(f"a paused job taken over ({where})", len(expected), table, time.monotonic() - a.started, line)


# --------------------------------------------------------------------------- 7. DEST or TMPDIR unusable


def _fill(folder: Path) -> None:
    """Write until the file system is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)


def _one_error_line(run: Run) -> str:
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("visionbatch: error: "), run.stderr
    assert "Traceback" not in run.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["read-only DEST", "full DEST", "read-only TMPDIR"])
def test_unusable_dest_or_tmpdir_fails_before_any_work(case, images, tiny_vit, tmp_path, tmpfs, start):
    """Exit 1 with one line naming the place, before any work starts (the seconds it
    took are printed, not asserted)."""
    disk = tmpfs("disk", "64k", read_only=case.startswith("read-only"))
    dest, env = (disk / "out", None) if case.endswith("DEST") else (tmp_path / "out", {"TMPDIR": str(disk)})
    if case == "full DEST":
        dest.mkdir()
        _fill(disk)
    run = start(_classify_args(images, tiny_vit, dest), tmp_path / "run", env=env)
    code = run.wait(300)
    seconds = time.monotonic() - run.started
    line = _one_error_line(run)
    assert code == 1, run.stderr
    assert str(disk) in line and ("No space left" if case == "full DEST" else "Read-only file system") in line, line
    assert not session_processes(run.pid)  # no Ray, no model: nothing was started
    if dest.exists():
        assert not [p.name for p in dest.iterdir()], "DEST should be left empty"
    print(f"\n[faults] {case}: exit {code} after {seconds:.1f} s: {line}")


@pytest.mark.slow
def test_disk_that_fills_mid_job_keeps_what_was_committed(images, tiny_vit, tmp_path, tmpfs, start):
    """A DEST that fills up after a few shards: exit 1 with one line naming the file and
    saying how to resume; the committed shards are whole and listed, no temporary file is
    left; with room again, --resume ends with every file exactly once."""
    disk = tmpfs("disk", "40k")  # room for a few of the 15 part files (4 KB each) and the manifest
    dest = disk / "out"
    run = start(_classify_args(images, tiny_vit, dest), tmp_path / "run1")
    code = run.wait(300)
    line = _one_error_line(run)
    assert code == 1 and "No space left on device" in line and f"cannot write {dest}/" in line, line
    assert "rerun the same command with --resume (log: " in line, line
    kept = rows_on_disk(dest)  # every part the manifest lists is whole
    assert f"; {len(kept)} finished rows are saved in {dest}:" in line and 0 < len(kept) < N_IMAGES, line
    assert len(kept) == len(set(kept))
    no_tmp_files(dest)
    assert not (dest / "_SUCCESS").exists()

    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    table, _, seconds = _resume_and_check(start, images, tiny_vit, dest, tmp_path / "run2", expected_paths(images),
                                          kept)
    _outcome("DEST full mid-job, then --resume", N_IMAGES, table, seconds, line)


def test_unwritable_summary_and_metrics_leave_a_finished_job(images, tiny_vit, tmp_path, start):
    """_summary.json and _metrics.json are written after the results are committed: failing
    to write them is a warning, and DEST stays a finished, readable result."""
    dest = tmp_path / "out"
    for name in (SUMMARY, METRICS_FILE):  # folders where files should go: their writes fail
        (dest / name).mkdir(parents=True)
        (dest / name / "keep").write_text("")
    run = start(_classify_args(images, tiny_vit, dest, "--limit", 16), tmp_path / "run")
    assert run.wait(300) == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(warnings) == 2 and all("the results are complete, but cannot write" in w for w in warnings), warnings
    assert SUMMARY in warnings[0] and METRICS_FILE in warnings[1]
    assert len(read_results(str(dest))) == 16 and (dest / "_SUCCESS").exists()
    no_tmp_files(dest)
    evaluate = start(["evaluate", dest], tmp_path / "evaluate")  # the metrics are the answer: printed, and a warning
    assert evaluate.wait(300) == 0 and "top-1 accuracy" in evaluate.stdout
    assert f"cannot write {dest}/{METRICS_FILE}" in evaluate.stderr


# --------------------------------------------------------------------------- 8. SIGTERM during start-up


@pytest.mark.slow
def test_sigterm_during_start_up(images, tiny_vit, tmp_path, start):
    """Once the job holds DEST (its lease is there) and before anything is committed:
    one line, the interrupt exit status, nothing left behind."""
    dest = tmp_path / "out"
    run = start(_classify_args(images, tiny_vit, dest), tmp_path / "run")
    _wait_until(lambda: (dest / "_lease.json").exists() or run.proc.poll() is not None, 120, "the job's lease",
                every=0.005)
    assert run.proc.poll() is None, f"the job ended before it could be stopped during start-up:\n{run.stderr}"
    os.kill(run.pid, signal.SIGTERM)
    code = run.wait(300)
    line = _one_error_line(run)
    assert code == 130, run.stderr
    assert line == "visionbatch: error: interrupted during start-up; nothing was written"
    assert not wait_session_gone(run), "the interrupted run left processes behind"
    assert [p.name for p in dest.iterdir()] == ["_lease.json"], "DEST should hold only its lease"
    assert json.loads((dest / "_lease.json").read_text())["released"]
