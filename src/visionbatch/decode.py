"""Decode: bytes -> an RGB Pillow image, or a typed error kept as data.

Decoding mirrors ``transformers.image_utils.load_image`` (Pillow open, EXIF
orientation, ``convert("RGB")``) so predictions match the reference pipeline, but it
never raises past this module: every failure becomes a :class:`DecodeError` whose
``kind`` ends up in the result row and the summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import resource
import time
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from visionbatch.config import DEFAULT_READ_TIMEOUT_S, MAX_MADE_PIXELS
from visionbatch.labels import LabelResolver, folder_of
from visionbatch.preprocess import Drafted, Preprocessing, made_pixels, pixel_layout, prepare_image
from visionbatch.results import KEY_COLUMN, ROW_COLUMN, SHA256, SHARD_COLUMN, SHARD_DIGEST_COLUMN, SHARD_ROWS_COLUMN
from visionbatch.samples import Reading, Sample, read_ahead, shard_samples
from visionbatch.shards import Shard, TarShard, describe_shard
from visionbatch.storage import Storage, describe

# Formats Pillow may try. Everything else (EPS/PDF via Ghostscript, exotic plugins)
# is refused before any decoder runs. (The JPEG opener also reads MPO, the
# multi-picture JPEG that phones write.)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
Image.init()  # register every plugin up front: open(formats=...) looks each name up
# Pillow's bomb check (an error at twice its own limit) is replaced by ours, which reads
# the header and applies the user's --max-pixels before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image by 90 degrees (exif_transpose)


class DecodeError(Exception):
    """A file that could not become an image; ``kind`` is a short stable category."""

    def __init__(self, kind: str, message: str, size: tuple[int, int] | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.size = size  # (width, height) when the header was readable


def decode_image(data: bytes, max_pixels: int, draft_side: int | None = None,
                 preprocessing: Preprocessing | None = None) -> tuple[Image.Image, tuple[int, int], Drafted | None]:
    """Open, check the pixel count from the header, decode, orient and convert to RGB;
    the file's (width, height) as oriented; and, where the JPEG was decoded at a
    reduced scale, what the resize needs to know about it (else None).

    ``preprocessing``: what will be made of the image, checked from the header too: a
    file from which it would make an image of more than ``MAX_MADE_PIXELS`` is refused.

    ``draft_side``: a JPEG may be decoded at a reduced scale (Pillow's ``draft``: the
    DCT-domain downscaling of libjpeg) as long as both sides stay at least this long.
    """
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
    made = made_pixels(width, height, preprocessing) if preprocessing is not None else 0
    if made > MAX_MADE_PIXELS:
        raise DecodeError("too_large", f"{width}x{height}: preprocessing for this model would make an image of {made} "
                          f"pixels, more than {MAX_MADE_PIXELS}", size=(width, height))
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        box = None  # where the file's own edges fall in a reduced-scale decode
        if draft_side and image.format == "JPEG":
            # Scaled by s, the image is ceil(w / s) x ceil(h / s): the last row and column
            # may be part-filled. (draft gives None where it cannot reduce this file.)
            configured = image.draft("RGB", (draft_side, draft_side))
            if configured and image.size != (width, height):
                box = oriented_box(configured[1], image.size, orientation)
        if orientation in _SWAPS_SIDES:
            width, height = height, width
        image.load()  # the first frame of an animation
        # Each of these copies the whole image even where it has nothing to do (~4% of
        # a 500x375 JPEG's decode and resize).
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image, (width, height), Drafted(box, (width, height)) if box else None
    except MemoryError:
        raise _out_of_memory("decoding", (width, height)) from None
    except OSError as err:
        kind = "truncated" if "truncated" in str(err).lower() else "decode_error"
        raise DecodeError(kind, describe(err), size=(width, height)) from None
    except Exception as err:
        raise DecodeError("decode_error", describe(err), size=(width, height)) from None


def _out_of_memory(stage: str, size: tuple[int, int]) -> DecodeError:
    limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
    cap = "" if limit == resource.RLIM_INFINITY else f" (this process may allocate {limit / 2**30:.1f} GiB)"
    return DecodeError("too_large", f"out of memory while {stage}{cap}", size=size)


def limit_memory(limit: int) -> int:
    """Cap this process's private memory (RLIMIT_DATA, what malloc, numpy and Pillow
    allocate from) at ``limit`` bytes, or keep a lower cap already set; returns the cap
    that was set before, to restore. An allocation past it raises MemoryError, which
    :func:`decode_file` makes a ``too_large`` row. Not RLIMIT_AS: a Ray worker maps the
    object store (~9 GB of address space) and every thread reserves arenas and a stack."""
    previous, hard = resource.getrlimit(resource.RLIMIT_DATA)
    capped = [cap for cap in (limit, previous, hard) if cap != resource.RLIM_INFINITY]
    resource.setrlimit(resource.RLIMIT_DATA, (min(capped), hard))
    return previous


@contextlib.contextmanager
def memory_limited(limit: int):
    """:func:`limit_memory` while inside: for a task in a worker process that other
    tasks and actors reuse afterwards (Ray's)."""
    previous = limit_memory(limit)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (previous, resource.getrlimit(resource.RLIMIT_DATA)[1]))


