"""Pipeline: the one place that knows about Ray.

It resolves a job's plan (device, dtype, replicas, batch sizes, preprocessing) once in
the driver and wires the plain stages into one Ray Data dataset::

    ShardPlanner actor (lists, hands out shards)
      -> decode tasks (take shards, yield uint8 pixel blocks)   visionbatch.decode
      -> Predictor actor pool (top-k)                            visionbatch.model
      -> ShardWriter actor (one part file per whole shard)       visionbatch.sinks
      -> the driver: commits shards to the manifest, progress bar, summary

The driver's memory grows with the number of shards, never with the number of images.
"""

from __future__ import annotations

import contextlib
import concurrent.futures
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from visionbatch.config import DECODE_MEMORY_LIMIT, ClassifyConfig, OutputConfig, config_from_kwargs, label_list
from visionbatch.labels import LabelResolver, build_resolver, folder_of
from visionbatch.model import (ModelSource, Predictor, check_model_kind, embedding_width, load_config, load_processor,
                               model_revision, resolve_model_source)
from visionbatch.preprocess import (Preprocessing, ProcessorPath, UnsupportedProcessor, choose_preprocessing,
                                   draft_side, pixel_layout)
from visionbatch.results import (MODEL_TRACEBACK, ROW_COLUMN, SHARD_COLUMN, SHARD_DIGEST_COLUMN, SHARD_ROWS_COLUMN,
                                 conform, job_columns, result_schema)
from visionbatch.samples import Reading
from visionbatch.shards import AnyShard, InputSpec, Shard, ShardPlanner, describe_shard
from visionbatch.sinks import (EMBEDDINGS_KEY, SUMMARY, Destination, DestinationError, Lease, Manifest, ShardWriter,
                               write_shard)
from visionbatch.sources import check_source
from visionbatch.storage import SourceError, Storage, canonical_uri, is_remote
from visionbatch.summary import Summary

log = logging.getLogger("visionbatch")

# Environment variables that workers on other nodes need to see as the driver does.
# Credentials are deliberately absent: each node uses its own environment.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE", "AWS_ENDPOINT_URL",
                  "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")
_STATUS_EVERY_S = 1.0  # how often the driver asks the planner how listing goes
_FIRST_SHARD_WAIT_S = 2.0
_BLOCK_BYTES = 32 << 20
# A job stops when this many shards fail in the model with nothing predicted yet: a
# model that cannot run on these inputs would otherwise fill DEST with error rows.
_MODEL_FAILURES_TO_STOP = 3


class JobError(Exception):
    """The job cannot run; the message is the one line the user sees."""


class JobInterrupted(JobError):
    """Ctrl-C or SIGTERM stopped the job; the message says what was kept."""


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

    @property
    def decode_tasks(self) -> int:
        """Long-lived decode tasks in all, each taking shards until none are left; more
        than run at once, so that a task killed by a bad file is replaced."""
        return 4 * self.decode_concurrency


def _cluster_resources() -> tuple[float, float]:
    import ray

    resources = ray.cluster_resources()
    return resources.get("CPU", 1.0), resources.get("GPU", 0.0)


def _largest_node_cpus() -> int:
    import ray

    return int(max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0))


