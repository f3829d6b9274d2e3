"""Label errors found by ``visionbatch label-issues`` against ``cleanlab.filter.find_label_issues``
(issue 20), on ImageNet images with a known share of labels made wrong.

    python benchmarks/label_issues_vs_cleanlab.py [--images ../shared/data/imagenet-sample-200]
                                                  [--wrong 0.1] [--seed 0] [--work DIR]

Copies the images into a class-folder tree where a share (``--wrong``) of them sit in
another class's folder (the labels made wrong); builds the real ImageNet-trained
EfficientNet-Lite0 offline (``visionbatch models make-efficientnet-lite0``); runs
``visionbatch classify`` and ``visionbatch label-issues`` on the tree as a user would;
and computes the same model's full probabilities over the same files with transformers
(its own image processor) for ``cleanlab.filter.find_label_issues`` (ranked by
self-confidence, as ours). K is the number of labels made wrong; reported for each:
how many flagged, the precision of the first K flagged (also their recall), and the
precision and recall of all flagged.

The sample has one image per class: every class is a long tail, which is where a
threshold per class alone (cleanlab's) has the least to go on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_noisy_tree(images: Path, tree: Path, wrong: float, seed: int) -> dict[str, str]:
    """Copy ``images`` (class folders) to ``tree``, a share ``wrong`` of them into another
    class's folder; returns each copied file's path -> its real folder, for those moved."""
    files = sorted(p for p in images.rglob("*") if p.is_file())
    folders = sorted({p.parent.name for p in files})
    rng = np.random.default_rng(seed)
    moved = set(rng.choice(len(files), size=round(wrong * len(files)), replace=False).tolist())
    planted = {}
    for i, source in enumerate(files):
        folder = source.parent.name
        if i in moved:
            folder = rng.choice([f for f in folders if f != source.parent.name])
        target = tree / folder / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        if i in moved:
            planted[str(target)] = source.parent.name
    return planted


def visionbatch_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "visionbatch.cli", *args], check=True)


def full_probabilities(model_dir: str, paths: list[str], batch: int = 16) -> np.ndarray:
    """(N, classes) softmax of the model over the files, with transformers alone."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    out = []
    for start in range(0, len(paths), batch):
        images = [Image.open(p).convert("RGB") for p in paths[start:start + batch]]
        with torch.inference_mode():
            out.append(torch.softmax(model(**processor(images, return_tensors="pt")).logits, -1).numpy())
    return np.concatenate(out)


def scores(ranked: list[str], planted: set[str]) -> dict:
    """With K = the number made wrong, precision of the first K flagged is also their recall."""
    k, found = len(planted), len(set(ranked) & planted)
    return {"flagged": len(ranked), "precision_at_k": len(set(ranked[:k]) & planted) / k,
            "precision": found / max(len(ranked), 1), "recall": found / k}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample-200")
    parser.add_argument("--wrong", type=float, default=0.1, help="share of the labels made wrong")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="work folder (kept); default: a temporary one")
    args = parser.parse_args(argv)
    import cleanlab
    import pyarrow.parquet as pq
    from cleanlab.filter import find_label_issues

    from visionbatch.destination import LABEL_ISSUES
    from visionbatch.imagenet import imagenet_wnids

    work = args.work or Path(tempfile.mkdtemp(prefix="label-issues-vs-cleanlab-"))
    tree, dest, model = work / "tree", work / "dest", work / "efficientnet-lite0"
    shutil.rmtree(tree, ignore_errors=True)
    planted = make_noisy_tree(args.images, tree, args.wrong, args.seed)
    if not model.is_dir():
        visionbatch_cli("models", "make-efficientnet-lite0", str(model))
    started = time.perf_counter()
    visionbatch_cli("classify", str(tree), "--model", str(model), "--output", str(dest), "--overwrite", "-q")
    classified = time.perf_counter()
    visionbatch_cli("label-issues", str(dest))
    ours = pq.read_table(dest / LABEL_ISSUES).column("path").to_pylist()
    ours_s = time.perf_counter() - classified

    paths = sorted(str(p) for p in tree.rglob("*") if p.is_file())
    class_of = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    given = np.array([class_of[Path(p).parent.name] for p in paths])
    probabilities = full_probabilities(str(model), paths)
    started_cleanlab = time.perf_counter()
    ranked = find_label_issues(given, probabilities, return_indices_ranked_by="self_confidence")
    cleanlab_s = time.perf_counter() - started_cleanlab
    theirs = [paths[i] for i in ranked]

    figures = {"images": len(paths), "made_wrong": len(planted), "classify_s": round(classified - started, 1),
               "visionbatch": {**scores(ours, set(planted)), "seconds": round(ours_s, 2)},
               f"cleanlab {cleanlab.__version__}": {**scores(theirs, set(planted)), "seconds": round(cleanlab_s, 2)}}
    print(json.dumps(figures, indent=1))
    print("| method | flagged | precision (= recall) of the first K | precision, all flagged | recall, all flagged |")
    print("| --- | --- | --- | --- | --- |")
    for method, found in list(figures.items())[-2:]:
        print(f"| {method} | {found['flagged']} | {found['precision_at_k']:.0%} | {found['precision']:.0%} "
              f"| {found['recall']:.0%} |")
    if not args.work:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
