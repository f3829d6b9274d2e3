"""Stop-signal storms on real jobs, several at once, until one hangs: how often a job
fails to exit 130 under a storm, and where a hung one waits.

    .venv/bin/python benchmarks/signal_storms.py --streams 3 --minutes 20 --work /tmp/storms

Each stream runs `visionbatch classify` (120 images, a 6-layer random ViT slow enough
to be stopped mid-job) again and again, as the tests run it (tests/runs.py: its own
session, the default stop signals); from its first commit on, 20 x (SIGINT to its
process group, then SIGTERM to the driver), each a random 0-30 ms apart (with
--at-start, from 0-4 s after the start on: its start-up too). A job alive
60 s after its storm is dumped (py-spy --native where py-spy is on PATH, and the
driver's own `kill -USR1` stacks) into WORK/hang-*.txt, then killed. test_faults'
storm test is the same check, 5 storms a suite run; this finds a 1-in-20 hang in
minutes. Prints the count of each outcome.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import save_slow_vit  # noqa: E402  (the tests' helpers)
from runs import Run, kill_session, session_processes, signal_storm, write_job_images  # noqa: E402


def _dump(run: Run, path: Path) -> None:
    left = session_processes(run.pid)
    with open(path, "w") as out:
        out.write(f"stderr:\n{run.stderr}\nthe session's processes: {left}\n")
        if shutil.which("py-spy"):
            for pid in [run.pid, *left]:
                out.write(subprocess.run(["py-spy", "dump", "--native", "--pid", str(pid)], capture_output=True,
                                         text=True).stdout)
        out.write("kill -USR1:\n" + run.stacks())


def _stream(number: int, images: Path, model: str, work: Path, deadline: float, at_start: bool,
            outcomes: collections.Counter, lock: threading.Lock) -> None:
    pause = random.Random(number).random
    for attempt in itertools.count():
        if time.monotonic() > deadline:
            return
        folder = work / f"{number}-{attempt}"
        dest = folder / "out"
        run = Run(["classify", str(images), "--model", model, "--output", str(dest), "--shard-size", "8", "-q"],
                  folder)
        if at_start:  # anywhere in the start-up (model load, pool spawn) or in the job
            time.sleep(pause() * 4)
        else:
            try:
                run.wait_for_commit(dest)
            except BaseException as err:  # noqa: BLE001 - pytest.fail's, outside a test too: an outcome to count
                kill_session(run)
                with lock:
                    outcomes[f"no commit: {err}"] += 1
                continue
        signal_storm(run, lambda: pause() * 0.03)
        try:
            code = run.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _dump(run, work / f"hang-{number}-{attempt}.txt")
            kill_session(run)
            outcome = "hung (dumped)"
        else:
            # Every line, the run's folder named alike: runs that ended the same way count together.
            lines = [line.replace(str(folder), "RUN") for line in run.stderr.splitlines() if line.strip()]
            outcome = ("exit 130, one line" if code == 130 and len(lines) == 1 else
                       "exit 0 (ended before the storm)" if code == 0 and not lines else f"exit {code}: {lines}")
            if outcome.startswith(("exit 130, one line", "exit 0")):
                shutil.rmtree(folder, ignore_errors=True)  # others kept, their stderr to read
        with lock:
            outcomes[outcome] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--work", type=Path, required=True, help="a folder for the images, model and runs")
    parser.add_argument("--at-start", action="store_true",
                        help="each storm 0-4 s after the job starts (its start-up too), not at its first commit")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    images = args.work / "images"
    if not images.exists():
        write_job_images(images)
    model = args.work / "slow-vit"
    if not model.exists():  # the tests' slow_vit
        save_slow_vit(model)
    outcomes, lock = collections.Counter(), threading.Lock()
    deadline = time.monotonic() + args.minutes * 60
    streams = [threading.Thread(target=_stream, args=(n, images, str(model), args.work, deadline, args.at_start,
                                                           outcomes, lock))
               for n in range(args.streams)]
    for stream in streams:
        stream.start()
    for stream in streams:
        stream.join()
    for outcome, count in outcomes.most_common():
        print(f"{count:5d}  {outcome}")


if __name__ == "__main__":
    main()
