"""Make the machine busy, as a neighbour would, until stopped (Ctrl-C or SIGTERM).

    python benchmarks/busy_machine.py --cpu 1 --memory-gb 6 &
    make test > test.log 2>&1 &

``--cpu N`` processes spin on a core each; ``--memory-gb G`` is allocated, and every
page touched again each few seconds so that it stays resident. For issue 17's "green
while a CPU-heavy process runs beside it" and issue 19's "three times in a row beside a
CPU-heavy and a memory-heavy process".
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
import time


def _spin() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    while True:
        pass


def _hold(gigabytes: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    page = 4096
    held = bytearray(int(gigabytes * (1 << 30)))
    while True:
        for offset in range(0, len(held), page):
            held[offset] = (held[offset] + 1) & 0xFF
        time.sleep(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", type=int, default=1, help="processes that each keep a core busy")
    parser.add_argument("--memory-gb", type=float, default=6.0, help="memory held resident")
    args = parser.parse_args(argv)
    workers = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.cpu)]
    if args.memory_gb > 0:
        workers.append(multiprocessing.Process(target=_hold, args=(args.memory_gb,), daemon=True))
    for worker in workers:
        worker.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for worker in workers:
            worker.join()
    except KeyboardInterrupt:
        pass
    finally:
        for worker in workers:
            worker.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
