"""Samples: a shard's inputs as (path, bytes or error, true-label value, key), whatever holds them.

Image files and URLs are read one each, a few reads in flight; a WebDataset tar is read
as one stream, member by member (never whole into memory); a Parquet shard's rows come
from its row group. Nothing here raises for a bad input: a failure is the sample's
``data``, an error text ``"<kind>: message"`` that becomes its result row's ``error``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import tarfile
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from visionbatch.config import DEFAULT_READ_TIMEOUT_S
from visionbatch.labels import ClassName
from visionbatch.shards import AnyShard, Shard, TarShard
from visionbatch.sources import class_names, image_location, is_image_name
from visionbatch.storage import Storage, describe, is_url

READ_AHEAD = 16  # reads in flight per decode task
READER_THREAD = "visionbatch-read"  # the name of read_ahead's threads


@dataclass(frozen=True)
class Sample:
    path: str
    data: bytes | str  # the image's bytes, or its error text
    label: object = None  # the true label's raw value: a WebDataset member's text, a label column's value
    key: str | None = None  # a WebDataset sample's __key__


@dataclass(frozen=True)
class Reading:
    """How the decode stage reads a shard's inputs (plain values, shipped to every task)."""

    storage: Storage
    max_bytes: int | None = None
    label_column: str | None = None  # WebDataset member extension or Parquet column of the true label
    image_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    read_timeout: float = DEFAULT_READ_TIMEOUT_S  # per file or URL read (not per tar or table: those stream)


def read_file(path: str, storage: Storage, max_bytes: int | None = None) -> bytes | str:
    """A file's (or URL's) bytes, or its ``read_error`` / ``download_error`` text (never raises)."""
    try:
        return storage.read(path, max_bytes)
    except Exception as err:  # missing, permission, network: keep the row
        return f"{'download_error' if is_url(path) else 'read_error'}: {describe(err)}"


