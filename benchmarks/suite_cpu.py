"""Where the test suite's CPU goes: runs pytest (by default the Makefile's test command)
and, every 0.3 s, reads each process's CPU time from /proc, so that the processes the
tests start (jobs, their decode workers, Ray's workers and daemons) are counted too,
which pytest's durations and `time` (children it never reaps) miss.

    .venv/bin/python benchmarks/suite_cpu.py                      # the whole suite
    .venv/bin/python benchmarks/suite_cpu.py -- tests/test_faults.py -n 2

Prints the CPU seconds by kind of process and by test (a process is charged to the test
named in the environment it was exec'd with: a Ray cluster's workers to the test that
started the cluster, a run forked by tests/jobserver.py to the test that started its
server). Linux only. A process that lives less than 0.3 s may be missed.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import threading
import time

PYTEST = ["-n", "3", "--dist", "loadgroup", "-q", "-p", "no:cacheprovider"]  # the Makefile's test command
KINDS = (  # (kind, a word its command line holds), first match wins
    ("Ray worker", "ray/_private/workers/"), ("Ray daemon", "ray/"), ("Ray daemon", "raylet"),
    ("Ray daemon", "gcs_server"), ("decode/task worker (multiprocessing)", "multiprocessing"),
    ("visionbatch job", "visionbatch"), ("pytest worker", "exec(eval(sys.stdin.readline()))"),
    ("pytest worker", "pytest"))


def _read(pid: str, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def sample(seen: dict, baseline: bool = False) -> None:
    """One look at every process: (pid, start time) -> [CPU seconds before the run (for a
    process already alive in the ``baseline`` look), CPU seconds now, command line, test]."""
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = _read(pid, "stat").rpartition(b")")[2].split()
            cpu, key = (int(fields[11]) + int(fields[12])) / tick, (pid, int(fields[19]))
            if key not in seen:
                command = _read(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace")
                test = next((v[20:].decode(errors="replace").rsplit(" (", 1)[0]
                             for v in _read(pid, "environ").split(b"\0") if v.startswith(b"PYTEST_CURRENT_TEST=")),
                            "(outside any test)")
                seen[key] = [cpu if baseline else 0.0, cpu, command, test]
            seen[key][1] = cpu
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile


def sample_until(stop: threading.Event, seen: dict, every: float = 0.3) -> None:
    while not stop.wait(every):
        sample(seen)


def kind_of(command: str) -> str:
    return next((kind for kind, word in KINDS if word in command), "other")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=30, help="how many tests to list")
    parser.add_argument("pytest_args", nargs="*", help="after --: pytest's arguments (default: the whole suite)")
    args = parser.parse_args()
    seen: dict = {}
    sample(seen, baseline=True)  # what ran before is not the suite's
    stop = threading.Event()
    sampler = threading.Thread(target=sample_until, args=(stop, seen), daemon=True)
    sampler.start()
    started = time.monotonic()
    code = subprocess.call([sys.executable, "-m", "pytest", *PYTEST, *args.pytest_args])
    wall = time.monotonic() - started
    stop.set()
    sampler.join()
    own = os.getpid()
    rows = [(now - before, command, test) for (pid, _), (before, now, command, test) in seen.items()
            if int(pid) != own and now > before]
    total = sum(cpu for cpu, _, _ in rows)
    print(f"\npytest exit {code}: {wall:.0f} s wall, {total:.0f} CPU s in {len(rows)} processes "
          f"({total / wall:.2f} cores busy on average, {os.cpu_count()} CPUs)")
    by_kind, count = collections.Counter(), collections.Counter()
    for cpu, command, _ in rows:
        by_kind[kind_of(command)] += cpu
        count[kind_of(command)] += 1
    print(f"\n{'CPU s':>7}  {'share':>5}  {'procs':>5}  kind")
    for kind, cpu in by_kind.most_common():
        print(f"{cpu:7.0f}  {cpu / total:5.0%}  {count[kind]:5d}  {kind}")
    by_test = collections.Counter()
    for cpu, _, test in rows:
        by_test[test] += cpu
    print(f"\n{'CPU s':>7}  test (its processes'; the pytest workers' own time is under '(outside any test)')")
    for test, cpu in by_test.most_common(args.top):
        print(f"{cpu:7.0f}  {test}")
    return code


if __name__ == "__main__":
    sys.exit(main())
