"""Write a text list of N image paths, one per line, for scale runs of ``classify --from-list``.

    python benchmarks/make_path_list.py N OUT.txt [--root /nonexistent/images] [--folders 1000]

Paths look like ``ROOT/n01440764/img_000000123.jpg``: N/FOLDERS consecutive paths per
ImageNet class folder, so the list comes out sorted, as ``find | sort`` would give it.
The files need not exist (missing files become error rows, which measures the
pipeline's overhead without decoding). Written in chunks: memory stays constant and
10,000,000 lines take a few seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

CHUNK = 100_000  # lines per write: big enough to be fast, small enough to keep memory flat


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet class folder names, read from visionbatch's package data without
    importing the package (no Ray or torch import, and immune to a half-edited pipeline)."""
    package = Path(importlib.util.find_spec("visionbatch").submodule_search_locations[0])
    lines = (package / "data" / "imagenet_classes.tsv").read_text(encoding="utf-8").splitlines()
    return [line.split("\t", 1)[0] for line in lines if line]


def write_path_list(n: int, out: str, root: str = "/nonexistent/images", folders: int = 1000) -> None:
    names = imagenet_wnids()
    names = [names[i % len(names)] + ("" if i < len(names) else f"_{i}") for i in range(folders)]
    root = root.rstrip("/")
    with open(out, "w", encoding="utf-8") as f:
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            # Folder of path i: i * folders // n, so each folder holds a contiguous block.
            f.write("".join(f"{root}/{names[i * folders // n]}/img_{i:09d}.jpg\n" for i in range(start, stop)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a text list of N image paths (one per line).")
    parser.add_argument("n", type=int)
    parser.add_argument("out")
    parser.add_argument("--root", default="/nonexistent/images")
    parser.add_argument("--folders", type=int, default=1000)
    args = parser.parse_args(argv)
    write_path_list(args.n, args.out, args.root, args.folders)
    return 0


if __name__ == "__main__":
    sys.exit(main())
