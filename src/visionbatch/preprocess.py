"""Preprocess: the model's image-processor config resolved once into a plain value,
then applied to decoded images on CPU workers.

Geometry (crop, resize, thumbnail, pad, crop, channel flip) runs here on uint8 pixels
exactly as transformers' PIL backend does it (the same Pillow ``resize`` calls with the
configured filter, the same centre-crop and padding arithmetic), so predictions match
``pipeline("image-classification")``. The per-channel affine part (rescale, normalise)
is left to the model stage, which applies it on its device: the array crossing between
stages stays uint8, four times smaller than float32.

:func:`resolve_spec` only reads the processor's settings; :func:`verify_spec` proves the
result against the processor itself, and :func:`resolve_checked_spec` does both. A
processor that fails the proof is served by :func:`processor_pixel_values` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

# Largest difference, in model-input units, between the processor's pixel_values and
# visionbatch's preprocess + affine that still counts as a match. Both sides run the same
# Pillow resize on the same uint8 pixels, so the geometry is bit-identical (measured in
# tests/test_preprocess_families.py: not one differing uint8 value over every fast-path
# family, 10 sample photos and the synthetic images); what remains is float32 rounding
# of the affine (processor: x * 1/255 in float64, then (x - mean) / std in float32;
# visionbatch: x * scale + offset in float32), measured at most 4.8e-7 (values span
# about +-2.6). One uint8 level, the smallest real geometry error, moves a value by
# rescale_factor / std >= 1/255 ~ 3.9e-3 for the usual image_std <= 1 (and stays above
# the tolerance up to std ~ 39). 1e-4 sits ~200x above the rounding, leaving room for
# the device's arithmetic (fused multiply-add), and ~40x below one level.
MATCH_TOLERANCE = 1e-4
# Output pixels verify_spec may ask of the processor. The whole check costs about 0.1 us
# per output pixel (measured: 224x224 x 7 images ~60 ms, Donut's 2560x1920 x 1 ~450 ms,
# single-threaded), so this keeps it well under a second.
CHECK_OUTPUT_PIXELS = 2_000_000
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale where that leaves at least DRAFT_MARGIN
# times the resize's output side (see draft_side). Measured on 1,000 4032-px photos with
# real weights (benchmarks/RESULTS.md, "Large photos"): 2 (1/4 scale) is 5.4x faster than
# a full decode, top-1 agreement 98.9%, accuracy +0.1 pt; 3 (1/2 scale) 3.4x, 99.3%, -0.2.
DRAFT_MARGIN = 2.0


class UnsupportedProcessor(ValueError):
    """The image processor does something visionbatch's fast path does not reproduce."""


