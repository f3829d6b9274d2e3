"""Save a random-weight micro ViT (hidden 64, 2 layers, 1000 ImageNet labels, 224x224
ViTImageProcessor) with ``save_pretrained``, for scale runs where the model must cost
next to nothing.

    python benchmarks/make_micro_vit.py OUT_FOLDER
"""

import sys
from pathlib import Path

from visionbatch.bench import make_vit  # the benchmark's own builder: one definition of "micro"

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(make_vit(Path(sys.argv[1]), "micro"))
