"""Label errors found by ``visionbatch label-issues`` against two baselines (issues 20 and 34),
on ImageNet images with a known share of labels moved to another class.

    pip install cleanlab     # benchmark only
    python benchmarks/label_issues_vs_cleanlab.py --work /tmp/li-bench [--seeds 10] [--json FILE]
                                                  [--before REVISION]

The images: the 200 sample images (``--images``, one per ImageNet class) and three
edited copies of each (JPEG re-encoded at quality 25 and shrunk to 60%, the middle 80%
cropped and mirrored, recoloured and rotated 4 degrees): 800 files. The real
ImageNet-trained EfficientNet-Lite0 is built offline (``visionbatch models
make-efficientnet-lite0``) and its full 1000-class probabilities over every file are
computed once with transformers (its own image processor), cached in ``--work``.

Each setting and seed moves a share of the given labels to another class and writes a
finished DEST of the result rows ``visionbatch classify`` writes for those
probabilities (top-5, ``true_label_score``: the given label's probability), one part
file per 100 rows through the writer's own ``write_shard``; then runs ``label-issues``
on it. The same probabilities and given labels go to the baselines:

plain     every row whose top-1 differs from its given label, ranked by the given
          label's probability (lowest first)
cleanlab  ``cleanlab.filter.find_label_issues(labels, pred_probs,
          return_indices_ranked_by="self_confidence")`` (confident learning)

and, with ``--before``, label-issues as it was at that git revision (7d78162: confident
learning over the top-5, issue 20's rule).

Settings:

long-tail-200  the 200 originals: one image per class, 5% of labels moved (K = 10)
long-tail-800  the 800 files (issue 34's figure: one original and its three copies per
               class), 5% moved (K = 40)
dense-5%, -10% the 800 files under 20 coarse classes (ImageNet's class index // 50: its
               order follows WordNet, so neighbours are alike, e.g. fish and birds,
               dogs, ...; a coarse class's probability is the sum of its fine ones),
               ~40 files per class from ~10 different photographs, 5% or 10% moved
               (K = 40, 80)
conflicts      the 800 files, 10 edited copies filed under another class, and
               ``DEST/_derived/duplicates/duplicates.parquet`` grouping each original with its
               copies (as ``visionbatch duplicates`` writes it); run with and without it

K is the number moved; reported for each: how many flagged, the precision of the first
K flagged (= their recall), the precision and recall of all flagged; mean and worst
over the seeds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
TOP_K = 5
COPIES = ("jpeg25-small", "crop-mirror", "recolour-rotate")
COARSE_WIDTH = 50  # fine ImageNet classes per coarse class
PART_ROWS = 100


def edited_copies(image):
    """The three edited copies of a PIL image, named as COPIES."""
    import io

    from PIL import Image, ImageEnhance, ImageOps

    small = image.resize((max(1, image.width * 3 // 5), max(1, image.height * 3 // 5)), Image.BILINEAR)
    encoded = io.BytesIO()
    small.save(encoded, "JPEG", quality=25)
    w, h = image.size
    cropped = ImageOps.mirror(image.crop((w // 10, h // 10, w - w // 10, h - h // 10)))
    recoloured = ImageEnhance.Brightness(ImageEnhance.Color(image).enhance(1.6)).enhance(0.85).rotate(4)
    return [Image.open(encoded), cropped, recoloured]


def build_images(sample: Path, images: Path) -> list[tuple[str, str, int]]:
    """The originals and their copies under ``images/<wnid>/``; returns (path, wnid, source
    number) for each file, originals first."""
    from PIL import Image

    originals = sorted(p for p in sample.rglob("*") if p.is_file())
    files, copies = [], []
    for number, source in enumerate(originals):
        folder = images / source.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / source.name
        if not target.exists():
            shutil.copyfile(source, target)
        files.append((str(target), source.parent.name, number))
        with Image.open(source) as image:
            image = image.convert("RGB")
            for name, copy in zip(COPIES, edited_copies(image)):
                path = folder / f"{source.stem}-{name}.jpg"
                if not path.exists():
                    copy.convert("RGB").save(path, "JPEG", quality=90)
                copies.append((str(path), source.parent.name, number))
    return files + copies


def full_probabilities(model_dir: str, paths: list[str], batch: int = 16) -> np.ndarray:
    """(N, 1000) softmax of the model over the files, with transformers alone."""
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
        print(f"\rprobabilities {start + len(images)}/{len(paths)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return np.concatenate(out)


def cached_probabilities(work: Path, sample: Path) -> tuple[list[tuple[str, str, int]], np.ndarray]:
    from visionbatch.cli import main as visionbatch

    files = build_images(sample, work / "images")
    model, cache = work / "efficientnet-lite0", work / "probabilities.npy"
    if not model.is_dir():
        visionbatch(["models", "make-efficientnet-lite0", str(model)])
    if not cache.exists():
        np.save(cache, full_probabilities(str(model), [path for path, _, _ in files]).astype(np.float32))
    return files, np.load(cache)


def result_rows(paths: list[str], probabilities: np.ndarray, names: np.ndarray, given: np.ndarray) -> pa.Table:
    """The rows ``classify`` writes for these probabilities and given labels (class indices)."""
    from visionbatch.results import RESULT_SCHEMA, TRUE_LABEL_SCORE

    n = len(paths)
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :TOP_K]
    top_scores = np.take_along_axis(probabilities, top, axis=1)
    offsets = pa.array(np.arange(0, (n + 1) * TOP_K, TOP_K, dtype=np.int32))
    return pa.table({
        "path": paths, "label": names[top[:, 0]], "label_id": top[:, 0], "score": top_scores[:, 0],
        "top_k_labels": pa.ListArray.from_arrays(offsets, pa.array(names[top.ravel()])),
        "top_k_scores": pa.ListArray.from_arrays(offsets, pa.array(top_scores.ravel())),
        "true_label": names[given], "correct": top[:, 0] == given,
        TRUE_LABEL_SCORE: probabilities[np.arange(n), given],
        "error": pa.nulls(n, pa.string()), "width": pa.nulls(n, pa.int32()), "height": pa.nulls(n, pa.int32()),
    }, schema=RESULT_SCHEMA)


def write_dest(dest: Path, rows: pa.Table) -> None:
    """A finished DEST of ``rows``, a part file per PART_ROWS, as a job writes it."""
    from visionbatch.destination import Destination
    from visionbatch.manifest import Manifest
    from visionbatch.writer import write_shard

    shutil.rmtree(dest, ignore_errors=True)
    destination = Destination(str(dest))
    manifest = Manifest(destination, {"benchmark": "label-issues", "format": "parquet"})
    for seq, start in enumerate(range(0, rows.num_rows, PART_ROWS)):
        manifest.add(write_shard(destination, f"000-{seq:07d}", rows.slice(start, PART_ROWS), "parquet"))
    manifest.write(complete=True)


def write_duplicates(dest: Path, paths: list[str], groups: np.ndarray, given_labels: np.ndarray) -> None:
    """DEST/_derived/duplicates/duplicates.parquet as ``visionbatch duplicates`` writes it; a group's
    first file (the original) is kept. ``similarity``: label-issues does not read it."""
    import pyarrow.parquet as pq

    from visionbatch.destination import DUPLICATES

    first = np.unique(groups, return_index=True)[1]
    keep = np.zeros(len(paths), bool)
    keep[first] = True
    (dest / DUPLICATES).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "path": paths, "group": pa.array(groups, pa.int64()), "keep": keep,
        "similarity": pa.array(np.full(len(paths), np.nan), pa.float32()),
        "kind": ["near"] * len(paths), "given_label": pa.array(given_labels, pa.string())}), dest / DUPLICATES)


def move_labels(real: np.ndarray, chosen: np.ndarray, rng) -> np.ndarray:
    """``real`` with the rows ``chosen`` given another of the classes present, at random."""
    classes = np.unique(real)
    given = real.copy()
    for i in chosen:
        given[i] = rng.choice(classes[classes != real[i]])
    return given


def plain_ranking(probabilities: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Rows whose top-1 is not the given label, by the given label's probability."""
    self_confidence = probabilities[np.arange(len(given)), given]
    flagged = np.flatnonzero(probabilities.argmax(1) != given)
    return flagged[np.lexsort((flagged, self_confidence[flagged]))]


