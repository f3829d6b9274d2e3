"""A real two-node Ray cluster on this machine, started and stopped by the tests.

Both nodes are ``ray start --block`` processes in their own process groups; the tests
stop them by process-group id (never ``ray stop``, which would stop every Ray on the
machine). The cluster uses token authentication (Ray's default once ~/.ray/auth_token
exists) with a fresh random token per cluster, passed to every process through
RAY_AUTH_MODE/RAY_AUTH_TOKEN, so the tests neither read nor write ~/.ray.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import visionbatch
from visionbatch.destination import SUMMARY, read_results

from conftest import WNIDS, free_port, write_image

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 300 * 1024 * 1024  # per node; the default (30% of RAM each) is needlessly large here

_ALIVE_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR", include_dashboard=False)
deadline = time.monotonic() + float(sys.argv[3])
while True:
    alive = sum(bool(n.get("Alive")) for n in ray.nodes())
    if alive >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(0.25)
print(alive)
"""


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc), so that none outlives the test."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Cluster:
    """A head node (2 CPUs) and a second node (1 CPU, custom resource ``node2``), or the
    head alone (``start(second_node=False)``: test_engine_contract's Ray)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Short, private temp dir: Ray's unix socket paths must stay under 108 bytes,
        # and a private dir keeps this cluster out of /tmp/ray/ray_current_cluster.
        self.temp_dir = tempfile.mkdtemp(prefix="vbray-", dir="/tmp")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN": secrets.token_hex(32),
               # A lost node is found dead after 2 missed health checks 1 s apart, not
               # Ray's 5 checks 3 s apart (15 s of a node-loss test spent waiting).
               "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "2"}
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            env.pop(name, None)
        self.env = env
        self.nodes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(os.path.join(self.temp_dir, f"{name}.log"), "wb")
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
             f"--object-store-memory={OBJECT_STORE_BYTES}", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        self.nodes[name] = proc
        return proc

    def start(self, second_node: bool = True) -> "Cluster":
        head = self._start("head", "--head", f"--port={self.port}", "--num-cpus=2", "--include-dashboard=false",
                           f"--temp-dir={self.temp_dir}")
        self._wait_for_port(head)
        if second_node:
            self._start("node2", f"--address={self.address}", "--num-cpus=1", '--resources={"node2": 1}')
        expected = 2 if second_node else 1
        alive = self.alive_nodes(expect=expected, within=60)
        assert alive == expected, f"the cluster has {alive} alive node(s), expected {expected}:\n{self.logs()}"
        return self

    def _wait_for_port(self, head: subprocess.Popen, within: float = 60) -> None:
        import socket

        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert head.poll() is None, f"the head node exited:\n{self.logs()}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        pytest.fail(f"the head node did not listen on {self.port} within {within} s:\n{self.logs()}")

    def alive_nodes(self, expect: int, within: float) -> int:
        done = subprocess.run([sys.executable, "-c", _ALIVE_NODES, self.address, str(expect), str(within)],
                              env=self.env, capture_output=True, text=True, timeout=within + 60)
        assert done.returncode == 0, done.stderr[-3000:]
        return int(done.stdout.split()[-1])

    def status(self) -> str:
        """`ray status` (for failure messages)."""
        try:
            done = subprocess.run([str(BIN / "ray"), "status", f"--address={self.address}"], env=self.env,
                                  capture_output=True, text=True, timeout=30)
            return done.stdout[-3000:] + done.stderr[-1000:]
        except subprocess.TimeoutExpired:
            return "(ray status timed out)"

    def logs(self) -> str:
        return "\n".join(f"--- {name}.log\n" + Path(self.temp_dir, f"{name}.log").read_text(errors="replace")[-2000:]
                         for name in self.nodes)

    def kill(self, name: str) -> None:
        """SIGKILL a node's process group (and any process of it that left the group)."""
        proc = self.nodes[name]
        if proc.poll() is not None:
            return
        stragglers = _descendants(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in stragglers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            self.kill(name)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _cluster():
    started = Cluster()
    try:
        yield started.start()
    finally:
        started.stop()


cluster = pytest.fixture(scope="module")(_cluster)
doomed_cluster = pytest.fixture(_cluster)  # one whose second node a test kills


def _images(root: Path, count: int, size=(40, 30)) -> list[str]:
    return sorted(str(write_image(root / WNIDS[i % 4] / f"img {i:03d}.jpg", size=size, seed=i)) for i in range(count))


def _classify(cluster: Cluster, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "visionbatch"), "classify", *args, "--address", cluster.address],
                            env=cluster.env, **popen)


def _report(scenario: str, expected: int, rows: list[str], seconds: float, extra: str = "") -> None:
    print(f"\n[{scenario}] rows expected {expected}, rows written {len(rows)}, "
          f"duplicates {len(rows) - len(set(rows))}, {seconds:.1f} s{extra}")


