"""Running ``visionbatch`` as a job would be run, and checking what it leaves: the helpers
of the tests that start, signal and kill real jobs (test_faults, test_engine_contract,
test_inputs, test_export). The ``start`` fixture (conftest) starts runs and cleans up.

A run is a ``visionbatch`` process in a session of its own (``start_new_session``), so a
test can signal or kill a whole run, and find every process of that run (its decode
workers, a local Ray's processes) by its session id, without touching any other
process on the machine (never ``ray stop``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from visionbatch.destination import Destination, read_results
from visionbatch.driver import HOLD_AFTER_COMMITS

from conftest import WNIDS, write_image
from jobserver import JobServer, preload_key

EXE = Path(sys.executable).with_name("visionbatch")
# Each run starts with the default stop signals that a job started from a terminal
# has, whatever started the suite: a shell starts a background job (`make test > log &`)
# with SIGINT ignored, `nohup` ignores SIGHUP, an ignored signal stays ignored across
# fork and exec (and visionbatch keeps it ignored, as nohup means), and Popen's
# restore_signals restores SIGPIPE and SIGXFSZ only.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_WITH_DEFAULT_STOP_SIGNALS = ("import os, signal, sys\n"
                              f"for signum in {tuple(int(s) for s in STOP_SIGNALS)}:\n"
                              "    signal.signal(signum, signal.SIG_DFL)\n"
                              "os.execv(sys.argv[1], sys.argv[1:])")


_job_servers: dict[tuple, JobServer] = {}


def job_server(args: list[str], env: dict) -> JobServer | None:
    """This process's fork server (jobserver.py) for a run of ``args`` with ``env``,
    started at its first run: one for runs on the local engine, one for those on Ray
    (for each set of RAY_* values); None where VISIONBATCH_TESTS_EXEC=1 asks for every
    run to be exec'd (to compare)."""
    if os.environ.get("VISIONBATCH_TESTS_EXEC") == "1":
        return None
    on_ray = "--address" in args or any(a == "--engine" and b == "ray" for a, b in zip(args, args[1:]))
    key = preload_key(env, on_ray) if on_ray else preload_key(os.environ, False)
    if key not in _job_servers:
        _job_servers[key] = JobServer(env if on_ray else None, ray=on_ray)
    return _job_servers[key]


class Run:
    """One ``visionbatch`` process in its own session; stdout/stderr go to files. Forked
    by the job server, or exec'd where it cannot stand in (jobserver.py)."""

    def __init__(self, args: list[str], folder: Path, env: dict | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = folder / "stdout", folder / "stderr"
        self.started = time.monotonic()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        server = job_server(args, env)
        self.proc = server.popen([EXE, *args], self.out_path, self.err_path, env) if server else None
        if self.proc is None:
            with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
                self.proc = subprocess.Popen([sys.executable, "-c", _WITH_DEFAULT_STOP_SIGNALS, str(EXE), *args],
                                             stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                             start_new_session=True)
        self.pid = self.proc.pid  # also its process group and session id (execv keeps the pid)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stacks = self.stacks()
            left = session_processes(self.pid)
            kill_session(self)
            pytest.fail(f"visionbatch did not exit within {timeout} s; stderr:\n{self.stderr}\n"
                        f"its session's processes: {left}\nthe driver's threads (kill -USR1):\n{stacks}")

    def stacks(self, timeout: float = 10) -> str:
        """The driver's Python stacks, from its SIGUSR1 handler (cli.py). The handler
        writes a whole dump (one "Current thread": the one it runs in, the main thread
        unless Linux hands the signal to another) before it can run again: the second
        dump's start is the event that the first is whole (without one, the deadline)."""
        before = len(self.stderr)
        deadline = time.monotonic() + timeout
        for dumps in (1, 2):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGUSR1)
            while self.stderr[before:].count("Current thread ") < dumps:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    return self.stderr[before:] or "(no stack dump came)"
                time.sleep(0.05)
        return self.stderr[before:]

    def wait_for_commit(self, dest: Path | str, timeout: float = 180, more_than: int = 0,
                        endpoint: str | None = None) -> float:
        """Poll until DEST's manifest lists more than ``more_than`` committed shards; returns
        the seconds since start."""
        deadline = time.monotonic() + timeout
        while len(committed_parts(dest, endpoint)) <= more_than:
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before committing a part file:\n{self.stderr}")
            if time.monotonic() > deadline:
                pytest.fail(f"no part file in {dest} after {timeout} s")
            time.sleep(0.02)
        return time.monotonic() - self.started


