"""Pipeline: the one place that knows about Ray.

It resolves a job's plan (device, dtype, replicas, batch sizes, preprocessing) once in
the driver, wires the plain stages into a Ray Data dataset
(paths -> ``decode_batch`` CPU tasks -> ``Predictor`` actor pool), and, for
:func:`run`, streams the results to a :class:`~visionbatch.sinks.ResultWriter` with a
progress bar and returns a :class:`Summary`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute

from visionbatch.config import ClassifyConfig, OutputConfig, config_from_kwargs
from visionbatch.labels import LabelResolver, build_resolver, folder_of
from visionbatch.model import ModelSource, Predictor, load_config, load_processor, resolve_model_source
from visionbatch.preprocess import PreprocessSpec, UnsupportedProcessor, resolve_spec
from visionbatch.sinks import Destination, ResultWriter, _Part, conform
from visionbatch.sources import Listing, SourceError, list_images, resolve

log = logging.getLogger("visionbatch")

# Environment variables that workers on other nodes need to see as the driver does.
# Credentials are deliberately absent: each node uses its own environment.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE", "AWS_ENDPOINT_URL",
                  "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")


# Per-row timing columns the stages add, and the summary's name for each.
STAGE_COLUMNS = {"decode_seconds": "read, decode and preprocess (task-seconds)",
                 "predict_seconds": "model (actor-seconds)"}


class JobError(Exception):
    """The job cannot run; the message is the one line the user sees."""


@dataclass(frozen=True)
class Plan:
    """A job's resolved execution plan: plain values shipped to every worker."""

    source: ModelSource
    spec: PreprocessSpec
    device: str
    dtype: str
    replicas: int
    gpus_per_replica: float
    cpus_per_replica: float
    model_threads: int | None
    batch_size: int
    decode_batch_size: int


@dataclass
class Summary:
    """What a job did, printed at the end and written to DEST/summary.json."""

    model: str
    device: str
    dtype: str
    dest: str | None = None
    images_found: int = 0
    already_done: int = 0
    predicted: int = 0
    failed: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    skipped_non_image: int = 0
    unlabelled: int = 0
    unmapped_folders: list[str] = field(default_factory=list)
    labelled: int = 0
    top1_correct: int = 0
    top5_correct: int = 0
    wall_time_s: float = 0.0
    time_to_first_result_s: float | None = None
    images_per_s: float = 0.0
    steady_images_per_s: float | None = None  # after the first result: excludes start-up
    batch_size: int = 0
    replicas: int = 0
    # Where the time went: wall seconds in the driver, summed worker seconds per stage.
    stage_times: dict[str, float] = field(default_factory=dict)
    object_store_spilled_mb: float = 0.0

    @property
    def top1(self) -> float | None:
        return self.top1_correct / self.labelled if self.labelled else None

    @property
    def top5(self) -> float | None:
        return self.top5_correct / self.labelled if self.labelled else None

    def to_dict(self) -> dict:
        return {**asdict(self), "top1": self.top1, "top5": self.top5}

    def add(self, table: pa.Table) -> None:
        """Count one streamed block of result rows (and its stages' worker seconds)."""
        for column, stage in STAGE_COLUMNS.items():
            if column in table.column_names:
                seconds = pa.compute.sum(table.column(column)).as_py() or 0.0
                self.stage_times[stage] = self.stage_times.get(stage, 0.0) + seconds
        errors = table.column("error").to_pylist()
        for error in errors:
            if error is None:
                self.predicted += 1
            else:
                self.failed += 1
                kind = error.split(":", 1)[0]
                self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1
        truths = table.column("true_label").to_pylist() if "true_label" in table.column_names else [None] * len(errors)
        tops = table.column("top_k_labels").to_pylist()
        for error, truth, top in zip(errors, truths, tops):
            if error is None and truth is not None:
                self.labelled += 1
                self.top1_correct += top[0] == truth
                self.top5_correct += truth in top[:5]

    def format(self) -> str:
        lines = [
            f"images found      {self.images_found}" + (f" ({self.already_done} already done)" if self.already_done else ""),
            f"predicted         {self.predicted}",
            f"failed            {self.failed}"
            + ("  (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.errors_by_kind.items())) + ")" if self.failed else ""),
            f"non-image skipped {self.skipped_non_image}",
            f"wall time         {self.wall_time_s:.1f} s   ({self.images_per_s:.1f} images/s)",
        ]
        if self.labelled:
            lines.append(f"top-1 accuracy    {self.top1:.2%}   top-5 {self.top5:.2%}   ({self.labelled} labelled)")
        if self.unlabelled:
            example = ", ".join(self.unmapped_folders[:5])
            lines.append(f"unlabelled        {self.unlabelled} (folders with no matching class: {example}"
                         + (", ..." if len(self.unmapped_folders) > 5 else "") + ")")
        if self.dest:
            lines.append(f"results           {self.dest}")
        return "\n".join(lines)


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