def oriented_box(box: tuple[float, float, float, float], size: tuple[int, int], orientation: int
                 ) -> tuple[float, float, float, float]:
    """``box`` (left, upper, right, lower) in an image of ``size`` (width, height), after
    the image is turned as EXIF ``orientation`` says (as ``ImageOps.exif_transpose`` does)."""
    x0, y0, x1, y1 = box
    w, h = size
    if orientation in (2, 3, 7, 8):  # mirrored left-right before any turn
        x0, x1 = w - x1, w - x0
    if orientation in (3, 4, 6, 7):  # mirrored top-bottom before any turn
        y0, y1 = h - y1, h - y0
    if orientation in _SWAPS_SIDES:  # then mirrored across the diagonal
        x0, y0, x1, y1 = y0, x0, y1, x1
    return x0, y0, x1, y1


def decode_file(path: str, data: bytes | str, spec: Preprocessing, max_pixels: int, draft_side: int | None = None
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
        image, (width, height), drafted = decode_image(data, max_pixels, draft_side, spec)
    except DecodeError as err:
        width, height = err.size or (-1, -1)
        return None, width, height, str(err)
    try:
        return prepare_image(image, spec, drafted), width, height, ""
    except MemoryError:
        return None, width, height, str(_out_of_memory("preprocessing", (width, height)))
    except Exception as err:  # a resize of a pathological image must not take the batch down
        return None, width, height, f"preprocess_error: {describe(err)}"


def decode_batch(batch: dict[str, np.ndarray], *, spec: Preprocessing, max_pixels: int,
                 storage: Storage = Storage(), max_bytes: int | None = None,
                 read_timeout: float = DEFAULT_READ_TIMEOUT_S, draft_side: int | None = None) -> dict[str, np.ndarray]:
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
        image, widths[i], heights[i], errors[i] = decode_file(path, data, spec, max_pixels, draft_side)
        if image is not None:
            pixels[i] = image
    seconds = np.full(n, (time.perf_counter() - started) / max(n, 1))  # this stage's share, per row
    return {**batch, "width": widths, "height": heights, "error": errors, "pixels": pixels, "decode_seconds": seconds}


def decode_shards(next_shard: Callable[[], object], *, spec: Preprocessing, max_pixels: int, reading: Reading,
                  labels: LabelResolver | None, batch_size: int, draft_side: int | None = None) -> Iterator[pa.Table]:
    """The CPU stage: take shards until there are none; yield model-ready blocks.

    Each block holds up to ``batch_size`` decoded images and the failed rows met on the
    way. Every row carries its shard, its index in the shard and the shard's size, from
    which the writer knows when a shard is whole. A shard whose size is known only once
    read (a tar) says -1 until its last block, which is held back until the shard ends so
    that it always has rows to say the size with. ``draft_side``: see :func:`decode_image`.
    """
    while (shard := next_shard()) is not None:
        yield from _decode_shard(shard, spec, max_pixels, reading, labels, batch_size, draft_side)


def crash_block(shard, rows: list[int], error: str, reading: Reading, labels: LabelResolver | None) -> pa.Table:
    """Rows of ``shard`` that no task finished, as a block of error rows that the writer
    takes as it takes decoded ones (a tar's or a table's shard, whose rows are not
    known without reading it: one row naming its file)."""
    if isinstance(shard, Shard):
        true_label = _true_labels(reading, labels)
        made = [(row, shard.paths[row], true_label(Sample(shard.paths[row], error)), None, None, None, -1, -1, error)
                for row in rows]
        return _BlockMaker(shard, shard.columns)(made, 0.0, size=len(shard.paths))
    return _BlockMaker(shard, None)([(0, describe_shard(shard), None, None, None, None, -1, -1, error)], 0.0,
                                    size=1)


def _true_labels(reading: Reading, labels: LabelResolver | None) -> Callable[[Sample], str | None]:
    """A sample's true label: its label column's value, or its folder's label."""
    by_folder: dict[str, str | None] = {}

    def true_label(sample: Sample) -> str | None:
        if labels is None:
            return None
        if reading.label_column:
            return labels.of_value(sample.label)
        folder = folder_of(sample.path)
        if folder not in by_folder:
            by_folder[folder] = labels(folder)
        return by_folder[folder]

    return true_label


def _decode_shard(shard, spec, max_pixels, reading: Reading, labels, batch_size: int,
                  draft_side: int | None) -> Iterator[pa.Table]:
    samples, kept = shard_samples(shard, reading)
    true_label = _true_labels(reading, labels)
    block = _BlockMaker(shard, kept)
    held = None  # a full block of a shard of unknown size, until the next row or the end
    rows: list = []
    images, index = 0, 0
    started = time.perf_counter()
    first = shard.only_row or 0 if isinstance(shard, Shard) else 0  # a piece's one row is its row in the shard
    for index, sample in enumerate(samples, start=first):
        if held is not None:
            yield block(*held, size=-1)
            held = None
        rows.append((index, sample.path, true_label(sample), sample.key, _sha256(sample.data),
                     *decode_file(sample.path, sample.data, spec, max_pixels, draft_side)))
        images += rows[-1][5] is not None
        if images == batch_size:
            made = (rows, (time.perf_counter() - started) / len(rows))
            if shard.rows is None:
                held = made
            else:
                yield block(*made, size=shard.rows)
            rows, images, started = [], 0, time.perf_counter()
    size = index + 1 if shard.rows is None else shard.rows
    if held is not None:
        yield block(*held, size=size)
    if rows:
        yield block(rows, (time.perf_counter() - started) / len(rows), size=size)


class _BlockMaker:
    def __init__(self, shard, kept: pa.Table | None):
        self.shard, self.kept = shard, kept
        self.keyed = isinstance(shard, TarShard)

    def __call__(self, rows, seconds_per_row: float, size: int) -> pa.Table:
        """Rows of one shard as a table; the decoded images go in one binary column whose
        data buffer is the images back to back (a failed row holds no bytes), so a block
        has one schema whatever failed, and the model stage reads the images without a copy."""
        index, paths, truths, keys, digests, images, widths, heights, errors = zip(*rows)
        n = len(rows)
        sizes = np.array([0 if image is None else image.nbytes for image in images], dtype=np.int64)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        decoded = [image.reshape(-1).view(np.uint8) for image in images if image is not None]
        data = np.concatenate(decoded) if decoded else np.zeros(0, dtype=np.uint8)
        pixels = pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
        columns = {
            SHARD_COLUMN: pa.array([self.shard.id] * n, pa.string()),
            ROW_COLUMN: pa.array(index, pa.int32()),
            SHARD_ROWS_COLUMN: pa.array([size] * n, pa.int32()),
            SHARD_DIGEST_COLUMN: pa.array([self.shard.digest] * n, pa.string()),
            "path": pa.array(paths, pa.string()),
            "true_label": pa.array(truths, pa.string()),
            "width": _size_column(widths),
            "height": _size_column(heights),
            "error": pa.array([error or None for error in errors], pa.string()),
            SHA256: pa.array(digests, pa.string()),
            "pixels": pixels,
            "decode_seconds": pa.array(np.full(n, seconds_per_row)),
        }
        if self.keyed:
            columns[KEY_COLUMN] = pa.array(keys, pa.string())
        if self.kept is not None:
            taken = self.kept.take(pa.array(index, pa.int64()))
            columns.update(zip(taken.column_names, taken.columns))
        return pa.table(columns)


def _sha256(data: bytes | str) -> str | None:
    """A file's bytes' digest (None for a read error: ``data`` is its text)."""
    return hashlib.sha256(data).hexdigest() if isinstance(data, bytes) else None


def _size_column(values) -> pa.Array:
    values = np.array(values, dtype=np.int32)
    return pa.array(values, pa.int32(), mask=values < 0)  # -1: unknown
