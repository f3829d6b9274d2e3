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

from visionbatch.errors import UsageError
from visionbatch.results import check_keep_columns

DEFAULT_MODEL = "google/vit-base-patch16-224"
DEFAULT_HYPOTHESIS_TEMPLATE = "This is a photo of {}."  # transformers' zero-shot pipeline's

# Pillow's own default decompression-bomb threshold (Image.MAX_IMAGE_PIXELS).
DEFAULT_MAX_PIXELS = 89_478_485
# The most pixels an image the preprocessing makes from one file may hold (the resize's
# output, its intermediate, a pad), computed from the header before decoding, as
# --max-pixels is for the file itself: a 1 x 65,500 PNG that a shortest-edge resize would
# turn into 256 x 16.8M pixels (17 GB) gets a too_large row instead.
MAX_MADE_PIXELS = DEFAULT_MAX_PIXELS
# What one decode worker process may allocate (RLIMIT_DATA: its private memory; the Ray
# object store it maps is shared and not counted). An image that still outgrows it fails
# alone, as a too_large row, never through a node's out-of-memory killer. Measured: the
# largest image the two bounds above let through (9459 x 9459 RGBA PNG, ConvNeXt) peaks
# at 1.1 GB in a process holding transformers; a Ray worker holds 0.3-0.9 GB, a process
# with 16 pyarrow threads 1.3 GB (arenas and stacks count, though mostly untouched).
DECODE_MEMORY_LIMIT = 3 << 30
DEFAULT_READ_TIMEOUT_S = 60.0
# A block's files are read 16 at a time (samples.READ_AHEAD), each for up to the read
# timeout: a worker silent for twice that is stuck (stopped, hung), not slow.
DEFAULT_STALL_TIMEOUT_S = 2 * DEFAULT_READ_TIMEOUT_S
DEFAULT_MAX_BYTES = 50_000_000  # a 12-MP JPEG is ~5 MB, a 100-MP TIFF ~300 MB: raise it for such collections

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Format = Literal["parquet", "csv", "jsonl"]
LabelsMode = Literal["dirs", "column", "none"]
Engine = Literal["auto", "local", "ray"]
Runtime = Literal["auto", "openvino", "torch"]


def option(default, help: str, *, flag: str | None = None, metavar: str | None = None, cli: bool = True):
    """A config field with its command-line help (``cli=False``: API only)."""
    return field(default=default, metadata={"help": help, "flag": flag, "metavar": metavar, "cli": cli})