def resolve_plan(config: ClassifyConfig, source: ModelSource, spec: PreprocessSpec) -> Plan:
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
        batch_size = config.batch_size or _probe_gpu_batch_size(config, spec, gpus_per_replica)
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
    return Plan(
        source=source,
        spec=spec,
        device=device,
        dtype="float32" if device == "cpu" and config.dtype == "auto" else config.dtype,
        replicas=replicas,
        gpus_per_replica=gpus_per_replica,
        cpus_per_replica=cpus_per_replica,
        model_threads=threads,
        batch_size=batch_size,
        decode_batch_size=config.decode_batch_size,
    )


def _probe_gpu_batch_size(config: ClassifyConfig, spec: PreprocessSpec, gpus: float) -> int:
    """Measure the best batch size on one GPU of the cluster (one extra model load)."""
    import ray

    def probe() -> int:
        predictor = Predictor(resolve_model_source(config.model), scale=spec.scale, offset=spec.offset,
                              device="cuda", dtype=config.dtype, allow_pickle=config.allow_pickle,
                              trust_remote_code=config.trust_remote_code)
        return predictor.fastest_batch_size(spec.output_size)

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
    except (ConnectionError, RuntimeError, ValueError) as err:
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


@dataclass(frozen=True)
class Prepared:
    """Everything the driver resolved before any work is submitted."""

    config: ClassifyConfig
    plan: Plan
    listing: Listing
    true_labels: list[str | None]
    unmapped_folders: list[str]


def prepare(config: ClassifyConfig) -> Prepared:
    """List the sources, load the model's configs and resolve the plan (no data is read).

    Ray starts in the main thread while another thread loads the model's configs and
    lists the sources: both mostly wait (on subprocesses, on storage), and together
    they are most of the time to the first result.
    """
    source = resolve_model_source(config.model)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        metadata = pool.submit(_model_and_listing, config, source)
        try:
            init_ray(config.address)
        finally:
            spec, id2label, listing = metadata.result()
    true_labels, unmapped = _true_labels(config, id2label, listing.paths)
    _warn_local_paths_on_cluster(config)
    return Prepared(config, resolve_plan(config, source, spec), listing, true_labels, unmapped)


def _model_and_listing(config: ClassifyConfig, source: ModelSource) -> tuple[PreprocessSpec, dict[int, str], Listing]:
    model_config = load_config(source, config.trust_remote_code)
    processor = load_processor(source, config.trust_remote_code)
    try:
        spec = resolve_spec(processor)
    except UnsupportedProcessor as err:
        raise JobError(str(err)) from None
    if spec.output_size is None:
        raise JobError(f"{type(processor).__name__} gives images of varying size; visionbatch needs a fixed input size")
    try:
        listing = list_images(config.sources, from_list=config.from_list, s3_endpoint=config.s3_endpoint)
    except SourceError as err:
        raise JobError(str(err)) from None
    paths = listing.paths[: config.limit] if config.limit else listing.paths
    if not paths:
        raise JobError(f"no image files found in {', '.join(config.sources)}"
                       + (f" ({listing.skipped_non_image} other files skipped)" if listing.skipped_non_image else ""))
    id2label = {int(k): v for k, v in model_config.id2label.items()}
    return spec, id2label, Listing(paths=paths, skipped_non_image=listing.skipped_non_image)


