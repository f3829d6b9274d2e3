"""The duplicates command (``visionbatch duplicates SOURCE``): the stages of
:mod:`visionbatch.duplicates` as a committed run (:class:`visionbatch.driver.Command`),
each stage a list of tasks on the engine (``Engine.map_tasks``), each task writing files
of its own to the work dir before the driver commits it:

    sample-U   a unit's share of the k-means sample     sample/unit-U.npy
    train      k-means, the quantizer, the buckets       centroids.npy, quantizer.faiss, buckets.npy
    assign-U   a unit's rows, and its vectors' spills    rows/unit-U.parquet, cells/unit-U.*
    cells-T    a cell task's pairs                       pairs/task-T.parquet

Then the driver groups (:mod:`visionbatch.duplicate_groups`), writes OUT/duplicates.parquet
and OUT/_summary.json, commits the run complete and removes the work dir (about rows x
width x 8 bytes). Without embeddings only the rows are spilled (exact duplicates: equal
content digests).

Fenced as every committed run's output is: the driver's writes to OUT check its lease, and
so does each task before each work file appears (a task of a run a newer one took OUT
from raises Superseded and leaves no file in the work dir the newer run goes on with).

``--resume`` runs only the tasks the manifest does not list. Every task is deterministic
in its inputs (a sample's seed is its unit's, files are named by unit and task), so a
redone task rewrites the same file; a committed task whose file is gone from the work dir
(another machine, a cleared cache) is done again, and where that is the trained cells,
every assign and cell task with them. kill -9 anywhere, then ``--resume``: the same groups.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from visionbatch.config import DuplicatesConfig
from visionbatch.destination import (DERIVED, DUPLICATES_OUT, DUPLICATES_TABLE, SUCCESS, SUMMARY, CommandOutput,
                                     Destination)
from visionbatch.driver import Driver, Run, progress_bar
from visionbatch.duplicate_cells import cell_counts, cell_stage, pairs_file, plan_cell_tasks, unit_file, write_parquet
from visionbatch.duplicates import (TRAIN_POINTS_PER_CELL, assign_stage, choose_cells, is_dest, plan_source,
                                    sample_stage, save_npy, train_stage)
from visionbatch.engines import make_engine
from visionbatch.errors import UsageError
from visionbatch.lease import Fence
from visionbatch.shards import paths_digest
from visionbatch.storage import Storage, cache_root, canonical_uri, is_remote, within
from visionbatch.writer import CommitRecord

WORK = "_work"  # OUT's work dir, where OUT is local


class DuplicatesOutput(CommandOutput):
    command, first_file = "duplicates", WORK


@dataclass(frozen=True)
class DuplicatesTask:
    """One task of a stage (``number``: its unit or cell task), all it needs to run
    anywhere: the source's plan but its units (they grow with the source: a task carries
    its own unit, or the number of units)."""

    stage: str
    number: int
    source: dict  # duplicates.plan_source's, without "units"
    units: int
    work: str
    config: DuplicatesConfig
    near: bool
    cells: int  # k-means cells asked for
    out: str  # OUT, whose lease (``fence``) is checked before each work file appears
    fence: Fence
    item: dict | None = None  # sample, assign: its unit; cells: its cell task

    @property
    def task(self) -> str:
        """Its commit record's key (and the local engine's retry key)."""
        return "train" if self.stage == "train" else f"{self.stage}-{self.number:06d}"


def run_task(task: DuplicatesTask) -> CommitRecord:
    """Run one task; its commit record: ``{"shard": key, "file": what it wrote (relative to
    the work dir; a redo rewrites it), "rows", "counts"}``."""
    plan, config, work = task.source, task.config, task.work
    check_fence = DuplicatesOutput(task.out, Storage(config.s3_endpoint), task.fence).check_fence
    rows, counts = 0, {}
    if task.near:
        import faiss

        # training runs alone (all cores); the other stages' tasks run a worker per core
        faiss.omp_set_num_threads(len(os.sched_getaffinity(0)) if task.stage == "train" else 1)
    if task.stage == "sample":
        sample = sample_stage(plan, task.item, TRAIN_POINTS_PER_CELL * task.cells)
        file = unit_file(work, "sample", task.number, ".npy")
        save_npy(file, sample, check_fence)
        counts = {"points": len(sample)}
    elif task.stage == "train":
        samples = [np.load(unit_file(work, "sample", unit, ".npy")) for unit in range(task.units)]
        sample = np.concatenate([sample for sample in samples if len(sample)])
        counts = {**train_stage(sample, task.cells, work, config.threshold, plan["rows"], config.cell_rows,
                                config.cells_per_row, check_fence), "dim": int(sample.shape[1]), "points": len(sample)}
        file = os.path.join(work, "buckets.npy")  # train's last file
    elif task.stage == "assign":
        counts = assign_stage(plan, task.item, work, config.threshold, task.near, config.cells_per_row, check_fence)
        counts.pop("unit")
        rows, file = task.item["rows"], unit_file(work, "rows", task.number)
    else:
        counts = {"pairs": cell_stage(work, task.units, task.item, config.threshold, config.cell_rows, check_fence)}
        file = pairs_file(work, task.number)
    return {"shard": task.task, "file": os.path.relpath(file, work), "rows": rows, "counts": counts}


class DuplicatesSummary(dict):
    def format(self) -> str:
        lines = [f"duplicates        {self['images_in_groups']:,} images in {self['groups']:,} groups "
                 f"({self['exact_groups']:,} of exact copies) among {self['rows']:,} rows",
                 f"a deduplicated set drops {self['images_dropped']:,} images (all but each group's kept member)",
                 f"threshold         cosine >= {self['threshold']}" if self["near"] else
                 f"near-duplicates   not looked for: {self['near_not_looked_for']}",
                 f"groups            {self['output']}/{DUPLICATES_TABLE}"]
        return "\n".join(lines)


def run_duplicates(config: DuplicatesConfig, progress=None) -> DuplicatesSummary:
    """Find the duplicates of ``config.source`` into OUT (module docstring); ``progress``:
    the stream for the progress bars (None: none)."""
    job = DuplicatesJob(config, Storage(config.s3_endpoint), progress)
    return Driver(job, job.out, overwrite=config.overwrite, resume=config.resume,
                  flush_seconds=config.flush_seconds)()


def output_of(config: DuplicatesConfig, source: Destination) -> str:
    """OUT: ``--output``, or for a DEST its ``_derived/duplicates`` folder (never inside
    another table, whose next listing would take OUT's Parquet files for its own)."""
    dest = is_dest(source)
    if config.output is None:
        if not dest:
            raise UsageError(f"{config.source} is not a visionbatch DEST: name where the groups go with --output")
        return f"{source.uri}/{DUPLICATES_OUT}"
    if within(config.source, config.output) or (
            within(config.output, config.source) and not (dest and within(config.output, f"{source.uri}/{DERIVED}"))):
        raise UsageError(f"--output {config.output} and SOURCE {config.source} overlap: write the groups to a folder "
                         f"outside SOURCE{' (or under its ' + DERIVED + '/)' if dest else ''}")
    return config.output


class DuplicatesJob:
    """The duplicates command's part of a committed run. The source is listed (its units)
    before the driver claims OUT: a source that cannot be read is refused first."""

    name = "duplicates"

    def __init__(self, config: DuplicatesConfig, storage: Storage, progress):
        self.config, self.progress, self.started = config, progress, time.monotonic()
        self.source = Destination(config.source, storage)
        self.out = DuplicatesOutput(output_of(config, self.source), storage)
        self.out.check_own()
        self.plan = plan_source(config)
        self.near, self.near_not_looked_for = _wants_near(config, self.plan)
        self.cells = (config.cells or choose_cells(self.plan["rows"])) if self.near else 0
        self.work_dir = config.work_dir or (
            os.path.join(cache_root(), "duplicates", paths_digest([self.out.uri])) if is_remote(self.out.uri)
            else os.path.join(self.out.root, WORK))
        self.engine = None
        self.fence: Fence | None = None  # the run's, once the driver has fenced OUT
        self.stage_seconds: dict[str, float] = {}  # this run's

    def prepare(self) -> None:
        pass  # the engine starts once there are tasks (a resumed run may have none)

    def identity(self) -> dict:
        plan, config = self.plan, self.config
        return {"duplicates": True, "source": canonical_uri(config.source),
                "source_digest": paths_digest(f"{piece['file']} {piece['rows']}" for unit in plan["units"]
                                              for piece in unit["pieces"]),
                "rows": plan["rows"], "columns": plan["columns"], "near": self.near, "threshold": config.threshold,
                "cells": self.cells, "unit_rows": config.unit_rows, "cell_rows": config.cell_rows,
                "cells_per_row": config.cells_per_row}

    def failure(self, err: BaseException) -> str | None:
        return self.engine.failure(err) if self.engine is not None else None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def work(self, run: Run) -> DuplicatesSummary:
        shards, out = run.manifest.shards, run.destination
        if shards and out.exists(SUCCESS) and out.exists(SUMMARY):  # finished already (its work dir removed)
            return DuplicatesSummary(json.loads(out.read_bytes(SUMMARY)))
        if not shards:  # nothing committed: nothing in the work dir is to be trusted
            shutil.rmtree(self.work_dir, ignore_errors=True)
        _forget_lost(shards, self.work_dir)
        os.makedirs(self.work_dir, exist_ok=True)
        self.fence = out.fence
        units = self.plan["units"]
        source = {key: value for key, value in self.plan.items() if key != "units"}
        stats = {"units": len(units)}
        if self.near:
            if "train" not in shards:
                samples = [self._task("sample", unit["unit"], source, unit) for unit in units]
                self._stage(run, samples)
                if not sum(shards[task.task]["counts"]["points"] for task in samples):
                    raise UsageError(f"{self.source.uri}: no row has an embedding (all null or zero): nothing to "
                                     "compare (--find exact: equal bytes alone)")
                self._stage(run, [self._task("train", 0, source)])
            trained = shards["train"]["counts"]
            source = {**source, "dim": trained["dim"]}
            stats.update(cells=trained["cells"], buckets=trained["buckets"], sample=trained["points"])
        self._stage(run, [self._task("assign", unit["unit"], source, unit) for unit in units])
        if self.near:
            cell_tasks = plan_cell_tasks(cell_counts(self.work_dir, len(units)),
                                         np.load(os.path.join(self.work_dir, "buckets.npy")), self.config.cell_rows)
            self._stage(run, [self._task("cells", task["task"], source, task) for task in cell_tasks])
            stats["cell_tasks"] = len(cell_tasks)
        for key in ("vectors", "visits", "visits_cut", "pairs"):
            stats[key] = sum(record["counts"].get(key, 0) for record in shards.values())
        self.close()  # the workers' memory back before the group stage takes its own
        from visionbatch.duplicate_groups import group_stage

        table, groups = group_stage(self.work_dir, self.config.threshold, self.near)
        summary = DuplicatesSummary(
            {**groups, "rows": self.plan["rows"], "near": self.near, "near_not_looked_for": self.near_not_looked_for,
             "source": self.source.uri, "output": out.uri, "stats": stats, "stage_seconds": self.stage_seconds,
             "seconds": round(time.monotonic() - self.started, 1)})
        with tempfile.TemporaryDirectory(prefix="visionbatch-duplicates-") as scratch:
            write_parquet(os.path.join(scratch, DUPLICATES_TABLE), table)
            out.write_file(DUPLICATES_TABLE, os.path.join(scratch, DUPLICATES_TABLE))
        out.write_bytes(SUMMARY, json.dumps(summary, indent=1).encode())
        run.write(complete=True)
        if not self.config.keep_work:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        if self.plan["kind"] == "dest" and within(out.uri, self.source.uri):
            self.source.write_hub_config(self.plan["job"]["format"])  # datasets: the groups as a config of DEST
        return summary

    def _task(self, stage: str, number: int, source: dict, item: dict | None = None) -> DuplicatesTask:
        return DuplicatesTask(stage, number, source, len(self.plan["units"]), self.work_dir, self.config, self.near,
                              self.cells, self.out.uri, self.fence, item)

    def _stage(self, run: Run, tasks: list[DuplicatesTask]) -> None:
        """A stage's tasks that the manifest does not list, on the engine, each committed
        as it finishes."""
        tasks = [task for task in tasks if task.task not in run.manifest.shards]
        if not tasks:
            return
        if self.engine is None:
            self.engine = make_engine(self.config, model=False)
        bar = progress_bar(self.progress, f"duplicates: {tasks[0].stage}", total=len(tasks), unit="task")
        began = time.monotonic()
        try:
            for record in self.engine.map_tasks(run_task, tasks, self.config.max_retries, self.config.address):
                if record is not None:
                    run.commit(record)
                    bar.update(1)
                run.tick()
        finally:
            bar.close()
            self.stage_seconds[tasks[0].stage] = round(time.monotonic() - began, 1)


def _wants_near(config: DuplicatesConfig, plan: dict) -> tuple[bool, str | None]:
    """Whether to look for near-duplicates, and where not, why (``--find``)."""
    if config.find == "exact":
        return False, "--find exact"
    if plan["columns"]["embedding"] is None:
        what = ("classify it again with --embeddings" if plan["kind"] == "dest"
                else f"name its embedding column with --embedding-column (no column {config.embedding_column!r})")
        why = f"{config.source} has no embeddings, which near-duplicates need: {what}"
        if config.find == "all":
            raise UsageError(f"{why}; exact duplicates (equal content digests) need none (--find exact)")
        if plan["columns"]["digest"] is None:
            raise UsageError(f"{config.source} has neither embeddings ({config.embedding_column!r}) nor "
                             f"content digests ({config.digest_column!r}): nothing to compare")
        return False, why
    return True, None


def _forget_lost(shards: dict[str, dict], work: str) -> None:
    """Drop the commit records whose file is gone from the work dir, so that their tasks
    run again: a lost sample only where training is still to come; with the trained cells
    lost, every assign and cell task too (new cells would not match their spills)."""
    lost = {key for key, record in shards.items() if not os.path.exists(os.path.join(work, record["file"]))}
    if "train" in lost:
        lost |= {key for key in shards if key.split("-")[0] in ("assign", "cells")}
    elif "train" in shards:
        lost = {key for key in lost if not key.startswith("sample-")}
    for key in lost:
        del shards[key]
