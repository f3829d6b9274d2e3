"""Every image-mode and format oddity becomes an RGB image or a typed error, never a crash."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionbatch.decode import DecodeError, decode_batch, decode_image
from visionbatch.preprocess import resolve_spec

from conftest import write_huge_png, write_image

LIMIT = 89_478_485


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _rgb(size=(40, 30)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
                                      ("I;16", "PNG"), ("1", "BMP"), ("RGB", "WEBP"), ("RGB", "TIFF"), ("P", "GIF")])
def test_modes_convert_to_rgb(mode, fmt):
    image, _, _ = decode_image(_encode(_rgb().convert(mode), fmt), LIMIT)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (20, 10), color) for color in ("red", "blue")]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    image, _, _ = decode_image(data, LIMIT)
    assert image.getpixel((0, 0))[0] > 200  # red, the first frame


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    data = _encode(_rgb((40, 30)), "JPEG", exif=exif.tobytes())
    assert decode_image(data, LIMIT)[0].size == (30, 40)


@pytest.mark.parametrize("orientation,size", [(1, (2000, 1500)), (6, (1500, 2000))])
def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_reports_its_own_size(orientation, size):
    exif = Image.Exif()
    exif[0x0112] = orientation
    smooth = Image.linear_gradient("L").resize((2000, 1500)).convert("RGB")
    data = _encode(smooth, "JPEG", exif=exif.tobytes(), quality=95)
    drafted, drafted_size, _ = decode_image(data, LIMIT, draft_side=448)
    full, full_size, _ = decode_image(data, LIMIT)
    assert drafted_size == full_size == size
    assert full.size == size and drafted.size == (size[0] // 2, size[1] // 2)  # 1/2: 1/4 would be < 448
    assert min(drafted.size) >= 448
    difference = np.abs(np.asarray(drafted.resize((224, 224)), np.int16) - np.asarray(full.resize((224, 224)), np.int16))
    assert difference.mean() < 1.0
    png = _encode(smooth, "PNG")
    assert decode_image(png, LIMIT, draft_side=448)[0].size == (2000, 1500)  # only JPEGs have a cheap reduced decode


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_drafted_image_is_resized_from_the_box_the_file_covers(orientation):
    """Sides that are not a multiple of the scale leave a part-filled last row and
    column; in every EXIF orientation, the drafted image's model input matches the full
    decode's (0.6 grey levels on average here; 2.7 without the box)."""
    from transformers import ViTImageProcessor

    from visionbatch.preprocess import prepare_image, resolve_spec

    spec = resolve_spec(ViTImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                          do_center_crop=True))
    exif = Image.Exif()
    exif[0x0112] = orientation
    rng = np.random.default_rng(orientation)
    y, x = np.mgrid[0:1387, 0:2013].astype(np.float32)  # 1/4 scale: 503.25 x 346.75 pixels
    texture = np.stack([128 + 100 * np.sin(x / 9) * np.cos(y / 7), x * 255 / 2013, y * 255 / 1387], axis=-1)
    texture += rng.normal(0, 8, texture.shape)
    data = _encode(Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8)), "JPEG", exif=exif.tobytes(), quality=95)
    drafted, size, box = decode_image(data, LIMIT, draft_side=300)
    full, full_size, _ = decode_image(data, LIMIT)
    assert box is not None and size == full_size == full.size and drafted.size != full.size
    difference = np.abs(prepare_image(drafted, spec, box).astype(np.int16) - prepare_image(full, spec).astype(np.int16))
    assert difference.mean() < 1.0


def test_draft_side_follows_the_resize_and_spares_what_must_be_exact():
    from visionbatch.preprocess import DRAFT_MARGIN, PreprocessSpec, ProcessorPath, draft_side

    affine = dict(resample=3, scale=(1.0,) * 3, offset=(0.0,) * 3)
    assert draft_side(PreprocessSpec(resize=("exact", 224, 224), crop=None, **affine)) == int(DRAFT_MARGIN * 224)
    assert draft_side(PreprocessSpec(resize=("shortest_edge", 256, 0), crop=(224, 224), **affine)) == int(DRAFT_MARGIN * 256)
    assert draft_side(PreprocessSpec(resize=("shortest_edge", 800, 1333), crop=None, **affine)) == int(DRAFT_MARGIN * 1333)
    assert draft_side(PreprocessSpec(resize=None, crop=(224, 224), **affine)) is None  # crops the full image
    assert draft_side(PreprocessSpec(resize=("exact", 224, 224), crop=None, crop_before_resize=(0.875, 0.875),
                                     **affine)) is None
    exact = PreprocessSpec(resize=("exact", 224, 224), crop=None, **affine)
    assert draft_side(ProcessorPath(processor=None, output_size=(224, 224), geometry=exact)) is None


@pytest.mark.parametrize("size", [(1, 1), (8000, 8)])
def test_extreme_shapes(size):
    assert decode_image(_encode(_rgb(size), "PNG"), LIMIT)[0].size == size


