"""Every family of tests/test_families.py through OpenVINO: converted with parity against
torch float32, or a stated reason it falls back (issue 32, acceptance 4).

Each family's tiny random model (the family suite's, head scaled so that scores depend
on the input) is loaded as a job loads it, its OpenVINO path taken as a resumed job
takes a certified one (converted, cached, checked on a probe), and run beside torch on
the same 64 random images in the model's own input layout: top-1 agreement and the
largest score difference. The suite tests a handful (tests/test_runtime.py); this runs
them all (~2 minutes on 2 cores).

    .venv/bin/python benchmarks/openvino_families.py [FAMILY ...]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> int:
    os.environ.setdefault("VISIONBATCH_CACHE", tempfile.mkdtemp(prefix="visionbatch-cache-"))
    from test_families import FAMILIES, REFUSED, save_family

    from visionbatch.model_loading import ModelSource, load_processor
    from visionbatch.predictor import Predictor
    from visionbatch.plan import _affine
    from visionbatch.preprocess import UnsupportedProcessor, choose_preprocessing, pixel_layout

    work = Path(tempfile.mkdtemp(prefix="visionbatch-families-"))
    print(f"{'family':22} {'path':14} {'agree':>7} {'max score diff':>15}  note")
    for name in sys.argv[1:] or FAMILIES:
        if name in REFUSED:
            continue
        folder = save_family(name, work / name)
        try:
            spec, _ = choose_preprocessing(load_processor(ModelSource(folder, True)))
        except UnsupportedProcessor as err:
            print(f"{name:22} {'refused':14} {'':>7} {'':>15}  {err}")
            continue
        shape, dtype = pixel_layout(spec)
        arguments = dict(model=folder, **_affine(spec), pixel_layout=(shape, dtype.str), batch_size=16)
        reference = Predictor(**arguments, runtime="torch")
        candidate = Predictor(**arguments, runtime="openvino", certified_path="openvino/f32")
        candidate.paths.wait(600)
        report = candidate.paths.report()
        if report["path"] != "openvino/f32":
            print(f"{name:22} {'torch (fell back)':14} {'':>7} {'':>15}  {'; '.join(report['notes'])}")
            continue
        rng = np.random.default_rng(0)
        pixels = (rng.integers(0, 256, (64, *shape)) if dtype == np.uint8 else rng.standard_normal((64, *shape)))
        pixels = pixels.astype(dtype)
        agree, largest = 0, 0.0
        for start in range(0, 64, 16):
            ids, scores, _, _ = candidate.predict_pixels(pixels[start:start + 16])
            expected_ids, expected_scores, _, _ = reference.predict_pixels(pixels[start:start + 16])
            agree += int((ids[:, 0] == expected_ids[:, 0]).sum())
            largest = max(largest, float(np.abs(scores[:, 0] - expected_scores[:, 0]).max()))
        print(f"{name:22} {'openvino/f32':14} {agree:>4}/64 {largest:>15.2g}  {report['notes'][0].split(', ', 1)[1]}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
