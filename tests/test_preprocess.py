"""The resolved PreprocessSpec reproduces each transformers image processor exactly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import (BitImageProcessor, ConvNextImageProcessor, DeiTImageProcessor, EfficientNetImageProcessor,
                          ViTImageProcessor)

from visionbatch.preprocess import (PreprocessSpec, UnsupportedProcessor, center_crop, preprocess, resized_size,
                                    resolve_spec, verify_spec)

from conftest import write_image

PROCESSORS = {
    "vit-224": ViTImageProcessor(size={"height": 224, "width": 224}),
    "vit-384-bicubic": ViTImageProcessor(size={"height": 384, "width": 384}, resample=3),
    "convnext-crop-pct": ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875),
    "convnext-384-warp": ConvNextImageProcessor(size={"shortest_edge": 384}),
    "deit-resize-crop": DeiTImageProcessor(size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224}),
    "bit-shortest-crop": BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                           image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    "efficientnet-include-top": EfficientNetImageProcessor(size={"height": 240, "width": 240}, rescale_offset=True),
}


def _model_input(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """What the model stage computes from the uint8 array: the per-channel affine, CHW."""
    chw = pixels.astype(np.float32).transpose(2, 0, 1)
    return chw * np.array(spec.scale, np.float32)[:, None, None] + np.array(spec.offset, np.float32)[:, None, None]


@pytest.mark.parametrize("name", sorted(PROCESSORS))
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (97, 1200), (1, 1), (224, 224)])
def test_spec_matches_processor(name, size, tmp_path):
    processor = PROCESSORS[name]
    spec = resolve_spec(processor)
    image = Image.open(write_image(tmp_path / "x.png", size=size, seed=size[0])).convert("RGB")
    expected = processor(image, return_tensors="np")["pixel_values"][0]
    got = _model_input(preprocess(image, spec), spec)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_spec_values_for_convnext():
    spec = resolve_spec(ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875))
    assert spec.resize == ("shortest_edge", 256, 0)
    assert spec.crop == (224, 224)
    assert spec.resample == Image.Resampling.BICUBIC
    assert spec.output_size == (224, 224)


@pytest.mark.parametrize("shape,crop", [((2, 3), (4, 4)), ((5, 2), (3, 4)), ((7, 9), (4, 4)), ((3, 3), (3, 6))])
def test_center_crop_matches_transformers_including_padding(shape, crop):
    from transformers.image_transforms import center_crop as reference

    pixels = np.arange(shape[0] * shape[1] * 3, dtype=np.uint8).reshape(*shape, 3) + 1
    expected = reference(pixels, crop, data_format="channels_last", input_data_format="channels_last")
    np.testing.assert_array_equal(center_crop(pixels, *crop), expected)


def test_unknown_size_rule_is_refused():
    processor = ViTImageProcessor()
    processor.size = {"max_height": 10, "max_width": 10}
    with pytest.raises(UnsupportedProcessor):
        resolve_spec(processor)


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (97, 1200), (1200, 97), (300, 300), (224, 600),
                                          (600, 224), (250, 333)])
def test_shortest_and_longest_edge_follow_transformers(width, height):
    from transformers.image_transforms import get_size_with_aspect_ratio

    spec = PreprocessSpec(resize=("shortest_edge", 224, 300), crop=None, resample=2, scale=(1.0,) * 3,
                          offset=(0.0,) * 3)
    assert resized_size(width, height, spec) == get_size_with_aspect_ratio((height, width), 224, 300)[::-1]


def test_shortest_and_longest_edge_processor_is_verified():
    processor = BitImageProcessor(size={"shortest_edge": 224, "longest_edge": 300}, crop_size={"height": 224,
                                                                                              "width": 224})
    assert verify_spec(processor, resolve_spec(processor)) is None
