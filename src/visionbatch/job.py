"""The job driver: runs a classification job on an engine, engine-neutral.

It claims DEST (the lease), prepares the plan while the engine starts, opens the
manifest (resume), then takes the writer's commit records from the engine's stream:
commits shards to the manifest, shows progress, keeps the summary, redoes the shards of
tasks that died (one file per task) and stops on Ctrl-C/SIGTERM/SIGHUP with what was
committed kept. The driver's memory grows with the number of shards, never with the
number of images.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import sys
import time
import traceback

import pyarrow as pa

from visionbatch.config import ClassifyConfig, OutputConfig, config_from_kwargs
from visionbatch.destination import SUMMARY, Destination, DestinationError, Superseded
from visionbatch.engine import Engine, make_engine
from visionbatch.labels import folder_of
from visionbatch.lease import Lease
from visionbatch.manifest import Manifest
from visionbatch.model import resolve_model_source
from visionbatch.plan import (JobError, JobInterrupted, Prepared, input_spec, job_identity, model_metadata,
                              resolve_plan)
from visionbatch.results import (MODEL_TRACEBACK, ROW_COLUMN, SHARD_COLUMN, SHARD_DIGEST_COLUMN, SHARD_ROWS_COLUMN,
                                 conform, job_columns)
from visionbatch.shards import AnyShard, Shard, describe_shard
from visionbatch.sources import check_source
from visionbatch.storage import SourceError, Storage, describe
from visionbatch.summary import Summary
from visionbatch.writer import ShardWriter, write_shard

__all__ = ["JobError", "JobInterrupted", "prepare", "run", "run_job", "sigterm_as_interrupt"]

log = logging.getLogger("visionbatch")

_STATUS_EVERY_S = 1.0  # how often the driver asks the planner how listing goes
_FIRST_SHARD_WAIT_S = 2.0
# A job stops when this many shards fail in the model with nothing predicted yet: a
# model that cannot run on these inputs would otherwise fill DEST with error rows.
_MODEL_FAILURES_TO_STOP = 3


def prepare(config: ClassifyConfig, engine: Engine | None = None) -> tuple[Prepared, Engine]:
    """Check the sources, load the model's configs and resolve the plan (no image is read).

    The engine starts in the main thread while another thread loads the model's
    configs: both mostly wait (on subprocesses, on storage); the planner is made (not
    started) before the configs are in.
    """
    engine = engine or make_engine(config)
    storage = Storage(config.s3_endpoint, config.download_timeout, config.download_retries)
    try:
        for uri in config.sources:
            check_source(uri, storage, config.from_list)
    except SourceError as err:
        raise JobError(str(err)) from None
    source = resolve_model_source(config.model)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        metadata = pool.submit(model_metadata, config, source, storage)
        try:
            resources = engine.start(config)
            engine.make_planner(input_spec(config), storage)
        finally:
            model, labels = metadata.result()
    plan = resolve_plan(config, model, resources, engine.probe_batch_size)
    return Prepared(config, plan, storage, labels), engine


def run(sources, output: str, *, format: str = "parquet", overwrite: bool = False, resume: bool = False,
        flush_seconds: float = 30.0, model: str | None = None, progress: bool = True, **options) -> Summary:
    """Classify and write one row per image file to ``output``; returns the :class:`Summary`."""
    if model is not None:
        options["model"] = model
    config = config_from_kwargs(sources, **options)
    output_config = OutputConfig(dest=output, format=format, overwrite=overwrite, resume=resume,
                                 flush_seconds=flush_seconds)
    return run_job(config, output_config, progress=sys.stderr if progress else None)


def run_job(config: ClassifyConfig, output: OutputConfig, progress=None) -> Summary:
    """Run a job to the end; ``progress`` is the stream for the progress bar (None: no bar)."""
    started = time.monotonic()
    with sigterm_as_interrupt():
        try:
            destination = Destination(output.dest, Storage(config.s3_endpoint))
            lease = Lease.take(destination, output.overwrite, output.resume)
        except (SourceError, DestinationError) as err:
            raise JobError(str(err)) from None
        engine = None
        try:
            try:
                with _interrupts_held() as interrupted:
                    try:
                        engine = make_engine(config)
                        prepared, _ = prepare(config, engine)
                    except SystemExit:  # SIGTERM met the handler that ray.init installs first
                        interrupted.set()
                if interrupted.is_set():
                    raise KeyboardInterrupt
                lease.confirm()
                destination = lease.fenced()
                manifest = Manifest.open(destination, job_identity(config, output, prepared.plan),
                                         overwrite=output.overwrite, resume=output.resume)
                prepared = dataclasses.replace(prepared, plan=dataclasses.replace(
                    prepared.plan, certified_path=manifest.certified_path))
            except KeyboardInterrupt:
                raise JobInterrupted("interrupted during start-up; nothing was written") from None
            except DestinationError as err:
                raise JobError(str(err)) from None
            summary = _Job(prepared, engine, manifest, lease, output, started, progress).run()
            try:
                destination.write_bytes(SUMMARY, json.dumps(summary.to_dict(), indent=1).encode())
            except DestinationError as err:  # the results are committed: DEST is whole without it
                log.warning("the results are complete, but %s", err)
        finally:
            lease.release()
            if engine is not None:
                engine.close()
    return summary


class _Job:
    """The driver's side of a run: commit shards as the writer finishes them."""

    def __init__(self, prepared: Prepared, engine: Engine, manifest: Manifest, lease: Lease, output: OutputConfig,
                 started: float, progress):
        self.prepared, self.engine, self.manifest, self.lease, self.output, self.started = (
            prepared, engine, manifest, lease, output, started)
        plan, config = prepared.plan, prepared.config
        self.summary = Summary(model=config.model, device=plan.device, dtype=plan.dtype, dest=output.dest,
                               labels=config.labels, batch_size=plan.batch_size, replicas=plan.replicas)
        for record in manifest.shards.values():  # committed by an earlier run of this job
            self.summary.add_shard(record["rows"], record["counts"])
        self.summary.already_done = self.summary.images_found
        self.progress, self.bar = progress, None
        self.writer = ShardWriter(output.dest, prepared.storage, output.format, config.labels != "none",
                                  plan.model.schema, job_columns(config.keep_columns), manifest.destination.fence)
        self.planner = engine.planner
        self.planner.start({shard: record["digest"] for shard, record in manifest.shards.items()})
        self.status: dict = {}
        self._model_failures, self._model_error = 0, ""  # shards with model errors while nothing is predicted
        self._status_at = 0.0
        self._first: tuple[float, int] | None = None  # when rows first reached the writer, and how many
        self._certified: tuple[float, int] | None = None  # when the certificate was seen decided, and rows by then
        self._streamed = 0

    def run(self) -> Summary:
        self.summary.stage_times[f"start: model config, {self.engine.name} engine (wall)"] = \
            time.monotonic() - self.started
        # A moment for the listing to show an empty or unreadable input before the model
        # starts; a listing that takes longer (a resumed job skipping what it did) goes
        # on while it starts.
        self.status = self.planner.wait_started(_FIRST_SHARD_WAIT_S)
        if self.status["listing_done"]:
            self.summary.stage_times["listing ended (wall, from start)"] = time.monotonic() - self.started
        self._check_listing()
        if self.status["index_labels"]:
            log.warning(self.status["index_labels"])
        self.bar = self._progress_bar()
        try:
            self._take(self.engine.run(self.prepared, self.writer))
            self._poll_status(wait=True)
            self._check_listing()
            # The planner may hear of commits late: the manifest is the truth.
            lost = [shard for shard in self.planner.unfinished() if shard.id not in self.manifest.shards]
            if lost:
                # A decode task, a model replica or the writer died with these shards in
                # hand; redo them one file per task to isolate a file that kills its worker.
                log.warning("%d shard(s) were in tasks that failed; redoing them one file per task", len(lost))
                self._redo_isolated(lost)
            if self._model_failures and not self.summary.predicted:  # fewer shards than the stopping rule needs
                raise JobError(self._model_failed())
            self._write_manifest(complete=True)
        except KeyboardInterrupt:
            raise JobInterrupted(self._stopped("interrupted")) from None
        except Superseded as err:  # DEST is the newer job's: nothing more to commit
            raise JobError(str(err)) from None
        except DestinationError as err:  # a full disk, a read-only mount, a bucket gone
            raise JobError(self._stopped(str(err))) from None
        except JobError:
            raise
        except Exception as err:  # the engine's own failure, or a bug: keep what was committed
            why = self.engine.failure(err)
            if why is None:
                traceback.print_exc()  # to the log file (the command sends library output there)
                why = f"the job failed: {describe(err)} (the traceback is in the log)"
            raise JobError(self._stopped(why)) from None
        finally:
            self.bar.close()  # (made before the try)
        summary = self.summary
        # A name that is not UTF-8 cannot be a result row's path: skipped, and said.
        summary.skipped_non_image = self.status["skipped_non_image"] + self.status["undecodable_names"]
        if self.status["undecodable_names"]:
            log.warning("skipped %d file(s) whose names are not valid UTF-8 (rename them to classify them)",
                        self.status["undecodable_names"])
        summary.skipped_special = self.status["skipped_special"]
        summary.special_files = self.status["special_examples"]
        summary.skipped_folder_links = self.status["skipped_folder_links"]
        summary.runtime = self.manifest.runtime
        summary.wall_time_s = time.monotonic() - self.started
        summary.images_per_s = (summary.images_found - summary.already_done) / summary.wall_time_s
        return summary

    def _check_listing(self) -> None:
        status = self.status
        if status["input_changed"]:  # resuming would mix two inputs in one DEST
            raise JobError(self._stopped(status["input_changed"], resumable=False))
        if status["error"]:
            raise JobError(self._stopped(f"cannot list the input: {status['error']}"))
        if status["listing_done"] and not status["shards_listed"]:
            skipped = status["skipped_non_image"] + status["skipped_special"]
            raise JobError(f"no image files found in {', '.join(self.prepared.config.sources)}"
                           + (f" ({skipped} other files skipped)" if skipped else "")
                           + (f"; {status['unread_archive']}" if status["unread_archive"] else ""))

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(total=None, initial=self.summary.already_done, unit="img", disable=self.progress is None,
                    dynamic_ncols=True, file=self.progress, desc="classify", smoothing=0.1)

    def _stopped(self, why: str, resumable: bool = True) -> str:
        """Commit what finished; the message says what was kept and how to go on."""
        with contextlib.suppress(Exception):
            self._write_manifest()
        kept = self.manifest.saved_rows  # what DEST's manifest lists (the last write may have failed)
        if not resumable:
            return why
        if not kept:
            return f"{why}; no results had been committed yet, so nothing was kept"
        return (f"{why}; {kept} finished rows are saved in {self.output.dest}: "
                "rerun the same command with --resume")

    def _poll_status(self, wait: bool = False) -> None:
        now = time.monotonic()
        if not wait and now - self._status_at < _STATUS_EVERY_S:
            return
        status, self._status_at = self.planner.status(), now
        if self._certified is None:  # when the rows began to come from the certified path (or the reference)
            certificate = (self.engine.runtime_report() or {}).get("certificate")
            if certificate and certificate["decided"]:
                self._certified = (now, self._streamed)
        if status["listing_done"] and not self.status.get("listing_done"):
            self.summary.stage_times["listing ended (wall, from start)"] = now - self.started
            if self.bar is not None and not status["unsized_shards"]:  # a tar's images: counted as read
                self.bar.total = status["images_listed"]
                self.bar.refresh()
        self.status = status

    def _take(self, events) -> set[str]:
        """Count and commit what the engine's writer reports; the shards committed."""
        committed = set()
        for rows_in, record in events:
            self.lease.check()
            self._rows_arrived(rows_in)
            if record is not None:
                self._commit(record)
                committed.add(record["shard"])
                self.planner.mark_committed([record["shard"]])
            if self.manifest.due(self.output.flush_seconds):
                self._write_manifest()
            self._poll_status()
        return committed

    def _write_manifest(self, complete: bool = False) -> None:
        """Commit, with what runs the model now (a resumed job keeps a certified choice,
        and the figures of the certificate that chose it)."""
        report, earlier = self.engine.runtime_report(), self.manifest.runtime or {}
        if report is not None and report["certificate"] is None and earlier.get("certificate"):
            report = {**report, "certificate": earlier["certificate"]}
        self.manifest.runtime = report or self.manifest.runtime
        if complete:  # before _SUCCESS: a finished DEST has it
            self.manifest.destination.write_hub_config(self.output.format)
        self.manifest.write(complete)

    def _commit(self, record: dict) -> None:
        """Count a finished shard and list it in the manifest, unless the model failed
        on every image so far: then the job stops with the model's own error (or its part
        could not be written: then the job stops keeping what was committed)."""
        if "write_error" in record:
            raise (Superseded if record["superseded"] else DestinationError)(record["write_error"])
        self.summary.add_shard(record["rows"], record["counts"])
        self.manifest.add(record)
        model_error = record["counts"]["model_error"]
        if model_error and MODEL_TRACEBACK in record:
            print(f"model_error in shard {record['shard']}:\n{record[MODEL_TRACEBACK]}", file=sys.stderr)
        if model_error and not self.summary.predicted:
            self._model_failures, self._model_error = self._model_failures + 1, model_error
            if self._model_failures >= _MODEL_FAILURES_TO_STOP:
                raise JobError(self._model_failed())

    def _model_failed(self) -> str:
        """Shards whose rows are model errors are not results (a fixed model redoes
        them): drop them, commit the rest; the message to stop with."""
        for shard, record in list(self.manifest.shards.items()):
            if record["counts"]["model_error"]:
                del self.manifest.shards[shard]
        return self._stopped(f"the model fails on every image: {self._model_error.partition(': ')[2]} "
                             "(the traceback is in the log)")

    def _rows_arrived(self, rows: int) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = (now, rows)
            self.summary.time_to_first_result_s = now - self.started
        elif now > self._first[0]:
            self.summary.steady_images_per_s = (self._streamed + rows - self._first[1]) / (now - self._first[0])
        if self._certified is not None and now > self._certified[0]:
            self.summary.certified_images_per_s = (self._streamed + rows - self._certified[1]) / (now - self._certified[0])
        self._streamed += rows
        self.bar.update(rows)

    def _redo_isolated(self, lost: list[AnyShard]) -> None:
        """Redo whole shards one file per task; files whose every attempt fails get a
        ``worker_crash`` row. Their part files are written here, by the driver: this
        is the rare path, and its rows (a few shards) fit in the driver. Shards of tars
        and tables cannot be cut into files: each is redone whole by one task."""
        shards = [shard for shard in lost if isinstance(shard, Shard)]
        if len(shards) < len(lost):
            self._redo_whole([shard for shard in lost if not isinstance(shard, Shard)])
        if not shards:
            return
        config = self.prepared.config
        self.writer.discard([shard.id for shard in shards])
        rows = self._shard_rows(shards)
        results = {shard.id: [] for shard in shards}
        for table in self.engine.predict_files(self.prepared, rows):
            results[table.column(SHARD_COLUMN)[0].as_py()].append(table)
            self._rows_arrived(table.num_rows)
        crash = self._crash_error("file")
        schema, extra = self.prepared.plan.model.schema, job_columns(config.keep_columns)
        for shard in shards:
            mine = rows.filter(pa.compute.equal(rows.column(SHARD_COLUMN), shard.id))
            done = pa.concat_tables(results[shard.id], promote_options="permissive") if results[shard.id] else None
            seen = set(done.column(ROW_COLUMN).to_pylist()) if done is not None else set()
            missing = mine.filter(pa.array([row not in seen for row in mine.column(ROW_COLUMN).to_pylist()]))
            if missing.num_rows:
                missing = missing.append_column("error", pa.array([crash] * missing.num_rows, pa.string()))
                self._rows_arrived(missing.num_rows)
            parts = [t for t in (done, missing) if t is not None and t.num_rows]
            table = pa.concat_tables([_with_result_columns(t, schema, extra) for t in parts],
                                     promote_options="permissive")
            self._commit(write_shard(self.manifest.destination, shard.id, table, self.output.format,
                                     config.labels != "none", schema, extra))

    def _crash_error(self, what: str) -> str:
        return (f"worker_crash: processing this {what} failed {self.prepared.config.max_retries + 1} times "
                "(its worker process died or its task failed)")

    def _redo_whole(self, shards: list[AnyShard]) -> None:
        """Redo tar and table shards, one task each (retried); a shard that no attempt
        finishes gets one ``worker_crash`` row naming its file."""
        self.writer.discard([shard.id for shard in shards])
        committed = self._take(self.engine.run(self.prepared, self.writer, shards))
        config = self.prepared.config
        for shard in shards:
            if shard.id not in committed:
                crash = pa.table({"path": [describe_shard(shard)], "error": [self._crash_error("shard")],
                                  SHARD_DIGEST_COLUMN: [shard.digest]})
                self._rows_arrived(1)
                self._commit(write_shard(self.manifest.destination, shard.id, crash, self.output.format,
                                         config.labels != "none", self.prepared.plan.model.schema))

    def _shard_rows(self, shards: list[Shard]) -> pa.Table:
        labels = self.prepared.labels if self.prepared.config.labels == "dirs" else None
        columns = {SHARD_COLUMN: [], ROW_COLUMN: [], SHARD_ROWS_COLUMN: [], "path": [], "true_label": []}
        for shard in shards:
            for row, path in enumerate(shard.paths):
                columns[SHARD_COLUMN].append(shard.id)
                columns[ROW_COLUMN].append(row)
                columns[SHARD_ROWS_COLUMN].append(len(shard.paths))
                columns["path"].append(path)
                columns["true_label"].append((labels(folder_of(path)) if labels else None) or "")
        table = pa.table({**columns, ROW_COLUMN: pa.array(columns[ROW_COLUMN], pa.int32()),
                          SHARD_ROWS_COLUMN: pa.array(columns[SHARD_ROWS_COLUMN], pa.int32())})
        kept = [shard.columns for shard in shards if shard.columns is not None]
        if kept:  # the list's kept columns travel with each file
            kept = pa.concat_tables(kept)
            table = pa.Table.from_arrays([*table.columns, *kept.columns], [*table.column_names, *kept.column_names])
        return table


