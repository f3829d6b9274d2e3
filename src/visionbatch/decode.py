"""Decode: bytes -> an RGB Pillow image, or a typed error kept as data.

Decoding mirrors ``transformers.image_utils.load_image`` (Pillow open, EXIF
orientation, ``convert("RGB")``) so predictions match the reference pipeline, but it
never raises past this module: every failure becomes a :class:`DecodeError` whose
``kind`` ends up in the result row and the summary.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import os
import threading
import time
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from visionbatch.config import DEFAULT_READ_TIMEOUT_S
from visionbatch.labels import LabelResolver, folder_of
from visionbatch.preprocess import Preprocessing, pixel_layout, prepare_image
from visionbatch.results import ROW_COLUMN, SHARD_COLUMN, SHARD_ROWS_COLUMN
from visionbatch.storage import Storage, describe

# Formats Pillow may try. Everything else (EPS/PDF via Ghostscript, exotic plugins)
# is refused before any decoder runs. (The JPEG opener also reads MPO, the
# multi-picture JPEG that phones write.)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
Image.init()  # register every plugin up front: open(formats=...) looks each name up
# Pillow's bomb check (an error at twice its own limit) is replaced by ours, which reads
# the header and applies the user's --max-pixels before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None
READ_AHEAD = 16  # reads in flight per decode task


class DecodeError(Exception):
    """A file that could not become an image; ``kind`` is a short stable category."""

    def __init__(self, kind: str, message: str, size: tuple[int, int] | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.size = size  # (width, height) when the header was readable


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open, check the pixel count from the header, decode, orient and convert to RGB."""
    if not data:
        raise DecodeError("empty_file", "file has 0 bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", "not a recognised image format (allowed: "
                          + ", ".join(ALLOWED_FORMATS) + ")") from None
    except Exception as err:  # Pillow raises many types on malformed headers
        raise DecodeError("decode_error", describe(err)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError("too_large", f"{width}x{height} = {width * height} pixels exceeds --max-pixels "
                          f"{max_pixels}", size=(width, height))
    try:
        image.load()  # the first frame of an animation
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except OSError as err:
        kind = "truncated" if "truncated" in str(err).lower() else "decode_error"
        raise DecodeError(kind, describe(err), size=(width, height)) from None
    except Exception as err:
        raise DecodeError("decode_error", describe(err), size=(width, height)) from None


def read_file(path: str, storage: Storage, max_bytes: int | None = None) -> bytes | str:
    """A file's bytes, or its ``read_error`` text (never raises)."""
    try:
        return storage.read(path, max_bytes)
    except Exception as err:  # missing, permission, network: keep the row
        return f"read_error: {describe(err)}"


def read_ahead(paths, storage: Storage, max_bytes: int | None, timeout: float = DEFAULT_READ_TIMEOUT_S,
               window: int = READ_AHEAD) -> Iterator[bytes | str]:
    """:func:`read_file` of each path, in order, with up to ``window`` reads in flight:
    object-store requests wait on the network for tens of ms each, and pyarrow's reads
    release the GIL, so a few threads hide that latency behind decoding.

    A read not done ``timeout`` seconds after it started gives a ``read_error`` (a hung
    mount or server must not hold the shard forever). Its thread cannot be stopped, so
    each read has a daemon thread of its own: one left hanging blocks neither the next
    reads nor the process's exit.
    """
    pending: collections.deque = collections.deque()

    def result(read: tuple[concurrent.futures.Future, float]) -> bytes | str:
        future, deadline = read
        try:
            return future.result(max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            return f"read_error: timed out after {timeout:g} s (--read-timeout)"

    for path in paths:
        pending.append(_start_read(path, storage, max_bytes, timeout))
        if len(pending) >= window:
            yield result(pending.popleft())
    while pending:
        yield result(pending.popleft())


def _start_read(path: str, storage: Storage, max_bytes: int | None, timeout: float):
    future: concurrent.futures.Future = concurrent.futures.Future()
    thread = threading.Thread(target=lambda: future.set_result(read_file(path, storage, max_bytes)),
                              daemon=True, name="visionbatch-read")
    thread.start()
    return future, time.monotonic() + timeout


def decode_file(path: str, data: bytes | str, spec: Preprocessing, max_pixels: int
                ) -> tuple[np.ndarray | None, int, int, str]:
    """One file's bytes (or its read error) -> (the model stage's pixels for it or None,
    width, height, error).

    Never raises: a file that cannot be read or decoded gives its error text ("" for
    none) and whatever size its header told (-1 where unknown).
    """
    crash_on = os.environ.get("VISIONBATCH_FAILPOINT_EXIT_ON")
    if crash_on and crash_on in path:  # a failpoint for fault tests: die like a segfaulting decoder
        os._exit(70)
    if isinstance(data, str):
        return None, -1, -1, data
    try:
        image = decode_image(data, max_pixels)
    except DecodeError as err:
        width, height = err.size or (-1, -1)
        return None, width, height, str(err)
    try:
        return prepare_image(image, spec), image.width, image.height, ""
    except Exception as err:  # a resize of a pathological image must not take the batch down
        return None, image.width, image.height, f"preprocess_error: {describe(err)}"


def decode_batch(batch: dict[str, np.ndarray], *, spec: Preprocessing, max_pixels: int,
                 storage: Storage = Storage(), max_bytes: int | None = None,
                 read_timeout: float = DEFAULT_READ_TIMEOUT_S) -> dict[str, np.ndarray]:
    """Paths in; model-ready pixels, sizes and errors out, one row per path.

    Rows that fail keep zero pixels and their ``error``; other input columns pass
    through. Between stages "" stands for "no error": an all-None string column does
    not survive Ray's numpy/Arrow round trip as strings.
    """
    started = time.perf_counter()
    n = len(batch["path"])
    shape, dtype = pixel_layout(spec)
    pixels = np.zeros((n, *shape), dtype=dtype)
    widths, heights = np.full(n, -1, dtype=np.int32), np.full(n, -1, dtype=np.int32)
    errors = np.full(n, "", dtype=object)
    paths = batch["path"]
    for i, (path, data) in enumerate(zip(paths, read_ahead(paths, storage, max_bytes, read_timeout))):
        image, widths[i], heights[i], errors[i] = decode_file(path, data, spec, max_pixels)
        if image is not None:
            pixels[i] = image
    seconds = np.full(n, (time.perf_counter() - started) / max(n, 1))  # this stage's share, per row
    return {**batch, "width": widths, "height": heights, "error": errors, "pixels": pixels, "decode_seconds": seconds}


def decode_shards(next_shard: Callable[[], object], *, spec: Preprocessing, max_pixels: int, storage: Storage,
                  labels: LabelResolver | None, batch_size: int, max_bytes: int | None = None,
                  read_timeout: float = DEFAULT_READ_TIMEOUT_S) -> Iterator[pa.Table]:
    """The CPU stage: take shards until there are none; yield model-ready blocks.

    Each block holds up to ``batch_size`` decoded images (one forward pass) and the
    failed rows met on the way. Every row carries its shard, its index in the shard and
    the shard's size, from which the writer knows when a shard is whole.
    """
    while (shard := next_shard()) is not None:
        yield from _decode_shard(shard, spec, max_pixels, storage, labels, batch_size, max_bytes, read_timeout)


def _decode_shard(shard, spec, max_pixels, storage, labels, batch_size, max_bytes, read_timeout
                  ) -> Iterator[pa.Table]:
    by_folder: dict[str, str | None] = {}

    def true_label(path: str) -> str | None:
        folder = folder_of(path)
        if folder not in by_folder:
            by_folder[folder] = labels(folder) if labels else None
        return by_folder[folder]

    rows: list[tuple[int, np.ndarray | None, int, int, str]] = []
    images = 0
    started = time.perf_counter()
    for i, (path, data) in enumerate(zip(shard.paths, read_ahead(shard.paths, storage, max_bytes, read_timeout))):
        rows.append((i, *decode_file(path, data, spec, max_pixels)))
        images += rows[-1][1] is not None
        if images == batch_size:
            yield _block(shard, rows, true_label, (time.perf_counter() - started) / len(rows))
            rows, images, started = [], 0, time.perf_counter()
    if rows:
        yield _block(shard, rows, true_label, (time.perf_counter() - started) / len(rows))


def _block(shard, rows, true_label, seconds_per_row: float) -> pa.Table:
    """Rows of one shard as a table; the decoded images go in one binary column whose
    data buffer is the images back to back (a failed row holds no bytes), so a block
    has one schema whatever failed, and the model stage reads the images without a copy."""
    index, images, widths, heights, errors = zip(*rows)
    n = len(rows)
    sizes = np.array([0 if image is None else image.nbytes for image in images], dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    decoded = [image.reshape(-1).view(np.uint8) for image in images if image is not None]
    data = np.concatenate(decoded) if decoded else np.zeros(0, dtype=np.uint8)
    pixels = pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    return pa.table({
        SHARD_COLUMN: pa.array([shard.id] * n, pa.string()),
        ROW_COLUMN: pa.array(index, pa.int32()),
        SHARD_ROWS_COLUMN: pa.array([len(shard.paths)] * n, pa.int32()),
        "path": pa.array([shard.paths[i] for i in index], pa.string()),
        "true_label": pa.array([true_label(shard.paths[i]) for i in index], pa.string()),
        "width": _size_column(widths),
        "height": _size_column(heights),
        "error": pa.array([error or None for error in errors], pa.string()),
        "pixels": pixels,
        "decode_seconds": pa.array(np.full(n, seconds_per_row)),
    })


def _size_column(values) -> pa.Array:
    values = np.array(values, dtype=np.int32)
    return pa.array(values, pa.int32(), mask=values < 0)  # -1: unknown