def read_ahead(paths, storage: Storage, max_bytes: int | None, timeout: float = DEFAULT_READ_TIMEOUT_S,
               window: int = READ_AHEAD) -> Iterator[bytes | str]:
    """:func:`read_file` of each path, in order, with up to ``window`` reads in flight:
    object-store and http requests wait on the network for tens of ms each, and their
    reads release the GIL, so a few threads hide that latency behind decoding.

    ``window`` daemon threads take the reads from a queue (a thread per read costs a
    thread start, and a wait for it, per file: at millions of files that was most of a
    decode task's time). A read not done ``timeout`` seconds after it was queued gives a
    ``read_error`` (a hung mount or server must not hold the shard forever); its thread
    cannot be stopped, so it is left to finish on its own and a new thread takes its
    place. Daemon threads block neither the next reads nor the process's exit.
    """
    todo: queue.SimpleQueue = queue.SimpleQueue()
    readers = 0

    def read_queued() -> None:
        while (item := todo.get()) is not None:
            path, future = item
            if future.set_running_or_notify_cancel():
                future.set_result(read_file(path, storage, max_bytes))

    def add_reader() -> None:
        nonlocal readers
        threading.Thread(target=read_queued, daemon=True, name=READER_THREAD).start()
        readers += 1

    def result(read: tuple[concurrent.futures.Future, float]) -> bytes | str:
        future, deadline = read
        try:
            return future.result(max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            add_reader()  # the hung read keeps its thread
            return f"read_error: timed out after {timeout:g} s (--read-timeout)"

    pending: collections.deque = collections.deque()
    try:
        for path in paths:
            if readers < window:
                add_reader()
            future: concurrent.futures.Future = concurrent.futures.Future()
            todo.put((path, future))
            pending.append((future, time.monotonic() + timeout))
            if len(pending) >= window:
                yield result(pending.popleft())
        while pending:
            yield result(pending.popleft())
    finally:
        for future, _ in pending:
            future.cancel()
        for _ in range(readers):
            todo.put(None)


def shard_samples(shard: AnyShard, reading: Reading) -> tuple[Iterator[Sample], pa.Table | None]:
    """The shard's samples in order (a piece's one sample), and the input columns its
    rows keep (a row per file of the whole shard; None when none are kept)."""
    if isinstance(shard, Shard):
        paths = shard.paths if shard.only_row is None else shard.paths[shard.only_row:shard.only_row + 1]
        samples = (Sample(path, data) for path, data in
                   zip(paths, read_ahead(paths, reading.storage, reading.max_bytes, reading.read_timeout)))
        return samples, shard.columns
    if isinstance(shard, TarShard):
        return tar_samples(shard, reading), None
    return _table_samples(shard, reading)


# --------------------------------------------------------------------------- WebDataset


def split_key(name: str) -> tuple[str, str]:
    """A tar member's (__key__, extension), as webdataset splits them: at the first dot
    of the name's last path component."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


def tar_samples(shard: TarShard, reading: Reading) -> Iterator[Sample]:
    """A sample per image member of a WebDataset tar, in tar order; members of one
    sample are consecutive and share a key. A member that cannot be read gets an error
    sample; a tar cut short gives the samples before the cut and one for the cut."""
    uri, storage = shard.uri, reading.storage
    fs, path = storage.resolve(uri)
    try:
        stream = fs.open_input_stream(path)
    except Exception as err:
        yield Sample(uri, f"read_error: {describe(err)}")
        return
    with stream:
        try:
            archive = tarfile.open(fileobj=stream, mode="r|*")  # plain, gzip, bzip2 or xz: a stream each
        except (tarfile.TarError, OSError) as err:
            yield Sample(uri, f"read_error: not a tar file ({describe(err)})")
            return
        key, images, label, found = None, [], None, 0

        def sample_rows() -> Iterator[Sample]:  # the sample met so far: a row per image member
            return (Sample(f"{uri}#{name}", image, label, key) for name, image in images)

        for member, data in _members(archive, shard, reading):
            if isinstance(data, _Cut):
                found += len(images)
                yield from sample_rows()
                yield Sample(f"{uri}#{member or f'@{data.offset}'}", f"truncated: {data.why}", None,
                             split_key(member)[0] if member else None)
                return
            member_key, extension = split_key(member)
            if member_key != key:
                found += len(images)
                yield from sample_rows()
                key, images, label = member_key, [], None
            if extension == reading.label_column and isinstance(data, bytes):
                label = data
            elif data is not None and is_image_name(member):
                images.append((member, data))
        found += len(images)
        yield from sample_rows()
        if not found:
            yield Sample(uri, "not_an_image: no image member in this tar")


@dataclass(frozen=True)
class _Cut:
    """Where a tar was cut short."""

    offset: int
    why: str


def _members(archive: tarfile.TarFile, shard: TarShard, reading: Reading):
    """(member name, its bytes or error text) for the regular files that are images or
    labels ((name, None) for the others, unread); a last ``_Cut`` where the tar breaks.
    The member name is "" when the break is in a header."""
    while True:
        offset = archive.offset
        try:
            member = archive.next()
        except (tarfile.TarError, OSError) as err:
            yield "", _Cut(offset, f"the tar breaks in the member header at byte {offset} ({describe(err)})")
            return
        if member is None:
            # tarfile ends quietly where a header is cut or missing: a whole tar ends
            # with zero blocks after its last member, which tarfile reads past (its
            # stream's position counts the bytes read, decompressed).
            end = archive.fileobj.tell()
            if end - archive.offset < tarfile.BLOCKSIZE:
                yield "", _Cut(archive.offset, f"the tar ends at byte {end}, after its last whole member "
                                               "and without the end-of-archive blocks")
            return
        if not member.isfile() or not (is_image_name(member.name)
                                       or split_key(member.name)[1] == reading.label_column):
            yield member.name, None
            continue
        if reading.max_bytes is not None and member.size > reading.max_bytes:
            yield member.name, f"read_error: larger than {reading.max_bytes} bytes (--max-bytes)"
            continue
        try:
            yield member.name, archive.extractfile(member).read()
        except (tarfile.TarError, OSError) as err:
            yield member.name, _Cut(offset, f"the tar ends inside this member ({describe(err)})")
            return


# --------------------------------------------------------------------------- Parquet


def _table_samples(shard, reading: Reading) -> tuple[Iterator[Sample], pa.Table | None]:
    """The shard's rows of its row group: the image column (binary, or a struct with
    ``bytes`` and ``path``: a struct without bytes is read from its path, as a file is),
    the label column (a Hugging Face ``ClassLabel``'s integers as its names), the kept
    columns."""
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys([reading.image_column, *filter(None, [reading.label_column]),
                                  *reading.keep_columns]))
    fs, path = reading.storage.resolve(shard.uri)
    try:
        with fs.open_input_file(path) as file:
            table = pq.ParquetFile(file)
            rows = table.read_row_group(shard.row_group, columns=columns).slice(shard.start, shard.count)
    except Exception as err:  # the file changed or broke since it was listed: every row says so
        error = f"read_error: {describe(err)}"
        return (Sample(f"{shard.uri}#{shard.first_row + i}", error) for i in range(shard.count)), None
    images = rows.column(reading.image_column).combine_chunks()
    paths = [None] * len(rows)
    if pa.types.is_struct(images.type):
        if images.type.get_field_index("path") >= 0:
            paths = images.field("path").to_pylist()
        images = images.field("bytes")
    labels = rows.column(reading.label_column).to_pylist() if reading.label_column else [None] * len(rows)
    names = class_names(table.schema_arrow, reading.label_column) if reading.label_column else None
    if names:
        labels = [ClassName(names[label]) if label is not None and 0 <= label < len(names) else None
                  for label in labels]
    located = [image_location(named, shard.uri) if named and not image.is_valid else None
               for named, image in zip(paths, images)]
    reads = read_ahead(filter(None, located), reading.storage, reading.max_bytes, reading.read_timeout)

    def samples() -> Iterator[Sample]:
        for i, (named, location, image, label) in enumerate(zip(paths, located, images, labels)):
            if location:  # read as a file is: the same limits, the same error kinds
                named, data = location, next(reads)
            elif (data := image.as_py()) is None:
                data = "empty_file: no image bytes in this row"
            elif reading.max_bytes is not None and len(data) > reading.max_bytes:
                data = f"read_error: larger than {reading.max_bytes} bytes (--max-bytes)"
            yield Sample(named or f"{shard.uri}#{shard.first_row + i}", data, label)

    return samples(), rows.select(list(reading.keep_columns)) if reading.keep_columns else None