# Tests of one module-scoped fixture run in one worker of a parallel suite (pytest -n).
@pytest.mark.xdist_group("cluster")
def test_two_node_cluster_matches_a_local_run(cluster, tiny_vit, tmp_path):
    files = _images(tmp_path / "images", 48)
    visionbatch.run([str(tmp_path / "images")], str(tmp_path / "local"), model=tiny_vit, progress=False)
    local = {row["path"]: row for row in read_results(str(tmp_path / "local")).to_pylist()}

    started = time.monotonic()
    proc = _classify(cluster, str(tmp_path / "images"), "--model", tiny_vit, "--output", str(tmp_path / "remote"),
                     "--shard-size", "16", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the job did not finish in 180 s\n{cluster.status()}\n{err[-3000:]}")
    seconds = time.monotonic() - started
    assert proc.returncode == 0, err
    assert "predicted         48" in out
    # Both nodes share this disk, so local paths work; the user is still warned.
    assert "local paths with a multi-node cluster" in err

    rows = read_results(str(tmp_path / "remote")).to_pylist()
    paths = [row["path"] for row in rows]
    _report("two-node cluster vs local", len(files), paths, seconds)
    assert len(paths) == len(set(paths)) == len(files) and sorted(paths) == files == sorted(local)
    for row in rows:
        ref = local[row["path"]]
        assert row["error"] is None and ref["error"] is None
        assert row["label"] == ref["label"] and row["top_k_labels"] == ref["top_k_labels"]
        assert row["score"] == pytest.approx(ref["score"], abs=1e-5)
        assert row["true_label"] == ref["true_label"] and (row["width"], row["height"]) == (ref["width"], ref["height"])


@pytest.mark.xdist_group("cluster")
def test_a_client_without_the_token_is_told_what_to_set(cluster, tiny_vit, tmp_path):
    """`ray start --head` turns token authentication on by itself once ~/.ray/auth_token
    exists, and ray.init never sends a token to an explicit address unless told to."""
    write_image(tmp_path / "images" / "a.jpg")
    env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    started = time.monotonic()
    done = subprocess.run([str(BIN / "visionbatch"), "classify", str(tmp_path / "images"), "--model", tiny_vit,
                           "--output", str(tmp_path / "out"), "--address", cluster.address],
                          capture_output=True, text=True, timeout=180, env=env)
    print(f"\n[cluster without the token] exit {done.returncode} after {time.monotonic() - started:.1f} s")
    assert done.returncode == 1
    assert "token authentication" in done.stderr and "RAY_AUTH_MODE=token" in done.stderr, done.stderr
    assert cluster.env["RAY_AUTH_TOKEN"] not in done.stderr


def test_node_lost_mid_run_loses_and_duplicates_nothing(doomed_cluster, tiny_vit, tmp_path):
    cluster = doomed_cluster
    files = _images(tmp_path / "images", 300, size=(32, 24))
    dest = tmp_path / "out"
    stdout, stderr = open(tmp_path / "stdout", "w+"), open(tmp_path / "stderr", "w+")
    started = time.monotonic()
    proc = _classify(cluster, str(tmp_path / "images"), "--model", tiny_vit, "--output", str(dest),
                     "--shard-size", "16", stdout=stdout, stderr=stderr)
    try:
        # Progress has started once the first part file (16 rows) is committed.
        deadline = time.monotonic() + 120
        while not list(dest.glob("part-*.parquet")):
            assert proc.poll() is None, f"the job ended before any progress: {Path(stderr.name).read_text()}"
            assert time.monotonic() < deadline, "no progress within 120 s"
            time.sleep(0.05)
        committed = sum(1 for _ in dest.glob("part-*.parquet")) * 16
        assert proc.poll() is None and committed < len(files), "the job finished before the node could be killed"
        cluster.kill("node2")
        killed = time.monotonic()
        try:
            rc = proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            status = cluster.status()
            proc.send_signal(signal.SIGINT)  # stops like Ctrl-C: committed rows stay
            proc.wait(timeout=60)
            pytest.fail(f"the job hung after the second node died ({time.monotonic() - killed:.0f} s)\n{status}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seconds, after_kill = time.monotonic() - started, time.monotonic() - killed
    err = Path(stderr.name).read_text()
    resumed = rc != 0
    if resumed:
        # Ray Data recovers a lost node's actors and retried tasks, and drops the blocks
        # of decode tasks lost with it (their shards are redone one file per task at the
        # end). Whatever it still fails its stream with stops the job, which says so and
        # keeps what it committed (maybe nothing yet: a part file on disk is committed
        # once the manifest lists it); --resume does the rest.
        assert rc == 1 and "a Ray node or worker was lost" in err, err[-3000:]
        again = _classify(cluster, str(tmp_path / "images"), "--model", tiny_vit, "--output", str(dest),
                          "--shard-size", "16", "--resume", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, again_err = again.communicate(timeout=300)
        assert again.returncode == 0, again_err[-3000:]
        seconds = time.monotonic() - started

    table = read_results(str(dest))
    paths = table.column("path").to_pylist()
    # What Ray told the driver (its log file): tasks lost with the node and retried.
    log = "".join(p.read_text(errors="replace")
                  for p in (Path(tempfile.gettempdir()) / "visionbatch").glob(f"driver-*-{proc.pid}.log"))
    recomputed = sum(int(n) for n in re.findall(r"recover (\d+) lost objects", log))
    _report("node killed mid-run", len(files), paths, seconds,
            f" ({'stopped, then --resume' if resumed else 'finished'} {after_kill:.1f} s after the kill, "
            f"{committed} rows committed before it; driver {proc.pid} log: "
            f"node marked dead: {'marked dead' in log}, {recomputed} lost blocks recomputed, "
            f"{log.count('retries remaining')} task retries "
            f"({log.count('Task MapWorker(MapBatches(Predictor)).submit failed')} to the model actor), "
            f"{log.count('were in tasks that failed')} isolated retry pass(es))")
    assert len(paths) == len(set(paths)), "duplicate rows"
    assert sorted(paths) == files, "rows != files"
    errors = [e for e in table.column("error").to_pylist() if e]
    assert not errors, errors[:3]  # every file is good: a lost node must not turn it into an error row
    summary = json.loads((dest / SUMMARY).read_text())
    assert summary["predicted"] == len(files) and summary["failed"] == 0
