"""The Ray engine: the one place that knows about Ray, for clusters (``--address``), more
than one GPU, or on request (``--engine ray``).

It wires the plain stages into one Ray Data dataset::

    ShardPlanner actor (lists, hands out shards)
      -> decode tasks (take shards, yield uint8 pixel blocks)   visionbatch.decode
      -> Predictor actor pool (top-k)                            visionbatch.predictor
      -> ShardWriter actor (one part file per whole shard)       visionbatch.writer
      -> the driver (visionbatch.job): commits, progress, summary
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
import warnings
from typing import Iterator


from visionbatch.config import DECODE_MEMORY_LIMIT, ClassifyConfig
from visionbatch.engines.base import Engine, commit_events
from visionbatch.errors import JobError
from visionbatch.plan import (ModelPlan, Prepared, Resources, block_images, image_bytes,
                              model_arguments, predictor_arguments)
from visionbatch.predictor import Predictor
from visionbatch.shards import AnyShard, InputSpec, PlannerStatus, ShardPlanner
from visionbatch.storage import Storage, is_remote
from visionbatch.writer import ShardWriter

log = logging.getLogger("visionbatch")

# An actor's task is retried for as long as the actor can come back: its restarts
# (--max-retries) bound how often a model or writer may die. A bounded count of task
# retries instead is spent in seconds while a lost node's actor restarts elsewhere
# ("temporarily unavailable" each time), and fails the stream for nothing.
ACTOR_TASK_RETRIES = -1

# The threads of a Ray Data stream, by the names Ray Data gives them, and how long closing
# the engine waits for them to end (see RayEngine.close).
_STREAM_THREADS = ("StreamingExecutor-", "iter_threaded")
_STREAM_THREADS_JOIN_S = 60.0
# Environment variables that workers on other nodes need to see as the driver does.
# Credentials are deliberately absent: each node uses its own environment.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE", "AWS_ENDPOINT_URL",
                  "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")


class RayEngine(Engine):
    name = "ray"

    def start(self, config: ClassifyConfig) -> Resources:
        import ray

        init_ray(config.address)
        _warn_local_paths_on_cluster(config)
        resources = ray.cluster_resources()
        node_cpus = int(max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")),
                            default=0))
        return Resources(int(resources.get("CPU", 1)), int(resources.get("GPU", 0)), node_cpus)

    def probe_batch_size(self, config: ClassifyConfig, model: ModelPlan, gpus: float) -> int:
        """Measure the best batch size on one GPU of the cluster (one extra model load)."""
        import ray

        def probe() -> int:
            predictor = Predictor(**model_arguments(config, model), device="cuda", dtype=config.dtype)
            return predictor.fastest_batch_size(model.spec.output_size)

        try:
            return ray.get(ray.remote(num_gpus=gpus, max_retries=0)(probe).remote())
        except Exception as err:  # the real job reports model errors; fall back to a safe size
            log.warning("batch-size probe failed (%s); using 128", root_cause(err))
            return 128

    def make_planner(self, inputs: InputSpec, storage: Storage) -> "_PlannerActor":
        """The ShardPlanner actor, on the driver's node (it outlives any other node). Each
        decode task waits in one of its threads: room for as many as the CPUs can run."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        cpus = int(ray.cluster_resources().get("CPU", 1))
        actor = ray.remote(ShardPlanner).options(
            num_cpus=0, max_concurrency=4 * cpus + 8, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False))
        self.planner = _PlannerActor(lambda: actor.remote(inputs, storage))
        return self.planner

    def run(self, prepared: Prepared, writer: ShardWriter,
            shards: list[AnyShard] | None = None) -> Iterator[tuple[int, dict | None]]:
        import ray.data

        config = prepared.config
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            if shards is None:
                # One writer gathers every shard's blocks; its work (encoding small rows) is light.
                ds = job_dataset(prepared, self.planner.actor).map_batches(
                    ShardWriter, batch_size=None, batch_format="pyarrow",
                    fn_constructor_args=writer.arguments(), compute=ray.data.ActorPoolStrategy(size=1),
                    num_cpus=0, max_restarts=config.max_retries, max_task_retries=ACTOR_TASK_RETRIES)
            else:  # a redo of whole shards, a task each (retried), written by the driver's own writer
                slots = ray.data.from_items(list(range(len(shards))), override_num_blocks=len(shards))
                ds = _predict(slots.map_batches(_decode_stage, batch_size=1, batch_format="pyarrow",
                                                fn_kwargs={"shards": shards,
                                                           **prepared.decode_options(prepared.plan.batch_size)},
                                                num_cpus=1, max_retries=config.max_retries),
                              prepared, prepared.plan.batch_size)
        ds = _failures_become_rows(ds)
        # No prefetch: it holds each block back until the next one has come, which
        # delays the first result (and every commit) by a block's worth of model time.
        # Closed on the way out, whatever ends the stream: Ray Data's executor then
        # stops while Ray is up. Left to the garbage collector after a stop, it could run
        # after the engine's ray.shutdown() and start a second, local Ray in this process.
        with contextlib.closing(iter(ds.iter_batches(batch_size=None, batch_format="pyarrow",
                                                     prefetch_batches=0))) as batches:
            for records in batches:
                finished = False
                for rows_in, record in commit_events(records if shards is None else writer(records)):
                    if record is not None and "digest" in record:
                        self.planner.committed[record["shard"]] = record["digest"]
                        finished = shards is None and self.planner.all_committed()
                    yield rows_in, record
                if finished:
                    # Every shard is committed: the job is done, whatever the stream still
                    # waits for (after a lost node, Ray Data's last decode slots can wait
                    # forever for CPUs that its restarted actors hold).
                    break
        if shards is None and self.planner.dead:
            # The planner died (its decode tasks with it, at their next shard): a new one
            # lists again, skips what is committed, and the job goes on with the rest.
            log.warning("the shard planner died; a new one takes over from what is committed")
            self.planner.restart()
            yield from self.run(prepared, writer)

    def map_tasks(self, fn, items: list, max_retries: int, address: str | None = None,
                  poll_s: float = 1.0) -> Iterator:
        """A Ray task per item (retried by Ray, on failure and on a lost worker or node),
        at most twice the cluster's CPUs in flight."""
        import ray

        init_ray(address)
        remote = ray.remote(fn).options(num_cpus=1, max_retries=max_retries, retry_exceptions=True)
        limit = 2 * int(ray.cluster_resources().get("CPU", 1))
        pending, in_flight = iter(items), []
        while True:
            in_flight += [remote.remote(item) for item in itertools.islice(pending, limit - len(in_flight))]
            if not in_flight:
                return
            done, in_flight = ray.wait(in_flight, num_returns=1, timeout=poll_s)
            if not done:
                yield None
            for ref in done:
                yield ray.get(ref)

    def failure(self, err: BaseException) -> str | None:
        import ray.exceptions

        if not isinstance(err, ray.exceptions.RayError):
            return None
        if _lost_with_a_node(err):
            # What Ray Data does not drop as a failed block (_failures_become_rows) and
            # fails its stream with: a lost node's actors may still be restarting
            # elsewhere in this process, holding CPUs a new stream would wait for; a new
            # driver (--resume) starts clean.
            return f"the job failed: a Ray node or worker was lost with work in hand ({root_cause(err)})"
        return f"the job failed: {root_cause(err)}"

    def close(self) -> None:
        """Shut a local Ray down (a cluster's stays up), once the threads of Ray Data's
        stream have ended. A closed stream stops them without waiting: its executor's loop
        gets 2 s, and the thread that fetches its blocks ends at its next block. One still
        running after ray.shutdown() (a loaded machine, a stop signal mid-stream) calls
        Ray there, and Ray's core worker ends this process with exit 1 ("The core worker
        has already been shutdown ... The process will exit") before the job's stop
        message. (Ray Data's block prefetcher thread outlives every stream: not waited for.)"""
        import ray

        deadline = time.monotonic() + _STREAM_THREADS_JOIN_S
        for thread in threading.enumerate():
            if thread.name.startswith(_STREAM_THREADS):
                thread.join(max(0.0, deadline - time.monotonic()))
        ray.shutdown()


