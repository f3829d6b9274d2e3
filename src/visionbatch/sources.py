"""Sources: what the user named, streamed as image paths in a deterministic order.

A folder or prefix is walked one directory at a time (each directory's entries sorted,
files before sub-folders), so the first paths come out at once and memory stays that
of one directory; a list file (text, CSV or Parquet with a ``path`` column) is read as
a stream. Nothing here holds the whole listing: :mod:`visionbatch.shards` cuts the
stream into shards as it flows.
"""

from __future__ import annotations

import fnmatch
import io
import os
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from visionbatch.storage import SourceError, Storage, describe, is_remote, uri_prefix

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_GLOB_CHARS = "*?["
_LIST_BATCH_ROWS = 65_536


@dataclass
class ListingCounts:
    """What a listing passed over, counted as it goes."""

    skipped_non_image: int = 0
    skipped_special: int = 0  # FIFOs, sockets, devices: never opened
    undecodable_names: int = 0  # names that are not UTF-8 cannot be a result row's path
    special_examples: list[str] = field(default_factory=list)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def check_source(uri: str, storage: Storage, from_list: bool) -> None:
    """Fail fast, before any work, on a source that does not exist or cannot be reached."""
    fs, path = storage.resolve(uri)
    if not from_list and any(c in path for c in _GLOB_CHARS):
        path = path[: min(path.index(c) for c in _GLOB_CHARS if c in path)].rpartition("/")[0]
    try:
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException) as err:
        raise SourceError(f"cannot list {uri}: {describe(err)}") from err
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{'list file' if from_list else 'source'} not found: {uri}")


def iter_source(uri: str, storage: Storage, counts: ListingCounts) -> Iterator[str]:
    """Image paths under a file, folder, glob or prefix, in a deterministic order."""
    fs, path = storage.resolve(uri)
    prefix = uri_prefix(uri)
    pattern = None
    if any(c in path for c in _GLOB_CHARS):
        first = min(path.index(c) for c in _GLOB_CHARS if c in path)
        pattern, path = path, path[:first].rpartition("/")[0]
    try:
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException) as err:
        raise SourceError(f"cannot list {uri}: {describe(err)}") from err
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"source not found: {uri}")
    if info.type == pafs.FileType.File and pattern is None:
        if is_image_name(path):
            yield prefix + path
        else:
            counts.skipped_non_image += 1
        return
    walk = _walk_local(path, counts) if isinstance(fs, pafs.LocalFileSystem) else _walk_remote(fs, path, uri)
    for name in walk:
        if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
            continue
        if is_image_name(name):
            yield prefix + name
        else:
            counts.skipped_non_image += 1


def _walk_local(root: str, counts: ListingCounts) -> Iterator[str]:
    """Depth first with os.scandir, which knows an entry's type without a stat per file.

    Directory symlinks are not followed (they make cycles and second spellings of the
    same file); FIFOs, sockets and devices are counted and never opened.
    """
    stack = [root]
    while stack:
        folder = stack.pop()
        files, folders = [], []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            folders.append(entry.path)
                        elif entry.is_file():  # a regular file, or a symlink to one
                            files.append(entry.path)
                        elif not entry.is_dir():  # FIFO, socket, device, broken link (folder links: not followed)
                            counts.skipped_special += 1
                            if len(counts.special_examples) < 5:
                                counts.special_examples.append(entry.path)
                    except OSError:
                        continue
        except OSError as err:
            if folder == root:
                raise SourceError(f"cannot list {root}: {describe(err)}") from err
            continue  # a folder removed or unreadable meanwhile: its files cannot be classified
        for path in sorted(files):
            if _utf8(path):
                yield path
            else:
                counts.undecodable_names += 1
        stack.extend(sorted(folders, reverse=True))


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:  # surrogate escapes of a name that is not UTF-8
        return False


def _walk_remote(fs: pafs.FileSystem, root: str, uri: str) -> Iterator[str]:
    """Depth first, one listing request (paged by pyarrow) per "folder" of a prefix."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))
        except (OSError, pa.ArrowException) as err:
            raise SourceError(f"cannot list {uri}: {describe(err)}") from err
        files = sorted(info.path for info in infos if info.type == pafs.FileType.File)
        folders = sorted((info.path for info in infos if info.type == pafs.FileType.Directory), reverse=True)
        yield from files
        stack.extend(folders)


def iter_list_file(list_uri: str, storage: Storage, counts: ListingCounts, cwd: str) -> Iterator[str]:
    """Paths from a text file (one per line) or a CSV/Parquet file with a ``path`` column,
    read as a stream. Relative local paths are taken relative to ``cwd``."""
    for path in _iter_list_entries(list_uri, storage):
        if not path:
            continue
        if not is_image_name(path):
            counts.skipped_non_image += 1
        elif is_remote(path):
            yield path
        else:
            yield os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


def _iter_list_entries(list_uri: str, storage: Storage) -> Iterator[str]:
    fs, path = storage.resolve(list_uri)
    lower = path.lower()
    try:
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(fs.open_input_file(path))
            if "path" not in parquet.schema_arrow.names:
                raise SourceError(f"{list_uri} has no 'path' column (columns: {', '.join(parquet.schema_arrow.names)})")
            for batch in parquet.iter_batches(batch_size=_LIST_BATCH_ROWS, columns=["path"]):
                yield from batch.column(0).to_pylist()
        elif lower.endswith(".csv"):
            import pyarrow.csv as pacsv

            reader = pacsv.open_csv(fs.open_input_stream(path),
                                    convert_options=pacsv.ConvertOptions(column_types={"path": pa.string()}))
            if "path" not in reader.schema.names:
                raise SourceError(f"{list_uri} has no 'path' column (columns: {', '.join(reader.schema.names)})")
            for batch in reader:
                yield from batch.column(batch.schema.get_field_index("path")).to_pylist()
        else:
            with fs.open_input_stream(path) as stream:
                for line in io.TextIOWrapper(io.BufferedReader(stream, 1 << 20), encoding="utf-8"):
                    yield line.strip()
    except SourceError:
        raise
    except (OSError, pa.ArrowException, UnicodeDecodeError) as err:
        raise SourceError(f"cannot read list {list_uri}: {describe(err)}") from err