def _true_labels(config: ClassifyConfig, id2label: dict[int, str], paths: list[str]):
    if config.labels == "none":
        return [None] * len(paths), []
    label_map_text = None
    if config.label_map:
        fs, path = resolve(config.label_map, config.s3_endpoint)
        try:
            with fs.open_input_stream(path) as stream:
                label_map_text = stream.read().decode("utf-8")
        except OSError as err:
            raise JobError(f"cannot read --label-map {config.label_map}: {err}") from None
    try:
        resolver: LabelResolver = build_resolver(id2label, label_map_text)
    except ValueError as err:
        raise JobError(str(err)) from None
    by_folder: dict[str, str | None] = {}
    labels = []
    for path in paths:
        folder = folder_of(path)
        if folder not in by_folder:
            by_folder[folder] = resolver(folder)
        labels.append(by_folder[folder])
    return labels, sorted(f for f, label in by_folder.items() if label is None)


def _warn_local_paths_on_cluster(config: ClassifyConfig) -> None:
    import ray

    from visionbatch.sources import is_remote

    if not config.address or all(is_remote(s) for s in config.sources):
        return
    if len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        log.warning("local paths with a multi-node cluster: workers on other nodes read their own disks, where "
                    "these files may not exist. Put the images on shared storage (s3://, gs://, NFS) instead.")


def build_dataset(prepared: Prepared, paths: list[str] | None = None, true_labels: list | None = None,
                  isolate: bool = False):
    """The lazy Ray Data pipeline: paths -> decode/preprocess tasks -> predictor actors.

    ``isolate``: one file per task and per model call, so a failure takes only its own file.
    """
    import ray.data

    plan, config = prepared.plan, prepared.config
    paths = prepared.listing.paths if paths is None else paths
    true_labels = prepared.true_labels if true_labels is None else true_labels
    table = pa.table({"path": pa.array(paths, pa.string()),
                      "true_label": pa.array([label or "" for label in true_labels], pa.string())})
    # One input block per decode task, so that decoding spreads over the CPUs and
    # streams into the actors from the first block on.
    step = 1 if isolate else plan.decode_batch_size
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])
    with warnings.catch_warnings():
        # Retry bounds are "ray_remote_args", deprecated without a named replacement yet;
        # Ray's defaults retry failed tasks and dead actors forever.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        return _wire(ds, plan, config, 1 if isolate else plan.batch_size)


def _wire(ds, plan: Plan, config: ClassifyConfig, batch_size: int):
    import ray.data

    from visionbatch.decode import decode_batch

    ds = ds.map_batches(
        decode_batch,
        batch_size=None,
        batch_format="numpy",
        fn_kwargs={"spec": plan.spec, "max_pixels": config.max_pixels, "s3_endpoint": config.s3_endpoint},
        num_cpus=1,
        max_retries=config.max_retries,
    )
    return ds.map_batches(
        Predictor,
        batch_size=batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "model": plan.source,
            "scale": plan.spec.scale,
            "offset": plan.spec.offset,
            "top_k": config.top_k,
            "device": plan.device,
            "dtype": plan.dtype,
            "allow_pickle": config.allow_pickle,
            "trust_remote_code": config.trust_remote_code,
            "num_threads": plan.model_threads,
            "compile": config.compile,
        },
        compute=ray.data.ActorPoolStrategy(size=plan.replicas),
        num_cpus=plan.cpus_per_replica,
        num_gpus=plan.gpus_per_replica or None,
        max_restarts=config.max_retries,
        max_task_retries=config.max_retries,
    )