@dataclass(frozen=True)
class PreprocessSpec:
    """What a model expects, as plain numbers. :func:`preprocess` applies the steps in
    field order: ``crop_before_resize``, ``resize``, ``thumbnail``, ``pad``, ``crop``,
    ``flip_channels``.

    ``crop_before_resize``: (height_ratio, width_ratio): centre crop
    ``int(ratio * shortest side)`` pixels before resizing (Perceiver), or None.
    ``resize``: ("exact", height, width) or ("shortest_edge", size, longest_edge or 0).
    ``thumbnail``: (height, width): shrink to fit inside, keeping the aspect (Donut).
    ``pad``: (height, width): zero-pad around the centred image (Donut).
    ``crop``: (height, width) centre crop, zero-padding smaller images, or None.
    ``flip_channels``: RGB -> BGR (MobileViT).
    ``scale``/``offset``: per-channel affine from uint8 to model input, indexed by the
    channels after any flip: ``x_model = x_uint8 * scale + offset`` (rescale, offset and
    normalisation folded).
    """

    resize: tuple[str, int, int] | None
    crop: tuple[int, int] | None
    resample: int
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]
    flip_channels: bool = False
    crop_before_resize: tuple[float, float] | None = None
    thumbnail: tuple[int, int] | None = None
    pad: tuple[int, int] | None = None

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every preprocessed image, or None if it varies."""
        if self.crop:
            return self.crop
        if self.pad:
            return self.pad
        if self.resize and self.resize[0] == "exact" and not self.thumbnail:
            return self.resize[1], self.resize[2]
        return None


def _size_dict(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, int):
        return {"height": value, "width": value}
    # a dict, or transformers' SizeDict, which iterates over its set (key, value) pairs
    pairs = value.items() if hasattr(value, "items") else value
    return {k: v for k, v in pairs if v is not None}


def _triple(value, default: float) -> tuple[float, float, float]:
    if value is None:
        return (default,) * 3
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    return values if len(values) == 3 else (values[0],) * 3


def _family(processor) -> str:
    """The transformers processor class whose resize rules apply: the first class in the
    MRO with its own rules, without the backend suffix ("ConvNextImageProcessorPil" and
    the torchvision "ConvNextImageProcessor" share one rule); "" for the base rules."""
    for cls in type(processor).__mro__:
        name = cls.__name__.removesuffix("Pil").removesuffix("Fast")
        if name in _FAMILY_RULES:
            return name
    return ""


def _standard_resize(processor, size: dict) -> tuple[str, int, int]:
    """PilBackend.resize: fixed height/width, or shortest edge with an optional longest edge."""
    if "height" in size and "width" in size:
        return "exact", int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        return "shortest_edge", int(size["shortest_edge"]), int(size.get("longest_edge") or 0)
    raise UnsupportedProcessor(f"{type(processor).__name__}: unsupported size {size}")


def _crop_size(processor) -> tuple[int, int]:
    crop_size = _size_dict(getattr(processor, "crop_size", None))
    if not ("height" in crop_size and "width" in crop_size):
        raise UnsupportedProcessor(f"{type(processor).__name__}: unsupported crop_size {crop_size}")
    return int(crop_size["height"]), int(crop_size["width"])


def _base_geometry(processor, size: dict) -> dict:
    """PilBackend._preprocess: resize, then centre crop."""
    geometry = {}
    if getattr(processor, "do_resize", True) and size:
        geometry["resize"] = _standard_resize(processor, size)
    if getattr(processor, "do_center_crop", False):
        geometry["crop"] = _crop_size(processor)
    return geometry


def _convnext_geometry(processor, size: dict) -> dict:
    """ConvNeXt (also ResNet, RegNet, CvT): below 384 pixels, resize the shortest edge to
    ``int(size / crop_pct)`` and crop ``size``; from 384 on, warp to ``size`` x ``size``."""
    geometry = {}
    if getattr(processor, "do_resize", True):
        if "shortest_edge" not in size:
            raise UnsupportedProcessor(f"{type(processor).__name__}: size needs shortest_edge, got {size}")
        edge = int(size["shortest_edge"])
        if edge < 384:
            if getattr(processor, "crop_pct", None) is None:  # the processor itself fails then
                raise UnsupportedProcessor(f"{type(processor).__name__}: crop_pct is unset")
            geometry["resize"] = ("shortest_edge", int(edge / processor.crop_pct), 0)
            geometry["crop"] = (edge, edge)
        else:
            geometry["resize"] = ("exact", edge, edge)
    if getattr(processor, "do_center_crop", False):
        crop = _crop_size(processor)
        # A second centre crop of a centre crop can land one pixel off a single crop.
        if geometry.get("crop", crop) != crop:
            raise UnsupportedProcessor(f"{type(processor).__name__}: crop_pct crop followed by a centre crop")
        geometry["crop"] = crop
    return geometry


def _poolformer_geometry(processor, size: dict) -> dict:
    """PoolFormer: with crop_pct, scale the size by 1 / crop_pct (a shortest-edge resize
    unless height and width differ), then centre crop."""
    crop_pct = getattr(processor, "crop_pct", None)
    geometry = _base_geometry(processor, size)
    if "resize" in geometry and crop_pct is not None:
        if "shortest_edge" in size:
            geometry["resize"] = ("shortest_edge", int(size["shortest_edge"] / crop_pct), 0)
        elif size["height"] == size["width"]:
            geometry["resize"] = ("shortest_edge", int(size["height"] / crop_pct), 0)
        else:
            geometry["resize"] = ("exact", int(size["height"] / crop_pct), int(size["width"] / crop_pct))
    return geometry


def _levit_geometry(processor, size: dict) -> dict:
    """LeViT: the shortest edge is resized to ``int(256 / 224 * size)``, then cropped."""
    geometry = _base_geometry(processor, size)
    if "resize" in geometry and "shortest_edge" in size:
        geometry["resize"] = ("shortest_edge", int((256 / 224) * size["shortest_edge"]), 0)
    return geometry


def _perceiver_geometry(processor, size: dict) -> dict:
    """Perceiver: centre crop ``size / crop_size`` of the shortest side, then resize."""
    geometry = {}
    if getattr(processor, "do_center_crop", False):
        crop_height, crop_width = _crop_size(processor)
        if not ("height" in size and "width" in size):
            raise UnsupportedProcessor(f"{type(processor).__name__}: size needs height and width, got {size}")
        geometry["crop_before_resize"] = (size["height"] / crop_height, size["width"] / crop_width)
    if getattr(processor, "do_resize", True) and size:
        geometry["resize"] = _standard_resize(processor, size)
    return geometry


def _donut_geometry(processor, size: dict) -> dict:
    """Donut: shortest edge to min(height, width), thumbnail to fit, pad, optional crop."""
    if getattr(processor, "do_align_long_axis", False):
        raise UnsupportedProcessor(f"{type(processor).__name__}: do_align_long_axis (rotation) is not reproduced")
    if not ("height" in size and "width" in size):
        raise UnsupportedProcessor(f"{type(processor).__name__}: size needs height and width, got {size}")
    target = (int(size["height"]), int(size["width"]))
    geometry = {}
    if getattr(processor, "do_resize", True):
        geometry["resize"] = ("shortest_edge", min(target), 0)
    if getattr(processor, "do_thumbnail", True):
        geometry["thumbnail"] = target
    if getattr(processor, "do_pad", True):
        geometry["pad"] = target
    if getattr(processor, "do_center_crop", False):
        geometry["crop"] = _crop_size(processor)
    return geometry


_FAMILY_RULES = {
    "ConvNextImageProcessor": _convnext_geometry,
    "PoolFormerImageProcessor": _poolformer_geometry,
    "LevitImageProcessor": _levit_geometry,
    "PerceiverImageProcessor": _perceiver_geometry,
    "DonutImageProcessor": _donut_geometry,
    # base geometry; listed because resolve_spec treats its normalisation apart
    "MobileViTImageProcessor": _base_geometry,
}


def resolve_spec(processor) -> PreprocessSpec:
    """Resolve a transformers image processor into a :class:`PreprocessSpec` from its
    settings alone; nothing here proves that the processor does nothing else (that is
    :func:`verify_spec`).

    Reproduces the base rules (fixed height/width, or shortest edge with an optional
    longest edge, then an optional centre crop: ViT, DeiT, BEiT, Swin, BiT/DINOv2, CLIP,
    SigLIP, MobileNet, EfficientNet...) and the per-family resize rules of ConvNeXt
    (``crop_pct`` below 384 pixels; also ResNet, RegNet, CvT), PoolFormer (``crop_pct``),
    LeViT (``256/224`` of the shortest edge), Perceiver (crop before resize) and Donut
    (thumbnail + pad), plus MobileViT's channel flip.
    """
    family = _family(processor)
    size = _size_dict(getattr(processor, "size", None))
    geometry = _FAMILY_RULES.get(family, _base_geometry)(processor, size)

    scale, offset = np.ones(3), np.zeros(3)
    if getattr(processor, "do_rescale", True):
        scale = scale * float(getattr(processor, "rescale_factor", 1 / 255))
        if getattr(processor, "rescale_offset", False):  # EfficientNet: x * s - 1
            offset = offset - 1.0
    # MobileViT's processors never normalise, whatever do_normalize says.
    if getattr(processor, "do_normalize", True) and family != "MobileViTImageProcessor":
        mean = np.array(_triple(getattr(processor, "image_mean", None), 0.0))
        std = np.array(_triple(getattr(processor, "image_std", None), 1.0))
        scale, offset = scale / std, (offset - mean) / std
    if getattr(processor, "include_top", False):  # EfficientNet divides by std again, normalised or not
        std = np.array(_triple(getattr(processor, "image_std", None), 1.0))
        scale, offset = scale / std, offset / std
    resample = getattr(processor, "resample", None)
    return PreprocessSpec(
        resize=geometry.get("resize"),
        crop=geometry.get("crop"),
        resample=int(Image.Resampling.BILINEAR if resample is None else resample),
        scale=tuple(float(v) for v in scale),
        offset=tuple(float(v) for v in offset),
        flip_channels=bool(getattr(processor, "do_flip_channel_order", False)),
        crop_before_resize=geometry.get("crop_before_resize"),
        thumbnail=geometry.get("thumbnail"),
        pad=geometry.get("pad"),
    )


def resized_size(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(width, height) after the resize step, with transformers' rounding."""
    if spec.resize is None:
        return width, height
    mode, a, b = spec.resize
    if mode == "exact":
        return b, a
    if b:
        return _shortest_and_longest_edge_size(width, height, a, b)
    # get_resize_output_image_size with default_to_square=False
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = a, int(a * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _shortest_and_longest_edge_size(width: int, height: int, shortest: int, longest: int) -> tuple[int, int]:
    """transformers' get_size_with_aspect_ratio (PilBackend.resize given both edges), as (width, height)."""
    raw_size = None
    min_side, max_side = float(min(height, width)), float(max(height, width))
    if max_side / min_side * shortest > longest:
        raw_size = longest * min_side / max_side
        shortest = int(round(raw_size))
    if (height <= width and height == shortest) or (width <= height and width == shortest):
        return width, height
    if width < height:
        return shortest, int((raw_size or shortest) * height / width)
    return int((raw_size or shortest) * width / height), shortest


def made_pixels(width: int, height: int, preprocessing: "Preprocessing") -> int:
    """The most pixels any image the preprocessing makes from a width x height file
    holds, known from the header before any pixel is decoded: the centre crop before
    the resize, the resize's output and the intermediate of Pillow's two-pass resize
    (the new width at the old height, or the old width at the new height), and the
    zero-padded image of a pad or of a crop larger than the image. Taken either way
    round: EXIF may turn the image before it is resized. Images of the file's own size
    are not counted: --max-pixels bounds those. The slow path is bounded by the
    processor's geometry as :class:`ProcessorPath` records it."""
    spec = preprocessing.geometry if isinstance(preprocessing, ProcessorPath) else preprocessing
    most = 0
    for w, h in ((width, height), (height, width)):
        made = []
        if spec.crop_before_resize:
            shortest = min(w, h)
            h, w = (max(1, int(ratio * shortest)) for ratio in spec.crop_before_resize)
            made.append((w, h))
        new_w, new_h = resized_size(w, h, spec)
        if (new_w, new_h) != (w, h):
            made += [(new_w, new_h), (new_w, h), (w, new_h)]
        for box in (spec.pad, spec.crop):
            if box and (box[0] > new_h or box[1] > new_w):
                made.append((max(box[1], new_w), max(box[0], new_h)))
        most = max(most, *(a * b for a, b in made), 0)
    return most


def thumbnail_size(width: int, height: int, max_height: int, max_width: int) -> tuple[int, int]:
    """(width, height) after Donut's thumbnail: fit inside, keeping the aspect, never enlarging."""
    new_height, new_width = min(height, max_height), min(width, max_width)
    if height > width:
        new_width = int(width * new_height / height)
    elif width > height:
        new_height = int(height * new_width / width)
    return new_width, new_height


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop an HxWxC array, zero-padding where the image is smaller (as transformers does)."""
    orig_h, orig_w = pixels.shape[:2]
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + height, left : left + width]
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    padded = np.zeros((new_h, new_w) + pixels.shape[2:], dtype=pixels.dtype)
    top_pad, left_pad = math.ceil((new_h - orig_h) / 2), math.ceil((new_w - orig_w) / 2)
    padded[top_pad : top_pad + orig_h, left_pad : left_pad + orig_w] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : max(0, top) + height, max(0, left) : max(0, left) + width]


def center_pad(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Zero-pad an HxWxC array to height x width, the extra row/column going to the bottom/right (Donut)."""
    orig_h, orig_w = pixels.shape[:2]
    if orig_h > height or orig_w > width:
        raise ValueError(f"cannot pad a {orig_w}x{orig_h} image to {width}x{height}")
    top, left = (height - orig_h) // 2, (width - orig_w) // 2
    padded = np.zeros((height, width) + pixels.shape[2:], dtype=pixels.dtype)
    padded[top : top + orig_h, left : left + orig_w] = pixels
    return padded


class Drafted(NamedTuple):
    """A JPEG decoded at a reduced scale (see ``decode.decode_image``)."""

    box: tuple[float, float, float, float]  # where the file's own edges fall in the decoded image
    size: tuple[int, int]  # the file's own (width, height)


def preprocess(image: Image.Image, spec: PreprocessSpec, drafted: Drafted | None = None) -> np.ndarray:
    """RGB image -> uint8 HxWx3 array at the model's input size.

    A ``drafted`` image is resized to the size the full image would have been resized
    to, from the box its own pixels cover: its part-filled last row and column would
    otherwise shift and stretch it by up to half a reduced pixel (3 grey levels of
    difference on average to the full decode where a side is not a multiple of 8)."""
    if spec.crop_before_resize:
        ratio_h, ratio_w = spec.crop_before_resize
        shortest = min(image.size)
        cropped = center_crop(np.asarray(image), int(ratio_h * shortest), int(ratio_w * shortest))
        image = Image.fromarray(np.ascontiguousarray(cropped))
    if drafted:
        image = image.resize(resized_size(*drafted.size, spec), resample=spec.resample, box=drafted.box)
    else:
        target = resized_size(image.width, image.height, spec)
        if target != image.size:
            image = image.resize(target, resample=spec.resample)
    if spec.thumbnail:
        target = thumbnail_size(image.width, image.height, *spec.thumbnail)
        if target != image.size:
            # Donut's thumbnail falls back to bicubic when the filter is 0 (nearest)
            image = image.resize(target, resample=spec.resample or Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.uint8)
    if spec.pad:
        pixels = center_pad(pixels, *spec.pad)
    if spec.crop:
        pixels = center_crop(pixels, *spec.crop)
    if spec.flip_channels:
        pixels = pixels[..., ::-1]
    return np.ascontiguousarray(pixels)


def synthetic_images() -> list[tuple[str, Image.Image]]:
    """Deterministic test images, as (name, RGB image) the way decode hands them over,
    most telling first (a typical photo, then the shapes and modes that take other
    branches: tall, wide, smaller than any crop, odd sizes, greyscale and RGBA files
    converted to RGB as decode does, square): smooth gradients that differ per channel
    (a channel flip or a wrong affine shows) plus pixel noise (a crop or resize one
    pixel off shows)."""
    rng = np.random.default_rng(9)

    def texture(width: int, height: int, channels: int) -> np.ndarray:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        gradients = [x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1),
                     128 + 100 * np.sin(x / 7) * np.cos(y / 5), (x + y) * 255 / max(width + height - 2, 1)]
        noise = rng.integers(-24, 25, (height, width, channels))
        return np.clip(np.stack(gradients[:channels], axis=-1) + noise, 0, 255).astype(np.uint8)

    return [
        ("photo 640x480", Image.fromarray(texture(640, 480, 3))),
        ("tall 211x500", Image.fromarray(texture(211, 500, 3))),
        ("wide 333x127", Image.fromarray(texture(333, 127, 3))),
        ("small 37x29", Image.fromarray(texture(37, 29, 3))),
        ("greyscale 301x199", Image.fromarray(texture(301, 199, 1)[..., 0], "L").convert("RGB")),
        ("RGBA 256x171", Image.fromarray(texture(256, 171, 4), "RGBA").convert("RGB")),
        ("square 224x224", Image.fromarray(texture(224, 224, 3))),
    ]