def _with_result_columns(table: pa.Table, schema: pa.Schema, extra: tuple[str, ...] = ()) -> pa.Table:
    """A table of rows (predicted or crashed) with every result column, the job's own
    columns and the row index."""
    rows = conform(table.set_column(table.schema.get_field_index("true_label"), "true_label",
                                    pa.compute.if_else(pa.compute.equal(table.column("true_label"), ""), None,
                                                       table.column("true_label")))
                   if table.column("true_label").type == pa.string() else table, schema, extra)
    return rows.append_column(ROW_COLUMN, table.column(ROW_COLUMN).cast(pa.int32()))


def _stop_signals() -> list[int]:
    """Ctrl-C, SIGTERM and SIGHUP, except those the job was started with ignored
    (``nohup`` ignores SIGHUP; a shell script's ``&`` ignores SIGINT): those stay ignored."""
    import signal

    named = [getattr(signal, name, None) for name in ("SIGINT", "SIGTERM", "SIGHUP")]
    return [signum for signum in named if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN]


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()  # signals are handled there only


def _interrupt_once(signum, frame):
    """The first stop signal raises KeyboardInterrupt in the main thread; from then on
    the stop signals are ignored: raised again while the stop cleans up (a thread's
    join, a pool's close), they would cut it short and leave threads and processes
    behind, the interpreter then waiting for them at exit."""
    _ignore_further_interrupts()
    raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupts_held():
    """Stop signals during start-up take effect once it is done: raised at any point,
    they could break an import half done in the thread that loads the model's configs.
    Yields the event that says one came (then the stop signals stay ignored)."""
    import signal
    import threading

    came = threading.Event()
    if not _in_main_thread():
        yield came
        return
    saved = {signum: signal.signal(signum, lambda *_: came.set()) for signum in _stop_signals()}
    try:
        yield came
    finally:
        if came.is_set():
            _ignore_further_interrupts()
        else:
            for signum, handler in saved.items():
                signal.signal(signum, handler)


@contextlib.contextmanager
def sigterm_as_interrupt(restore_after_a_stop: bool = True):
    """SIGTERM and SIGHUP stop the job like Ctrl-C, and any of them only once (see
    _interrupt_once): committed rows stay and --resume continues. Every handler is as
    before once the block ends, unless a stop came and ``restore_after_a_stop`` is
    False (the command line, whose process exits next). Inside another such block,
    nothing changes: the outer one decides."""
    import signal

    if not _in_main_thread():
        yield
        return
    signals = [signum for signum in _stop_signals() if signal.getsignal(signum) is not _interrupt_once]
    saved = {signum: signal.signal(signum, _interrupt_once) for signum in signals}
    try:
        yield
    finally:
        stopped = any(signal.getsignal(signum) is not _interrupt_once for signum in signals)
        if restore_after_a_stop or not stopped:
            for signum, handler in saved.items():
                signal.signal(signum, handler)


def _ignore_further_interrupts() -> None:
    """Once a job is stopping, another Ctrl-C or SIGTERM changes nothing: the stop
    finishes (commit, lease, engine) and the exit status stays 130."""
    import signal

    if _in_main_thread():
        for signum in _stop_signals():
            signal.signal(signum, signal.SIG_IGN)
