"""The typed objects that hold a job's options, and the command-line flags made from them.

The CLI builds them, the Python API takes them (or keyword arguments that build them),
and the pipeline reads only them. Each option's default and help text live here once:
:func:`add_options` turns the fields into ``argparse`` flags, so names, defaults and
help cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal, Sequence

DEFAULT_MODEL = "google/vit-base-patch16-224"

# Pillow's own default decompression-bomb threshold (Image.MAX_IMAGE_PIXELS).
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_READ_TIMEOUT_S = 60.0
DEFAULT_MAX_BYTES = 50_000_000  # a 12-MP JPEG is ~5 MB, a 100-MP TIFF ~300 MB: raise it for such collections

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Format = Literal["parquet", "csv", "jsonl"]
LabelsMode = Literal["dirs", "none"]


def option(default, help: str, *, flag: str | None = None, metavar: str | None = None, cli: bool = True):
    """A config field with its command-line help (``cli=False``: API only)."""
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar, "cli": cli})


@dataclass(frozen=True)
class ClassifyConfig:
    """Everything one classification job needs to know."""

    sources: tuple[str, ...]
    model: str = option(DEFAULT_MODEL, f"hub id or local save_pretrained folder (default {DEFAULT_MODEL})")
    from_list: bool = option(False, "SOURCEs are text files (one path per line) or CSV/Parquet files with a 'path' "
                             "column; relative paths are taken from the working directory")
    follow_symlinks: bool = option(False, "follow folder symlinks that lead out of a SOURCE folder (each folder "
                                   "once: cycles are cut)")
    top_k: int = option(5, "labels and scores kept per image")
    batch_size: int | None = option(None, "images per forward pass (default: measured on GPU, largest that "
                                    "still speeds up; 16 on CPU)")
    replicas: int | None = option(None, "model replicas (default: one per GPU, or one on CPU)")
    gpus_per_replica: float = option(1.0, "GPUs per model replica (fractions allowed)")
    model_threads: int | None = option(None, "torch threads per CPU model replica (default: all cores but one "
                                       "in eight)", flag="--threads")
    device: Device = option("auto", "where the model runs")
    dtype: DType = option("auto", "auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU")
    limit: int | None = option(None, "classify only the first N images (in listing order)", metavar="N")
    labels: LabelsMode = option("dirs", "dirs: true label from the parent folder's name; none: no labels")
    label_map: str | None = option(None, "CSV of folder,label that overrides folder-name matching", metavar="FILE")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "refuse images with more pixels than this, checked from the header")
    max_bytes: int = option(DEFAULT_MAX_BYTES, "refuse files larger than this many bytes (a read_error row)")
    read_timeout: float = option(DEFAULT_READ_TIMEOUT_S, "seconds to wait for one file's bytes before giving it a "
                                 "read_error row (a hung mount or server)", metavar="SECONDS")
    shard_size: int = option(1000, "images per shard: the unit of work, of output (one part file each) and of "
                             "--resume", metavar="N")
    allow_pickle: bool = option(False, "also load pickled (.bin) weights; only for models you trust")
    trust_remote_code: bool = option(False, "run model code from the hub repo; only for repos you trust")
    s3_endpoint: str | None = option(None, "S3-compatible endpoint (default: $AWS_ENDPOINT_URL)", metavar="URL")
    address: str | None = option(None, "join a running Ray cluster (default: start a local Ray)")
    compile: bool = option(False, "torch.compile the model")
    max_retries: int = option(3, "attempts after the first for a failed task or a dead model actor", cli=False)

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))
        else:
            object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        if not self.sources:
            raise ValueError("at least one source is required")
        for name in ("top_k", "batch_size", "replicas", "limit", "max_pixels", "max_bytes", "shard_size", "read_timeout"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")

    def replace(self, **changes) -> "ClassifyConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class OutputConfig:
    """Where and how results are written."""

    dest: str
    format: Format = option("parquet", "result file format (csv: top-k lists as JSON arrays)")
    overwrite: bool = option(False, "replace results already in DEST")
    resume: bool = option(False, "continue an interrupted job into the same DEST")
    flush_seconds: float = option(30.0, "commit finished shards to the manifest at least this often", cli=False)

    def __post_init__(self) -> None:
        if self.overwrite and self.resume:
            raise ValueError("--overwrite and --resume contradict each other: choose one")


def add_options(parser: argparse.ArgumentParser, config_class) -> None:
    """One flag per field of ``config_class`` that has command-line help."""
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        meta = f.metadata
        if not meta.get("help") or not meta.get("cli"):
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        args = typing.get_args(kind)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
            continue
        if typing.get_origin(kind) is Literal:
            parser.add_argument(flag, dest=f.name, choices=args, default=f.default,
                                help=f"{meta['help']} (default {f.default})")
            continue
        scalar = next(a for a in args if a is not type(None)) if args else kind
        default = "" if f.default is None or "default" in meta["help"] else f" (default {f.default})"
        parser.add_argument(flag, dest=f.name, type=scalar, default=f.default, metavar=meta["metavar"],
                            help=meta["help"] + default)


def options_of(config_class, namespace: argparse.Namespace) -> dict:
    """The fields of ``config_class`` that ``namespace`` holds."""
    return {f.name: getattr(namespace, f.name) for f in dataclasses.fields(config_class) if hasattr(namespace, f.name)}


def config_from_kwargs(sources: str | Sequence[str], **options) -> ClassifyConfig:
    """Build a ClassifyConfig from keyword arguments, rejecting unknown names clearly."""
    known = {f.name for f in dataclasses.fields(ClassifyConfig)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return ClassifyConfig(sources=tuple([sources] if isinstance(sources, str) else sources), **options)