def scores(ranked: list[int], moved: set[int]) -> dict:
    """With K = the number moved, precision of the first K flagged is also their recall."""
    k, found = len(moved), len(set(ranked) & moved)
    return {"flagged": len(ranked), "precision_at_k": len(set(ranked[:k]) & moved) / k,
            "precision": found / max(len(ranked), 1), "recall": found / k}


def label_issues_at(revision: str, work: Path):
    """``find_label_issues`` as ``src/visionbatch/label_issues.py`` was at a git revision."""
    import importlib.util
    import subprocess

    source = work / f"label_issues_{revision}.py"
    source.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:src/visionbatch/label_issues.py"],
                                     check=True, capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location(source.stem, source)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module.find_label_issues


def compare(work: Path, paths: list[str], probabilities: np.ndarray, names: np.ndarray, given: np.ndarray,
            moved: set[int], duplicates: np.ndarray | None = None, before=None) -> dict[str, dict]:
    """Each method's scores on one setting and seed; with ``duplicates`` (each file's group)
    label-issues runs twice: without, then with DEST/_derived/duplicates/duplicates.parquet; with
    ``before`` (an older ``find_label_issues``), that one first."""
    import pyarrow.parquet as pq
    from cleanlab.filter import find_label_issues as cleanlab_issues

    from visionbatch.label_issues import find_label_issues
    from visionbatch.destination import LABEL_ISSUES

    dest = work / "dest"
    row_of = {path: i for i, path in enumerate(paths)}
    write_dest(dest, result_rows(paths, probabilities, names, given))
    runs = {"visionbatch": (find_label_issues, None)}
    if duplicates is not None:
        runs = {"visionbatch, no duplicates table": (find_label_issues, None),
                "visionbatch": (find_label_issues, duplicates)}
    if before:
        runs = {"visionbatch before": (before, None), **runs}
    figures = {}
    for method, (find, groups) in runs.items():
        if groups is not None:
            write_duplicates(dest, paths, groups, names[given])
        find(str(dest))
        issues = pq.read_table(dest / LABEL_ISSUES)
        figures[method] = scores([row_of[path] for path in issues.column("path").to_pylist()], moved)
        if groups is not None:
            conflicts = issues.filter(pa.compute.equal(issues.column("reason"), "duplicate_conflict"))
            figures[method]["conflicts"] = conflicts.num_rows
    figures["plain"] = scores(plain_ranking(probabilities, given).tolist(), moved)
    figures["cleanlab"] = scores(cleanlab_issues(given, probabilities, return_indices_ranked_by="self_confidence")
                                 .tolist(), moved)
    return figures


