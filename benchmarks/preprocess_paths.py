"""The CPU stage's images/s on the fast path (uint8 resize/crop, affine on the model's
device) against the slow path (the model's own processor on the CPU workers), on the
same files, one core, side by side in one run.

    python benchmarks/preprocess_paths.py [IMAGES_DIR] [--repeat 3]

Both paths read, decode and orient the image the same way; they differ in what comes
after (and the slow path ships 4x the bytes to the model stage, not counted here).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from visionbatch.decode import decode_batch
from visionbatch.preprocess import ProcessorPath, choose_preprocessing

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample-200"


def processors() -> dict:
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    return {"ViT (resize 224)": ViTImageProcessor(size={"height": 224, "width": 224}),
            "ConvNeXt (shortest edge 256, crop 224)": ConvNextImageProcessor(size={"shortest_edge": 224},
                                                                              crop_pct=0.875)}


def images_per_s(paths: np.ndarray, preprocessing, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        decode_batch({"path": paths}, spec=preprocessing, max_pixels=10**9)
        best = min(best, time.perf_counter() - started)
    return len(paths) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="?", default=str(SAMPLE_DIR))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    paths = np.array(sorted(str(p) for p in Path(args.images).rglob("*.JPEG")) or
                     sorted(str(p) for p in Path(args.images).rglob("*.jpg")), dtype=object)
    print(f"{len(paths)} images, best of {args.repeat}, one process")
    for name, processor in processors().items():
        fast, reason = choose_preprocessing(processor)
        assert not isinstance(fast, ProcessorPath), reason
        slow = ProcessorPath.of(processor)
        fast_rate, slow_rate = images_per_s(paths, fast, args.repeat), images_per_s(paths, slow, args.repeat)
        print(f"{name}: fast {fast_rate:.0f} img/s, slow {slow_rate:.0f} img/s, slow/fast {slow_rate / fast_rate:.2f}")


if __name__ == "__main__":
    main()
