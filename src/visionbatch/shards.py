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
import dataclasses
from dataclasses import dataclass
from typing import Iterator, TypedDict, Union

import pyarrow as pa

from visionbatch.sources import Container, ListingCounts, iter_list_file, iter_source, iter_tables
from visionbatch.storage import Storage, describe


@dataclass(frozen=True)
class Shard:
    """Image files (or URLs) in order; ``columns``: the list's kept columns, a row per path.
    ``only_row``: a piece of the shard, for a task that reads that one file (a redo);
    its rows still say the whole shard's id and size, so the writer gathers the pieces."""

    id: str
    paths: tuple[str, ...]
    columns: pa.Table | None = None
    only_row: int | None = None

    @property
    def rows(self) -> int | None:
        return len(self.paths)

    @property
    def task(self) -> str:
        """What one task works on: the shard, or one piece of it."""
        return self.id if self.only_row is None else f"{self.id}@{self.only_row}"

    @property
    def digest(self) -> str:
        return paths_digest(self.paths)


@dataclass(frozen=True)
class TarShard:
    """One WebDataset tar: its rows (image members) are known only once it is read."""

    id: str
    uri: str
    size: int
    mtime_ns: int

    rows = None

    @property
    def task(self) -> str:
        return self.id

    @property
    def digest(self) -> str:  # a changed tar is a changed shard
        return paths_digest([f"{self.uri} {self.size} {self.mtime_ns}"])


@dataclass(frozen=True)
class TableShard:
    """Rows ``start`` to ``start + count`` of one row group of a Parquet file with images;
    ``first_row``: the first one's number in the file."""

    id: str
    uri: str
    size: int
    mtime_ns: int
    row_group: int
    start: int
    count: int
    first_row: int

    @property
    def rows(self) -> int:
        return self.count

    @property
    def task(self) -> str:
        return self.id

    @property
    def digest(self) -> str:
        return paths_digest([f"{self.uri} {self.size} {self.mtime_ns} {self.row_group} {self.start} {self.count}"])


AnyShard = Union[Shard, TarShard, TableShard]


def one_file_pieces(shard: AnyShard) -> list[AnyShard]:
    """A shard as tasks of one file each (a tar or a table, which cannot be cut into
    files: itself)."""
    if not isinstance(shard, Shard):
        return [shard]
    return [dataclasses.replace(shard, only_row=row) for row in range(len(shard.paths))]


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
    image_column: str | None = None  # SOURCEs are Parquet tables of images
    url_column: str = "path"  # the list files' column of paths or URLs
    columns: tuple[str, ...] = ()  # input columns the decode stage reads besides the image (kept, label)
    label_column: str | None = None  # the tables' column of true labels
    follow_symlinks: bool = False


def iter_shards(spec: InputSpec, storage: Storage, counts: ListingCounts) -> Iterator[AnyShard]:
    """Every shard of the input, in order: image files cut into shards of ``shard_size``,
    each WebDataset tar a shard, each Parquet row group cut into shards of ``shard_size``."""
    remaining = spec.limit
    for index, uri in enumerate(spec.sources):
        if spec.image_column:
            items = iter_tables(uri, storage, counts, spec.image_column, spec.columns, spec.follow_symlinks,
                                spec.label_column)
        elif spec.from_list:
            items = iter_list_file(uri, storage, counts, spec.cwd, spec.url_column, spec.columns)
        else:
            items = iter_source(uri, storage, counts, spec.follow_symlinks)
        seq, pending, kept = 0, [], None  # kept: the pending paths' kept list columns
        for item in items:
            if isinstance(item, Container):
                if item.rows is None:  # a tar: one shard, however many images it holds
                    yield TarShard(shard_id(index, seq), item.uri, item.size, item.mtime_ns)
                    seq += 1
                    continue
                for start in range(0, item.rows, spec.shard_size):
                    count = min(spec.shard_size, item.rows - start, item.rows if remaining is None else remaining)
                    yield TableShard(shard_id(index, seq), item.uri, item.size, item.mtime_ns, item.row_group,
                                     start, count, item.first_row + start)
                    seq += 1
                    if remaining is not None:
                        remaining -= count
                        if remaining == 0:
                            return
                continue
            paths, columns = item if isinstance(item, tuple) else (item, None)  # a list's batches keep columns
            if remaining is not None:
                paths, columns = paths[:remaining], None if columns is None else columns.slice(0, remaining)
                remaining -= len(paths)
            pending.extend(paths)
            if columns is not None:
                kept = columns if kept is None else pa.concat_tables([kept, columns])
            start = 0
            while len(pending) - start >= spec.shard_size:
                yield _files_shard(index, seq, pending[start:start + spec.shard_size], kept, start)
                seq, start = seq + 1, start + spec.shard_size
            del pending[:start]
            kept = kept.slice(start) if kept is not None and start else kept
            if remaining == 0:
                break
        if pending:
            yield _files_shard(index, seq, pending, kept, 0)
        if remaining == 0:
            return