@dataclass(frozen=True)
class Setting:
    name: str
    paths: list[str]
    probabilities: np.ndarray
    names: np.ndarray  # class names
    real: np.ndarray  # each file's class
    movable: np.ndarray  # the files whose labels may move
    moves: int
    groups: np.ndarray | None = None  # each file's photograph: DEST's duplicate groups


def settings(files: list[tuple[str, str, int]], probabilities: np.ndarray):
    """The settings of the module docstring."""
    from visionbatch.imagenet import imagenet_wnids

    wnids = np.array(imagenet_wnids())
    index = {wnid: i for i, wnid in enumerate(wnids)}
    paths = [path for path, _, _ in files]
    fine = np.array([index[wnid] for _, wnid, _ in files])
    sources = np.array([number for _, _, number in files])
    everything, originals = np.arange(len(files)), len(np.unique(sources))  # originals come first
    coarse = probabilities.reshape(len(files), -1, COARSE_WIDTH).sum(2)
    coarse_names = np.array([f"{wnids[c]}..{wnids[c + COARSE_WIDTH - 1]}" for c in range(0, len(wnids), COARSE_WIDTH)])
    yield Setting("long-tail-200", paths[:originals], probabilities[:originals], wnids, fine[:originals],
                  everything[:originals], round(0.05 * originals))
    yield Setting("long-tail-800", paths, probabilities, wnids, fine, everything, round(0.05 * len(files)))
    for share in (0.05, 0.10):
        yield Setting(f"dense-{share:.0%}", paths, coarse, coarse_names, fine // COARSE_WIDTH, everything,
                      round(share * len(files)))
    yield Setting("conflicts", paths, probabilities, wnids, fine, everything[originals:], 10, sources)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample-200")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1: which labels move, and where")
    parser.add_argument("--work", type=Path, help="work folder (kept: images, model, probabilities); "
                        "default: a temporary one")
    parser.add_argument("--json", type=Path, help="also write every seed's figures here")
    parser.add_argument("--before", metavar="REVISION", help="also run label-issues as it was at this git revision")
    args = parser.parse_args(argv)
    import cleanlab

    work = args.work or Path(tempfile.mkdtemp(prefix="label-issues-vs-cleanlab-"))
    files, probabilities = cached_probabilities(work, args.images)
    before = label_issues_at(args.before, work) if args.before else None
    every = {}
    for setting in settings(files, probabilities):
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            moved = rng.choice(setting.movable, setting.moves, replace=False)
            given = move_labels(setting.real, moved, rng)
            figures = compare(work, setting.paths, setting.probabilities, setting.names, given,
                              set(moved.tolist()), setting.groups, before)
            figures["moved"] = sorted(setting.paths[i] for i in moved)
            every.setdefault(setting.name, []).append(figures)
    print(f"cleanlab {cleanlab.__version__}; {args.seeds} seeds; mean (worst) over the seeds")
    print("| setting | K | method | flagged | precision of the first K | recall, all flagged |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, runs in every.items():
        k = len(runs[0]["moved"])
        for method in [key for key in runs[0] if key != "moved"]:
            table = {key: np.array([run[method][key] for run in runs]) for key in runs[0][method]}
            conflicts = f" ({table['conflicts'].mean():.1f} as duplicate conflicts)" if "conflicts" in table else ""
            print(f"| {name} | {k} | {method} | {table['flagged'].mean():.0f}{conflicts} "
                  f"| {table['precision_at_k'].mean():.3f} ({table['precision_at_k'].min():.2f}) "
                  f"| {table['recall'].mean():.3f} ({table['recall'].min():.2f}) |")
    if args.json:
        args.json.write_text(json.dumps(every, indent=1))
    if not args.work:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
