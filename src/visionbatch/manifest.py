"""The driver's commits: DEST's manifest (``_manifest.json``) lists the job (its
options), its lease generation and every shard it committed, from the writer's commit
records (:mod:`visionbatch.writer`); ``_SUCCESS`` comes last, once every shard is
committed. The driver writes it at least every ``flush_seconds`` and at the end; readers
and ``--resume`` trust only the shards it lists. A job starts from it: empty, or on
``--resume`` the committed shards of an interrupted run of the same job (its options
checked against this one's, its parts against damage).
"""

from __future__ import annotations

import json
import logging
import time

from visionbatch.counts import merge_counts
from visionbatch.counts import metric_counts as metric_counts_of
from visionbatch.destination import MANIFEST, SUCCESS, Destination, job_schema
from visionbatch.errors import DestinationError
from visionbatch.results import MODEL_TRACEBACK
from visionbatch.writer import CommitRecord

# 3: rows carry true_label_score; --resume across versions is refused, so no DEST mixes
# part files with and without it. 4: the job's record holds its input (InputSpec) whole.
MANIFEST_VERSION = 4
ROWS_WITH_TRUE_LABEL_SCORE = 3  # the first version whose rows carry it (label-issues reads it)
log = logging.getLogger("visionbatch")


class Manifest:
    """The driver's record of a job in DEST: its options and its committed shards."""

    def __init__(self, destination: Destination, job: dict, shards: dict[str, dict] | None = None,
                 metric_counts: dict | None = None, runtime: dict | None = None):
        self.destination = destination
        self.job = job
        self.runtime = runtime  # what ran the model and its certificate (runtime.ModelPaths.report)
        self.shards: dict[str, dict] = dict(shards or {})
        self.metric_counts = metric_counts or {}  # of the committed shards, added up (see evaluate)
        self.saved_rows = self.rows  # rows the manifest in DEST lists
        self._written_at = time.monotonic()
        self._write_seconds = 0.0

    @classmethod
    def open(cls, destination: Destination, job: dict, *, overwrite: bool, resume: bool) -> "Manifest":
        """The manifest a job starts from: empty, or (``resume``) the committed shards of
        an interrupted run of the same job."""
        if overwrite and resume:
            raise DestinationError("--overwrite and --resume contradict each other: choose one")
        job = json.loads(json.dumps(job))  # as DEST will read it back (a tuple as a list)
        if not destination.has_results():
            return cls(destination, job)
        if overwrite:
            destination.clear()
            return cls(destination, job)
        if not resume:
            raise DestinationError(f"{destination.uri} already holds results: pass --overwrite to replace them "
                                   "or --resume to continue")
        earlier = destination.manifest() or {"job": job, "shards": {}}
        version = earlier.get("version", MANIFEST_VERSION)
        if version != MANIFEST_VERSION:
            raise DestinationError(
                f"{destination.uri} was written by {'an older' if version < MANIFEST_VERSION else 'a newer'} "
                f"visionbatch (manifest version {version}; this one writes {MANIFEST_VERSION}), which --resume "
                "cannot continue: finish it with the visionbatch that started it, or start again with "
                "--overwrite or into a new DEST (its finished results stay readable)")
        there, now = _fields(earlier["job"]), _fields(job)
        differing = sorted(key for key in set(there) | set(now) if there.get(key) != now.get(key))
        if differing:
            raise DestinationError(
                f"--resume with other options than the job in {destination.uri}: "
                + "; ".join(f"{key}: {there.get(key)!r} there, {now.get(key)!r} now" for key in differing))
        shards = dict(earlier["shards"])
        metric_counts = earlier.get("metric_counts")
        damaged = destination.damaged_parts(shards, job_schema(job))
        if damaged:
            log.warning("%d committed part file(s) in %s are missing or damaged; their shards are redone",
                        len(damaged), destination.uri)
            for shard in damaged:
                del shards[shard]
            # Counts cannot be taken back out of the sum: count the whole parts again (rare).
            metric_counts = None
            for record in shards.values():
                part = destination.read_part(record["file"], record["rows"], job_schema(job))
                metric_counts = merge_counts(metric_counts, metric_counts_of(part))
        return cls(destination, job, shards, metric_counts, earlier.get("runtime"))

    @property
    def certified_path(self) -> str | None:
        """The model path an earlier run certified (a resumed job keeps it), None where none was decided."""
        runtime = self.runtime or {}
        certificate = runtime.get("certificate")
        if certificate is None:
            return runtime.get("path")  # no certificate to take (torch only), or itself a resumed choice
        return certificate["chosen"] if certificate["decided"] else None

    @property
    def rows(self) -> int:
        return sum(shard["rows"] for shard in self.shards.values())

    def add(self, record: CommitRecord) -> None:
        counts = dict(record["counts"])
        if "metrics" in counts:  # a classify job's shard (an export's has none)
            self.metric_counts = merge_counts(self.metric_counts, counts.pop("metrics"))
        self.shards[record["shard"]] = {**{key: value for key, value in record.items()
                                           if key not in ("shard", MODEL_TRACEBACK)}, "counts": counts}

    def due(self, every_seconds: float) -> bool:
        """Time to commit again: at least every ``every_seconds``, and more often while
        the manifest is cheap to write (at most a tenth of the time goes to writing it)."""
        elapsed = time.monotonic() - self._written_at
        return elapsed >= min(every_seconds, max(1.0, 10 * self._write_seconds))

    def write(self, complete: bool = False) -> None:
        """Commit: the shards listed here are the job's results (``complete``: all of them).
        With no shard to list and the job unfinished, DEST is left without a manifest."""
        if not self.shards and not complete:
            if MANIFEST in self.destination.files():
                self.destination.delete([MANIFEST])
            return
        body = {"version": MANIFEST_VERSION, "complete": complete, "job": self.job, "rows": self.rows,
                "shards": self.shards, "metric_counts": self.metric_counts, "runtime": self.runtime,
                "generation": self.destination.generation}
        started = time.monotonic()
        self.destination.write_bytes(MANIFEST, json.dumps(body, separators=(",", ":")).encode())
        self.saved_rows = self.rows
        self._written_at = time.monotonic()
        self._write_seconds = self._written_at - started
        if complete:
            self.destination.remove_strays({shard["file"] for shard in self.shards.values()})
            self.destination.write_bytes(SUCCESS, json.dumps({"rows": self.rows, "shards": len(self.shards),
                                                              "generation": self.destination.generation}).encode())


def _fields(job: dict) -> dict:
    """A job's record with its input's fields as their own (``input.cwd``): a message names
    the one that differs."""
    return {**{key: value for key, value in job.items() if key != "input"},
            **{f"input.{key}": value for key, value in job.get("input", {}).items()}}
