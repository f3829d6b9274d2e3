"""Scale benchmark for issue 8: time to first result, driver memory, overhead rate,
Ctrl-C and resume of ``visionbatch classify`` on big inputs.

    python benchmarks/scale.py --list N  [--interrupt-after S [--resume-for S]] [options]  # N missing paths
    python benchmarks/scale.py --tree N  [options]                          # N tiny JPEGs in 1000 folders
    python benchmarks/scale.py --s3 M    [options]                          # M tiny JPEGs on a moto S3 server
    python benchmarks/scale.py --s3 M --get-latency-ms 50 [options]         # ... with 50 ms added to every GET
    python benchmarks/scale.py --source PATH [--from-list] [options]        # an input you already have

    options: --model DIR (default: a micro ViT built in the work folder), --work DIR (inputs, model
    and DEST; default a temporary folder, deleted afterwards unless --keep; inputs already there
    are reused), --labels none|dirs (default none), --cli "COMMAND" (default: this venv's
    visionbatch), --extra-args "..." (passed to classify, e.g. "--shard-size 10000"), --json FILE.

The job runs as a subprocess in its own session, watched from outside every 50 ms:

- time to first result: from the start of the command until the first ``part-*`` file
  shows in DEST (names ending in .tmp or starting with "." are writes in progress);
- driver peak RSS: VmHWM of the visionbatch process itself (not Ray's workers);
- steady rows/s: rows of the part files that appeared after the first one, over the time
  from the first part file to the last;
- rows: from DEST's ``_SUCCESS`` manifest if it has a row count, and counted from the
  part files in every case, together with a check that no path was written twice
  (64-bit hashes of the ``path`` column, one part file at a time, so 10M rows cost ~80 MB).

``--interrupt-after S`` sends SIGINT to the driver's pid alone (as ``kill -INT PID`` or a
supervisor would), times how long it takes to exit, then reruns the same command with
``--resume`` and times its first new (or rewritten) part file.
Each figure is printed as one ``name: value`` line, then everything as one JSON dict.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the make_* scripts next to this one
from make_path_list import write_path_list  # noqa: E402
from latency_proxy import start_latency_proxy  # noqa: E402
from make_tree import fill_moto_in_process, make_tree  # noqa: E402

POLL_S = 0.05
KILL_AFTER_S = 120  # an interrupted job still running this long after SIGINT is killed (and reported)


def part_files(dest: Path) -> dict[str, int]:
    """Committed part files in DEST: name -> mtime_ns (a rewritten shard changes its mtime)."""
    found = {}
    try:
        with os.scandir(dest) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith("part-") and not name.endswith(".tmp") and entry.is_file():
                    try:
                        found[name] = entry.stat().st_mtime_ns
                    except FileNotFoundError:  # replaced between listing and stat
                        pass
    except FileNotFoundError:  # DEST not created yet
        pass
    return found


def vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0  # gone, or a zombie (no memory lines any more)


def session_processes(sid: int) -> list[str]:
    """Names of the processes still in a session (the driver's Ray processes, after it exits)."""
    names = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getsid(int(proc.name)) == sid:
                names.append((proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"))
        except (OSError, IndexError):
            pass
    return names


def read_paths(file: Path):
    """The ``path`` column of one part file, as a pyarrow array."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(file, columns=["path"]).column("path")
    if file.suffix == ".csv":
        import pyarrow.csv as pacsv

        return pacsv.read_csv(file, convert_options=pacsv.ConvertOptions(include_columns=["path"])).column("path")
    import pyarrow.json as pajson

    return pajson.read_json(file).column("path")


def count_rows(file: Path) -> int:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(file).metadata.num_rows  # footer only
    return len(read_paths(file))


def run(cmd: list[str], dest: Path, log: Path, interrupt_after: float | None = None) -> dict:
    """Run one classify command; watch DEST and the driver's memory until it exits."""
    before = part_files(dest)
    started = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n".encode())
        out.flush()
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[str, float] = {}  # part file new or rewritten by this run -> seconds when first seen
    peak = 0.0
    sigint_at = None
    killed = False
    while True:
        rc = process.poll()  # before the last scan, so that files written just before exit count
        peak = max(peak, vm_hwm_mb(process.pid))
        now = time.perf_counter() - started
        for name, mtime in part_files(dest).items():
            if name not in seen and before.get(name) != mtime:
                seen[name] = now
        if rc is not None:
            break
        if interrupt_after is not None and sigint_at is None and now >= interrupt_after:
            os.kill(process.pid, signal.SIGINT)  # the driver alone, not its process group
            sigint_at = now
        if sigint_at is not None and now - sigint_at > KILL_AFTER_S and not killed:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            killed = True
        time.sleep(POLL_S)
    wall = time.perf_counter() - started
    leftover = session_processes(process.pid)
    for _ in range(50):  # Ray's own processes may take a moment to follow the driver out
        if not leftover:
            break
        time.sleep(0.1)
        leftover = session_processes(process.pid)
    if leftover:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # only our own session: the next run starts clean
        except ProcessLookupError:
            pass
    # A part file may be gone by now (replaced under another name): count what is there.
    rows = {name: count_rows(dest / name) for name in seen if (dest / name).exists()}
    result = {"exit_code": rc, "wall_s": round(wall, 2), "driver_peak_rss_mb": round(peak),
              "part_files": len(seen), "rows": sum(rows.values()), "left_running_5s_after_exit": leftover}
    if seen:
        first = min(seen.values())
        last = max(seen.values())
        rows_first = sum(rows.get(name, 0) for name, t in seen.items() if t == first)
        result["first_result_s"] = round(first, 2)
        result["steady_rows_per_s"] = round((result["rows"] - rows_first) / (last - first)) if last > first else None
    if interrupt_after is not None:
        result["sigint_at_s"] = None if sigint_at is None else round(sigint_at, 2)
        result["sigint_to_exit_s"] = None if sigint_at is None else round(wall - sigint_at, 2)
        result["killed_after_sigint"] = killed
    return result


def check_output(dest: Path) -> dict:
    """Rows in DEST and whether any path was written twice, one part file at a time."""
    import numpy as np
    import pandas as pd

    files = sorted(dest / name for name in part_files(dest))
    hashes = []
    for file in files:
        paths = read_paths(file).to_numpy(zero_copy_only=False)
        hashes.append(pd.util.hash_array(paths))  # uint64 per path: 8 bytes a row in memory
    hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    hashes.sort()  # in place: no second copy
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    result = {"part_files_total": len(files), "rows_in_part_files": int(len(hashes))}
    examples = {}
    if len(repeated):  # confirm on the strings themselves (a 64-bit collision is not a duplicate)
        for file in files:
            paths = read_paths(file).to_numpy(zero_copy_only=False)
            for path in paths[np.isin(pd.util.hash_array(paths), repeated)]:
                examples[path] = examples.get(path, 0) + 1
        examples = {path: n for path, n in examples.items() if n > 1}
    result["paths_written_twice"] = len(examples)
    if examples:
        result["examples_written_twice"] = dict(list(examples.items())[:5])
    try:
        manifest = json.loads((dest / "_SUCCESS").read_text())
        result["manifest_rows"] = manifest.get("rows") if isinstance(manifest, dict) else None
    except (OSError, ValueError):
        result["manifest_rows"] = None
    return result


def listing_alone(source: str) -> float:
    """Seconds to list the input in one plain loop, for comparison with time to first result."""
    started = time.perf_counter()
    if source.startswith("s3://"):
        import boto3

        bucket, _, prefix = source.removeprefix("s3://").partition("/")
        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        sum(len(page.get("Contents", [])) for page in pages)
    else:
        for _ in os.walk(source):
            pass
    return round(time.perf_counter() - started, 2)


def start_moto() -> str:
    """A moto S3 server in this process, with fake credentials for everyone (our child included)."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request would drown the figures

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    endpoint = f"http://127.0.0.1:{port}"
    # AWS_ENDPOINT_URL is classify's default endpoint, so no CLI flag is needed either way.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_SESSION_TOKEN="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    return endpoint


def prepare_input(args, work: Path) -> tuple[str, bool]:
    """The SOURCE to classify and whether it is a list; inputs already in WORK are reused."""
    if args.list:
        source = work / f"paths-{args.list}.txt"
        if not source.exists():
            write_path_list(args.list, str(source))
        return str(source), True
    if args.tree:
        source, done = work / f"tree-{args.tree}", work / f"tree-{args.tree}.done"
        if not done.exists():  # the marker lives outside the tree, where classify won't list it
            make_tree(args.tree, str(source))
            done.touch()
        return str(source), False
    if args.s3:
        endpoint = start_moto()
        source = "s3://scale-bench/images/"
        started = time.perf_counter()
        fill_moto_in_process(args.s3, source, endpoint)
        print(f"put {args.s3} objects to {source} in {time.perf_counter() - started:.1f} s", flush=True)
        if args.get_latency_ms:
            os.environ["AWS_ENDPOINT_URL"] = start_latency_proxy(endpoint, args.get_latency_ms / 1000)
        return source, False
    return args.source, args.from_list


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", type=int, metavar="N", help="a list of N paths to missing files (--from-list)")
    what.add_argument("--tree", type=int, metavar="N", help="a local tree of N tiny JPEGs")
    what.add_argument("--s3", type=int, metavar="M", help="M tiny JPEGs under an S3 prefix on a moto server")
    what.add_argument("--source", help="an existing SOURCE")
    parser.add_argument("--from-list", action="store_true", help="with --source: it is a list file")
    parser.add_argument("--get-latency-ms", type=float, metavar="MS",
                        help="with --s3: every GET goes through a proxy that adds MS milliseconds")
    parser.add_argument("--model", help="model folder (default: a micro ViT, built once in the work folder)")
    parser.add_argument("--work", help="folder for inputs, model and DEST (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--labels", choices=["none", "dirs"], default="none")
    parser.add_argument("--cli", default=str(Path(sys.executable).parent / "visionbatch"), help="classify's command")
    parser.add_argument("--extra-args", default="", help="more classify arguments, e.g. '--shard-size 10000'")
    parser.add_argument("--interrupt-after", type=float, metavar="S", help="SIGINT the driver after S s, then --resume")
    parser.add_argument("--resume-for", type=float, metavar="S",
                        help="with --interrupt-after: SIGINT the resumed run too, after S s (a 10M job need not finish)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="visionbatch-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source, from_list = prepare_input(args, work)
        model = args.model
        if not model:
            model = str(work / "micro-vit")
            if not (work / "micro-vit" / "config.json").exists():
                subprocess.run([sys.executable, str(Path(__file__).parent / "make_micro_vit.py"), model],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dest = work / "out"
        shutil.rmtree(dest, ignore_errors=True)  # every benchmark starts from an empty DEST
        cmd = [*shlex.split(args.cli), "classify", source, *(["--from-list"] if from_list else []),
               "--output", str(dest), "--model", model, "--labels", args.labels, "-q", *shlex.split(args.extra_args)]
        log = work / "classify.log"
        results: dict = {"source": source, "command": shlex.join(cmd), "cpus": os.cpu_count()}
        if not from_list and not args.source:
            results["listing_alone_s"] = listing_alone(source)
        results["run"] = run(cmd, dest, log, args.interrupt_after)
        if args.interrupt_after is not None:
            results["resume"] = run([*cmd, "--resume"], dest, log, args.resume_for)
        results["output"] = check_output(dest)

        for key in ("source", "command", "listing_alone_s"):
            if key in results:
                print(f"{key}: {results[key]}")
        for stage in ("run", "resume", "output"):
            for key, value in results.get(stage, {}).items():
                print(f"{stage}.{key}: {value}")
        print(json.dumps(results))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        # An interrupted run may exit non-zero by design; the resumed one (unless also
        # interrupted), or a plain run, may not.
        last = results.get("resume", results["run"])
        failed = last["exit_code"] != 0 and not last.get("sigint_at_s")
        if failed:
            print(f"classify failed; its output is in {log}:\n" + log.read_text()[-3000:], file=sys.stderr)
        return 1 if failed or results["output"]["paths_written_twice"] else 0
    finally:
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.work:
            print(f"work folder kept: {work}")


if __name__ == "__main__":
    sys.exit(main())
