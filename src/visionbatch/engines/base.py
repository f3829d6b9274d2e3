"""The engine contract: what an execution engine does for a committed run (a leaf of the
engines package: the engines import it, it imports none of them).

An engine only moves work: a classify job's shards through decode -> model -> write,
reporting the writer's commit records (:meth:`Engine.run`), and other commands' tasks
(:meth:`Engine.map_tasks`, the same thing for work that is not a model's). Everything
that makes a run correct (the plan, shard ids, the manifest and its commits, resume,
the lease, the summary, signals, exit codes) lives above it: :mod:`visionbatch.driver`
and the commands (:mod:`visionbatch.job`, :mod:`visionbatch.export`).
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Iterator, Protocol

import pyarrow as pa

from visionbatch.config import ClassifyConfig
from visionbatch.plan import ModelPlan, Prepared, Resources
from visionbatch.shards import AnyShard, InputSpec, PlannerStatus
from visionbatch.storage import Storage
from visionbatch.writer import CommitRecord
from visionbatch.writer import ShardWriter

log = logging.getLogger("visionbatch")


class Planner(Protocol):
    """The planner's calls the driver makes (a ShardPlanner, or its Ray actor)."""

    def start(self, committed: dict[str, str] | None = None) -> None: ...
    def wait_started(self, timeout: float | None = None) -> PlannerStatus: ...
    def status(self) -> PlannerStatus: ...
    def mark_committed(self, ids: list[str]) -> None: ...
    def unfinished(self) -> list[AnyShard]: ...


class Engine:
    """One way to execute a job. ``start`` runs while the model's configs load."""

    name: str
    planner: Planner

    def start(self, config: ClassifyConfig) -> Resources:
        """Start what the engine runs on; the resources the plan may use."""
        raise NotImplementedError

    def probe_batch_size(self, config: ClassifyConfig, model: ModelPlan, gpus: float) -> int:
        """The best batch size on one GPU."""
        raise NotImplementedError

    def make_planner(self, inputs: InputSpec, storage: Storage) -> Planner:
        """The job's planner (made here, started by the driver once DEST says what is done)."""
        raise NotImplementedError

    def run(self, prepared: Prepared, writer: ShardWriter,
            shards: list[AnyShard] | None = None) -> Iterator[tuple[int, CommitRecord | None]]:
        """Decode, predict and write the planner's shards (or the given ``shards``, each
        retried as a whole); yields (rows that reached the writer, the commit record of a
        shard the writer finished or None). A shard whose task died is left unfinished."""
        raise NotImplementedError

    def map_tasks(self, fn: Callable, items: list, max_retries: int, address: str | None = None,
                  poll_s: float = 1.0) -> Iterator:
        """``fn(item)`` for each item, a task each (a picklable module-level function and
        arguments), retried ``max_retries`` times when it fails or its worker dies; yields
        the results as tasks finish, and None after ``poll_s`` seconds without one (so
        that the caller can commit on time). Tasks must be idempotent: a retried one
        runs again from the start. For work that is not a classify job (``export``)."""
        raise NotImplementedError

    def failure(self, err: BaseException) -> str | None:
        """The one-line reason for an engine failure (else None: not the engine's)."""
        return None

    def runtime_report(self) -> dict | None:
        """What runs the model and why (its model's ModelPaths.report); None where the
        engine's replicas do not report it (Ray's actors certify each on its own)."""
        return None

    def close(self) -> None:
        """Stop whatever the engine started."""


def commit_events(records: pa.Table) -> Iterator[tuple[int, CommitRecord | None]]:
    """The writer's records of a block as (rows in, commit record or None)."""
    for rows_in, commit in zip(records.column("rows_in").to_pylist(), records.column("commit").to_pylist()):
        yield rows_in, None if commit is None else json.loads(commit)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()
