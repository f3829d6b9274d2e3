"""Sources: what the user named, streamed as image paths in a deterministic order.

A folder or prefix is walked one directory at a time (each directory's entries sorted,
files before sub-folders), so the first paths come out at once and memory stays that
of one directory; a list file (text, CSV or Parquet with a ``path`` column) is read as
a stream. Nothing here holds the whole listing: :mod:`visionbatch.shards` cuts the
stream into shards as it flows.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from visionbatch.errors import SourceError
from visionbatch.storage import Storage, describe, file_kind, uri_prefix

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_GLOB_CHARS = "*?["
_LIST_BATCH_ROWS = 65_536
_URL = r"^[A-Za-z][A-Za-z0-9+.-]*://"  # an entry with a scheme: s3://, http://, file://, ...
_UNNORMAL = r"//|/\.\.?(/|$)"  # what os.path.normpath would change in an absolute path
SPECIAL_EXAMPLES = 20  # special files named in the summary (bounded: the driver never grows with the input)
_IMAGE_NAME = r"\.(" + "|".join(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)) + r")$"


@dataclass
class ListingCounts:
    """What a listing passed over, counted as it goes."""

    skipped_non_image: int = 0
    skipped_special: int = 0  # FIFOs, sockets, devices, broken links: never opened
    skipped_folder_links: int = 0  # folder symlinks not followed (or leading where the walk has been)
    undecodable_names: int = 0  # names that are not UTF-8 cannot be a result row's path
    special_examples: list[str] = field(default_factory=list)  # the first few skipped special files
    unread_archive: str | None = None  # why the first archive met that is not read was skipped
    index_labels: str | None = None  # the first table whose label column is class indices: said at start-up

    def skip_special(self, path: str) -> None:
        self.skipped_special += 1
        if len(self.special_examples) < SPECIAL_EXAMPLES:
            self.special_examples.append(path)


def is_image_name(name: str) -> bool:
    stem, dot, extension = name.rpartition(".")
    return bool(dot) and "/" not in extension and f".{extension.lower()}" in IMAGE_EXTENSIONS


def _source_root(uri: str, storage: Storage, from_list: bool = False):
    """(filesystem, the path to list, the glob pattern or None, that path's info); a
    source that does not exist or cannot be reached fails here."""
    fs, path = storage.resolve(uri)
    pattern = None
    if not from_list and any(c in path for c in _GLOB_CHARS):
        first = min(path.index(c) for c in _GLOB_CHARS if c in path)
        pattern, path = path, path[:first].rpartition("/")[0]
    try:
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException) as err:
        raise SourceError(f"cannot list {uri}: {describe(err)}") from err
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{'list file' if from_list else 'source'} not found: {uri}")
    if info.type == pafs.FileType.Unknown:  # a FIFO, socket or device (local): reading it could wait forever
        raise SourceError(f"{'list file' if from_list else 'source'} {uri} is not a regular file "
                          f"({file_kind(os.stat(path).st_mode)}): name a file or a folder")
    return fs, path, pattern, info


def check_source(uri: str, storage: Storage, from_list: bool) -> None:
    """Fail fast, before any work, on a source that does not exist, cannot be reached,
    or is an archive that is not read."""
    _, path, pattern, info = _source_root(uri, storage, from_list)
    why = None if from_list or pattern or info.type != pafs.FileType.File else unread_archive(uri)
    if why:
        raise SourceError(why)


@dataclass(frozen=True)
class Container:
    """A file that holds many images: a WebDataset tar (``rows`` None: known once read)
    or one row group of a Parquet table of images."""

    uri: str
    size: int
    mtime_ns: int
    rows: int | None = None
    row_group: int = 0
    first_row: int = 0  # the row group's first row's number in the file


# WebDataset shards: tars, plain or compressed (webdataset reads them all; so does tarfile's stream mode).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# Archives that cannot be streamed member by member, or that no WebDataset writer makes.
_UNREAD_ARCHIVES = (".zip", ".7z", ".rar", ".tar.zst", ".tar.lz4", ".gz", ".bz2", ".xz", ".zst")


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def unread_archive(name: str) -> str | None:
    """Why a file that is an archive visionbatch does not read is skipped (None for any other file)."""
    lower = name.lower()
    if is_tar_name(lower) or not lower.endswith(_UNREAD_ARCHIVES):
        return None
    return (f"{name} is an archive that is not read (WebDataset shards are {', '.join(TAR_SUFFIXES)}): extract it, "
            "or repack its images as tar shards")


def _iter_files(uri: str, storage: Storage, counts: ListingCounts, follow_symlinks: bool = False
                ) -> Iterator[tuple[pafs.FileSystem, list[str]]]:
    """The files under a file, folder, glob or prefix, in a deterministic order, in batches
    (a folder's files), with their filesystem."""
    fs, path, pattern, info = _source_root(uri, storage)
    if info.type == pafs.FileType.File and pattern is None:
        yield fs, [path]
        return
    walk = (_walk_local(path, counts, follow_symlinks) if isinstance(fs, pafs.LocalFileSystem)
            else _walk_remote(fs, path, uri))
    for names in walk:
        if pattern is not None:
            names = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        yield fs, names


def iter_source(uri: str, storage: Storage, counts: ListingCounts, follow_symlinks: bool = False
                ) -> Iterator[list[str] | Container]:
    """Image paths under a file, folder, glob or prefix, in a deterministic order, in
    batches (a folder's files); each ``.tar`` file met is a WebDataset :class:`Container`."""
    prefix = uri_prefix(uri)
    for fs, names in _iter_files(uri, storage, counts, follow_symlinks):
        images = [prefix + name for name in names if is_image_name(name)]
        tars = [name for name in names if is_tar_name(name)]
        skipped = len(names) - len(images) - len(tars)
        counts.skipped_non_image += skipped
        if skipped and counts.unread_archive is None:
            counts.unread_archive = next(filter(None, map(unread_archive, names)), None)
        if images:
            yield images
        for info in _file_infos(fs, tars, uri):
            yield Container(prefix + info.path, info.size, info.mtime_ns)


def _file_infos(fs: pafs.FileSystem, paths: list[str], uri: str) -> list[pafs.FileInfo]:
    """Size and modification time of files (a changed file is a changed shard)."""
    if not paths:
        return []
    try:
        return fs.get_file_info(paths)
    except (OSError, pa.ArrowException) as err:
        raise SourceError(f"cannot list {uri}: {describe(err)}") from err


def iter_tables(uri: str, storage: Storage, counts: ListingCounts, image_column: str,
                columns: tuple[str, ...], follow_symlinks: bool = False,
                label_column: str | None = None) -> Iterator[Container]:
    """The row groups of the Parquet files under a file, folder, glob or prefix, each
    checked for the image column and the other ``columns`` the job reads; the first
    table whose ``label_column`` holds class indices (integers without class names) is
    noted in ``counts``, for the start-up line."""
    import pyarrow.parquet as pq

    prefix = uri_prefix(uri)
    for fs, names in _iter_files(uri, storage, counts, follow_symlinks):
        tables = [name for name in names if name.lower().endswith(".parquet")]
        counts.skipped_non_image += len(names) - len(tables)
        for info in _file_infos(fs, tables, uri):
            try:
                with fs.open_input_file(info.path) as file:
                    metadata = pq.ParquetFile(file).metadata
            except (OSError, pa.ArrowException) as err:
                raise SourceError(f"cannot read {prefix + info.path}: {describe(err)}") from err
            schema = metadata.schema.to_arrow_schema()
            missing = [name for name in (image_column, *columns) if name not in schema.names]
            if missing:
                raise SourceError(f"{prefix + info.path} has no column {', '.join(map(repr, missing))} (columns: "
                                  f"{', '.join(schema.names)})")
            if (label_column and counts.index_labels is None and pa.types.is_integer(schema.field(label_column).type)
                    and class_names(schema, label_column) is None):
                counts.index_labels = (f"--label-column {label_column}: {prefix + info.path} gives its integers no "
                                       "class names (no Hugging Face ClassLabel feature): read as the model's class "
                                       "indices")
            first = 0
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                yield Container(prefix + info.path, info.size, info.mtime_ns, rows, group, first)
                first += rows


HF_FEATURES_KEY = b"huggingface"  # where Hugging Face datasets keeps a table's features in its schema metadata


def class_names(schema: pa.Schema, column: str) -> tuple[str, ...] | None:
    """The names a Hugging Face ``ClassLabel`` column's integers index (None for any other column)."""
    try:
        features = json.loads((schema.metadata or {}).get(HF_FEATURES_KEY, b"{}"))["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None
    feature = features.get(column) if isinstance(features, dict) else None
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return tuple(map(str, feature["names"]))
    return None


def image_location(path: str, table_uri: str) -> str:
    """Where a table's image struct ``path`` points: an absolute path or URI as it is, a
    relative path from the table's folder (where a dataset keeps its files beside its tables)."""
    if path.startswith("/") or "://" in path:
        return path
    scheme, sep, rest = table_uri.rpartition("://")
    return scheme + sep + posixpath.normpath(posixpath.join(posixpath.dirname(rest), path))


def _walk_local(root: str, counts: ListingCounts, follow_symlinks: bool = False) -> Iterator[list[str]]:
    """Depth first with os.scandir, which knows an entry's type without a stat per file.

    Folder symlinks make cycles and second spellings of the same file, so by default
    they are not followed. ``follow_symlinks`` follows those that lead out of the root
    (a link into the root leads where the walk goes anyway), each folder at most once,
    by (device, inode): every file keeps one path. FIFOs, sockets and devices are
    counted and never opened.
    """
    real_root = os.path.realpath(root)
    visited: set[tuple[int, int]] = set()  # folders walked, when links are followed: the number of folders

    def new_folder(path: str) -> bool:
        if not follow_symlinks:
            return True
        try:
            info = os.stat(path)
        except OSError:
            return False
        key = (info.st_dev, info.st_ino)
        if key in visited:
            return False
        visited.add(key)
        return True

    stack = [root]
    while stack:
        folder = stack.pop()
        if not new_folder(folder):
            counts.skipped_folder_links += 1
            continue
        files, folders = [], []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            folders.append(entry.path)
                        elif entry.is_file():  # a regular file, or a symlink to one
                            files.append(entry.path)
                        elif entry.is_dir():  # a folder symlink
                            if follow_symlinks and not _inside(os.path.realpath(entry.path), real_root):
                                folders.append(entry.path)
                            else:
                                counts.skipped_folder_links += 1
                        else:  # FIFO, socket, device, broken link
                            counts.skip_special(entry.path)
                    except OSError:
                        continue
        except OSError as err:
            if folder == root:
                raise SourceError(f"cannot list {root}: {describe(err)}") from err
            continue  # a folder removed or unreadable meanwhile: its files cannot be classified
        named = [path for path in sorted(files) if _utf8(path)]
        counts.undecodable_names += len(files) - len(named)
        yield named
        stack.extend(sorted(folders, reverse=True))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:  # surrogate escapes of a name that is not UTF-8
        return False


def _walk_remote(fs: pafs.FileSystem, root: str, uri: str) -> Iterator[list[str]]:
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
        yield files
        stack.extend(folders)


def iter_list_file(list_uri: str, storage: Storage, counts: ListingCounts, cwd: str, column: str = "path",
                   keep: tuple[str, ...] = ()) -> Iterator[tuple[list[str], pa.Table | None]]:
    """Image paths and URLs from a text file (one per line) or a CSV/Parquet file with a
    ``column`` of them, read as a stream of batches, with the ``keep`` columns of the
    same entries (None when there are none). Relative local paths are taken relative to
    ``cwd``. An entry with a scheme (``http://``, ``file://``) is kept whatever its name:
    the decode stage downloads http(s) and refuses the rest with an error row.

    Lists run to 100M entries, so each batch is sifted with Arrow's vectorised string
    kernels; only entries that need it (relative, or not normal) go through os.path.
    """
    for batch in _iter_list_batches(list_uri, storage, column, keep):
        entries = pc.utf8_trim_whitespace(batch.column(column).cast(pa.string()))
        images = pc.or_(pc.match_substring_regex(entries, _IMAGE_NAME, ignore_case=True),
                        pc.match_substring_regex(entries, _URL))
        images = pc.fill_null(images, False)
        counts.skipped_non_image += pc.sum(pc.and_(pc.invert(images), pc.not_equal(entries, ""))).as_py() or 0
        entries = entries.filter(images)
        absolute = pc.and_(pc.starts_with(entries, "/"), pc.invert(pc.match_substring_regex(entries, _UNNORMAL)))
        normal = pc.or_(absolute, pc.match_substring_regex(entries, _URL))
        paths = entries.to_pylist()
        if not pc.all(normal).as_py():
            paths = [path if ok else _local_path(path, cwd) for path, ok in zip(paths, normal.to_pylist())]
        yield paths, (pa.Table.from_batches([batch.select(list(keep))]).filter(images) if keep else None)


def _local_path(path: str, cwd: str) -> str:
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


def _iter_list_batches(list_uri: str, storage: Storage, column: str, keep: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
    fs, path, _, _ = _source_root(list_uri, storage, from_list=True)
    lower = path.lower()
    wanted = [column, *keep]
    try:
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(fs.open_input_file(path))
            names = parquet.schema_arrow.names
            missing = [name for name in wanted if name not in names]
            if missing:
                raise SourceError(f"{list_uri} has no {', '.join(map(repr, missing))} column (columns: "
                                  f"{', '.join(names)})")
            yield from parquet.iter_batches(batch_size=_LIST_BATCH_ROWS, columns=wanted)
            return
        import pyarrow.csv as pacsv

        if lower.endswith(".csv"):  # only the columns read, as text: the same type in every batch
            reader = pacsv.open_csv(fs.open_input_stream(path), convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in wanted}, include_columns=wanted))
        else:  # one path per line: read as a one-column CSV that has no quoting and no delimiter
            if keep:
                raise SourceError(f"--keep-columns needs a CSV or Parquet list; {list_uri} is a text list")
            reader = pacsv.open_csv(
                fs.open_input_stream(path),
                read_options=pacsv.ReadOptions(column_names=[column], block_size=1 << 22),
                parse_options=pacsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False),
                convert_options=pacsv.ConvertOptions(column_types={column: pa.string()}))
        yield from reader
    except SourceError:
        raise
    except (OSError, pa.ArrowException) as err:
        raise SourceError(f"cannot read list {list_uri}: {describe(err)}") from err

