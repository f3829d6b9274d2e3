"""Preprocess: the model's image-processor config resolved once into a plain value,
then applied to decoded images on CPU workers.

Geometry (resize, crop) runs here on uint8 pixels exactly as transformers' PIL
backend does it (Pillow ``resize`` with the configured filter, then a centre crop), so
predictions match ``pipeline("image-classification")``. The per-channel affine part
(rescale, normalise) is left to the model stage, which applies it on its device: the
array crossing between stages stays uint8, four times smaller than float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


class UnsupportedProcessor(ValueError):
    """The image processor's resize rule is not one visionbatch reproduces."""


@dataclass(frozen=True)
class PreprocessSpec:
    """What a model expects, as plain numbers.

    ``resize``: ("exact", height, width) or ("shortest_edge", size, longest_edge or 0).
    ``crop``: (height, width) centre crop after resizing, or None.
    ``scale``/``offset``: per-channel affine from uint8 to model input,
    ``x_model = x_uint8 * scale + offset`` (rescale, offset and normalisation folded).
    """

    resize: tuple[str, int, int] | None
    crop: tuple[int, int] | None
    resample: int
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every preprocessed image, or None if it varies."""
        if self.crop:
            return self.crop
        if self.resize and self.resize[0] == "exact":
            return self.resize[1], self.resize[2]
        return None


def _size_dict(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, int):
        return {"height": value, "width": value}
    if hasattr(value, "items"):
        return {k: v for k, v in value.items() if v is not None}
    return {k: getattr(value, k) for k in ("height", "width", "shortest_edge", "longest_edge") if getattr(value, k, None)}


def _triple(value, default: float) -> tuple[float, float, float]:
    if value is None:
        return (default,) * 3
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    return values if len(values) == 3 else (values[0],) * 3


def resolve_spec(processor) -> PreprocessSpec:
    """Resolve a transformers image processor into a :class:`PreprocessSpec`.

    Handles the rules of the image-classification processors in transformers: fixed
    height/width (ViT, DeiT, BEiT, Swin, EfficientNet), shortest edge with optional
    centre crop (ResNet-style, MobileNet), and ConvNeXt's ``crop_pct`` (resize the
    shortest edge to ``size / crop_pct``, then crop ``size``, below 384 pixels).
    """
    size = _size_dict(getattr(processor, "size", None))
    resize: tuple[str, int, int] | None = None
    crop: tuple[int, int] | None = None
    crop_pct = getattr(processor, "crop_pct", None)
    if getattr(processor, "do_resize", True) and size:
        if "height" in size and "width" in size:
            resize = ("exact", int(size["height"]), int(size["width"]))
        elif "shortest_edge" in size:
            edge = int(size["shortest_edge"])
            if crop_pct is not None and "ConvNext" in type(processor).__name__:
                if edge < 384:
                    resize, crop = ("shortest_edge", int(edge / crop_pct), 0), (edge, edge)
                else:
                    resize = ("exact", edge, edge)
            else:
                resize = ("shortest_edge", edge, int(size.get("longest_edge") or 0))
        else:
            raise UnsupportedProcessor(f"{type(processor).__name__}: unsupported size {size}")
    if getattr(processor, "do_center_crop", False):
        crop_size = _size_dict(getattr(processor, "crop_size", None))
        if not ("height" in crop_size and "width" in crop_size):
            raise UnsupportedProcessor(f"{type(processor).__name__}: unsupported crop_size {crop_size}")
        crop = (int(crop_size["height"]), int(crop_size["width"]))

    scale, offset = np.ones(3), np.zeros(3)
    if getattr(processor, "do_rescale", True):
        scale = scale * float(getattr(processor, "rescale_factor", 1 / 255))
        if getattr(processor, "rescale_offset", False):  # EfficientNet: x * s - 1
            offset = offset - 1.0
    if getattr(processor, "do_normalize", True):
        mean = np.array(_triple(getattr(processor, "image_mean", None), 0.0))
        std = np.array(_triple(getattr(processor, "image_std", None), 1.0))
        scale, offset = scale / std, (offset - mean) / std
        if getattr(processor, "include_top", False):  # EfficientNet divides by std twice
            scale, offset = scale / std, offset / std
    resample = getattr(processor, "resample", None)
    return PreprocessSpec(
        resize=resize,
        crop=crop,
        resample=int(Image.Resampling.BILINEAR if resample is None else resample),
        scale=tuple(float(v) for v in scale),
        offset=tuple(float(v) for v in offset),
    )


def resized_size(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(width, height) after the resize step, with transformers' rounding."""
    if spec.resize is None:
        return width, height
    mode, a, b = spec.resize
    if mode == "exact":
        return b, a
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = a, int(a * long / short)
    if b and new_long > b:  # longest_edge cap
        new_short, new_long = int(b * new_short / new_long), b
    return (new_short, new_long) if width <= height else (new_long, new_short)


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


def preprocess(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image -> uint8 HxWx3 array at the model's input size."""
    target = resized_size(image.width, image.height, spec)
    if target != image.size:
        image = image.resize(target, resample=spec.resample)
    pixels = np.asarray(image, dtype=np.uint8)
    if spec.crop:
        pixels = center_crop(pixels, *spec.crop)
    return np.ascontiguousarray(pixels)