def cpu_model_threads(cpus: int, replicas: int = 1) -> int:
    """Torch threads per CPU model replica: all cores but one in eight, shared by the replicas.

    Decoding and resizing cost a few ms of one core per image against tens of ms of
    all cores for a forward pass, so decode tasks need a small share of the machine.
    Measured on 2 cores with ViT-Ti/16 (benchmarks/RESULTS.md): 2 model threads beside
    the decode tasks reach ~55 images/s, 1 thread and a core kept for decoding ~32.
    """
    return max(1, (cpus - cpus // 8) // replicas)


# Images/s one core decodes and resizes: ImageNet-size JPEGs (~110 KB, ~500 px) to 224 px
# take 2.8-3.7 ms on this project's machines (`visionbatch bench` line 1b).
DECODE_IMAGES_PER_CPU_S = 300.0


def resolve_plan(config: ClassifyConfig, model: ModelPlan) -> Plan:
    """Device, dtype, replicas and batch sizes from the options and the cluster."""
    cpus, gpus = _cluster_resources()
    device = config.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus == 0:
        raise JobError("--device cuda was asked for but the Ray cluster has no GPUs")
    if device == "cuda":
        replicas = config.replicas or max(1, int(gpus // config.gpus_per_replica))
        gpus_per_replica = config.gpus_per_replica
        # One CPU per GPU replica feeds it; the remaining CPUs decode.
        cpus_per_replica, threads = 1.0, None
        batch_size = config.batch_size or _probe_gpu_batch_size(config, model, gpus_per_replica)
    else:
        replicas = config.replicas or 1
        gpus_per_replica = 0.0
        # A replica is one actor on one node: it must fit on the largest node and leave that
        # node a CPU to decode with, or once the other nodes are lost the decode tasks wait
        # forever for CPUs the replica holds. Its torch threads may still use every core
        # (see cpu_model_threads): decoding needs only a small share of them.
        node_cpus = _largest_node_cpus() or int(cpus)
        threads = config.model_threads or min(cpu_model_threads(int(cpus), replicas), cpu_model_threads(node_cpus))
        cpus_per_replica = float(max(1, min(threads, int(cpus) - 1, node_cpus - 1)))
        batch_size = config.batch_size or 16
    decode_concurrency = max(1, int(cpus - replicas * cpus_per_replica))
    # On a small machine the replica's threads reach into the decode tasks' cores. That
    # pays for a heavy model (ViT-Ti on 2 cores: 55 images/s on 2 threads, 32 on 1) and
    # costs a light one (micro ViT: decoding fell from 0.88 to 0.56 of its one core).
    # Which one the model is shows only on the machine: the replica times itself.
    fewer_threads = None
    if device == "cpu" and not config.model_threads and threads > cpus_per_replica:
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


def _model_arguments(config: ClassifyConfig, model: ModelPlan) -> dict:
    """The Predictor's arguments that decide what it computes (the job's and the batch-size probe's)."""
    return {"model": model.source, **_affine(model.spec), "allow_pickle": config.allow_pickle,
            "trust_remote_code": config.trust_remote_code, "embedding_width": model.embedding_width,
            "normalize_embeddings": config.normalize_embeddings, "candidate_labels": model.candidate_labels,
            "hypothesis_template": config.hypothesis_template}


def _probe_gpu_batch_size(config: ClassifyConfig, model: ModelPlan, gpus: float) -> int:
    """Measure the best batch size on one GPU of the cluster (one extra model load)."""
    import ray

    def probe() -> int:
        predictor = Predictor(**_model_arguments(config, model), device="cuda", dtype=config.dtype)
        return predictor.fastest_batch_size(model.spec.output_size)

    try:
        return ray.get(ray.remote(num_gpus=gpus, max_retries=0)(probe).remote())
    except Exception as err:  # the real job reports model errors; fall back to a safe size
        log.warning("batch-size probe failed (%s); using 128", _root_cause(err))
        return 128


def init_ray(address: str | None) -> None:
    """Join a cluster (``--address``) or start a quiet local Ray: no dashboard, loopback only."""
    import ray

    if address:
        _check_reachable(address)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}
    kwargs = dict(
        log_to_driver=False,
        logging_level=logging.WARNING,
        include_dashboard=False,
        runtime_env={"env_vars": env} if env else None,
    )
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", **kwargs)
    except (ConnectionError, RuntimeError, ValueError, OSError) as err:  # OSError: an unwritable temp dir
        if address and _token_refused(err):
            raise JobError(f"the Ray cluster at {address} uses token authentication and refused this client: set "
                           "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or ~/.ray/auth_token)"
                           ) from None
        raise JobError(f"cannot {'reach the Ray cluster at ' + address if address else 'start a local Ray'}: "
                       f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
    _quiet_ray_data()


def _token_refused(err: BaseException | None) -> bool:
    """Ray reports a missing or wrong auth token as a failure to connect; the cause is
    only in the chained errors."""
    while err is not None:
        if type(err).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on an unreachable cluster: ray.init retries for minutes."""
    import socket

    if address == "auto":
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as err:
        raise JobError(f"cannot reach the Ray cluster at {address}: {err}") from None


def _quiet_ray_data() -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)




def job_identity(config: ClassifyConfig, output: OutputConfig, plan: Plan) -> dict:
    """Everything that changes a job's results: a DEST belongs to one of these, and
    ``--resume`` with another is refused."""
    from visionbatch import __version__

    model = plan.model
    return {"visionbatch": __version__, "model": model.source.ref, "model_revision": model_revision(model.source),
            "top_k": config.top_k, "format": output.format, "dtype": plan.dtype, "labels": config.labels,
            "label_map": config.label_map, "sources": [canonical_uri(uri) for uri in config.sources],
            "from_list": config.from_list, "list_cwd": os.getcwd() if config.from_list else None,
            "follow_symlinks": config.follow_symlinks, "shard_size": config.shard_size, "limit": config.limit,
            "max_pixels": config.max_pixels, "max_bytes": config.max_bytes, "exact_decode": config.exact_decode,
            EMBEDDINGS_KEY: model.embedding_width and {"width": model.embedding_width,
                                                       "normalized": config.normalize_embeddings},
            "zero_shot": model.candidate_labels and {"labels": list(model.candidate_labels),
                                                     "template": config.hypothesis_template},
            "image_column": config.image_column, "url_column": config.url_column,
            "keep_columns": list(config.keep_columns), "label_column": config.label_column}


@dataclass(frozen=True)
class Prepared:
    """Everything the driver resolved before any work is submitted."""

    config: ClassifyConfig
    plan: Plan
    storage: Storage
    labels: LabelResolver | None
    planner: object  # the ShardPlanner actor, made but not started (start_planner starts it)


def prepare(config: ClassifyConfig) -> Prepared:
    """Check the sources, load the model's configs and resolve the plan (no image is read).

    Ray starts in the main thread while another thread loads the model's configs: both
    mostly wait (on subprocesses, on storage); the planner's worker then starts while
    the configs are still loading.
    """
    storage = Storage(config.s3_endpoint, config.download_timeout, config.download_retries)
    try:
        for uri in config.sources:
            check_source(uri, storage, config.from_list)
    except SourceError as err:
        raise JobError(str(err)) from None
    source = resolve_model_source(config.model)
    # Canonical: the planner lists in a Ray worker, whose working directory may be another.
    inputs = InputSpec(sources=tuple(canonical_uri(uri) for uri in config.sources), from_list=config.from_list, shard_size=config.shard_size,
                       limit=config.limit, cwd=os.getcwd(), image_column=config.image_column,
                       url_column=config.url_column or "path",
                       columns=tuple(dict.fromkeys([*([config.label_column] if config.image_column and
                                                      config.label_column else []), *config.keep_columns])),
                       follow_symlinks=config.follow_symlinks)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        metadata = pool.submit(_model_metadata, config, source, storage)
        try:
            init_ray(config.address)
            planner = _make_planner(inputs, storage)
        finally:
            model, labels = metadata.result()
    _warn_local_paths_on_cluster(config)
    return Prepared(config, resolve_plan(config, model), storage, labels, planner)


def _model_metadata(config: ClassifyConfig, source: ModelSource,
                    storage: Storage) -> tuple[ModelPlan, LabelResolver | None]:
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


def _warn_local_paths_on_cluster(config: ClassifyConfig) -> None:
    import ray

    if not config.address or all(is_remote(s) for s in config.sources):
        return
    if len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        log.warning("local paths with a multi-node cluster: workers on other nodes read their own disks, where "
                    "these files may not exist. Put the images on shared storage (s3://, gs://, NFS) instead.")


def _make_planner(inputs: InputSpec, storage: Storage):
    """The ShardPlanner actor, on the driver's node (it outlives any other node). Each
    decode task waits in one of its threads: room for as many as the CPUs can run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cpus, _ = _cluster_resources()
    actor = ray.remote(ShardPlanner).options(
        num_cpus=0, max_concurrency=4 * int(cpus) + 8, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False))
    return actor.remote(inputs, storage)


def start_planner(prepared: Prepared, committed: dict[str, str] | None = None) -> None:
    """Start the listing, skipping the shards ``committed`` (id -> digest)."""
    prepared.planner.start.remote(committed)


def _decode_stage(batch, *, planner, **decode_options):
    """A decode task: takes shards from the planner until none are left (``batch`` is
    only this task's slot)."""
    import ray

    from visionbatch.decode import decode_shards, memory_limited

    with memory_limited(DECODE_MEMORY_LIMIT):
        yield from decode_shards(lambda: ray.get(planner.next.remote()), **decode_options)


def _decode_given(batch, *, shards, **decode_options):
    """A decode task for the shards whose indices ``batch`` holds (the redo of container
    shards whose task died)."""
    from visionbatch.decode import decode_shards

    given = iter([shards[i] for i in batch["item"]])
    yield from decode_shards(lambda: next(given, None), **decode_options)


def _decode_options(prepared: Prepared, batch_size: int) -> dict:
    """What every decode task is given (besides where its shards come from)."""
    config, plan = prepared.config, prepared.plan
    reading = Reading(prepared.storage, config.max_bytes, config.label_column if config.labels == "column" else None,
                      config.image_column, config.keep_columns if config.image_column else (), config.read_timeout)
    return {"spec": plan.model.spec, "max_pixels": config.max_pixels, "reading": reading, "labels": prepared.labels,
            "batch_size": batch_size, "draft_side": plan.draft_side}


def build_dataset(prepared: Prepared):
    """The lazy Ray Data pipeline: shards -> decode tasks -> predictor actors."""
    import ray.data

    plan, config = prepared.plan, prepared.config
    # Ray Data gathers a task's outputs into blocks of up to target_max_block_size
    # (128 MiB) before passing them on; a decode task lives for the whole job, so its
    # blocks must leave as they are made: the target is one block of images.
    shape, dtype = pixel_layout(plan.model.spec)
    image_bytes = int(np.prod(shape)) * dtype.itemsize
    block_images = _block_images(plan.batch_size, image_bytes, config.shard_size)
    ray.data.DataContext.get_current().target_max_block_size = block_images * image_bytes
    slots = ray.data.range(plan.decode_tasks, override_num_blocks=plan.decode_tasks)
    with warnings.catch_warnings():
        # Retry bounds are "ray_remote_args", deprecated without a named replacement yet;
        # Ray's defaults retry failed tasks and dead actors forever.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        decoded = slots.map_batches(
            _decode_stage, batch_size=None, batch_format="pyarrow",
            fn_kwargs={"planner": prepared.planner, **_decode_options(prepared, block_images)},
            num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=plan.decode_concurrency),
            # A decode task that dies loses only the shard it was on (the driver redoes it,
            # one file per task); a retry would take new shards, never that one.
            max_retries=0,
        )
        return _predict(decoded, prepared, batch_size=plan.batch_size)


def _block_images(batch_size: int, image_bytes: int, shard_size: int) -> int:
    """Images per block between the decode and model stages: whole forward passes, and
    about _BLOCK_BYTES of pixels, since Ray Data costs a few ms per block and operator
    (measured with a near-free model: 16-image blocks capped a 2-core job at ~165
    images/s); but no more than a shard's worth, or small shards would be committed
    many at a time."""
    passes = max(1, min(_BLOCK_BYTES // (batch_size * image_bytes), shard_size // batch_size))
    return batch_size * passes


def _predict(ds, prepared: Prepared, batch_size: int, pyarrow_blocks: bool = True):
    import ray.data

    plan, config = prepared.plan, prepared.config
    shape, dtype = pixel_layout(plan.model.spec)
    return ds.map_batches(
        Predictor,
        batch_size=None,
        batch_format="pyarrow" if pyarrow_blocks else "numpy",
        fn_constructor_kwargs={
            **_model_arguments(config, plan.model),
            "top_k": config.top_k,
            "device": plan.device,
            "dtype": plan.dtype,
            "num_threads": plan.model_threads,
            "fewer_threads": plan.fewer_threads,
            "compile": config.compile,
            "batch_size": batch_size,
            "pixel_layout": (shape, dtype.str),
        },
        compute=ray.data.ActorPoolStrategy(size=plan.replicas),
        num_cpus=plan.cpus_per_replica,
        num_gpus=plan.gpus_per_replica or None,
        max_restarts=config.max_retries,
        max_task_retries=config.max_retries,
    )


def classify(sources, model: str | None = None, **options):
    """Classify every image under ``sources``; returns a lazy ``ray.data.Dataset`` of result rows.

    (A lazy dataset cannot redo the shards of tasks that died: :func:`run` can.)
    """
    if model is not None:
        options["model"] = model
    config = config_from_kwargs(sources, **options)
    prepared = prepare(config)
    start_planner(prepared)
    return build_dataset(prepared).select_columns(prepared.plan.model.schema.names)


def run(sources, output: str, *, format: str = "parquet", overwrite: bool = False, resume: bool = False,
        flush_seconds: float = 30.0, model: str | None = None, progress: bool = True, **options) -> Summary:
    """Classify and write one row per image file to ``output``; returns the :class:`Summary`."""
    if model is not None:
        options["model"] = model
    config = config_from_kwargs(sources, **options)
    output_config = OutputConfig(dest=output, format=format, overwrite=overwrite, resume=resume,
                                 flush_seconds=flush_seconds)
    return run_job(config, output_config, progress=sys.stderr if progress else None)


def run_job(config: ClassifyConfig, output: OutputConfig, progress=None) -> Summary:
    """Run a job to the end; ``progress`` is the stream for the progress bar (None: no bar)."""
    started = time.monotonic()
    with sigterm_as_interrupt():
        try:
            destination = Destination(output.dest, Storage(config.s3_endpoint))
            if destination.has_results() and not (output.overwrite or output.resume):
                raise JobError(f"{output.dest} already holds results: pass --overwrite to replace them "
                               "or --resume to continue")
            destination.check_writable()
            lease = Lease(destination)
            lease.claim()
        except (SourceError, DestinationError) as err:
            raise JobError(str(err)) from None
        try:
            try:
                with _interrupts_held() as interrupted:
                    try:
                        prepared = prepare(config)
                    except SystemExit:  # SIGTERM met the handler that ray.init installs first
                        interrupted.set()
                if interrupted.is_set():
                    raise KeyboardInterrupt
                lease.confirm()
                manifest = Manifest.open(destination, job_identity(config, output, prepared.plan),
                                         overwrite=output.overwrite, resume=output.resume)
            except KeyboardInterrupt:
                raise JobInterrupted("interrupted during start-up; nothing was written") from None
            except DestinationError as err:
                raise JobError(str(err)) from None
            summary = _Job(prepared, manifest, output, started, progress).run()
            try:
                destination.write_bytes(SUMMARY, json.dumps(summary.to_dict(), indent=1).encode())
            except DestinationError as err:  # the results are committed: DEST is whole without it
                log.warning("the results are complete, but %s", err)
        finally:
            lease.release()
    return summary


class _Job:
    """The driver's side of a run: commit shards as the writer finishes them."""

    def __init__(self, prepared: Prepared, manifest: Manifest, output: OutputConfig, started: float, progress):
        self.prepared, self.manifest, self.output, self.started = prepared, manifest, output, started
        plan, config = prepared.plan, prepared.config
        self.summary = Summary(model=config.model, device=plan.device, dtype=plan.dtype, dest=output.dest,
                               labels=config.labels, batch_size=plan.batch_size, replicas=plan.replicas)
        for record in manifest.shards.values():  # committed by an earlier run of this job
            self.summary.add_shard(record["rows"], record["counts"])
        self.summary.already_done = self.summary.images_found
        self.progress, self.bar = progress, None
        self.planner = prepared.planner
        start_planner(prepared, {shard: record["digest"] for shard, record in manifest.shards.items()})
        self.status: dict = {}
        self._model_failures, self._model_error = 0, ""  # shards with model errors while nothing is predicted
        self._status_ref, self._status_at = None, 0.0
        self._first: tuple[float, int] | None = None  # when rows first reached the writer, and how many
        self._streamed = 0

    def run(self) -> Summary:
        import ray.exceptions

        self.summary.stage_times["start: model config, Ray (wall)"] = time.monotonic() - self.started
        # A moment for the listing to show an empty or unreadable input before the model
        # actors start; a listing that takes longer (a resumed job skipping what it
        # did) goes on while they start.
        self.status = self._ray_get(self.planner.wait_started.remote(_FIRST_SHARD_WAIT_S))
        if self.status["listing_done"]:
            self.summary.stage_times["listing ended (wall, from start)"] = time.monotonic() - self.started
        self._check_listing()
        self.bar = self._progress_bar()
        try:
            with _failures_become_rows():
                self._stream()
                self._poll_status(wait=True)
                self._check_listing()
                # The planner hears of commits asynchronously: the manifest is the truth.
                lost = [shard for shard in self._ray_get(self.planner.unfinished.remote())
                        if shard.id not in self.manifest.shards]
                if lost:
                    # A decode task, a model actor or the writer died with these shards in
                    # hand; redo them one file per task to isolate a file that kills its worker.
                    log.warning("%d shard(s) were in tasks that failed; redoing them one file per task", len(lost))
                    self._redo_isolated(lost)
            if self._model_failures and not self.summary.predicted:  # fewer shards than the stopping rule needs
                raise JobError(self._model_failed())
            self.manifest.write(complete=True)
        except KeyboardInterrupt:
            raise JobInterrupted(self._stopped("interrupted")) from None
        except ray.exceptions.RayError as err:
            raise JobError(self._stopped(f"the job failed: {_root_cause(err)}")) from None
        except DestinationError as err:  # a full disk, a read-only mount, a bucket gone
            raise JobError(self._stopped(str(err))) from None
        finally:
            self.bar.close()  # (made before the try)
        summary = self.summary
        # A name that is not UTF-8 cannot be a result row's path: skipped, and said.
        summary.skipped_non_image = self.status["skipped_non_image"] + self.status["undecodable_names"]
        if self.status["undecodable_names"]:
            log.warning("skipped %d file(s) whose names are not valid UTF-8 (rename them to classify them)",
                        self.status["undecodable_names"])
        summary.skipped_special = self.status["skipped_special"]
        summary.special_files = self.status["special_examples"]
        summary.skipped_folder_links = self.status["skipped_folder_links"]
        summary.wall_time_s = time.monotonic() - self.started
        summary.images_per_s = (summary.images_found - summary.already_done) / summary.wall_time_s
        return summary

    def _check_listing(self) -> None:
        status = self.status
        if status["input_changed"]:  # resuming would mix two inputs in one DEST
            raise JobError(self._stopped(status["input_changed"], resumable=False))
        if status["error"]:
            raise JobError(self._stopped(f"cannot list the input: {status['error']}"))
        if status["listing_done"] and not status["shards_listed"]:
            skipped = status["skipped_non_image"] + status["skipped_special"]
            raise JobError(f"no image files found in {', '.join(self.prepared.config.sources)}"
                           + (f" ({skipped} other files skipped)" if skipped else ""))

    def _progress_bar(self):
        from tqdm import tqdm

        return tqdm(total=None, initial=self.summary.already_done, unit="img", disable=self.progress is None,
                    dynamic_ncols=True, file=self.progress, desc="classify", smoothing=0.1)

    def _stopped(self, why: str, resumable: bool = True) -> str:
        """Commit what finished; the message says what was kept and how to go on."""
        with contextlib.suppress(Exception):
            self.manifest.write()
        kept = self.manifest.saved_rows  # what DEST's manifest lists (the last write may have failed)
        if not resumable:
            return why
        if not kept:
            return f"{why}; no results had been committed yet, so nothing was kept"
        return (f"{why}; {kept} finished rows are saved in {self.output.dest}: "
                "rerun the same command with --resume")

    def _ray_get(self, ref):
        import ray

        return ray.get(ref)

    def _poll_status(self, wait: bool = False) -> None:
        import ray

        now = time.monotonic()
        if self._status_ref is None and (wait or now - self._status_at >= _STATUS_EVERY_S):
            self._status_ref, self._status_at = self.planner.status.remote(), now
        if self._status_ref is None:
            return
        ready, _ = ray.wait([self._status_ref], timeout=None if wait else 0)
        if ready:
            status, self._status_ref = ray.get(ready[0]), None
            if status["listing_done"] and not self.status.get("listing_done"):
                self.summary.stage_times["listing ended (wall, from start)"] = now - self.started
                if self.bar is not None and not status["unsized_shards"]:  # a tar's images: counted as read
                    self.bar.total = status["images_listed"]
                    self.bar.refresh()
            self.status = status

    def _stream(self) -> None:
        import ray.data

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            # One writer gathers every shard's blocks; its work (encoding small rows) is light.
            ds = build_dataset(self.prepared).map_batches(
                ShardWriter, batch_size=None, batch_format="pyarrow",
                fn_constructor_args=(self.output.dest, self.prepared.storage, self.output.format,
                                     self.prepared.config.labels != "none", self.prepared.plan.model.schema,
                                     job_columns(self.prepared.config.keep_columns)),
                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0,
                max_restarts=self.prepared.config.max_retries, max_task_retries=self.prepared.config.max_retries)
        # No prefetch: it holds each block back until the next one has come, which delays
        # the first result (and every commit) by a block's worth of model time.
        for records in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            committed = []
            for rows_in, commit in zip(records.column("rows_in").to_pylist(), records.column("commit").to_pylist()):
                self._rows_arrived(rows_in)
                if commit is not None:
                    record = json.loads(commit)
                    self._commit(record)
                    committed.append(record["shard"])
            if committed:
                self.planner.mark_committed.remote(committed)
            if self.manifest.due(self.output.flush_seconds):
                self.manifest.write()
            self._poll_status()

    def _commit(self, record: dict) -> None:
        """Count a finished shard and list it in the manifest, unless the model failed
        on every image so far: then the job stops with the model's own error (or its part
        could not be written: then the job stops keeping what was committed)."""
        if "write_error" in record:
            raise DestinationError(record["write_error"])
        self.summary.add_shard(record["rows"], record["counts"])
        self.manifest.add(record)
        model_error = record["counts"]["model_error"]
        if model_error and MODEL_TRACEBACK in record:
            print(f"model_error in shard {record['shard']}:\n{record[MODEL_TRACEBACK]}", file=sys.stderr)
        if model_error and not self.summary.predicted:
            self._model_failures, self._model_error = self._model_failures + 1, model_error
            if self._model_failures >= _MODEL_FAILURES_TO_STOP:
                raise JobError(self._model_failed())

    def _model_failed(self) -> str:
        """Shards whose rows are model errors are not results (a fixed model redoes
        them): drop them, commit the rest; the message to stop with."""
        for shard, record in list(self.manifest.shards.items()):
            if record["counts"]["model_error"]:
                del self.manifest.shards[shard]
        return self._stopped(f"the model fails on every image: {self._model_error.partition(': ')[2]} "
                             "(the traceback is in the log)")

    def _rows_arrived(self, rows: int) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = (now, rows)
            self.summary.time_to_first_result_s = now - self.started
        elif now > self._first[0]:
            self.summary.steady_images_per_s = (self._streamed + rows - self._first[1]) / (now - self._first[0])
        self._streamed += rows
        self.bar.update(rows)

    def _redo_isolated(self, lost: list[AnyShard]) -> None:
        """Redo whole shards one file per task; files whose every attempt fails get a
        ``worker_crash`` row. Their part files are written here, by the driver: this
        is the rare path, and its rows (a few shards) fit in the driver. Shards of tars
        and tables cannot be cut into files: each is redone whole by one task."""
        import ray.data

        from visionbatch.decode import decode_batch

        shards = [shard for shard in lost if isinstance(shard, Shard)]
        if len(shards) < len(lost):
            self._redo_whole([shard for shard in lost if not isinstance(shard, Shard)])
        if not shards:
            return
        prepared, config = self.prepared, self.prepared.config
        rows = self._shard_rows(shards)
        ds = ray.data.from_arrow([rows.slice(i, 1) for i in range(rows.num_rows)])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            ds = _predict(ds.map_batches(decode_batch, batch_size=None, batch_format="numpy",
                                         fn_kwargs={"spec": prepared.plan.model.spec, "max_pixels": config.max_pixels,
                                                    "max_bytes": config.max_bytes, "storage": prepared.storage,
                                                    "read_timeout": config.read_timeout,
                                                    "draft_side": prepared.plan.draft_side},
                                         num_cpus=1, max_retries=config.max_retries), prepared, batch_size=1,
                           pyarrow_blocks=False)
        results = {shard.id: [] for shard in shards}
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            results[table.column(SHARD_COLUMN)[0].as_py()].append(table)
            self._rows_arrived(table.num_rows)
        crash = self._crash_error("file")
        schema, extra = prepared.plan.model.schema, job_columns(config.keep_columns)
        for shard in shards:
            mine = rows.filter(pa.compute.equal(rows.column(SHARD_COLUMN), shard.id))
            done = pa.concat_tables(results[shard.id], promote_options="permissive") if results[shard.id] else None
            seen = set(done.column(ROW_COLUMN).to_pylist()) if done is not None else set()
            missing = mine.filter(pa.array([row not in seen for row in mine.column(ROW_COLUMN).to_pylist()]))
            if missing.num_rows:
                missing = missing.append_column("error", pa.array([crash] * missing.num_rows, pa.string()))
                self._rows_arrived(missing.num_rows)
            parts = [t for t in (done, missing) if t is not None and t.num_rows]
            table = pa.concat_tables([_with_result_columns(t, schema, extra) for t in parts],
                                     promote_options="permissive")
            self._commit(write_shard(self.manifest.destination, shard.id, table, self.output.format,
                                     config.labels != "none", schema, extra))

    def _crash_error(self, what: str) -> str:
        return (f"worker_crash: processing this {what} failed {self.prepared.config.max_retries + 1} times "
                "(its worker process died or its task failed)")

    def _redo_whole(self, shards: list[AnyShard]) -> None:
        """Redo tar and table shards, one task each (retried); a shard that no attempt
        finishes gets one ``worker_crash`` row naming its file."""
        import ray.data

        prepared, config = self.prepared, self.prepared.config
        schema = prepared.plan.model.schema
        writer = ShardWriter(self.output.dest, prepared.storage, self.output.format, config.labels != "none",
                             schema, job_columns(config.keep_columns))
        ds = ray.data.from_items(list(range(len(shards))), override_num_blocks=len(shards))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            ds = _predict(ds.map_batches(_decode_given, batch_size=1, batch_format="numpy",
                                         fn_kwargs={"shards": shards,
                                                    **_decode_options(prepared, prepared.plan.batch_size)},
                                         num_cpus=1, max_retries=config.max_retries), prepared,
                           batch_size=prepared.plan.batch_size)
        committed = set()
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for rows_in, commit in zip(*writer(table).select(["rows_in", "commit"]).columns):
                self._rows_arrived(rows_in.as_py())
                if commit.as_py() is not None:
                    record = json.loads(commit.as_py())
                    self._commit(record)
                    committed.add(record["shard"])
        for shard in shards:
            if shard.id not in committed:
                crash = pa.table({"path": [describe_shard(shard)], "error": [self._crash_error("shard")],
                                  SHARD_DIGEST_COLUMN: [shard.digest]})
                self._rows_arrived(1)
                self._commit(write_shard(self.manifest.destination, shard.id, crash, self.output.format,
                                         config.labels != "none", schema))

    def _shard_rows(self, shards: list[Shard]) -> pa.Table:
        labels = self.prepared.labels if self.prepared.config.labels == "dirs" else None
        columns = {SHARD_COLUMN: [], ROW_COLUMN: [], SHARD_ROWS_COLUMN: [], "path": [], "true_label": []}
        for shard in shards:
            for row, path in enumerate(shard.paths):
                columns[SHARD_COLUMN].append(shard.id)
                columns[ROW_COLUMN].append(row)
                columns[SHARD_ROWS_COLUMN].append(len(shard.paths))
                columns["path"].append(path)
                columns["true_label"].append((labels(folder_of(path)) if labels else None) or "")
        table = pa.table({**columns, ROW_COLUMN: pa.array(columns[ROW_COLUMN], pa.int32()),
                          SHARD_ROWS_COLUMN: pa.array(columns[SHARD_ROWS_COLUMN], pa.int32())})
        kept = [shard.columns for shard in shards if shard.columns is not None]
        if kept:  # the list's kept columns travel with each file
            kept = pa.concat_tables(kept)
            table = pa.Table.from_arrays([*table.columns, *kept.columns], [*table.column_names, *kept.column_names])
        return table


def _with_result_columns(table: pa.Table, schema: pa.Schema, extra: tuple[str, ...] = ()) -> pa.Table:
    """A table of rows (predicted or crashed) with every result column, the job's own
    columns and the row index."""
    rows = conform(table.set_column(table.schema.get_field_index("true_label"), "true_label",
                                    pa.compute.if_else(pa.compute.equal(table.column("true_label"), ""), None,
                                                       table.column("true_label")))
                   if table.column("true_label").type == pa.string() else table, schema, extra)
    return rows.append_column(ROW_COLUMN, table.column(ROW_COLUMN).cast(pa.int32()))


@contextlib.contextmanager
def _failures_become_rows():
    """Let Ray Data drop blocks whose tasks failed all their retries instead of failing
    the job; the driver finds their files missing and retries or records them."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved, context.max_errored_blocks = context.max_errored_blocks, -1
    try:
        yield
    finally:
        context.max_errored_blocks = saved


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C and SIGTERM during start-up take effect once it is done: raised at any
    point, they could break an import half done in the thread that loads the model's
    configs. Yields the event that says one came."""
    import signal
    import threading

    came = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield came
        return
    saved = {signum: signal.signal(signum, lambda *_: came.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield came
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM stops the job like Ctrl-C: committed rows stay and --resume continues
    (signals can be handled in the main thread only)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


def _root_cause(err: Exception) -> str:
    """The innermost 'SomeError: message' line of a Ray error (which nests tracebacks)."""
    import re

    causes = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", str(err), flags=re.MULTILINE)
    if not causes:
        return type(err).__name__
    kind, message = causes[-1]
    return message if kind == "ModelLoadError" else f"{kind}: {message}"