class _PlannerActor:
    """The planner's methods, called on its actor and waited for. An actor that dies is
    noticed here and replaced (:meth:`restart`) once the stream that used it ends."""

    def __init__(self, make):
        self._make = make
        self.actor = make()
        self.committed: dict[str, str] = {}  # shard -> digest: given at start, then as the writer commits
        self.dead = False
        self._status: dict = {}

    def start(self, committed: dict[str, str] | None = None) -> None:
        self.committed = dict(committed or {})
        self.actor.start.remote(self.committed)

    def restart(self) -> None:
        self.actor, self.dead = self._make(), False
        self.start(self.committed)

    def _call(self, method: str, *args, default=None):
        import ray
        import ray.exceptions

        if self.dead:
            return default
        try:
            return ray.get(getattr(self.actor, method).remote(*args))
        except ray.exceptions.RayActorError:
            self.dead = True
            return default

    def wait_started(self, timeout: float | None = None) -> PlannerStatus:
        self._status = self._call("wait_started", timeout, default=self._status)
        return self._status

    def status(self) -> PlannerStatus:
        """The listing's status (the last one known while the actor is dead)."""
        self._status = self._call("status", default=self._status)
        return self._status

    def mark_committed(self, ids: list[str]) -> None:
        if not self.dead:
            self.actor.mark_committed.remote(ids)

    def unfinished(self) -> list[AnyShard]:
        return self._call("unfinished", default=[])

    def all_committed(self) -> bool:
        """Every shard is handed out and committed (``committed``: this side's record, as
        the planner hears of commits late)."""
        return bool(self.status().get("handed_out_all")) and all(
            shard.id in self.committed for shard in self.unfinished())


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
            raise _token_error(address) from None
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