@dataclass(frozen=True)
class ClassifyConfig:
    """Everything one classification job needs to know."""

    sources: tuple[str, ...]
    model: str = option(DEFAULT_MODEL, f"hub id or local save_pretrained folder (default {DEFAULT_MODEL})")
    from_list: bool = option(False, "SOURCEs are text files (one path or http(s) URL per line) or CSV/Parquet files "
                             "with a 'path' column; relative paths are taken from the working directory")
    url_column: str | None = option(None, "the CSV/Parquet list column that holds the paths or URLs (implies "
                                    "--from-list; default path)", metavar="NAME")
    image_column: str | None = option(None, "SOURCEs are Parquet files (file, folder, prefix, glob) whose column NAME "
                                      "holds the image: binary, or a {bytes, path} struct as Hugging Face datasets "
                                      "writes it", metavar="NAME")
    keep_columns: tuple[str, ...] = option((), "comma-separated input columns copied into the results (Parquet "
                                           "with --image-column, CSV/Parquet lists; default none)", metavar="A,B")
    follow_symlinks: bool = option(False, "follow folder symlinks that lead out of a SOURCE folder (each folder "
                                   "once: cycles are cut)")
    top_k: int = option(5, "labels and scores kept per image")
    batch_size: int | None = option(None, "images per forward pass (default: measured on GPU, largest that "
                                    "still speeds up; 16 on CPU)")
    replicas: int | None = option(None, "model replicas (default: one per GPU, or one on CPU)")
    gpus_per_replica: float = option(1.0, "GPUs per model replica (fractions allowed)")
    model_threads: int | None = option(None, "torch threads per CPU model replica (default: all cores but one "
                                       "in eight; on small machines only the replica's own cores when the "
                                       "model, timed at start, keeps up with decoding on them)", flag="--threads")
    device: Device = option("auto", "where the model runs")
    dtype: DType = option("auto", "auto: the fastest precision that passes the job's certificate (bf16 on GPUs that "
                          "support it, else fp16; on CPU what OpenVINO runs there), float32 until it does and "
                          "where it does not; an explicit bfloat16/float16 is certified too and used even where "
                          "it fails (reported)")
    runtime: Runtime = option("auto", "what runs the model on CPU: auto: OpenVINO (pip install "
                              "'visionbatch[openvino]') once it passes the job's certificate (its answers against "
                              "torch float32 on the job's own first images) and is fast enough to pay for it, else "
                              "torch; openvino: OpenVINO once it passes the certificate; torch: torch only")
    limit: int | None = option(None, "classify only the first N images (in listing order)", metavar="N")
    labels: LabelsMode = option("dirs", "dirs: true label from the parent folder's name; column: from "
                                "--label-column; none: no labels")
    label_column: str | None = option(None, "the true label's column (with --image-column) or WebDataset member "
                                      "extension (cls: a class index, txt: a class name); implies --labels column",
                                      metavar="NAME")
    label_map: str | None = option(None, "CSV of folder,label that overrides folder-name matching", metavar="FILE")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "refuse images with more pixels than this, checked from the header")
    max_bytes: int = option(DEFAULT_MAX_BYTES, "refuse files larger than this many bytes (a read_error row)")
    exact_decode: bool = option(False, "decode every JPEG at full size, for bit-for-bit parity with the "
                                "transformers pipeline (default: large JPEGs are decoded at 1/2-1/8 scale where "
                                "that leaves at least three times the model's resize side)")
    read_timeout: float = option(DEFAULT_READ_TIMEOUT_S, "seconds to wait for one file's bytes before giving it a "
                                 "read_error row (a hung mount or server)", metavar="SECONDS")
    stall_timeout: float = option(DEFAULT_STALL_TIMEOUT_S, "how long the model may wait on a decode worker that "
                                  "sends nothing of the shard it started (a stopped or hung process; time the model "
                                  "is busy does not count) before the workers are replaced and their shards done "
                                  "again (local engine); keep it above --read-timeout", metavar="SECONDS")
    shard_size: int = option(1000, "images per shard: the unit of work, of output (one part file each) and of "
                             "--resume", metavar="N")
    allow_pickle: bool = option(False, "also load pickled (.bin) weights; only for models you trust")
    trust_remote_code: bool = option(False, "run model code from the hub repo; only for repos you trust")
    download_timeout: float = option(30.0, "seconds an http(s) server may take to connect or to send (URLs)",
                                     metavar="S")
    download_retries: int = option(3, "retries of an http(s) download answered 429 or 5xx, or not connected")
    s3_endpoint: str | None = option(None, "S3-compatible endpoint (default: $AWS_ENDPOINT_URL)", metavar="URL")
    engine: Engine = option("auto", "local: this machine's processes, no Ray; ray: Ray Data (a cluster with "
                            "--address, else a Ray started for the job); auto: ray for --address or more than "
                            "one GPU, else local")
    address: str | None = option(None, "join a running Ray cluster (implies --engine ray)")
    compile: bool = option(False, "torch.compile the model")
    embeddings: bool = option(False, "add an 'embedding' column: the vector the model's classification head "
                              "receives (zero-shot models: the image embedding)")
    normalize_embeddings: bool = option(False, "scale embeddings to unit length")
    candidate_labels: tuple[str, ...] | None = option(None, "zero-shot: classify into these labels, comma-separated, "
                                                      "with a CLIP/SigLIP-like model", metavar="LABELS")
    candidate_labels_file: str | None = option(None, "zero-shot: the labels from a text file, one per line",
                                               metavar="FILE")
    hypothesis_template: str = option(DEFAULT_HYPOTHESIS_TEMPLATE, "zero-shot: the sentence each label is put into")
    max_retries: int = option(3, "attempts after the first for a failed task or a dead model actor", cli=False)

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))
        else:
            object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        if not self.sources:
            raise UsageError("at least one source is required")
        if isinstance(self.keep_columns, str):
            object.__setattr__(self, "keep_columns", tuple(c.strip() for c in self.keep_columns.split(",") if c.strip()))
        check_keep_columns(self.keep_columns, self.embeddings)
        if self.label_column and self.labels == "dirs":
            object.__setattr__(self, "labels", "column")
        if self.labels == "column" and not self.label_column:
            raise UsageError("--labels column needs --label-column NAME")
        if self.address and self.engine == "local":
            raise UsageError("--address joins a Ray cluster: it needs --engine ray (or auto)")
        if self.url_column:
            object.__setattr__(self, "from_list", True)
        if self.image_column and self.from_list:
            raise UsageError("--image-column reads Parquet SOURCEs, --from-list/--url-column list files: choose one")
        if self.label_column and self.from_list:
            raise UsageError("--label-column reads WebDataset members or --image-column tables, not list files")
        if self.download_timeout <= 0 or self.download_retries < 0:
            raise UsageError("--download-timeout must be positive and --download-retries at least 0")
        for name in ("top_k", "batch_size", "replicas", "limit", "max_pixels", "max_bytes", "shard_size", "read_timeout",
                     "stall_timeout"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.candidate_labels is not None:
            labels = self.candidate_labels
            object.__setattr__(self, "candidate_labels", label_list(labels.split(",") if isinstance(labels, str)
                                                                    else labels, "--candidate-labels"))
            if self.candidate_labels_file:
                raise UsageError("--candidate-labels and --candidate-labels-file contradict each other: choose one")
        if "{}" not in self.hypothesis_template:
            raise UsageError("--hypothesis-template must hold {} where the label goes")
        if self.normalize_embeddings and not self.embeddings:
            raise UsageError("--normalize-embeddings needs --embeddings")

    @property
    def zero_shot(self) -> bool:
        return self.candidate_labels is not None or self.candidate_labels_file is not None

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
            raise UsageError("--overwrite and --resume contradict each other: choose one")


ExportFormat = Literal["webdataset", "imagefolder", "labelstudio", "fiftyone"]


def same_option(config_class, name: str):
    """Another config's option, its default and help as they are there (stated once)."""
    original = next(f for f in dataclasses.fields(config_class) if f.name == name)
    return field(default=original.default, metadata=original.metadata)


@dataclass(frozen=True, kw_only=True)
class CommittedOutputOptions:
    """The options of a command that writes a committed OUT from a finished run's output
    (``export``, ``duplicates``): what to do with an earlier OUT, and where tasks run."""

    overwrite: bool = option(False, "replace what an earlier run of the command wrote to OUT")
    resume: bool = option(False, "continue an interrupted run into the same OUT")
    s3_endpoint: str | None = same_option(ClassifyConfig, "s3_endpoint")
    engine: Engine = same_option(ClassifyConfig, "engine")
    address: str | None = same_option(ClassifyConfig, "address")
    max_retries: int = same_option(ClassifyConfig, "max_retries")
    flush_seconds: float = same_option(OutputConfig, "flush_seconds")

    def __post_init__(self) -> None:
        if self.overwrite and self.resume:
            raise UsageError("--overwrite and --resume contradict each other: choose one")
        if self.address and self.engine == "local":
            raise UsageError("--address joins a Ray cluster: it needs --engine ray (or auto)")

    def at_least_one(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")


@dataclass(frozen=True)
class ExportConfig(CommittedOutputOptions):
    """``visionbatch export``: which rows of a finished DEST, and where and how to write their images."""

    dest: str
    to: str
    format: ExportFormat = option("webdataset", "webdataset: tars with a .json per sample; imagefolder: a folder "
                                  "per predicted label; labelstudio: images and a Label Studio import file with "
                                  "the predictions as pre-annotations; fiftyone: FiftyOne's image classification layout, the ground truth in "
                                  "labels.json and the predictions in predictions.json")
    where: str | None = option(None, "one SQL predicate over a result row's columns (DuckDB), e.g. \"score < "
                               "0.5\": operators and scalar functions, no subquery or table function (row by "
                               "row: it runs over one part file at a time)", metavar="SQL")
    per_class: int | None = option(None, "only the N least confident rows of each predicted label (of those the "
                                   "other options select)", metavar="N")
    label_issues: bool = option(False, "only the rows `visionbatch label-issues DEST` flagged")
    dedup: bool = option(False, "of each group `visionbatch duplicates DEST` found, only its kept member "
                         "(exact copies and near-duplicates once)")
    reviewed: str | None = option(None, "a Label Studio JSON export of reviewed tasks (from an export --format "
                                  "labelstudio): each row gets its reviewed_label (--where sees it), and imagefolder "
                                  "files a reviewed image under its reviewed label", metavar="FILE")
    stall_timeout: float = option(DEFAULT_STALL_TIMEOUT_S, "how long the model may wait on a decode worker that "
                                  "sends nothing of the shard it started (a stopped or hung process; time the model "
                                  "is busy does not count) before the workers are replaced and their shards done "
                                  "again (local engine); keep it above --read-timeout", metavar="SECONDS")
    shard_size: int = option(1000, "rows per export shard: the unit of work, of output (a tar each) and of "
                             "--resume", metavar="N")
    image_url_prefix: str = option("/data/local-files/?d=", "labelstudio: what precedes images/NAME in a "
                                   "task's image URL (default: Label Studio's local files, with "
                                   "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT set to OUT)", metavar="PREFIX")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.at_least_one("per_class", "shard_size")


# Cosine at or above which two images are near-duplicates (`duplicates --threshold`).
# Measured on real EfficientNet-Lite0 embeddings of the ImageNet sample and edited copies of
# it (benchmarks/duplicates_quality.py, RESULTS.md): copies score 0.66 (JPEG at quality 15)
# to 1.0, 95% of them over 0.81; the most similar two different photographs 0.575. At 0.75
# every pair >= t was a true one and 97% of true pairs were >= t; 0.80 keeps 96%, 0.70 98%.
# 0.75 leaves 0.17 of cosine above the closest distinct photographs for denser collections.
DEFAULT_DUPLICATE_THRESHOLD = 0.75
DuplicateKinds = Literal["auto", "all", "exact"]


@dataclass(frozen=True)
class DuplicatesConfig(CommittedOutputOptions):
    """``visionbatch duplicates``: which images of a DEST (or of any Parquet table of paths
    and embeddings) are in it twice, and where the groups go."""

    source: str
    output: str | None = option(None, "where the groups go (a folder: duplicates.parquet, _summary.json); "
                                "default DEST/_derived/duplicates for a DEST, required for another table",
                                metavar="OUT")
    threshold: float = option(DEFAULT_DUPLICATE_THRESHOLD, "cosine of two embeddings at or above which the "
                              "images are near-duplicates", metavar="COSINE")
    find: DuplicateKinds = option("auto", "all: exact (equal bytes) and near-duplicates, refused without "
                                  "embeddings; exact: equal bytes only; auto: near-duplicates too where the "
                                  "source has embeddings")
    embedding_column: str = option("embedding", "the column of the embeddings (a list of floats)", metavar="NAME")
    path_column: str = option("path", "the column of the image paths", metavar="NAME")
    digest_column: str = option("sha256", "the column of the content digests (exact duplicates; classify "
                                "writes sha256)", metavar="NAME")
    label_column: str = option("true_label", "the column of the given labels, carried to the groups "
                               "(label-issues reads them)", metavar="NAME")
    unit_rows: int = option(50_000, "rows per unit of work: a worker holds about N x width x 16 bytes "
                            "(1 GB at 512)", metavar="N")
    cell_rows: int = option(100_000, "rows one cell task compares: about N x width x 6 bytes", metavar="N")
    cells: int | None = option(None, "k-means cells (default: rows / 2,500)", cli=False)
    cells_per_row: int = option(3, "cells a row is compared in at most: its home and the nearest whose "
                                "border it is near", cli=False)
    work_dir: str | None = option(None, "a local folder for the stages' files (large: about rows x width x 8 "
                                  "bytes; every Ray node must see it); default OUT/_work where OUT is local, "
                                  "else a folder in the cache named after OUT", metavar="DIR")
    keep_work: bool = option(False, "keep the work dir once done (the spills by cell, the pairs found), "
                             "for a look inside")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= self.threshold <= 1.0:
            raise UsageError(f"--threshold is a cosine, from -1 to 1 (got {self.threshold})")
        self.at_least_one("unit_rows", "cell_rows", "cells", "cells_per_row")


def label_list(items: Sequence[str], where: str) -> tuple[str, ...]:
    """Zero-shot labels: stripped, blanks dropped, at least one, none twice."""
    labels = tuple(label.strip() for label in items if label.strip())
    if not labels:
        raise UsageError(f"{where}: no labels given")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UsageError(f"{where}: labels given more than once: {', '.join(repeated)}")
    return labels


def add_options(parser: argparse.ArgumentParser, config_class) -> None:
    """One flag per field of ``config_class`` that has command-line help."""
    hints = typing.get_type_hints(config_class)
    # a command's own options first, then those it shares (CommittedOutputOptions')
    for f in sorted(dataclasses.fields(config_class), key=lambda f: f.kw_only is True):
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
        if typing.get_origin(scalar) is tuple:  # a comma-separated list (checked by the config)
            scalar = str
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
