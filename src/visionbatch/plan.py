"""The plan: what a job computes and with what, resolved once in the driver, engine-neutral.

From the options and the model's configs it resolves the model plan (preprocessing,
zero-shot labels, embedding width), the execution plan (device, dtype, replicas,
threads, batch size, decode workers) from the resources an engine reports, the
job's identity (what a DEST belongs to), and the arguments every decode task and
model replica is given. Plain values only: engines ship them to their workers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from visionbatch.config import ClassifyConfig, OutputConfig, label_list
from visionbatch.destination import EMBEDDINGS_KEY
from visionbatch.errors import JobError, ModelLoadError, SourceError
from visionbatch.labels import LabelResolver, build_resolver
from visionbatch.model_loading import (ModelSource, check_model_kind, embedding_width, load_config,
                                       load_processor, model_revision, resolve_model_source)
from visionbatch.preprocess import (Preprocessing, ProcessorPath, UnsupportedProcessor, choose_preprocessing,
                                   draft_side, pixel_layout)
from visionbatch.results import SHA256, result_schema
from visionbatch.samples import Reading
from visionbatch.shards import InputSpec
from visionbatch.storage import Storage, canonical_uri

log = logging.getLogger("visionbatch")

# Pixels moved between the decode and model stages in one block (see block_images).
_BLOCK_BYTES = 32 << 20


@dataclass(frozen=True)
class ModelPlan:
    """What the model computes, resolved in the driver from the model's configs and the options."""

    source: ModelSource
    spec: Preprocessing
    preprocessing: str  # which path and why, one line
    candidate_labels: tuple[str, ...] | None  # zero-shot: the classes (from the option or its file)
    embedding_width: int | None  # --embeddings: the width of the embedding column

    @property
    def schema(self) -> pa.Schema:
        return result_schema(self.embedding_width)


@dataclass(frozen=True)
class Resources:
    """What an engine can run on: CPUs and GPUs in all, and the CPUs of its largest node."""

    cpus: int
    gpus: int
    node_cpus: int


@dataclass(frozen=True)
class Plan:
    """A job's resolved execution plan: plain values shipped to every worker."""

    model: ModelPlan
    device: str
    dtype: str
    replicas: int
    gpus_per_replica: float
    cpus_per_replica: float
    model_threads: int | None
    # (threads, images/s): on CPU, where ``model_threads`` would take cores the decode
    # tasks hold, the replica first times itself on this many threads and keeps to them
    # if it runs at least this fast (see Predictor.fit_threads); None: no choice to make.
    fewer_threads: tuple[int, float] | None
    batch_size: int
    decode_concurrency: int  # decode tasks running at once: the CPUs the replicas leave free
    draft_side: int | None  # JPEGs may be decoded down to this side (None: full size)
    # The model path an earlier run of this job certified (a resumed job keeps it; None: certify).
    certified_path: str | None = None

    @property
    def decode_tasks(self) -> int:
        """Long-lived decode tasks in all, each taking shards until none are left; more
        than run at once, so that a task killed by a bad file is replaced."""
        return 4 * self.decode_concurrency


