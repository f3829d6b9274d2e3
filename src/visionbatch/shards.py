"""Shards: bounded, deterministic slices of the input, the unit of work, output and resume.

Each SOURCE's image paths stream out of :mod:`visionbatch.sources` in a fixed order and
are cut into shards of ``shard_size`` paths: shard ``<source>-<seq>`` is always the
same paths for the same command on the same input, so a resumed job sees the same
shards and a re-done shard rewrites the same part file. A shard's digest (a hash of its
paths) is kept in the manifest and checked on resume: an input that changed under a
committed shard is refused rather than mixed.

:class:`ShardPlanner` lists in a background thread and hands shards to the decode
tasks one at a time (it runs as one Ray actor; its memory is a bounded queue of shards
plus the shards handed out and not yet committed). The driver never sees a path.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

from visionbatch.sources import ListingCounts, iter_list_file, iter_source
from visionbatch.storage import Storage, describe


@dataclass(frozen=True)
class Shard:
    id: str
    paths: tuple[str, ...]

    @property
    def digest(self) -> str:
        return paths_digest(self.paths)


def shard_id(source_index: int, seq: int) -> str:
    return f"{source_index:03d}-{seq:07d}"


def paths_digest(paths) -> str:
    text = "".join(f"{path}\n" for path in paths)
    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


@dataclass(frozen=True)
class InputSpec:
    """What to list: the sources and how to read them (part of a job's identity)."""

    sources: tuple[str, ...]
    from_list: bool
    shard_size: int
    limit: int | None
    cwd: str  # relative paths in list files are taken relative to the driver's directory
    follow_symlinks: bool = False


def iter_shards(spec: InputSpec, storage: Storage, counts: ListingCounts) -> Iterator[Shard]:
    """Every shard of the input, in order."""
    remaining = spec.limit
    for index, uri in enumerate(spec.sources):
        batches = (iter_list_file(uri, storage, counts, spec.cwd) if spec.from_list
                   else iter_source(uri, storage, counts, spec.follow_symlinks))
        seq, pending = 0, []
        for paths in batches:
            if remaining is not None:
                paths = paths[:remaining]
                remaining -= len(paths)
            pending.extend(paths)
            start = 0
            while len(pending) - start >= spec.shard_size:
                yield Shard(shard_id(index, seq), tuple(pending[start:start + spec.shard_size]))
                seq, start = seq + 1, start + spec.shard_size
            del pending[:start]
            if remaining == 0:
                break
        if pending:
            yield Shard(shard_id(index, seq), tuple(pending))
        if remaining == 0:
            return


def _input_changed(what: str) -> str:
    return (f"the input changed since DEST was written (files added, removed or renamed): {what}; resuming "
            "would mix results of two inputs: write to a new DEST, or pass --overwrite to start again")


class ShardPlanner:
    """Lists the input in a thread and hands out shards that are not yet committed.

    ``committed``: shard id -> digest of shards a previous run of this job committed;
    they are skipped (after checking their digest).
    """

    def __init__(self, spec: InputSpec, storage: Storage, committed: dict[str, str] | None = None,
                 queue_size: int = 16):
        self._committed = dict(committed or {})
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._outstanding: dict[str, Shard] = {}  # handed out, not yet committed
        self._counts = ListingCounts()
        self._status = {"images_listed": 0, "already_done": 0, "shards_listed": 0, "listing_done": False,
                        "error": None, "input_changed": None}
        self._started = threading.Event()  # a first shard is ready, or listing ended
        self._thread = threading.Thread(target=self._list, args=(spec, storage), daemon=True)
        self._thread.start()

    def _list(self, spec: InputSpec, storage: Storage) -> None:
        try:
            for shard in iter_shards(spec, storage, self._counts):
                with self._lock:
                    self._status["images_listed"] += len(shard.paths)
                    self._status["shards_listed"] += 1
                done = self._committed.pop(shard.id, None)
                if done is not None:
                    if done != shard.digest:
                        self._status["input_changed"] = _input_changed(
                            f"shard {shard.id} (from {shard.paths[0]}) now holds other files")
                        return
                    with self._lock:
                        self._status["already_done"] += len(shard.paths)
                    continue
                self._queue.put(shard)
                self._started.set()
            if self._committed:
                self._status["input_changed"] = _input_changed(
                    f"{len(self._committed)} committed shard(s) ({min(self._committed)}, ...) are no longer in it")
        except Exception as err:  # reported through status(); the driver stops the job
            self._status["error"] = describe(err)
        finally:
            self._status["listing_done"] = True
            self._queue.put(None)
            self._started.set()

    def wait_started(self, timeout: float | None = None) -> dict:
        """The status once there is a first shard to do or listing has ended (or after
        ``timeout``): the driver refuses an empty or unreadable input before any work."""
        self._started.wait(timeout)
        return self.status()

    def next(self) -> Shard | None:
        """The next shard to do, or None when there are no more (waits while listing)."""
        shard = self._queue.get()
        if shard is None:
            self._queue.put(None)  # for the other callers
            return None
        with self._lock:
            self._outstanding[shard.id] = shard
        return shard

    def mark_committed(self, ids: list[str]) -> None:
        with self._lock:
            for shard in ids:
                self._outstanding.pop(shard, None)

    def unfinished(self) -> list[Shard]:
        """Shards handed out whose commit never came (their task or worker died)."""
        with self._lock:
            return sorted(self._outstanding.values(), key=lambda shard: shard.id)

    def status(self) -> dict:
        with self._lock:
            counts = self._counts
            return {**self._status, "skipped_non_image": counts.skipped_non_image,
                    "skipped_special": counts.skipped_special, "special_examples": list(counts.special_examples),
                    "skipped_folder_links": counts.skipped_folder_links,
                    "undecodable_names": counts.undecodable_names}