def signal_storm(run: Run, gap: Callable[[], float], pairs: int = 20) -> float | None:
    """``pairs`` x (Ctrl-C to the run's process group, then SIGTERM to its driver), each
    signal followed by ``gap()`` seconds; the seconds from the first signal to the
    driver's exit, where it exited during the storm."""
    signalled, exited = time.monotonic(), None
    for _ in range(pairs):
        with contextlib.suppress(ProcessLookupError):  # the group is gone: the storm goes on regardless
            os.killpg(run.pid, signal.SIGINT)
        time.sleep(gap())
        if exited is None:  # an exited driver is a zombie until poll() reaps it below: never signalled after
            os.kill(run.pid, signal.SIGTERM)
        time.sleep(gap())
        if exited is None and run.proc.poll() is not None:
            exited = time.monotonic() - signalled
    return exited


def ignored_signals(pid: int) -> set[int]:
    """The stop signals process ``pid`` ignores (its SigIgn mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return {signum for signum in STOP_SIGNALS if mask & 1 << (signum - 1)}


def session_processes(sid: int) -> dict[int, tuple[int, str]]:
    """Live processes of session ``sid``: pid -> (process group, command line)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        state, _ppid, pgrp, session = stat.rpartition(")")[2].split()[:4]
        if int(session) == sid and state not in ("Z", "X"):
            found[int(entry)] = (int(pgrp), cmdline.replace(b"\0", b" ").decode(errors="replace").strip())
    return found


def kill_session(run: Run, grace: float = 0.0) -> tuple[dict[int, str], dict[int, str]]:
    """SIGKILL the run's process group, then, by pid, those of its processes that left
    the group (Ray's workers make groups of their own) and are still alive after
    ``grace`` seconds. Returns (the processes that had left the group, those of them
    that had to be killed)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.pid, signal.SIGKILL)
    run.proc.wait()
    escaped = {pid: cmd for pid, (pgrp, cmd) in session_processes(run.pid).items() if pgrp != run.pid}
    deadline = time.monotonic() + grace
    while session_processes(run.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    lingering = {pid: cmd for pid, (_, cmd) in session_processes(run.pid).items()}
    deadline = time.monotonic() + 15
    while (left := session_processes(run.pid)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    return escaped, lingering


def wait_session_gone(run: Run, timeout: float = 15) -> dict[int, tuple[int, str]]:
    """After a run exits, the processes of its session still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := session_processes(run.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# The environment of a run that commits its first finished unit, then waits there for
# the test to stop or kill it (the driver's failpoint): a moment the test waits for as an
# event, whatever the machine's speed.
HELD_AFTER_FIRST_COMMIT = {HOLD_AFTER_COMMITS: "1"}

JOB_IMAGES = 120  # write_job_images' count


def write_job_images(root: Path) -> Path:
    """120 small JPEGs (64x48) in the four class folders: img000.jpg ... img119.jpg."""
    for i in range(JOB_IMAGES):
        write_image(root / WNIDS[i % 4] / f"img{i:03d}.jpg", size=(64, 48), seed=1000 + i)
    return root


def committed_parts(dest: Path | str, endpoint: str | None = None) -> list[str]:
    """The part files DEST's manifest lists (it is replaced whole, never seen half-written)."""
    manifest = Destination(str(dest), endpoint).manifest()
    return sorted(s["file"] for s in manifest["shards"].values()) if manifest else []


def rows_on_disk(dest: Path, names: list[str] | None = None) -> list[str]:
    """Paths of the rows in the given part files (default: every committed part file)."""
    names = committed_parts(dest) if names is None else names
    return Destination(str(dest)).read_parts(names).column("path").to_pylist() if names else []


def check_exactly_once(dest, expected: set[str], s3_endpoint: str | None = None):
    """The manifest's rows are the expected files, each exactly once; returns the table."""
    table = read_results(str(dest), s3_endpoint=s3_endpoint)
    paths = table.column("path").to_pylist()
    duplicates = len(paths) - len(set(paths))
    assert duplicates == 0, f"{duplicates} duplicate rows"
    assert set(paths) == expected, (f"missing {sorted(expected - set(paths))[:5]}, "
                                    f"unexpected {sorted(set(paths) - expected)[:5]}")
    return table


def no_tmp_files(dest: Path) -> None:
    leftovers = [p.name for p in dest.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, f"temporary files left in DEST: {leftovers}"


def expected_paths(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*.jpg")}


def source_and_dest(where: str, images: Path, files: list[Path], s3_server: str, tmp_path: Path):
    """SOURCE and DEST on local disk (SOURCE: every image) or in a new bucket of the S3
    server (SOURCE: ``files``); returns them with the endpoint, the paths the rows should
    have and the options the S3 server needs."""
    if where == "local":
        return images, tmp_path / "out", None, expected_paths(images), []
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"vb-lease-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    client.create_bucket(Bucket=bucket)
    for path in files:
        client.upload_file(str(path), bucket, f"val/{path.relative_to(images).as_posix()}")
    expected = {f"s3://{bucket}/val/{p.relative_to(images).as_posix()}" for p in files}
    return f"s3://{bucket}/val/", f"s3://{bucket}/results", s3_server, expected, ["--s3-endpoint", s3_server]
