"""Every image-classification family's processor, configured as its hub checkpoints
configure it: either the fast path (resolve_spec + preprocess + affine) is proven against
the real processor and matches it, or it is refused with a one-line reason and the slow
path (the processor itself) serves it, or neither path can and that is said up front."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageOps
import transformers as tf

from visionbatch.preprocess import (MATCH_TOLERANCE, UnsupportedProcessor, model_input, preprocess,
                                    processor_pixel_values, resolve_checked_spec, resolve_spec, slow_path_problem,
                                    spec_mismatch, synthetic_images, verify_spec)

from conftest import SAMPLE_DIR

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# Processors as the hub checkpoints named in the comments configure them (their
# preprocessor_config.json), built here without any download.
FAMILIES = {
    # google/vit-base-patch16-224
    "vit": lambda: tf.ViTImageProcessor(size=224, resample=2),
    # facebook/deit-base-distilled-patch16-224
    "deit": lambda: tf.DeiTImageProcessor(size=256, crop_size=224, resample=3,
                                          image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
    # microsoft/beit-base-patch16-224
    "beit": lambda: tf.BeitImageProcessor(size=224, resample=2, do_center_crop=False),
    # microsoft/swin-tiny-patch4-window7-224
    "swin": lambda: tf.ViTImageProcessor(size=224, resample=3, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
    # facebook/convnext-tiny-224
    "convnext-224": lambda: tf.ConvNextImageProcessor(size=224, crop_pct=0.875, resample=3,
                                                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
    # facebook/convnext-base-384 (no crop at 384: a warp)
    "convnext-384": lambda: tf.ConvNextImageProcessor(size=384, crop_pct=0.875, resample=3,
                                                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
    # microsoft/resnet-50 (ConvNeXt's processor, old-format integer size)
    "resnet": lambda: tf.ConvNextImageProcessor(size=224, crop_pct=0.875, resample=3,
                                                image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
    # google/efficientnet-b0
    "efficientnet": lambda: tf.EfficientNetImageProcessor(
        size={"height": 224, "width": 224}, resample=0, include_top=True, do_center_crop=False,
        image_mean=IMAGENET_MEAN, image_std=[0.47853944, 0.4732864, 0.47434163]),
    # google/mobilenet_v1_1.0_224
    "mobilenet-v1": lambda: tf.MobileNetV1ImageProcessor(size={"shortest_edge": 256}, crop_size=224, resample=2),
    # google/mobilenet_v2_1.0_224
    "mobilenet-v2": lambda: tf.MobileNetV2ImageProcessor(size={"shortest_edge": 256}, crop_size=224, resample=2),
    # apple/mobilevit-small: RGB -> BGR, no normalisation
    "mobilevit": lambda: tf.MobileViTImageProcessor(size=288, crop_size=256, resample=2, do_flip_channel_order=True),
    # apple/mobilevitv2-1.0-imagenet1k-256
    "mobilevitv2": lambda: tf.MobileViTImageProcessor(size={"shortest_edge": 288}, crop_size=256, resample=2,
                                                      do_flip_channel_order=True),
    # facebook/levit-128S: shortest edge int(256/224 * 224) = 256, crop 224
    "levit": lambda: tf.LevitImageProcessor(size=224, crop_size=224, resample=3),
    # sail/poolformer_s12: crop_pct 0.9
    "poolformer": lambda: tf.PoolFormerImageProcessor(size={"shortest_edge": 224}, crop_size=224, crop_pct=0.9,
                                                      resample=3),
    # deepmind/vision-perceiver-learned: crop 224/256 of the shortest side, then resize
    "perceiver": lambda: tf.PerceiverImageProcessor(size=224, crop_size=256, resample=3),
    # naver-clova-ix/donut-base ([width, height]): thumbnail + pad to 2560x1920
    "donut-swin": lambda: tf.DonutImageProcessor(size=[1920, 2560], resample=2, do_thumbnail=True, do_pad=True,
                                                 do_align_long_axis=False),
    # facebook/dinov2-small-imagenet1k-1-layer
    "dinov2": lambda: tf.BitImageProcessor(size={"shortest_edge": 256}, crop_size=224, resample=3,
                                           image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
    # google/bit-50
    "bit": lambda: tf.BitImageProcessor(size={"shortest_edge": 448}, crop_size=448, resample=3, do_normalize=False),
    # openai/clip-vit-base-patch32
    "clip": lambda: tf.CLIPImageProcessor(),
    # google/siglip-base-patch16-224
    "siglip": lambda: tf.SiglipImageProcessor(size={"height": 224, "width": 224}, resample=3),
    # Zetatech/pvt-tiny-224
    "pvt": lambda: tf.PvtImageProcessor(),
    # nvidia/mit-b0
    "segformer": lambda: tf.SegformerImageProcessor(size=512, resample=2),
    # microsoft/cvt-13 (ConvNeXt's processor)
    "cvt": lambda: tf.ConvNextImageProcessor(size=224, crop_pct=0.875, resample=3,
                                             image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
    # openai/imagegpt-small: colour-cluster input_ids, not pixel_values
    "imagegpt": lambda: tf.ImageGPTImageProcessor(
        size={"height": 32, "width": 32}, resample=2,
        clusters=np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)),
    # google/siglip2-base-patch16-naflex: variable patch count, plus mask and shapes
    "siglip2-naflex": lambda: tf.Siglip2ImageProcessor(),
    # czczup/textnet-base: shortest edge 640 rounded to multiples of 32, no crop
    "textnet": lambda: tf.TextNetImageProcessor(),
}
# Neither path can serve these: the job must be refused before any work.
REFUSED = {"imagegpt", "siglip2-naflex", "textnet"}
FAST = sorted(set(FAMILIES) - REFUSED)
# Donut's 2560x1920 output takes the processor most of a second per image.
HEAVY = {"donut-swin"}

ODD_SIZES = [(97, 1200), (1200, 97), (3, 2), (225, 223), (500, 375)]


def _odd_images() -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(3)
    return [(f"odd {w}x{h}", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))) for w, h in ODD_SIZES]


def _sample_images(count: int) -> list[tuple[str, Image.Image]]:
    """Real photos decoded as decode does (EXIF orientation, RGB), spread over the classes."""
    files = sorted(p for p in SAMPLE_DIR.glob("*/*") if p.is_file())[:: max(1, 200 // count)][:count]
    return [(p.name, ImageOps.exif_transpose(Image.open(p)).convert("RGB")) for p in files]


@pytest.mark.parametrize("family", FAST)
def test_family_takes_the_fast_path(family):
    spec, reason = resolve_checked_spec(FAMILIES[family]())
    assert spec is not None, reason
    assert "\n" not in reason


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_is_refused_by_both_paths_with_a_reason(family):
    processor = FAMILIES[family]()
    spec, reason = resolve_checked_spec(processor)
    assert spec is None and reason and "\n" not in reason
    problem = slow_path_problem(processor)
    assert problem and "\n" not in problem
    print(f"{family}: fast path: {reason}; slow path: {problem}")


@pytest.mark.parametrize("family", FAST)
def test_family_matches_processor_on_odd_images(family):
    processor = FAMILIES[family]()
    spec = resolve_spec(processor)
    images = synthetic_images() + ([] if family in HEAVY else _odd_images())
    assert spec_mismatch(processor, spec, images) is None


@pytest.mark.parametrize("family", FAST)
def test_family_matches_processor_on_sample_images(family, sample_dir):
    processor = FAMILIES[family]()
    spec = resolve_spec(processor)
    assert spec_mismatch(processor, spec, _sample_images(3 if family in HEAVY else 10)) is None


def test_measured_differences_are_float_rounding_only(sample_dir):
    """The tolerance's measurement: over every fast family, the processor's values and
    the affine of visionbatch's uint8 pixels differ by float32 rounding, and the uint8
    pixels the processor's values decode back to are visionbatch's exactly."""
    images = [image for _, image in _sample_images(10) + synthetic_images()]
    largest = 0.0
    for family in sorted(set(FAST) - HEAVY):
        processor = FAMILIES[family]()
        spec = resolve_spec(processor)
        pixels = np.stack([preprocess(image, spec) for image in images])
        expected = processor_pixel_values(images, processor)
        largest = max(largest, float(np.abs(model_input(pixels, spec) - expected).max()))
        scale = np.array(spec.scale, np.float32)[:, None, None]
        offset = np.array(spec.offset, np.float32)[:, None, None]
        levels = np.rint((expected - offset) / scale)
        np.testing.assert_array_equal(levels, pixels.transpose(0, 3, 1, 2), err_msg=family)
    print(f"largest |processor - visionbatch| over {len(FAST) - len(HEAVY)} families: {largest:.2e}")
    assert largest < MATCH_TOLERANCE / 10


# --- the new rules, value by value ---------------------------------------------------


def test_mobilevit_flips_to_bgr():
    spec = resolve_spec(FAMILIES["mobilevit"]())
    assert spec.flip_channels and spec.resize == ("shortest_edge", 288, 0) and spec.crop == (256, 256)
    assert spec.scale == (1 / 255,) * 3 and spec.offset == (0.0,) * 3  # MobileViT never normalises
    red = Image.new("RGB", (300, 300), (255, 0, 0))
    assert preprocess(red, spec)[0, 0].tolist() == [0, 0, 255]


def test_mobilevit_ignores_do_normalize_as_its_processor_does():
    processor = tf.MobileViTImageProcessor(size=288, crop_size=256, do_normalize=True, image_mean=IMAGENET_MEAN)
    assert verify_spec(processor, resolve_spec(processor)) is None


def test_levit_resizes_shortest_edge_to_256_over_224():
    assert resolve_spec(FAMILIES["levit"]()).resize == ("shortest_edge", 256, 0)
    assert resolve_spec(tf.LevitImageProcessor(size=384, crop_size=384)).resize == ("shortest_edge", 438, 0)


@pytest.mark.parametrize("size,resize", [
    ({"shortest_edge": 224}, ("shortest_edge", 248, 0)),
    ({"height": 224, "width": 224}, ("shortest_edge", 248, 0)),  # square: still a shortest-edge resize
    ({"height": 224, "width": 160}, ("exact", 248, 177)),
])
def test_poolformer_crop_pct(size, resize):
    processor = tf.PoolFormerImageProcessor(size=size, crop_size=224, crop_pct=0.9)
    spec = resolve_spec(processor)
    assert spec.resize == resize and spec.crop == (224, 224)
    assert verify_spec(processor, spec) is None


def test_poolformer_without_crop_pct_is_a_plain_resize():
    processor = tf.PoolFormerImageProcessor(size={"shortest_edge": 224}, crop_size=224, crop_pct=None)
    assert resolve_spec(processor).resize == ("shortest_edge", 224, 0)
    assert verify_spec(processor, resolve_spec(processor)) is None


def test_convnext_crop_then_another_crop_is_refused_and_served_slowly():
    processor = tf.ConvNextImageProcessor(size=224, crop_pct=0.875, do_center_crop=True, crop_size=200)
    spec, reason = resolve_checked_spec(processor)
    assert spec is None and "centre crop" in reason
    assert processor_pixel_values([image for _, image in synthetic_images()], processor).shape == (7, 3, 200, 200)


@pytest.mark.parametrize("size,crop_size", [(224, 256), (256, 224), ({"height": 224, "width": 192}, 256)])
def test_perceiver_crops_before_resizing(size, crop_size):
    processor = tf.PerceiverImageProcessor(size=size, crop_size=crop_size)
    spec = resolve_spec(processor)
    assert spec.crop is None and spec.crop_before_resize[0] == processor.size.height / processor.crop_size.height
    assert verify_spec(processor, spec) is None  # (256, 224): a crop larger than the image pads first


@pytest.mark.parametrize("size", [[240, 320], [320, 240], [301, 199]])
def test_donut_thumbnail_and_pad(size):
    processor = tf.DonutImageProcessor(size=size)
    spec = resolve_spec(processor)
    width, height = size
    assert spec.thumbnail == spec.pad == spec.output_size == (height, width)
    assert spec_mismatch(processor, spec, synthetic_images() + _odd_images()) is None


def test_donut_align_long_axis_is_refused_and_served_slowly():
    processor = tf.DonutImageProcessor(size=[240, 320], do_align_long_axis=True)
    spec, reason = resolve_checked_spec(processor)
    assert spec is None and "do_align_long_axis" in reason
    assert slow_path_problem(processor) is None


def test_efficientnet_include_top_applies_without_normalize():
    processor = tf.EfficientNetImageProcessor(size={"height": 64, "width": 64}, do_normalize=False, include_top=True)
    assert verify_spec(processor, resolve_spec(processor)) is None


# --- the start-up check itself -------------------------------------------------------


class ViTWithBrightness(tf.ViTImageProcessor):
    """A processor visionbatch cannot know about: an extra transform after the affine."""

    def _preprocess(self, images, **kwargs):
        outputs = super()._preprocess(images, **kwargs)
        outputs["pixel_values"] = [values + 0.05 for values in outputs["pixel_values"]]
        return outputs


class ViTWithMirror(tf.ViTImageProcessor):
    """An extra geometric transform: mirror left-right before the usual steps."""

    def preprocess(self, images, **kwargs):
        return super().preprocess([ImageOps.mirror(image) for image in images], **kwargs)


class ViTWithLogging(tf.ViTImageProcessor):
    """Overrides preprocess without changing a value: still the fast path."""

    def preprocess(self, images, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        return super().preprocess(images, **kwargs)


@pytest.mark.parametrize("processor_class", [ViTWithBrightness, ViTWithMirror])
def test_processor_it_does_not_understand_goes_to_the_slow_path(processor_class):
    processor = processor_class(size=224)
    spec, reason = resolve_checked_spec(processor)
    assert spec is None
    assert reason.startswith(processor_class.__name__) and "differs by up to" in reason and "\n" not in reason
    images = [image for _, image in synthetic_images()[:3]]
    pixel_values = processor_pixel_values(images, processor)
    assert pixel_values.shape == (3, 3, 224, 224) and pixel_values.dtype == np.float32
    assert slow_path_problem(processor) is None


def test_matching_processor_takes_the_fast_path():
    processor = ViTWithLogging(size=224)
    spec, reason = resolve_checked_spec(processor)
    assert spec == resolve_spec(tf.ViTImageProcessor(size=224))
    assert processor.calls == 1 and "matches" in reason


def test_one_uint8_level_is_caught():
    """The tolerance separates float rounding from the smallest real error."""
    processor = FAMILIES["vit"]()
    spec = resolve_spec(processor)
    off_by_one_level = dataclasses.replace(spec, offset=(spec.offset[0] + spec.scale[0],) + spec.offset[1:])
    assert "differs by up to 0.00784" in verify_spec(processor, off_by_one_level)


def test_wrong_filter_or_flip_is_caught():
    processor = FAMILIES["deit"]()
    spec = resolve_spec(processor)
    assert verify_spec(processor, dataclasses.replace(spec, resample=Image.Resampling.BILINEAR))
    assert verify_spec(processor, dataclasses.replace(spec, flip_channels=True))


def test_processor_failure_and_varying_size_are_reasons():
    varying = tf.BitImageProcessor(size={"shortest_edge": 64}, do_center_crop=False)
    assert "varies" in resolve_checked_spec(varying)[1]
    assert slow_path_problem(varying).startswith("BitImageProcessor")


def test_processor_pixel_values_refuses_other_model_inputs():
    with pytest.raises(UnsupportedProcessor, match="input_ids, not pixel_values"):
        processor_pixel_values([Image.new("RGB", (40, 30))], FAMILIES["imagegpt"]())
    with pytest.raises(UnsupportedProcessor, match="also returns pixel_attention_mask"):
        processor_pixel_values([Image.new("RGB", (40, 30))], FAMILIES["siglip2-naflex"]())


def test_synthetic_images_are_deterministic_rgb():
    first, second = synthetic_images(), synthetic_images()
    assert [name for name, _ in first] == [name for name, _ in second]
    for (_, a), (_, b) in zip(first, second):
        assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