def classify(sources, model: str | None = None, **options):
    """Classify every image under ``sources``; returns a lazy ``ray.data.Dataset`` of result rows."""
    if model is not None:
        options["model"] = model
    config = config_from_kwargs(sources, **options)
    return build_dataset(prepare(config)).drop_columns(list(STAGE_COLUMNS))


def run(sources, output: str, *, format: str = "parquet", overwrite: bool = False, resume: bool = False,
        rows_per_file: int = 100_000, flush_seconds: float = 30.0, model: str | None = None,
        progress: bool = True, **options) -> Summary:
    """Classify and write one row per image file to ``output``; returns the :class:`Summary`."""
    if model is not None:
        options["model"] = model
    config = config_from_kwargs(sources, **options)
    output_config = OutputConfig(dest=output, format=format, overwrite=overwrite, resume=resume,
                                 rows_per_file=rows_per_file, flush_seconds=flush_seconds)
    return run_job(config, output_config, progress=sys.stderr if progress else None)


def run_job(config: ClassifyConfig, output: OutputConfig, progress=None) -> Summary:
    """Run a job to the end; ``progress`` is the stream for the progress bar (None: no bar)."""
    started = time.monotonic()
    try:
        destination = Destination(output.dest, config.s3_endpoint)
    except SourceError as err:
        raise JobError(str(err)) from None
    if destination.has_results() and not (output.overwrite or output.resume):
        raise JobError(f"{output.dest} already holds results: pass --overwrite to replace them or --resume to continue")
    prepared = prepare(config)
    if output.overwrite:
        destination.clear()
    summary = Summary(model=config.model, device=prepared.plan.device, dtype=prepared.plan.dtype, dest=output.dest,
                      batch_size=prepared.plan.batch_size, replicas=prepared.plan.replicas,
                      skipped_non_image=prepared.listing.skipped_non_image,
                      images_found=len(prepared.listing.paths), unmapped_folders=prepared.unmapped_folders)
    summary.unlabelled = sum(label is None for label in prepared.true_labels) if config.labels != "none" else 0
    earlier: list[_Part] = []
    paths, true_labels = prepared.listing.paths, prepared.true_labels
    if output.resume:
        earlier, done = _committed_progress(destination, summary)
        todo = [i for i, p in enumerate(paths) if p not in done]
        summary.already_done = len(paths) - len(todo)
        paths, true_labels = [paths[i] for i in todo], [true_labels[i] for i in todo]
    writer = ResultWriter(destination, output.format, output.rows_per_file, output.flush_seconds)
    from tqdm import tqdm

    bar = tqdm(total=summary.images_found, initial=summary.already_done, unit="img", disable=progress is None,
               dynamic_ncols=True, file=progress, desc="classify", smoothing=0.1)
    job = _Job(prepared, writer, summary, bar, started, seen=done if output.resume else set())
    summary.stage_times["start: listing, model config, Ray (wall)"] = time.monotonic() - started
    try:
        with _failures_become_rows(), _sigterm_as_interrupt():
            job.stream(paths, true_labels)
            lost = [i for i, path in enumerate(paths) if path not in job.seen]
            if lost:
                # A block whose task kept failing (a file that kills its worker, a dead
                # node) was dropped; retry its files one per task to isolate the culprit.
                log.warning("%d files were in failed tasks; retrying them one file per task", len(lost))
                job.stream([paths[i] for i in lost], [true_labels[i] for i in lost], isolate=True)
            job.write_failures(paths, true_labels)
    except KeyboardInterrupt:
        writer.flush()
        bar.close()
        raise JobError(f"interrupted; finished rows are saved in {output.dest}: rerun the same command with --resume")
    except Exception as err:
        import ray.exceptions

        if not isinstance(err, ray.exceptions.RayError):
            raise
        writer.flush()  # keep what finished: --resume continues from it
        raise JobError(f"the job failed: {_root_cause(err)}") from None
    finally:
        bar.close()
    writer.commit(earlier)
    summary.stage_times["write results (wall)"] = writer.seconds
    summary.wall_time_s = time.monotonic() - started
    computed = summary.predicted + summary.failed - summary.already_done
    summary.images_per_s = computed / summary.wall_time_s if summary.wall_time_s else 0.0
    destination.write_bytes("summary.json", json.dumps(summary.to_dict(), indent=1).encode())
    return summary


