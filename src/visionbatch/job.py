"""The classify command: a classification job on an engine, engine-neutral.

The committed run's life (lease, manifest, resume, signals, stop messages) is the
driver's (:mod:`visionbatch.driver`); this is its loop body. It prepares the plan while
the engine starts, then takes the writer's commit records from the engine's stream:
commits shards, shows progress, keeps the summary and redoes the shards of tasks that
died (a file per task, through the engine's own run). Its memory grows with the number
of shards, never with the number of images.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import sys
import time

from visionbatch.config import ClassifyConfig, OutputConfig
from visionbatch.decode import crash_block
from visionbatch.destination import SUMMARY, Destination
from visionbatch.driver import Driver, Run, progress_bar
from visionbatch.engines import make_engine
from visionbatch.engines.base import Engine, commit_events
from visionbatch.errors import DestinationError, JobError, SourceError, Superseded
from visionbatch.manifest import Manifest
from visionbatch.model_loading import resolve_model_source
from visionbatch.plan import Prepared, input_spec, job_identity, model_metadata, resolve_plan
from visionbatch.results import MODEL_TRACEBACK, job_columns
from visionbatch.shards import AnyShard, Shard, one_file_pieces
from visionbatch.sources import check_source
from visionbatch.storage import Storage
from visionbatch.summary import Summary
from visionbatch.writer import ShardWriter

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


def run_job(config: ClassifyConfig, output: OutputConfig, progress=None) -> Summary:
    """Run a job to the end; ``progress`` is the stream for the progress bar (None: no bar)."""
    job = ClassifyJob(config, output, progress)
    destination = Destination(output.dest, Storage(config.s3_endpoint))
    return Driver(job, destination, overwrite=output.overwrite, resume=output.resume,
                  flush_seconds=output.flush_seconds, before_write=job.before_write)()


class ClassifyJob:
    """The classify command's part of a committed run (:class:`visionbatch.driver.Command`):
    commit shards as the engine's writer finishes them."""

    name = "classify"

    def __init__(self, config: ClassifyConfig, output: OutputConfig, progress):
        self.config, self.output, self.progress = config, output, progress
        self.started = time.monotonic()
        self.engine: Engine | None = None
        self.status: dict = {}
        self._model_failures, self._model_error = 0, ""  # shards with model errors while nothing is predicted
        self._status_at = 0.0
        self._first: tuple[float, int] | None = None  # when rows first reached the writer, and how many
        self._certified: tuple[float, int] | None = None  # when the certificate was seen decided, and rows by then
        self._streamed = 0

    def prepare(self) -> None:
        self.engine = make_engine(self.config)
        self.prepared, _ = prepare(self.config, self.engine)

    def identity(self) -> dict:
        return job_identity(self.config, self.output, self.prepared.plan)

    def failure(self, err: BaseException) -> str | None:
        return self.engine.failure(err) if self.engine is not None else None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def before_write(self, manifest: Manifest, complete: bool) -> None:
        """What runs the model now goes in each commit (a resumed job keeps a certified
        choice, and the figures of the certificate that chose it); a finished DEST has
        its Hugging Face configs before _SUCCESS."""
        report, earlier = self.engine.runtime_report(), manifest.runtime or {}
        if report is not None and report["certificate"] is None and earlier.get("certificate"):
            report = {**report, "certificate": earlier["certificate"]}
        manifest.runtime = report or manifest.runtime
        if complete:
            manifest.destination.write_hub_config(self.output.format)

    def work(self, run: Run) -> Summary:
        self.run = run
        manifest, config = run.manifest, self.config
        self.prepared = prepared = dataclasses.replace(self.prepared, plan=dataclasses.replace(
            self.prepared.plan, certified_path=manifest.certified_path))
        plan = prepared.plan
        self.summary = Summary(model=config.model, device=plan.device, dtype=plan.dtype, dest=self.output.dest,
                               labels=config.labels, batch_size=plan.batch_size, replicas=plan.replicas)
        for record in manifest.shards.values():  # committed by an earlier run of this job
            self.summary.add_shard(record["rows"], record["counts"])
        self.summary.already_done = self.summary.images_found
        self.writer = ShardWriter(self.output.dest, prepared.storage, self.output.format, config.labels != "none",
                                  plan.model.schema, job_columns(config.keep_columns), manifest.destination.fence)
        self.planner = self.engine.planner
        self.planner.start({shard: record["digest"] for shard, record in manifest.shards.items()})
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
        self.bar = progress_bar(self.progress, "classify", initial=self.summary.already_done)
        try:
            with contextlib.closing(self.engine.run(prepared, self.writer)) as events:  # see _take
                self._take(events)
            self._poll_status(wait=True)
            self._check_listing()
            # The planner may hear of commits late: the manifest is the truth.
            lost = [shard for shard in self.planner.unfinished() if shard.id not in manifest.shards]
            if lost:
                # A decode task, a model replica or the writer died with these shards in
                # hand; redo them one file per task to isolate a file that kills its worker.
                log.warning("%d shard(s) were in tasks that failed; redoing them one file per task", len(lost))
                self._redo(lost)
            if self._model_failures and not self.summary.predicted:  # fewer shards than the stopping rule needs
                raise JobError(self._model_failed())
            run.write(complete=True)
        finally:
            self.bar.close()
        summary = self._finish_summary()
        try:
            run.destination.write_bytes(SUMMARY, json.dumps(summary.to_dict(), indent=1).encode())
        except DestinationError as err:  # the results are committed: DEST is whole without it
            log.warning("the results are complete, but %s", err)
        return summary

    def _finish_summary(self) -> Summary:
        summary = self.summary
        # A name that is not UTF-8 cannot be a result row's path: skipped, and said.
        summary.skipped_non_image = self.status["skipped_non_image"] + self.status["undecodable_names"]
        if self.status["undecodable_names"]:
            log.warning("skipped %d file(s) whose names are not valid UTF-8 (rename them to classify them)",
                        self.status["undecodable_names"])
        summary.skipped_special = self.status["skipped_special"]
        summary.special_files = self.status["special_examples"]
        summary.skipped_folder_links = self.status["skipped_folder_links"]
        summary.runtime = self.run.manifest.runtime
        summary.wall_time_s = time.monotonic() - self.started
        summary.images_per_s = (summary.images_found - summary.already_done) / summary.wall_time_s
        return summary

    def _check_listing(self) -> None:
        status = self.status
        if status["input_changed"]:  # resuming would mix two inputs in one DEST
            raise JobError(status["input_changed"], resumable=False)
        if status["error"]:
            raise JobError(f"cannot list the input: {status['error']}")
        if status["listing_done"] and not status["shards_listed"]:
            skipped = status["skipped_non_image"] + status["skipped_special"]
            raise JobError(f"no image files found in {', '.join(self.config.sources)}"
                           + (f" ({skipped} other files skipped)" if skipped else "")
                           + (f"; {status['unread_archive']}" if status["unread_archive"] else ""),
                           resumable=False)

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
            if not status["unsized_shards"]:  # a tar's images: counted as read
                self.bar.total = status["images_listed"]
                self.bar.refresh()
        self.status = status

    def _take(self, events) -> set[str]:
        """Count and commit what the engine's writer reports; the shards committed. The
        caller closes ``events`` however this ends: an engine's stream stops then, before
        the engine does (a stop signal may come while the stream waits on its own)."""
        committed = set()
        for rows_in, record in events:
            self._rows_arrived(rows_in)
            if record is not None:
                self._commit(record)
                committed.add(record["shard"])
                self.planner.mark_committed([record["shard"]])
            self.run.tick()
            self._poll_status()
        return committed

    def _commit(self, record: dict) -> None:
        """Count a finished shard and list it in the manifest, unless the model failed
        on every image so far: then the job stops with the model's own error (or its part
        could not be written: then the job stops keeping what was committed)."""
        if "write_error" in record:
            raise (Superseded if record["superseded"] else DestinationError)(record["write_error"])
        self.summary.add_shard(record["rows"], record["counts"])
        self.run.commit(record)
        model_error = record["counts"]["model_error"]
        if model_error and MODEL_TRACEBACK in record:
            print(f"model_error in shard {record['shard']}:\n{record[MODEL_TRACEBACK]}", file=sys.stderr)
        if model_error and not self.summary.predicted:
            self._model_failures, self._model_error = self._model_failures + 1, model_error
            if self._model_failures >= _MODEL_FAILURES_TO_STOP:
                raise JobError(self._model_failed())

    def _model_failed(self) -> str:
        """Shards whose rows are model errors are not results (a fixed model redoes
        them): drop them; the message to stop with."""
        for shard, record in list(self.run.manifest.shards.items()):
            if record["counts"]["model_error"]:
                del self.run.manifest.shards[shard]
        return (f"the model fails on every image: {self._model_error.partition(': ')[2]} "
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

    def _redo(self, lost: list[AnyShard]) -> None:
        """Redo lost shards through the engine's own run, a file of a shard per task (a
        tar or a table, which cannot be cut into files, whole), each retried: a file
        that kills its worker is then the only one lost. The driver's writer gathers the
        pieces into their shards' part files; the rows no attempt finished become
        ``worker_crash`` rows (a tar's or table's shard: one naming its file)."""
        self.writer.discard([shard.id for shard in lost])
        pieces = [piece for shard in lost for piece in one_file_pieces(shard)]
        with contextlib.closing(self.engine.run(self.prepared, self.writer, pieces)) as events:
            committed = self._take(events)
        why = (f"worker_crash: processing this {{}} failed {self.config.max_retries + 1} times "
               "(its worker process died or its task failed)")
        options = self.prepared.decode_options(1)
        reading, labels = options["reading"], options["labels"]
        for shard in lost:
            if shard.id in committed:
                continue
            if isinstance(shard, Shard):  # the rows of the files that no try finished
                crashed = crash_block(shard, self.writer.unseen(shard.id, len(shard.paths)), why.format("file"), reading, labels)
            else:  # whatever a try left of it goes: one row names its file
                self.writer.discard([shard.id])
                crashed = crash_block(shard, [0], why.format("shard"), reading, labels)
            self._take(commit_events(self.writer(crashed)))


