"""Decode: bytes -> an RGB Pillow image, or a typed error kept as data.

Decoding mirrors ``transformers.image_utils.load_image`` (Pillow open, EXIF
orientation, ``convert("RGB")``) so predictions match the reference pipeline, but it
never raises past this module: every failure becomes a :class:`DecodeError` whose
``kind`` ends up in the result row and the summary.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from visionbatch.preprocess import PreprocessSpec, preprocess
from visionbatch.sources import open_and_read

# Formats Pillow may try. Everything else (EPS/PDF via Ghostscript, exotic plugins)
# is refused before any decoder runs. (The JPEG opener also reads MPO, the
# multi-picture JPEG that phones write.)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
Image.init()  # register every plugin up front: open(formats=...) looks each name up
# Pillow's bomb check (an error at twice its own limit) is replaced by ours, which reads
# the header and applies the user's --max-pixels before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None


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
        raise DecodeError("decode_error", _first_line(err)) from None
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
        raise DecodeError(kind, _first_line(err), size=(width, height)) from None
    except Exception as err:
        raise DecodeError("decode_error", _first_line(err), size=(width, height)) from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    spec: PreprocessSpec,
    max_pixels: int,
    s3_endpoint: str | None = None,
) -> dict[str, np.ndarray]:
    """The CPU stage: paths in; model-ready uint8 pixels, sizes and errors out.

    A file that cannot be read or decoded keeps its row, with ``error`` set and zero
    pixels, so that rows out always equal files in. Other input columns (such as
    ``true_label``) pass through. Between stages "" stands for "no error": an
    all-None string column does not survive Ray's numpy/Arrow round trip as strings.
    """
    started = time.perf_counter()
    paths = batch["path"]
    n = len(paths)
    height, width = spec.output_size
    pixels = np.zeros((n, height, width, 3), dtype=np.uint8)
    widths = np.full(n, -1, dtype=np.int32)
    heights = np.full(n, -1, dtype=np.int32)
    errors = np.full(n, "", dtype=object)
    crash_on = os.environ.get("VISIONBATCH_FAILPOINT_EXIT_ON")
    for i, path in enumerate(paths):
        if crash_on and crash_on in path:  # a failpoint for fault tests: die like a segfaulting decoder
            os._exit(70)
        try:
            data = open_and_read(path, s3_endpoint)
        except Exception as err:  # missing, permission, network: keep the row
            errors[i] = f"read_error: {_first_line(err)}"
            continue
        try:
            image = decode_image(data, max_pixels)
            widths[i], heights[i] = image.size
            pixels[i] = preprocess(image, spec)
        except DecodeError as err:
            errors[i] = str(err)
            if err.size:
                widths[i], heights[i] = err.size
        except Exception as err:  # a resize of a pathological image must not take the batch down
            errors[i] = f"preprocess_error: {_first_line(err)}"
    seconds = np.full(n, (time.perf_counter() - started) / max(n, 1))  # this stage's share, per row
    return {**batch, "width": widths, "height": heights, "error": errors, "pixels": pixels, "decode_seconds": seconds}