def cpu_model_threads(cpus: int, replicas: int = 1) -> int:
    """Torch threads per CPU model replica: all cores but one in eight, shared by the replicas.

    Decoding and resizing cost a few ms of one core per image against tens of ms of
    all cores for a forward pass, so decode tasks need a small share of the machine.
    Measured on 2 cores with ViT-Ti/16 (benchmarks/RESULTS.md): 2 model threads beside
    the decode tasks reach ~55 images/s, 1 thread and a core kept for decoding ~32.
    """
    return max(1, (cpus - cpus // 8) // replicas)


def cpu_replica(cpus: int, node_cpus: int, replicas: int = 1, model_threads: int | None = None) -> tuple[int, float]:
    """A CPU model replica's torch threads and the CPUs it holds.

    A replica is one actor on one node: it must fit on the largest node and leave that
    node a CPU to decode with, or once the other nodes are lost the decode tasks wait
    forever for CPUs the replica holds. Its torch threads may still use every core
    (see cpu_model_threads): decoding needs only a small share of them."""
    threads = model_threads or min(cpu_model_threads(cpus, replicas), cpu_model_threads(node_cpus))
    return threads, float(max(1, min(threads, cpus - 1, node_cpus - 1)))


def threads_reach_decode_cores(threads: int, cpus_per_replica: float, model_threads: int | None) -> bool:
    """Whether a CPU replica's threads run on cores the decode tasks have too (a small
    machine), and nothing fixes them (``--threads``): then an engine may move cores
    between the two (Ray's replica times itself; the local engine's _CoreSplit)."""
    return not model_threads and threads > cpus_per_replica


# Images/s one core decodes and resizes: ImageNet-size JPEGs (~110 KB, ~500 px) to 224 px
# take 2.8-3.7 ms on this project's machines (`visionbatch bench` line 1b).
DECODE_IMAGES_PER_CPU_S = 300.0


def resolve_plan(config: ClassifyConfig, model: ModelPlan, resources: Resources,
                 probe_batch_size: Callable[[ClassifyConfig, ModelPlan, float], int]) -> Plan:
    """Device, dtype, replicas and batch sizes from the options and the engine's resources;
    ``probe_batch_size(config, model, gpus_per_replica)`` measures a GPU's best batch size."""
    cpus, gpus = resources.cpus, resources.gpus
    device = config.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus == 0:
        raise JobError("--device cuda was asked for but no GPU is visible")
    if device == "cuda":
        replicas = config.replicas or max(1, int(gpus // config.gpus_per_replica))
        gpus_per_replica = config.gpus_per_replica
        # One CPU per GPU replica feeds it; the remaining CPUs decode.
        cpus_per_replica, threads = 1.0, None
        batch_size = config.batch_size or probe_batch_size(config, model, gpus_per_replica)
    else:
        replicas = config.replicas or 1
        gpus_per_replica = 0.0
        threads, cpus_per_replica = cpu_replica(cpus, resources.node_cpus or cpus, replicas, config.model_threads)
        batch_size = config.batch_size or 16
    decode_concurrency = max(1, int(cpus - replicas * cpus_per_replica))
    # On a small machine the replica's threads reach into the decode tasks' cores. That
    # pays for a heavy model (ViT-Ti on 2 cores: 55 images/s on 2 threads, 32 on 1) and
    # costs a light one (micro ViT: decoding fell from 0.88 to 0.56 of its one core).
    # Which one the model is shows only on the machine: the replica times itself.
    fewer_threads = None
    if device == "cpu" and threads_reach_decode_cores(threads, cpus_per_replica, config.model_threads):
        fewer_threads = (int(cpus_per_replica), decode_concurrency * DECODE_IMAGES_PER_CPU_S)
    return Plan(
        model=model,
        device=device,
        dtype="float32" if device == "cpu" and config.dtype == "auto" else config.dtype,
        replicas=replicas,
        gpus_per_replica=gpus_per_replica,
        cpus_per_replica=cpus_per_replica,
        model_threads=threads,
        fewer_threads=fewer_threads,
        batch_size=batch_size,
        # Decode tasks live as long as there are shards: left uncapped they would take
        # every CPU before the model replicas start, and the replicas would wait for them.
        decode_concurrency=decode_concurrency,
        draft_side=None if config.exact_decode else draft_side(model.spec),
    )


def _affine(spec: Preprocessing) -> dict:
    """The Predictor's uint8 -> model-input affine (the slow path's pixel_values arrive ready)."""
    if isinstance(spec, ProcessorPath):
        return {"scale": (1.0, 1.0, 1.0), "offset": (0.0, 0.0, 0.0)}
    return {"scale": spec.scale, "offset": spec.offset}


def model_arguments(config: ClassifyConfig, model: ModelPlan) -> dict:
    """The Predictor's arguments that decide what it computes (the job's and the batch-size probe's)."""
    return {"model": model.source, **_affine(model.spec), "allow_pickle": config.allow_pickle,
            "trust_remote_code": config.trust_remote_code, "embedding_width": model.embedding_width,
            "normalize_embeddings": config.normalize_embeddings, "candidate_labels": model.candidate_labels,
            "hypothesis_template": config.hypothesis_template}


def predictor_arguments(config: ClassifyConfig, plan: Plan, batch_size: int) -> dict:
    """Every argument of a job's model replica (a Predictor)."""
    shape, dtype = pixel_layout(plan.model.spec)
    return {**model_arguments(config, plan.model), "top_k": config.top_k, "device": plan.device,
            "dtype": plan.dtype, "num_threads": plan.model_threads, "fewer_threads": plan.fewer_threads,
            "compile": config.compile, "batch_size": batch_size, "pixel_layout": (shape, dtype.str),
            "runtime": config.runtime, "certified_path": plan.certified_path}


def block_images(plan: Plan, shard_size: int) -> int:
    """Images per block between the decode and model stages: whole forward passes, and
    about _BLOCK_BYTES of pixels, since an engine costs a few ms per block (measured on
    Ray Data with a near-free model: 16-image blocks capped a 2-core job at ~165
    images/s); but no more than a shard's worth, or small shards would be committed
    many at a time."""
    passes = max(1, min(_BLOCK_BYTES // (plan.batch_size * image_bytes(plan)), shard_size // plan.batch_size))
    return plan.batch_size * passes


def image_bytes(plan: Plan) -> int:
    """The bytes of one model-ready image between the stages."""
    shape, dtype = pixel_layout(plan.model.spec)
    return int(np.prod(shape)) * dtype.itemsize


def input_spec(config: ClassifyConfig) -> InputSpec:
    """What the planner lists (and the job's identity records, whole)."""
    # Canonical: the planner may list in a Ray worker, whose working directory may be another.
    return InputSpec(sources=tuple(canonical_uri(uri) for uri in config.sources), from_list=config.from_list,
                     shard_size=config.shard_size, limit=config.limit,
                     cwd=os.getcwd() if config.from_list else "", image_column=config.image_column,
                     url_column=config.url_column or "path",
                     columns=tuple(dict.fromkeys([*([config.label_column] if config.image_column and
                                                    config.label_column else []), *config.keep_columns])),
                     follow_symlinks=config.follow_symlinks,
                     label_column=config.label_column if config.labels == "column" else None)


@dataclass(frozen=True)
class Prepared:
    """Everything the driver resolved before any work is submitted."""

    config: ClassifyConfig
    plan: Plan
    storage: Storage
    labels: LabelResolver | None

    def decode_options(self, batch_size: int) -> dict:
        """What every decode task is given (besides where its shards come from)."""
        config, plan = self.config, self.plan
        reading = Reading(self.storage, config.max_bytes, config.label_column if config.labels == "column" else None,
                          config.image_column, config.keep_columns if config.image_column else (),
                          config.read_timeout)
        return {"spec": plan.model.spec, "max_pixels": config.max_pixels, "reading": reading, "labels": self.labels,
                "batch_size": batch_size, "draft_side": plan.draft_side}


def model_metadata(config: ClassifyConfig, source: ModelSource,
                   storage: Storage) -> tuple[ModelPlan, LabelResolver | None]:
    """The model plan and the true-label resolver, from the model's configs (no weights)."""
    model_config = load_config(source, config.trust_remote_code)
    check_model_kind(model_config, config.zero_shot)
    processor = load_processor(source, config.trust_remote_code)
    try:
        spec, preprocessing = choose_preprocessing(processor)
    except UnsupportedProcessor as err:
        raise JobError(f"cannot preprocess images for this model: {err}") from None
    if isinstance(spec, ProcessorPath):
        log.warning("preprocessing: %s", preprocessing)
    candidate_labels = config.candidate_labels
    if config.candidate_labels_file:
        try:
            lines = storage.read(config.candidate_labels_file).decode("utf-8").splitlines()
        except (OSError, SourceError, UnicodeDecodeError) as err:
            raise JobError(f"cannot read --candidate-labels-file {config.candidate_labels_file}: {err}") from None
        try:
            candidate_labels = label_list(lines, f"--candidate-labels-file {config.candidate_labels_file}")
        except ValueError as err:
            raise JobError(str(err)) from None
    width = embedding_width(model_config, spec.output_size, zero_shot=config.zero_shot,
                            trust_remote_code=config.trust_remote_code) if config.embeddings else None
    model = ModelPlan(source, spec, preprocessing, candidate_labels, width)
    if config.labels == "none":
        return model, None
    id2label = (dict(enumerate(candidate_labels)) if candidate_labels
                else {int(k): v for k, v in model_config.id2label.items()})
    label_map_text = None
    if config.label_map:
        try:
            label_map_text = storage.read(config.label_map).decode("utf-8")
        except (OSError, SourceError, UnicodeDecodeError) as err:
            raise JobError(f"cannot read --label-map {config.label_map}: {err}") from None
    try:
        return model, build_resolver(id2label, label_map_text)
    except ValueError as err:
        raise JobError(str(err)) from None


def recorded_input_spec(job: dict) -> InputSpec:
    """What the job a DEST records (``job_identity``) listed, read back whole."""
    if "input" not in job:  # a DEST of manifest version 3, before the record held its InputSpec
        return input_spec(ClassifyConfig(
            sources=tuple(job["sources"]), from_list=job["from_list"], url_column=job["url_column"],
            image_column=job["image_column"], keep_columns=tuple(job["keep_columns"]),
            follow_symlinks=job["follow_symlinks"], shard_size=job["shard_size"], limit=job["limit"],
            labels=job["labels"], label_column=job["label_column"]))
    recorded = job["input"]
    return InputSpec(**{**recorded, "sources": tuple(recorded["sources"]), "columns": tuple(recorded["columns"])})


def recorded_classes(job: dict) -> list[str] | None:
    """The classes the job a DEST records could answer, in index order: its zero-shot
    labels, or its model's ``id2label`` (from its config, no weights); None where that
    config can no longer be loaded (the model moved, the hub unreachable)."""
    if job["zero_shot"]:
        return list(job["zero_shot"]["labels"])
    try:
        id2label = load_config(resolve_model_source(job["model"])).id2label
    except ModelLoadError as err:
        log.warning("cannot check labels against the model's classes: %s", err)
        return None
    return [id2label[index] for index in sorted(id2label)]


def job_identity(config: ClassifyConfig, output: OutputConfig, plan: Plan) -> dict:
    """Everything that changes a job's results: a DEST belongs to one of these, and
    ``--resume`` with another is refused. The engine is not part of it: a DEST written
    by one engine resumes with the other."""
    from visionbatch.version import __version__

    model = plan.model
    return {"visionbatch": __version__, "model": model.source.ref, "model_revision": model_revision(model.source),
            "top_k": config.top_k, "format": output.format, "dtype": plan.dtype, "runtime": config.runtime,
            "labels": config.labels, "label_map": config.label_map,
            "input": dataclasses.asdict(input_spec(config)),  # what was listed, read back by recorded_input_spec
            "max_pixels": config.max_pixels, "max_bytes": config.max_bytes, "exact_decode": config.exact_decode,
            EMBEDDINGS_KEY: model.embedding_width and {"width": model.embedding_width,
                                                       "normalized": config.normalize_embeddings},
            "zero_shot": model.candidate_labels and {"labels": list(model.candidate_labels),
                                                     "template": config.hypothesis_template},
            "keep_columns": list(config.keep_columns), SHA256: True}
