"""Sources: turn what the user named into a list of image files.

Storage goes through pyarrow filesystems (what Ray Data itself uses): local disk,
``s3://`` (with ``s3://anonymous@bucket/...`` for public buckets and an optional
S3-compatible endpoint) and ``gs://``. Workers re-open files by URI, so the
filesystem is rebuilt from plain, secret-free values on each worker (credentials come
from the worker's own environment, never through Ray's object store).
"""

from __future__ import annotations

import fnmatch
import functools
import io
import logging
import os
import urllib.parse
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from visionbatch.config import IMAGE_EXTENSIONS


class SourceError(Exception):
    """A source cannot be listed or read (missing, unreachable, malformed)."""


@dataclass(frozen=True)
class Listing:
    """The image files found, and how many other files were passed over."""

    paths: list[str]
    skipped_non_image: int


_GLOB_CHARS = "*?["


def is_remote(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("s3", "gs", "gcs")


def s3_endpoint_from_env(explicit: str | None) -> str | None:
    """The S3-compatible endpoint: the explicit option, else the standard AWS variable."""
    endpoint = explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "@" in urllib.parse.urlparse(endpoint).netloc:
        raise SourceError("refusing an S3 endpoint URL with embedded credentials: pass credentials through "
                          "the environment (AWS_ACCESS_KEY_ID, ...) instead")
    return endpoint


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, anonymous: bool, endpoint: str | None) -> pafs.FileSystem:
    if scheme == "s3":
        options: dict = {
            "anonymous": anonymous,
            # Transient errors (SlowDown, 503, resets) are retried by the AWS SDK.
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=10),
        }
        if endpoint:
            parsed = urllib.parse.urlparse(endpoint)
            options["endpoint_override"] = parsed.netloc or parsed.path
            options["scheme"] = parsed.scheme or "https"
            options.setdefault("region", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
            options["force_virtual_addressing"] = False
        return pafs.S3FileSystem(**options)
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(anonymous=anonymous)
    return pafs.LocalFileSystem()


def resolve(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """Map a URI or local path to (filesystem, path inside it)."""
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("s3", "gs", "gcs"):
        anonymous = False
        if "@" in parsed.netloc:
            userinfo, _, bucket = parsed.netloc.rpartition("@")
            if userinfo != "anonymous":
                raise SourceError(
                    f"refusing a URI with embedded credentials ({scheme}://***@{bucket}/...): "
                    "pass credentials through the environment (AWS_ACCESS_KEY_ID, ...) instead"
                )
            anonymous = True
        else:
            bucket = parsed.netloc
        if not bucket:
            raise SourceError(f"no bucket in {uri!r}")
        endpoint = s3_endpoint_from_env(s3_endpoint) if scheme == "s3" else None
        return _filesystem(scheme, anonymous, endpoint), f"{bucket}/{parsed.path.lstrip('/')}".rstrip("/")
    if scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive letter
        path = parsed.path if scheme == "file" else uri
        return _filesystem("local", False, None), os.path.abspath(os.path.expanduser(path))
    raise SourceError(f"unsupported storage scheme {scheme!r} in {uri!r} (use a local path, s3:// or gs://)")


def _uri_prefix(uri: str) -> str:
    """'s3://anonymous@bucket/x' -> 's3://anonymous@'; local -> ''."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme.lower() in ("s3", "gs", "gcs"):
        userinfo = parsed.netloc.rpartition("@")[0]
        return f"{parsed.scheme}://" + (f"{userinfo}@" if userinfo else "")
    return ""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _describe(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:300]


def _list_one(uri: str, s3_endpoint: str | None) -> tuple[list[str], int]:
    fs, path = resolve(uri, s3_endpoint)
    prefix = _uri_prefix(uri)
    pattern = None
    if any(c in path for c in _GLOB_CHARS):
        first = min(path.index(c) for c in _GLOB_CHARS if c in path)
        pattern, path = path, path[:first].rpartition("/")[0]
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"source not found: {uri}")
        if info.type == pafs.FileType.File and pattern is None:
            return ([prefix + path], 0) if is_image_name(path) else ([], 1)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except SourceError:
        raise
    except (OSError, pa.ArrowException) as err:
        raise SourceError(f"cannot list {uri}: {_describe(err)}") from err
    images, skipped, undecodable = [], 0, 0
    for entry in infos:
        if entry.type != pafs.FileType.File:
            continue  # folders, even ones named like images
        try:
            name = entry.path
        except UnicodeDecodeError:  # a name that is not UTF-8 cannot be a result row's path
            undecodable += 1
            continue
        if pattern is not None and not fnmatch.fnmatchcase(name, pattern):
            continue
        if is_image_name(name):
            images.append(prefix + name)
        else:
            skipped += 1
    if undecodable:
        logging.getLogger("visionbatch").warning(
            "skipped %d file(s) under %s whose names are not valid UTF-8 (rename them to classify them)",
            undecodable, uri)
    return images, skipped + undecodable


def read_path_list(list_uri: str, s3_endpoint: str | None = None) -> list[str]:
    """Paths from a text file (one per line) or a CSV/Parquet file with a ``path`` column."""
    fs, path = resolve(list_uri, s3_endpoint)
    lower = path.lower()
    try:
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path, filesystem=fs, columns=["path"])
            return [p for p in table.column("path").to_pylist() if p]
        with fs.open_input_stream(path) as stream:
            data = stream.read()
    except (OSError, pa.ArrowException, KeyError) as err:
        raise SourceError(f"cannot read list {list_uri}: {_describe(err)}") from err
    if lower.endswith(".csv"):
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(io.BytesIO(data))
        if "path" not in table.column_names:
            raise SourceError(f"{list_uri} has no 'path' column (columns: {', '.join(table.column_names)})")
        return [p for p in table.column("path").to_pylist() if p]
    return [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]


def list_images(sources: tuple[str, ...], *, from_list: bool = False, s3_endpoint: str | None = None) -> Listing:
    """All image files under the sources, sorted and de-duplicated."""
    found: set[str] = set()
    skipped = 0
    if from_list:
        for list_uri in sources:
            for entry in read_path_list(list_uri, s3_endpoint):
                if is_image_name(entry):
                    found.add(entry if is_remote(entry) else os.path.abspath(os.path.expanduser(entry)))
                else:
                    skipped += 1
    else:
        for uri in sources:
            images, n_skipped = _list_one(uri, s3_endpoint)
            found.update(images)
            skipped += n_skipped
    return Listing(paths=sorted(found), skipped_non_image=skipped)


def open_and_read(uri: str, s3_endpoint: str | None = None, max_bytes: int | None = None) -> bytes:
    """Read a whole file by URI; raises OSError-like errors for the caller to record."""
    fs, path = resolve(uri, s3_endpoint)
    with fs.open_input_stream(path) as stream:
        if max_bytes is None:
            return stream.read()
        data = stream.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise OSError(f"file larger than {max_bytes} bytes")
        return data
