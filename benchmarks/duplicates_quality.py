"""Near-duplicates found by the ``duplicates`` stages (issue 34) on real photographs and
edited copies of them, against perceptual hashing and cleanlab Datalab.

    pip install imagehash cleanlab   # the two baselines (benchmark only; not visionbatch's requirements)
    python benchmarks/duplicates_quality.py [--images ../shared/data/imagenet-sample-200]
                                            [--edited 90] [--seed 0] [--work DIR] [--threshold T]

Copies the sample images (one folder per class) into a tree and adds edited copies of
``--edited`` of them, one edit each, cycling through: JPEG re-encoded at quality 15,
resized to half, cropped to the central 80%, mirrored, recoloured (saturation 0.4,
brightness 1.2), rotated 5 degrees, and a byte-for-byte copy; every third copy is filed
under another class's folder. Builds the real ImageNet-trained EfficientNet-Lite0 offline
(``visionbatch models make-efficientnet-lite0``), runs ``visionbatch classify TREE
--output DEST --model LITE0 --embeddings`` as a user would, then the duplicates stages
with default settings (``visionbatch duplicates``: ``run_duplicates``).

Truth: an original and its copy are a pair; no other two files are. Reported for each
method, over pairs of files: precision and recall. Ours: two files in one output group
(what a user acts on). pHash (``imagehash.phash``, 64 bits): Hamming distance at most
h, at the h with the best F1 (chosen on the truth, so its figure is an upper bound).
cleanlab: ``Datalab.find_issues(features=embeddings, issue_types={"near_duplicate": {}})``
on the same embeddings, two files in one ``near_duplicate_sets``.

Also printed: the cosines of true pairs and the highest cosines of other pairs, and
precision/recall of the pair graph (cosine >= t) at several t: how DEFAULT_DUPLICATE_THRESHOLD
was chosen.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EDITS = ("jpeg15", "half", "crop80", "mirror", "recolour", "rotate5", "bytes")


def edit(source: Path, target: Path, kind: str) -> None:
    from PIL import Image, ImageEnhance, ImageOps

    if kind == "bytes":
        shutil.copyfile(source, target)
        return
    image = Image.open(source).convert("RGB")
    width, height = image.size
    if kind == "half":
        image = image.resize((width // 2, height // 2), Image.BICUBIC)
    elif kind == "crop80":
        image = image.crop((width // 10, height // 10, width - width // 10, height - height // 10))
    elif kind == "mirror":
        image = ImageOps.mirror(image)
    elif kind == "recolour":
        image = ImageEnhance.Brightness(ImageEnhance.Color(image).enhance(0.4)).enhance(1.2)
    elif kind == "rotate5":
        image = image.rotate(5, resample=Image.BICUBIC)
    image.save(target, "JPEG", quality=15 if kind == "jpeg15" else 90)


def make_tree(images: Path, tree: Path, edited: int, seed: int) -> set[frozenset[str]]:
    """The originals and edited copies under ``tree``; returns the true pairs (paths)."""
    files = sorted(p for p in images.rglob("*") if p.is_file())
    folders = sorted({p.parent.name for p in files})
    rng = np.random.default_rng(seed)
    for source in files:
        target = tree / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    truth = set()
    for n, i in enumerate(sorted(rng.choice(len(files), size=edited, replace=False).tolist())):
        source, kind = files[i], EDITS[n % len(EDITS)]
        folder = source.parent.name if n % 3 else rng.choice([f for f in folders if f != source.parent.name])
        target = tree / folder / f"{source.stem}__{kind}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        edit(source, target, kind)
        truth.add(frozenset((str(tree / source.parent.name / source.name), str(target))))
    return truth


def visionbatch_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "visionbatch.cli", *args], check=True)


def scores(found: set[frozenset[str]], truth: set[frozenset[str]]) -> dict:
    hits = len(found & truth)
    return {"pairs": len(found), "precision": hits / max(len(found), 1), "recall": hits / len(truth)}


def pairs_of_groups(labels: dict[str, object]) -> set[frozenset[str]]:
    """Every two paths that share a group label."""
    by_group: dict[object, list[str]] = {}
    for path, group in labels.items():
        by_group.setdefault(group, []).append(path)
    return {frozenset(pair) for members in by_group.values() for pair in itertools.combinations(members, 2)}


def phash_best(paths: list[str], truth: set[frozenset[str]]) -> dict:
    import imagehash
    from PIL import Image

    bits = np.array([imagehash.phash(Image.open(p)).hash.ravel() for p in paths])
    distance = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    best = None
    for h in range(0, 33):
        i, j = np.nonzero(np.triu(distance <= h, 1))
        figures = {"hamming": h, **scores({frozenset((paths[a], paths[b])) for a, b in zip(i, j)}, truth)}
        f1 = 2 * figures["precision"] * figures["recall"] / max(figures["precision"] + figures["recall"], 1e-9)
        if best is None or f1 > best[0]:
            best = (f1, figures)
    return best[1]


def cleanlab_near_duplicates(paths: list[str], labels: list[str], embeddings: np.ndarray) -> set[frozenset[str]]:
    from cleanlab import Datalab

    lab = Datalab(data={"label": labels}, label_name="label", verbosity=0)
    lab.find_issues(features=embeddings, issue_types={"near_duplicate": {}})
    issues = lab.get_issues("near_duplicate")
    found = set()
    for i, others in enumerate(issues["near_duplicate_sets"]):
        found |= {frozenset((paths[i], paths[j])) for j in others}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample-200")
    parser.add_argument("--edited", type=int, default=90, help="how many originals get an edited copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, help="default: config.DEFAULT_DUPLICATE_THRESHOLD")
    parser.add_argument("--work", type=Path, help="work folder (kept; the model and DEST are reused); "
                                                  "default: a temporary one")
    args = parser.parse_args(argv)
    import cleanlab
    import imagehash
    import pyarrow.parquet as pq

    from visionbatch.config import DEFAULT_DUPLICATE_THRESHOLD, DuplicatesConfig
    from visionbatch.duplicates_job import run_duplicates
    from visionbatch.destination import read_results

    threshold = args.threshold or DEFAULT_DUPLICATE_THRESHOLD
    work = args.work or Path(tempfile.mkdtemp(prefix="duplicates-quality-"))
    tree, dest, model = work / "tree", work / "dest", work / "efficientnet-lite0"
    if not (dest / "_SUCCESS").exists():
        shutil.rmtree(tree, ignore_errors=True)
        make_tree(args.images, tree, args.edited, args.seed)
        if not model.is_dir():
            visionbatch_cli("models", "make-efficientnet-lite0", str(model))
        visionbatch_cli("classify", str(tree), "--model", str(model), "--output", str(dest), "--embeddings",
                        "--overwrite", "-q")
    truth = make_tree(args.images, work / "truth-tree", args.edited, args.seed)  # the same tree again: its truth
    truth = {frozenset(p.replace(str(work / "truth-tree"), str(tree)) for p in pair) for pair in truth}
    shutil.rmtree(work / "truth-tree")

    started = time.perf_counter()
    summary = run_duplicates(DuplicatesConfig(str(dest), output=str(work / "duplicates"), threshold=threshold,
                                              overwrite=True))
    ours_s = time.perf_counter() - started
    groups = pq.read_table(work / "duplicates" / "duplicates.parquet").to_pylist()
    ours = pairs_of_groups({row["path"]: row["group"] for row in groups})

    rows = read_results(str(dest)).to_pylist()
    paths = [row["path"] for row in rows]
    embeddings = np.array([row["embedding"] for row in rows], dtype=np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosine = embeddings @ embeddings.T
    index = {path: i for i, path in enumerate(paths)}
    true_cosines = sorted(float(cosine[index[a], index[b]]) for a, b in map(tuple, truth))
    other = np.triu(np.ones_like(cosine, dtype=bool), 1)
    for a, b in map(tuple, truth):
        other[index[a], index[b]] = other[index[b], index[a]] = False
    sweep = {}
    for t in (0.70, 0.75, 0.78, 0.80, 0.82, 0.85, 0.90):
        i, j = np.nonzero(np.triu(cosine >= t, 1))
        found = {frozenset((paths[a], paths[b])) for a, b in zip(i, j)}
        sweep[t] = {k: round(v, 3) for k, v in scores(found, truth).items()}

    started = time.perf_counter()
    phash = phash_best(paths, truth)
    phash_s = time.perf_counter() - started
    started = time.perf_counter()
    theirs = cleanlab_near_duplicates(paths, [Path(p).parent.name for p in paths], embeddings)
    cleanlab_s = time.perf_counter() - started

    figures = {
        "images": len(paths), "true_pairs": len(truth), "threshold": threshold,
        "true_pair_cosines": {"min": round(true_cosines[0], 3), "p5": round(true_cosines[len(true_cosines) // 20], 3),
                              "median": round(true_cosines[len(true_cosines) // 2], 3)},
        "other_pair_cosines_top5": [round(float(c), 3) for c in np.sort(cosine[other])[-5:][::-1]],
        "true_pair_cosines_by_edit": {kind: round(min(float(cosine[index[a], index[b]]) for a, b in map(tuple, truth)
                                                      if f"__{kind}." in a + b), 3) for kind in EDITS},
        "graph_at_threshold": sweep,
        "visionbatch duplicates": {**scores(ours, truth), "seconds": round(ours_s, 2), "summary": summary},
        f"imagehash {imagehash.__version__} pHash, best Hamming": {**phash, "seconds": round(phash_s, 2)},
        f"cleanlab {cleanlab.__version__} Datalab near_duplicate": {**scores(theirs, truth),
                                                                    "seconds": round(cleanlab_s, 2)},
    }
    print(json.dumps(figures, indent=1, default=str))
    print("| method | pairs found | precision | recall |")
    print("| --- | --- | --- | --- |")
    for method in list(figures)[-3:]:
        found = figures[method]
        print(f"| {method} | {found['pairs']} | {found['precision']:.3f} | {found['recall']:.3f} |")
    if not args.work:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