@pytest.mark.parametrize("data,kind", [(b"", "empty_file"), (b"hello" * 10, "not_an_image"),
                                       (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not_an_image")])
def test_bad_bytes(data, kind):
    with pytest.raises(DecodeError) as err:
        decode_image(data, LIMIT)
    assert err.value.kind == kind


def test_truncated_jpeg():
    data = _encode(_rgb((300, 200)), "JPEG")
    with pytest.raises(DecodeError) as err:
        decode_image(data[: len(data) // 2], LIMIT)
    assert err.value.kind == "truncated" and err.value.size == (300, 200)


def test_pixel_limit_from_header(tmp_path):
    data = write_huge_png(tmp_path / "huge.png").read_bytes()
    with pytest.raises(DecodeError) as err:
        decode_image(data, LIMIT)
    assert err.value.kind == "too_large" and err.value.size == (30000, 30000)
    with pytest.raises(DecodeError) as err:
        decode_image(_encode(_rgb((100, 100)), "PNG"), max_pixels=9999)
    assert err.value.kind == "too_large"


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_what_the_resize_would_make_is_bounded_from_the_header(path, tmp_path):
    """A 1 x 65,500 PNG (207 bytes, far under --max-pixels) that ConvNeXt's shortest-edge
    resize would make 256 x 16.8M pixels: refused from its header, either way round and
    on either preprocessing path; a strip the resize keeps small is classified."""
    from transformers import ConvNextImageProcessor

    from visionbatch.decode import decode_file
    from visionbatch.preprocess import ProcessorPath, made_pixels

    processor = ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)
    preprocessing = resolve_spec(processor) if path == "fast" else ProcessorPath.of(processor)
    assert made_pixels(1, 65_500, preprocessing) == 256 * int(256 * 65_500)
    for width, height in ((1, 65_500), (65_500, 1)):
        data = write_huge_png(tmp_path / f"{width}x{height}.png", width, height).read_bytes()
        pixels, *size, error = decode_file("strip.png", data, preprocessing, LIMIT)
        assert pixels is None and size == [width, height]
        assert error.startswith(f"too_large: {width}x{height}: preprocessing for this model would make an image of "
                                f"{256 * 256 * 65_500} pixels"), error
    pixels, *_, error = decode_file("strip.png", write_huge_png(tmp_path / "s.png", 40, 4000).read_bytes(),
                                    preprocessing, LIMIT)
    assert error == "" and pixels.size == 3 * 224 * 224


def test_decode_batch_keeps_every_row(tmp_path):
    from transformers import ViTImageProcessor

    spec = resolve_spec(ViTImageProcessor(size={"height": 32, "width": 32}))
    good = write_image(tmp_path / "good.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    paths = np.array([str(good), str(tmp_path / "empty.jpg"), str(tmp_path / "missing.jpg")], dtype=object)
    out = decode_batch({"path": paths, "true_label": np.array(["a", "", "b"], dtype=object)}, spec=spec, max_pixels=LIMIT)
    assert out["pixels"].shape == (3, 32, 32, 3) and out["pixels"].dtype == np.uint8
    assert out["error"][0] == "" and out["error"][1].startswith("empty_file")
    assert out["error"][2].startswith("read_error")
    assert list(out["width"]) == [64, -1, -1] and list(out["true_label"]) == ["a", "", "b"]


def test_special_files_are_never_opened(tmp_path):
    """A FIFO would block a read forever, /dev/zero never ends: in a list they get
    read_error rows at once; a folder listing skips and counts them."""
    from transformers import ViTImageProcessor

    from visionbatch.sources import ListingCounts, iter_source
    from visionbatch.storage import Storage

    spec = resolve_spec(ViTImageProcessor(size={"height": 32, "width": 32}))
    os.mkfifo(tmp_path / "fifo.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    os.symlink("/dev/urandom", tmp_path / "urandom.jpg")
    big = write_image(tmp_path / "big.png", size=(300, 300))
    paths = [str(tmp_path / name) for name in ("fifo.jpg", "zero.jpg", "urandom.jpg", "big.png")]
    out = decode_batch({"path": np.array(paths, dtype=object)}, spec=spec, max_pixels=LIMIT,
                       max_bytes=big.stat().st_size - 1)
    assert list(out["error"][:3]) == ["read_error: not a regular file (a FIFO)",
                                      "read_error: not a regular file (a character device)",
                                      "read_error: not a regular file (a character device)"]
    assert out["error"][3].startswith("read_error: larger than") and "--max-bytes" in out["error"][3]

    counts = ListingCounts()
    assert list(iter_source(str(tmp_path), Storage(), counts)) == [[str(big)]]
    assert counts.skipped_special == 3 and len(counts.special_examples) == 3


def test_a_hung_read_times_out(tmp_path, silent_server):
    """Reads from a server that never answers end as read_error rows after the timeout;
    the other files of the batch are decoded (nothing waits forever)."""
    from transformers import ViTImageProcessor

    from visionbatch.storage import Storage

    spec = resolve_spec(ViTImageProcessor(size={"height": 32, "width": 32}))
    good = [str(write_image(tmp_path / f"good{i}.jpg", seed=i)) for i in range(3)]
    paths = [good[0], "s3://bucket/hung-1.jpg", good[1], "s3://bucket/hung-2.jpg", good[2]]
    out = decode_batch({"path": np.array(paths, dtype=object)}, spec=spec, max_pixels=LIMIT,
                       storage=Storage(silent_server), read_timeout=1.0)
    assert list(out["error"]) == ["", "read_error: timed out after 1 s (--read-timeout)", "",
                                  "read_error: timed out after 1 s (--read-timeout)", ""]


def test_hung_reads_beyond_the_window_do_not_starve_the_next(tmp_path, silent_server):
    """More hung reads than reader threads: each hung read gives up its place to a new
    thread, so the good files after them are still read."""
    from visionbatch.samples import read_ahead
    from visionbatch.storage import Storage

    good = [str(write_image(tmp_path / f"good{i}.jpg", seed=i)) for i in range(3)]
    paths = [f"s3://bucket/hung-{i}.jpg" for i in range(3)] + good
    out = list(read_ahead(paths, Storage(silent_server), None, timeout=0.5, window=2))
    assert out[:3] == ["read_error: timed out after 0.5 s (--read-timeout)"] * 3
    assert out[3:] == [Path(file).read_bytes() for file in good]
