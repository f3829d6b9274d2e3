"""Large photos: JPEG DCT-domain downscaling (``draft``) against full decoding.

Makes phone-size JPEGs (4032 px long side) from the sample images, then for full
decoding (``--exact-decode``) and each draft margin: decode + resize time per image in
one process on one core, and the predictions of a real-weight model on the results:
top-1 agreement with full decoding and top-1 accuracy against the folders' labels.

    python benchmarks/large_photos.py --model /tmp/lite0 [--variants 5]  # visionbatch models make-efficientnet-lite0 /tmp/lite0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from visionbatch.bench import SAMPLE_DIR
from visionbatch.decode import decode_file
from visionbatch.labels import build_resolver, folder_of
from visionbatch.model_loading import load_processor, resolve_model_source
from visionbatch.plan import _affine
from visionbatch.predictor import Predictor
from visionbatch.preprocess import choose_preprocessing, draft_side


def make_photos(source: Path, folder: Path, long_side: int = 4032, variants: int = 1) -> list[str]:
    """Every sample image upscaled to ``long_side`` (Lanczos) and saved as a JPEG (q 90);
    with ``variants`` > 1, also mirrored and cropped versions of it (up to 5 in all), for
    a finer resolution than the 200 images' 0.5%."""
    views = [lambda im: im, ImageOps.mirror, lambda im: _crop(im, 0.5), lambda im: ImageOps.mirror(_crop(im, 0.0)),
             lambda im: _crop(im, 1.0)][:variants]
    paths = []
    for image_path in sorted(source.glob("*/*")):
        for number, view in enumerate(views):
            target = folder / image_path.parent.name / (image_path.stem + (f"-{number}" if number else "") + ".jpg")
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                image = view(Image.open(image_path).convert("RGB"))
                scale = long_side / max(image.size)
                image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS).save(
                    target, quality=90)
            paths.append(str(target))
    return paths


def _crop(image: Image.Image, where: float, keep: float = 0.85) -> Image.Image:
    """``keep`` of each side, from the top-left corner (0), the centre (0.5) or the bottom-right (1)."""
    width, height = round(image.width * keep), round(image.height * keep)
    left, top = round((image.width - width) * where), round((image.height - height) * where)
    return image.crop((left, top, left + width, top + height))


def measure(paths: list[str], spec, side: int | None, predictor: Predictor, labels) -> dict:
    pixels, seconds = [], []
    for path in paths:
        started = time.perf_counter()
        image, _, _, error = decode_file(path, Path(path).read_bytes(), spec, 10**9, side)
        seconds.append(time.perf_counter() - started)
        assert not error, error
        pixels.append(image)
    truth = [labels(folder_of(path)) for path in paths]
    table = predictor({"path": np.array(paths, dtype=object), "error": np.array([""] * len(paths), dtype=object),
                       "true_label": np.array(truth, dtype=object), "pixels": np.stack(pixels)})
    return {"draft_side": side, "ms_per_image": 1000 * float(np.median(seconds)),
            "labels": table.column("label").to_pylist(), "accuracy": float(np.mean(table.column("correct").to_pylist()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a real-weight model folder (EfficientNet-Lite0)")
    parser.add_argument("--photos", default="/tmp/visionbatch-large-photos", help="where the 4032-px JPEGs go")
    parser.add_argument("--margins", default="1,1.5,2,3", help="draft margins to compare with full decoding")
    parser.add_argument("--variants", type=int, default=1, help="photos per sample image (1-5: as is, mirrored, "
                        "cropped)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    paths = make_photos(SAMPLE_DIR, Path(args.photos), variants=args.variants)
    source = resolve_model_source(args.model)
    spec, _ = choose_preprocessing(load_processor(source, False))
    predictor = Predictor(source, **_affine(spec), top_k=1, num_threads=1, batch_size=16)
    labels = build_resolver({int(k): v for k, v in predictor.model.config.id2label.items()})
    exact = measure(paths, spec, None, predictor, labels)
    rows = [("decode", "draft side", "ms/image", "speed-up", "top-1 agreement", "accuracy")]
    results = [exact]
    rows.append(("exact", "-", f"{exact['ms_per_image']:.1f}", "1.0x", "100.0%", f"{100 * exact['accuracy']:.1f}%"))
    for margin in (float(m) for m in args.margins.split(",")):
        result = measure(paths, spec, draft_side(spec, margin), predictor, labels)
        result["margin"] = margin
        result["agreement"] = float(np.mean([a == b for a, b in zip(result["labels"], exact["labels"])]))
        results.append(result)
        rows.append((f"margin {margin:g}", str(result["draft_side"]), f"{result['ms_per_image']:.1f}",
                     f"{exact['ms_per_image'] / result['ms_per_image']:.1f}x", f"{100 * result['agreement']:.1f}%",
                     f"{100 * result['accuracy']:.1f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"{len(paths)} photos of 4032 px (long side), one core")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "labels"} for r in results], indent=1))


if __name__ == "__main__":
    main()
