"""Ray's start-up floor on this machine: what any Ray Data job pays before its first
result, measured the way ``visionbatch classify`` starts Ray (local, no dashboard).

    python benchmarks/ray_floor.py [--model DIR]   # DIR: a save_pretrained classifier (default: a random ViT-Ti)

Each step runs in a fresh process (``python -c``), so imports are paid as a job pays them:

- python + ``import ray``;
- ``ray.init`` (local Ray: GCS, raylet, the first workers);
- a Ray Data job whose first result needs one actor stage doing nothing
  (``range -> map_batches(actor) -> first batch``): Ray Data's own start-up;
- the same with an actor that imports torch and transformers and loads the model,
  then classifies one batch of 16 zero images: the floor of a model actor;
- the plain transformers pipeline in one process (import, load, one batch of 16): the
  same work without Ray.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = {
    "import ray": "import ray",
    "ray.init (local)": "from visionbatch.engines.ray import init_ray; init_ray(None)",
    "Ray Data, one no-op actor, first batch": """
from visionbatch.engines.ray import init_ray; init_ray(None)
import ray
class Noop:
    def __call__(self, batch): return batch
next(iter(ray.data.range(16).map_batches(Noop, compute=ray.data.ActorPoolStrategy(size=1)).iter_batches()))
""",
    "Ray Data, model actor, first batch of 16": """
from visionbatch.engines.ray import init_ray; init_ray(None)
import ray
class Model:
    def __init__(self):
        import torch
        from transformers import AutoModelForImageClassification
        self.torch, self.model = torch, AutoModelForImageClassification.from_pretrained(MODEL).eval()
    def __call__(self, batch):
        with self.torch.inference_mode():
            self.model(pixel_values=self.torch.zeros(len(batch["id"]), 3, 224, 224))
        return batch
next(iter(ray.data.range(16).map_batches(Model, batch_size=16, compute=ray.data.ActorPoolStrategy(size=1)).iter_batches()))
""",
    "no Ray: import, load, first batch of 16": """
import torch
from transformers import AutoModelForImageClassification
model = AutoModelForImageClassification.from_pretrained(MODEL).eval()
with torch.inference_mode():
    model(pixel_values=torch.zeros(16, 3, 224, 224))
""",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a save_pretrained image classifier folder (default: a random ViT-Ti)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        model = args.model
        if not model:
            from visionbatch.bench import make_vit

            model = make_vit(Path(work) / "vit", "tiny")
        figures = {}
        for name, code in STEPS.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"MODEL = {str(model)!r}\n{code}"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            figures[name] = round(time.perf_counter() - started, 2)
            print(f"{name:45s} {figures[name]:6.2f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