def _token_error(address: str) -> JobError:
    return JobError(f"the Ray cluster at {address} uses token authentication and refused this client: set "
                    "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or ~/.ray/auth_token)")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on an unreachable cluster or a refused token: ray.init retries
    for minutes, and for 20 s on a missing token."""
    import socket

    if address == "auto":
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    host = host or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        raise JobError(f"cannot reach the Ray cluster at {address}: {err}") from None
    if "://" in address:  # a Ray Client address (ray://): no GCS to ask
        return
    # One request to the cluster's GCS, as ray.init's first one (it answers in ms); only
    # a refused token is told here, anything else (this private class gone from a later
    # Ray included) is left to ray.init.
    try:
        from ray._raylet import GcsClient

        GcsClient(address=f"{host}:{port}")
    except Exception as err:  # noqa: BLE001 - whatever else it is, ray.init says it
        if _token_refused(err):
            raise _token_error(address) from None


def _quiet_ray_data() -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _warn_local_paths_on_cluster(config: ClassifyConfig) -> None:
    import ray

    if not config.address or all(is_remote(s) for s in config.sources):
        return
    if len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        log.warning("local paths with a multi-node cluster: workers on other nodes read their own disks, where "
                    "these files may not exist. Put the images on shared storage (s3://, gs://, NFS) instead.")


def _decode_stage(batch, *, planner=None, shards=None, **decode_options):
    """A decode task: takes shards from the planner until none are left (``batch`` is
    only this task's slot), or decodes the given ``shards`` whose indices ``batch`` holds."""
    import ray

    from visionbatch.decode import decode_shards, memory_limited

    if shards is not None:
        given = iter([shards[i] for i in batch["item"].to_pylist()])
        next_shard = lambda: next(given, None)  # noqa: E731
    else:
        next_shard = lambda: ray.get(planner.next.remote())  # noqa: E731
    # Put back when the task ends: Ray reuses its worker processes for other tasks and actors.
    with memory_limited(DECODE_MEMORY_LIMIT):
        yield from decode_shards(next_shard, **decode_options)


def _predict(ds, prepared: Prepared, batch_size: int, pyarrow_blocks: bool = True):
    import ray.data

    plan, config = prepared.plan, prepared.config
    return ds.map_batches(
        Predictor,
        batch_size=None,
        batch_format="pyarrow" if pyarrow_blocks else "numpy",
        # On CPU torch only, for now: each replica would certify on its own, with figures
        # the summary does not gather yet, and a small job would convert for nothing.
        fn_constructor_kwargs={**predictor_arguments(config, plan, batch_size),
                               **({"runtime": "torch"} if plan.device == "cpu" else {})},
        compute=ray.data.ActorPoolStrategy(size=plan.replicas),
        num_cpus=plan.cpus_per_replica,
        num_gpus=plan.gpus_per_replica or None,
        max_restarts=config.max_retries,
        max_task_retries=ACTOR_TASK_RETRIES,
    )


def _failures_become_rows(ds):
    """``ds``, letting Ray Data drop blocks whose tasks failed all their retries (a decode
    task whose worker died included) instead of failing the stream: the driver finds
    their shards unfinished and redoes them one file per task, or records them. Set on
    the dataset: it runs with a copy of the DataContext it was made under, so the current
    context, changed later, is not read."""
    ds.context.max_errored_blocks = -1
    return ds


def _lost_with_a_node(err: BaseException) -> bool:
    """A Ray failure of the cluster, not of the job's code: an object or an actor lost
    with its node or worker (an actor whose constructor raised is the job's failure)."""
    import ray.exceptions

    if isinstance(err, ray.exceptions.RayActorError):
        return not err.actor_init_failed
    return isinstance(err, (ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError,
                            ray.exceptions.WorkerCrashedError))


def root_cause(err: Exception) -> str:
    """The innermost 'SomeError: message' line of a Ray error (which nests tracebacks)."""
    import re

    causes = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", str(err), flags=re.MULTILINE)
    if not causes:
        return type(err).__name__
    kind, message = causes[-1]
    return message if kind == "ModelLoadError" else f"{kind}: {message}"


def job_dataset(prepared: Prepared, planner):
    """The lazy pipeline of a job: long-lived decode tasks take shards from the planner
    actor -> predictor actors."""
    import ray.data

    plan, config = prepared.plan, prepared.config
    batch = block_images(plan, config.shard_size)
    # Ray Data gathers a task's outputs into blocks of up to target_max_block_size
    # (128 MiB) before passing them on; a decode task lives for the whole job, so its
    # blocks must leave as they are made: the target is one block of images.
    ray.data.DataContext.get_current().target_max_block_size = batch * image_bytes(plan)
    slots = ray.data.range(plan.decode_tasks, override_num_blocks=plan.decode_tasks)
    with warnings.catch_warnings():
        # Retry bounds are "ray_remote_args", deprecated without a named replacement yet;
        # Ray's defaults retry failed tasks and dead actors forever.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        decoded = slots.map_batches(
            _decode_stage, batch_size=None, batch_format="pyarrow",
            fn_kwargs={"planner": planner, **prepared.decode_options(batch)}, num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=plan.decode_concurrency),
            # A decode task that dies loses only the shard it was on (the driver redoes it,
            # one file per task); a retry would take new shards, never that one.
            max_retries=0)
        return _predict(decoded, prepared, plan.batch_size)