def model_input(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """What the model stage computes from uint8 NxHxWx3 pixels: the affine in float32, NxCxHxW."""
    chw = pixels.astype(np.float32).transpose(0, 3, 1, 2)
    return chw * np.array(spec.scale, np.float32)[:, None, None] + np.array(spec.offset, np.float32)[:, None, None]


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def spec_mismatch(processor, spec: PreprocessSpec, images: list[tuple[str, Image.Image]],
                  tolerance: float = MATCH_TOLERANCE) -> str | None:
    """Compare the processor's pixel_values with visionbatch's preprocess + affine on
    named RGB images: None when every value is within ``tolerance``, else a one-line
    reason naming the image and the largest absolute difference."""
    if spec.output_size is None:
        return "the output size varies with the input image"
    try:
        expected = processor_pixel_values([image for _, image in images], processor)
    except UnsupportedProcessor as err:
        return str(err)
    except Exception as err:  # the processor's own failure is the reason
        return f"the processor fails on the test images ({_first_line(err)})"
    for (name, image), reference in zip(images, expected):
        try:
            got = model_input(preprocess(image, spec)[None], spec)[0]
        except Exception as err:  # e.g. a pad smaller than the image
            return f"visionbatch's preprocessing fails on image '{name}' ({_first_line(err)})"
        if got.shape != reference.shape:
            return f"image '{name}': the processor gives {reference.shape}, visionbatch {got.shape}"
        difference = float(np.abs(got - reference).max())
        if not difference <= tolerance:  # written so that NaN fails too
            return f"image '{name}' differs by up to {difference:.3g} (tolerance {tolerance:g})"
    return None


def verify_spec(processor, spec: PreprocessSpec, tolerance: float = MATCH_TOLERANCE) -> str | None:
    """Prove ``spec`` against the processor itself: run ``processor(images,
    return_tensors="np")["pixel_values"]`` and visionbatch's preprocess + affine on
    :func:`synthetic_images`. None when every value matches within ``tolerance``, else a
    one-line reason (which image, the largest absolute difference).

    It compares against whatever processor object it is given: where torchvision is
    installed, transformers 5 loads its torchvision processors, whose resampling differs
    from Pillow's, and the check then fails (slow path) rather than trusting a
    PIL-only assumption; where it is not (this project's environment), the PIL
    processors are what it proves.
    """
    images = synthetic_images()
    if spec.output_size:
        height, width = spec.output_size
        # The processor's cost grows with its output size: all the images for the usual
        # inputs (up to 512x512), fewer, the most telling first, for larger ones (Donut).
        images = images[: max(1, CHECK_OUTPUT_PIXELS // (height * width))]
    return spec_mismatch(processor, spec, images, tolerance)


def resolve_checked_spec(processor) -> tuple[PreprocessSpec | None, str]:
    """(spec, reason): the fast-path spec when :func:`resolve_spec` understands the
    processor and :func:`verify_spec` proves it, else (None, why not); one line either way."""
    name = type(processor).__name__
    try:
        spec = resolve_spec(processor)
    except UnsupportedProcessor as err:
        return None, str(err)
    mismatch = verify_spec(processor, spec)
    if mismatch:
        return None, f"{name}: {mismatch}"
    return spec, f"{name}: visionbatch's uint8 preprocessing matches the processor on the synthetic test images"


def processor_pixel_values(images: list[Image.Image], processor) -> np.ndarray:
    """The slow path: the model's own processor on a batch of RGB images -> float32 NxCxHxW.

    Raises :class:`UnsupportedProcessor` where the result is not one image tensor that
    is the model's only input: a model fed other inputs (ImageGPT: colour-cluster
    ``input_ids``; SigLIP2 NaFlex: patches plus a mask and shapes). A processor whose
    output size varies per image (TextNet) fails inside the processor when the batch
    is stacked.
    """
    outputs = processor(images=images, return_tensors="np")
    if "pixel_values" not in outputs:
        raise UnsupportedProcessor(f"the processor returns {', '.join(outputs)}, not pixel_values")
    extra = sorted(set(outputs) - {"pixel_values"})
    if extra:
        raise UnsupportedProcessor(f"the processor also returns {', '.join(extra)}, which the model would need")
    pixel_values = np.asarray(outputs["pixel_values"], dtype=np.float32)
    if pixel_values.ndim != 4 or pixel_values.shape[0] != len(images):
        raise UnsupportedProcessor(f"the processor returns pixel_values of shape {pixel_values.shape}, "
                                   "not N x C x H x W")
    return pixel_values


def slow_path_problem(processor) -> str | None:
    """Why the slow path cannot serve this processor (one line), or None when it can:
    :func:`processor_pixel_values` on a landscape and a portrait image must give one
    batch of one size."""
    name = type(processor).__name__
    try:
        processor_pixel_values([image for _, image in synthetic_images()[:2]], processor)
    except UnsupportedProcessor as err:
        return f"{name}: {err}"
    except Exception as err:  # e.g. a batch whose sizes differ cannot be stacked
        return f"{name}: {_first_line(err)}"
    return None


@dataclass(frozen=True)
class ProcessorPath:
    """The slow path, for processors the fast path does not reproduce: the model's own
    processor runs on the CPU workers and float32 ``pixel_values`` (C x H x W) travel to
    the model, four times the bytes of the fast path's uint8 pixels."""

    processor: object
    output_size: tuple[int, int]
    geometry: PreprocessSpec  # the processor's resize, as far as its settings tell: for made_pixels only

    @classmethod
    def of(cls, processor) -> "ProcessorPath":
        _, image = synthetic_images()[0]
        return cls(processor, tuple(processor_pixel_values([image], processor).shape[2:]), _geometry(processor))


def _geometry(processor) -> PreprocessSpec:
    """The processor's geometry where :func:`resolve_spec` reads it; else, to bound what
    the processor may make, a resize of the shortest edge to the largest side its
    settings name, keeping the aspect (the most any resize to those sides makes)."""
    try:
        return resolve_spec(processor)
    except UnsupportedProcessor:
        sides = [int(side) for name in ("size", "crop_size")
                 for side in _size_dict(getattr(processor, name, None)).values() if isinstance(side, (int, float))]
        return PreprocessSpec(resize=("shortest_edge", max(sides), 0) if sides else None, crop=None,
                              resample=int(Image.Resampling.BILINEAR), scale=(1.0,) * 3, offset=(0.0,) * 3)


Preprocessing = PreprocessSpec | ProcessorPath


def pixel_layout(preprocessing: Preprocessing) -> tuple[tuple[int, int, int], np.dtype]:
    """Shape and dtype of one preprocessed image as it travels to the model stage."""
    height, width = preprocessing.output_size
    if isinstance(preprocessing, ProcessorPath):
        return (3, height, width), np.dtype(np.float32)
    return (height, width, 3), np.dtype(np.uint8)


def draft_side(preprocessing: Preprocessing, margin: float = DRAFT_MARGIN) -> int | None:
    """The smallest side a JPEG may be decoded down to (DCT-domain scaling by 1/2, 1/4,
    1/8, far cheaper than a full decode and a resize), or None where the image must be
    decoded whole: the model's own processor, or a crop of the unresized image.

    ``margin`` times the largest side the resize produces: the resize then still shrinks
    by ``margin`` or more, which keeps its result close to that of the full image.
    """
    if isinstance(preprocessing, ProcessorPath) or preprocessing.crop_before_resize:
        return None
    # The output sides of the resize (a longest-edge cap counts: never smaller) and thumbnail.
    sides = [side for step in (preprocessing.resize, preprocessing.thumbnail) if step for side in step[-2:]]
    return int(margin * max(sides)) if sides else None


def prepare_image(image: Image.Image, preprocessing: Preprocessing, drafted: Drafted | None = None) -> np.ndarray:
    """RGB image -> what the model stage takes: uint8 HxWx3 (fast path) or float32 CxHxW.
    (Only the fast path drafts: see :func:`draft_side`.)"""
    if isinstance(preprocessing, ProcessorPath):
        return processor_pixel_values([image], preprocessing.processor)[0]
    return preprocess(image, preprocessing, drafted)


def choose_preprocessing(processor) -> tuple[Preprocessing, str]:
    """The fast path where it is proven to match the processor, else the processor
    itself; and one line saying which and why. Raises UnsupportedProcessor where
    neither can serve the model."""
    spec, reason = resolve_checked_spec(processor)
    if spec is not None:
        return spec, f"fast path (uint8 resize and crop on CPU, affine on the model's device): {reason}"
    problem = slow_path_problem(processor)
    if problem:
        raise UnsupportedProcessor(f"{reason}; and the model's own processor cannot be used either: {problem}")
    return ProcessorPath.of(processor), f"the model's own processor on the CPU workers (slower): {reason}"