def _files_shard(index: int, seq: int, paths: list[str], kept: pa.Table | None, start: int) -> Shard:
    columns = None if kept is None else kept.slice(start, len(paths)).combine_chunks()
    return Shard(shard_id(index, seq), tuple(paths), columns)


def describe_shard(shard: AnyShard) -> str:
    """Where a shard's input is, for messages."""
    return shard.paths[0] if isinstance(shard, Shard) else shard.uri


def _input_changed(what: str) -> str:
    return (f"the input changed since DEST was written (files added, removed or renamed): {what}; resuming "
            "would mix results of two inputs: write to a new DEST, or pass --overwrite to start again")


class PlannerStatus(TypedDict, total=False):
    """What the planner tells the driver of its listing (``ShardPlanner.status``): the
    progress bar's total, the summary's skipped files, and why listing stopped."""

    images_listed: int  # in the shards listed so far (a tar's count once read)
    already_done: int  # of them, in shards an earlier run committed (--resume)
    shards_listed: int
    unsized_shards: int  # shards whose image count is known only once read (tars)
    listing_done: bool
    handed_out_all: bool
    error: str | None  # listing failed: the job stops with it
    input_changed: str | None  # a committed shard's listing differs now (--resume): what changed
    # sources.ListingCounts, as it stands
    skipped_non_image: int
    skipped_special: int
    special_examples: list[str]
    skipped_folder_links: int
    undecodable_names: int
    unread_archive: str | None
    index_labels: str | None


class ShardPlanner:
    """Lists the input in a thread and hands out shards that are not yet committed.

    Made first and started later: the driver creates it while the model's configs load,
    and starts it once DEST's manifest says which shards are done.
    """

    def __init__(self, spec: InputSpec, storage: Storage, queue_size: int = 16):
        self._spec, self._storage = spec, storage
        self._committed: dict[str, str] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._outstanding: dict[str, AnyShard] = {}  # handed out, not yet committed
        self._counts = ListingCounts()
        self._status: PlannerStatus = {"images_listed": 0, "already_done": 0, "shards_listed": 0,
                                       "unsized_shards": 0, "listing_done": False, "handed_out_all": False,
                                       "error": None, "input_changed": None}
        self._started = threading.Event()  # a first shard is ready, or listing ended

    def start(self, committed: dict[str, str] | None = None) -> None:
        """Start listing. ``committed``: shard id -> digest of shards a previous run of
        this job committed; they are skipped (after checking their digest)."""
        self._committed = dict(committed or {})
        threading.Thread(target=self._list, daemon=True).start()

    def _list(self) -> None:
        try:
            for shard in iter_shards(self._spec, self._storage, self._counts):
                with self._lock:
                    self._status["images_listed"] += shard.rows or 0
                    self._status["unsized_shards"] += shard.rows is None
                    self._status["shards_listed"] += 1
                done = self._committed.pop(shard.id, None)
                if done is not None:
                    if done != shard.digest:
                        self._status["input_changed"] = _input_changed(
                            f"shard {shard.id} (from {describe_shard(shard)}) now holds other files")
                        return
                    with self._lock:
                        self._status["already_done"] += shard.rows or 0
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

    def wait_started(self, timeout: float | None = None) -> "PlannerStatus":
        """The status once there is a first shard to do or listing has ended (or after
        ``timeout``): the driver refuses an empty or unreadable input before any work."""
        self._started.wait(timeout)
        return self.status()

    def next(self) -> AnyShard | None:
        """The next shard to do, or None when there are no more (waits while listing)."""
        shard = self._queue.get()
        if shard is None:
            self._queue.put(None)  # for the other callers
            self._status["handed_out_all"] = True
            return None
        with self._lock:
            self._outstanding[shard.id] = shard
        return shard

    def mark_committed(self, ids: list[str]) -> None:
        with self._lock:
            for shard in ids:
                self._outstanding.pop(shard, None)

    def unfinished(self) -> list[AnyShard]:
        """Shards handed out whose commit never came (their task or worker died)."""
        with self._lock:
            return sorted(self._outstanding.values(), key=lambda shard: shard.id)

    def status(self) -> "PlannerStatus":
        with self._lock:
            counts = self._counts
            return {**self._status, "skipped_non_image": counts.skipped_non_image,
                    "skipped_special": counts.skipped_special, "special_examples": list(counts.special_examples),
                    "skipped_folder_links": counts.skipped_folder_links,
                    "undecodable_names": counts.undecodable_names, "unread_archive": counts.unread_archive,
                    "index_labels": counts.index_labels}