@dataclass
class _Job:
    """The driver's side of a run: stream result blocks into the writer, exactly once per path."""

    prepared: Prepared
    writer: ResultWriter
    summary: Summary
    bar: object
    started: float
    seen: set[str]
    _first: tuple[float, int] = (0.0, 0)  # when the first result arrived, and its rows
    _streamed: int = 0

    def stream(self, paths: list[str], true_labels: list, isolate: bool = False) -> None:
        ds = build_dataset(self.prepared, paths, true_labels, isolate=isolate)
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            fresh = [path not in self.seen for path in table.column("path").to_pylist()]
            if not all(fresh):  # a retried task may deliver rows already written
                table = table.filter(pa.array(fresh))
            self.seen.update(table.column("path").to_pylist())
            now = time.monotonic()
            if self.summary.time_to_first_result_s is None:
                self.summary.time_to_first_result_s = now - self.started
                self._first = (now, table.num_rows)
            elif now > self._first[0]:
                streamed = self._streamed + table.num_rows - self._first[1]
                self.summary.steady_images_per_s = streamed / (now - self._first[0])
            self._streamed += table.num_rows
            self.writer.write(table)
            self.summary.add(table)
            self.bar.update(table.num_rows)
        self.summary.object_store_spilled_mb += _spilled_mb(ds)

    def write_failures(self, paths: list[str], true_labels: list) -> None:
        """Rows for files whose every attempt failed, so that rows out = files in."""
        lost = [i for i, path in enumerate(paths) if path not in self.seen]
        if not lost:
            return
        retries = self.prepared.config.max_retries
        table = conform(pa.table({
            "path": pa.array([paths[i] for i in lost], pa.string()),
            "true_label": pa.array([true_labels[i] for i in lost], pa.string()),
            "error": pa.array([f"worker_crash: processing this file failed {retries + 1} times "
                               "(its worker process died or its task failed)"] * len(lost), pa.string()),
        }))
        self.seen.update(table.column("path").to_pylist())
        self.writer.write(table)
        self.summary.add(table)
        self.bar.update(table.num_rows)


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


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops the job like Ctrl-C: committed rows stay and --resume continues
    (ray.init installs its own SIGTERM handler, which would exit without flushing)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    saved = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


def _spilled_mb(ds) -> float:
    """Object-store spilling during a dataset's run, from Ray Data's own stats (a sign of
    blocks too big or stages out of balance)."""
    import re

    match = re.search(r"Dataset memory:\n\* Spilled to disk: (\d+)MB", ds.stats())
    return float(match.group(1)) if match else 0.0


def _root_cause(err: Exception) -> str:
    """The innermost 'SomeError: message' line of a Ray error (which nests tracebacks)."""
    import re

    causes = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", str(err), flags=re.MULTILINE)
    if not causes:
        return type(err).__name__
    kind, message = causes[-1]
    return message if kind == "ModelLoadError" else f"{kind}: {message}"


def _committed_progress(destination: Destination, summary: Summary) -> tuple[list[_Part], set[str]]:
    """Part files an interrupted run committed, counted into ``summary``; and their paths."""
    parts, done = [], set()
    for name in destination.part_files():
        table = destination.read_table([name])
        parts.append(_Part(name, table.num_rows))
        done.update(table.column("path").to_pylist())
        summary.add(table)
    return parts, done
