"""The one typed object that holds a job's options.

The CLI builds it, the Python API takes it (or keyword arguments that build it), and
the pipeline reads only it. Defaults live here once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

DEFAULT_MODEL = "google/vit-base-patch16-224"

# Pillow's own default decompression-bomb threshold (Image.MAX_IMAGE_PIXELS).
DEFAULT_MAX_PIXELS = 89_478_485

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Format = Literal["parquet", "csv", "jsonl"]
LabelsMode = Literal["dirs", "none"]


@dataclass(frozen=True)
class ClassifyConfig:
    """Everything one classification job needs to know."""

    sources: tuple[str, ...]
    model: str = DEFAULT_MODEL
    top_k: int = 5
    batch_size: int | None = None  # None: chosen per device (see pipeline.resolve_plan)
    replicas: int | None = None  # None: one per GPU, or one CPU replica
    gpus_per_replica: float = 1.0
    model_threads: int | None = None  # None: see pipeline.cpu_model_threads
    device: Device = "auto"
    dtype: DType = "auto"
    limit: int | None = None
    from_list: bool = False
    labels: LabelsMode = "dirs"
    label_map: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_pickle: bool = False
    trust_remote_code: bool = False
    s3_endpoint: str | None = None
    address: str | None = None
    compile: bool = False
    decode_batch_size: int = 16
    max_retries: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))
        else:
            object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        if not self.sources:
            raise ValueError("at least one source is required")
        if self.top_k < 1:
            raise ValueError("--top-k must be at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if self.replicas is not None and self.replicas < 1:
            raise ValueError("--replicas must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError("--limit must be at least 1")
        if self.max_pixels < 1:
            raise ValueError("--max-pixels must be at least 1")

    def replace(self, **changes) -> "ClassifyConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class OutputConfig:
    """Where and how results are written."""

    dest: str
    format: Format = "parquet"
    overwrite: bool = False
    resume: bool = False
    rows_per_file: int = 100_000
    flush_seconds: float = 30.0  # progress is committed at least this often (what --resume keeps)


def config_from_kwargs(sources: str | Sequence[str], **options) -> ClassifyConfig:
    """Build a ClassifyConfig from keyword arguments, rejecting unknown names clearly."""
    known = {f.name for f in dataclasses.fields(ClassifyConfig)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return ClassifyConfig(sources=tuple([sources] if isinstance(sources, str) else sources), **options)
