"""The local engine: one machine, no Ray, nothing to start but a few processes.

::

    ShardPlanner (a thread of the driver: lists, hands out shards)
      -> decode worker processes (a ProcessPoolExecutor; Pillow, numpy, pyarrow, no torch;
         one per core on CPU): a task per shard, its blocks into one bounded queue
                                                                  visionbatch.decode
      -> the model: one Predictor in the driver's process (CPU or its one GPU); on a
         small CPU machine up to a pass per core at once, each on one thread (_Lanes)
      -> ShardWriter in the driver's process (one part file per whole shard)
      -> the driver (visionbatch.job): commits, progress, summary

The queue is bounded, so memory stays flat at any input size: a worker waits while
the model is behind. A worker that dies (a segfaulting decoder, the kernel's OOM
killer) breaks its pool, as the standard library's pools do: the shards in flight
are left unfinished (the driver redoes them one file per task, a new pool each time
one dies, so that a file that keeps killing its worker gets a ``worker_crash`` row)
and a new pool takes the next shards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa

from visionbatch.certificate import images_needed
from visionbatch.config import DECODE_MEMORY_LIMIT, ClassifyConfig
from visionbatch.decode import limit_memory
from visionbatch.engines.base import Engine, commit_events, gpu_count
from visionbatch.errors import JobError
from visionbatch.plan import ModelPlan, Prepared, Resources, model_arguments, predictor_arguments
from visionbatch.predictor import Predictor
from visionbatch.results import SHARD_COLUMN
from visionbatch.shards import AnyShard, InputSpec, ShardPlanner
from visionbatch.storage import Storage
from visionbatch.writer import ShardWriter

log = logging.getLogger("visionbatch")

# How long the driver waits for a block before it looks at its decode tasks (a dead
# worker shows there, not in the queue).
_POLL_S = 0.2
# Workers start as fresh interpreters: a fork would copy the driver's threads and
# torch state, and a fork server would keep the environment of the first job of a
# process (tests and notebooks run many jobs in one process).
_START_METHOD = "spawn"
# How long closing a pool waits for its management thread (see _Pool.close), and how
# long a read that found the queue's end waits for the workers to be gone.
_MANAGER_JOIN_S = _WORKERS_EXIT_S = 10.0

_blocks = None  # in a decode worker: the queue its blocks go to
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class _ShardStarted:
    """A decode task's first item in the queue: a worker has the shard in hand."""

    shard: str


@dataclass(frozen=True)
class _ShardDone:
    """A decode task's last item in the queue: every block of the shard (or of the piece
    of it: ``task``) is before it."""

    shard: str
    task: str


def _die_with(driver: int) -> None:
    """On Linux, have the kernel SIGKILL this worker when the driver dies, even by
    kill -9: it would otherwise wait on its queues forever, reparented to PID 1, and
    keep multiprocessing's resource tracker alive too (that one exits once every
    process holding its pipe, the driver and its workers, is gone). The signal comes
    when the thread that started the worker ends: the driver's thread that runs the job."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != driver:  # it died before the signal was asked for
        os._exit(1)


def _init_worker(blocks, driver: int) -> None:
    global _blocks
    _die_with(driver)
    # Ctrl-C reaches the whole foreground process group: the driver stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # An image that still blows up becomes a row (MemoryError) or this worker's death,
    # never a machine-wide out-of-memory event.
    limit_memory(DECODE_MEMORY_LIMIT)
    _blocks = blocks


def _decode_task(shard: AnyShard, options: dict) -> None:
    """Decode one shard into the queue, then say it is done (in the same queue: one
    process's puts arrive in order)."""
    from visionbatch.decode import decode_shards

    given = iter([shard])
    _blocks.put(_ShardStarted(shard.id))
    for block in decode_shards(lambda: next(given, None), **options):
        _blocks.put(block)
    _blocks.put(_ShardDone(shard.id, shard.task))


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _decoders(prepared: Prepared) -> int:
    """Decode workers for a job. Where _CoreSplit moves cores between the model's lanes
    and the decoders (see _split_cores), one per core: where the model is the slower
    stage they wait on the full queue, idle; where it is light they take the cores it
    leaves (_CoreSplit gives its lanes back), which the plan's share alone would leave
    idle (micro ViT on 2 cores: 217-244 -> 227-295 images/s). Elsewhere the plan's: on a
    GPU the CPUs the thread that feeds it leaves, and where the model's threads are
    fixed (``--threads``, ``--compile``, or 8 cores and more: the plan leaves the
    decoders their own cores) nothing would give cores back."""
    return _cpus() if _split_cores(prepared) else prepared.plan.decode_concurrency


def _cpu_seconds(pids) -> dict[int, float]:
    """The CPU time each process has used so far (from Linux's /proc; {} elsewhere)."""
    used = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()  # the name may hold spaces
            used[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, ValueError, IndexError):
            pass
    return used


class _Pool:
    """Decode worker processes and the queue their blocks come back through; both are
    replaced together when a worker dies (a process killed while writing to the queue
    can leave it locked or cut).

    A worker's blocks wait in the queue's pipe, half written, until the driver reads
    them: a worker that dies (or that the broken pool kills) leaves a cut block there,
    whose read would wait forever, for the driver holds the queue's write end too
    (mp.Queue opens both). So the driver's end is closed as soon as no worker still has
    to inherit it (all started: the pool starts no more), or once the pool is broken;
    a read of a cut block then ends with EOFError when the workers are gone."""

    def __init__(self, workers: int, stall_timeout: float | None = None):
        context = multiprocessing.get_context(_START_METHOD)
        self.workers = workers
        self.blocks = context.Queue(maxsize=2 * workers + 2)
        self.executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                               initializer=_init_worker, initargs=(self.blocks, os.getpid()))
        self._writer_lock = threading.Lock()  # a worker starting pickles the write end: not once closed
        # Where the driver takes blocks (LocalEngine.run): a stuck worker breaks the pool.
        self.stall = _Stall(stall_timeout, self.kill) if stall_timeout is not None else None

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        with self._writer_lock:
            future = self.executor.submit(fn, *args)
            if len(self.pids()) == self.workers:
                self.blocks._writer.close()  # idempotent
        future.add_done_callback(self._task_done)
        return future

    def _task_done(self, future: concurrent.futures.Future) -> None:
        if not future.cancelled() and isinstance(future.exception(), BrokenProcessPool):
            with self._writer_lock:
                self.blocks._writer.close()

    def gone(self, timeout: float) -> bool:
        """Whether every worker has exited, waiting up to ``timeout`` s: the pipe's end
        comes while they exit (their ends close before they can be reaped), not after."""
        deadline = time.monotonic() + timeout
        while any(process.is_alive() for process in self.processes()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes()]

    def processes(self) -> list:
        # The executor's process map: it has no public one (and shutdown drops it).
        return list((self.executor._processes or {}).values())

    def kill(self) -> None:
        """SIGKILL every worker, a stopped one too (SIGTERM would wait for its SIGCONT);
        they hold nothing to clean up. (Python 3.14 has ProcessPoolExecutor.kill_workers.)"""
        for process in self.processes():
            process.kill()

    def close(self) -> None:
        if self.stall is not None:
            self.stall.stop()
        # Workers busy with a shard would finish it first: stop them now.
        processes, manager = self.processes(), self.executor._executor_manager_thread
        self.executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()
        # The pool's thread then closes its wake-up pipe; should the interpreter exit
        # meanwhile (an interrupted job), the pool's exit hook writes to that pipe as it
        # closes ("OSError: Bad file descriptor" on stderr, a race in CPython 3.11's
        # pool). Its end comes within a second of the workers'.
        if manager is not None:
            manager.join(timeout=_MANAGER_JOIN_S)
        self.blocks.cancel_join_thread()
        # Queue.close() closes nothing in a process that never put (the driver).
        self.blocks._reader.close()
        with self._writer_lock:
            self.blocks._writer.close()


class _Stall:
    """Watches a pool for a stuck worker (stopped, hung): a shard it started that has
    sent nothing, or a pool with shards in hand that has sent nothing at all (an idle
    worker stopped while it holds the lock on the pool's tasks), while the driver waited
    ``timeout`` s for blocks, all told (time the model is busy does not count: workers
    then wait for room in the queue). A thread of the driver looks every second and
    then kills the pool's workers: the driver itself may be blocked in the middle of a
    block that a stopped worker will never finish writing. Every writer dead ends that
    read, and the pool is broken as at a worker's death: its shards go again, a new
    pool takes the next ones."""

    def __init__(self, timeout: float, kill: Callable[[], None]):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._waited = 0.0  # the driver's time waiting for blocks, all told
        self._since: float | None = None  # when the wait under way began
        self._in_hand: set[str] = set()  # shards submitted and not done
        self._heard: dict[str, float] = {}  # a started shard -> _waited when it last sent something
        self._last = 0.0  # _waited when the pool last sent something, or was given work when it had none
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, args=(kill,), daemon=True, name="visionbatch-stall").start()

    def _waited_now(self) -> float:
        return self._waited + (time.monotonic() - self._since if self._since is not None else 0.0)

    @contextlib.contextmanager
    def waiting(self):
        """Around the driver's wait for a block."""
        with self._lock:
            self._since = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._waited, self._since = self._waited_now(), None

    def submitted(self, shard: str) -> None:
        with self._lock:
            if not self._in_hand:
                self._last = self._waited_now()
            self._in_hand.add(shard)

    def heard(self, shard: str) -> None:
        """Something came from ``shard``: its start or a block."""
        with self._lock:
            self._heard[shard] = self._last = self._waited_now()

    def done(self, shard: str) -> None:
        with self._lock:
            self._heard.pop(shard, None)
            self._in_hand.discard(shard)
            self._last = self._waited_now()

    def _silent(self) -> float:
        with self._lock:
            now = self._waited_now()
            silences = [now - heard for heard in self._heard.values()]
            if self._in_hand:
                silences.append(now - self._last)
            return max(silences, default=0.0)

    def _watch(self, kill: Callable[[], None]) -> None:
        while not self._stopped.wait(1.0):
            if (silent := self._silent()) > self.timeout:
                log.warning("a decode worker sent nothing for %.0f s (stopped or hung): the workers are replaced "
                            "and their shards done again", silent)
                kill()
                return

    def stop(self) -> None:
        self._stopped.set()


class LocalEngine(Engine):
    name = "local"

    def __init__(self):
        self._predictor: Predictor | None = None
        self._task_workers: _Pool | None = None  # map_tasks' workers, kept from one call to the next

    def start(self, config: ClassifyConfig) -> Resources:
        cpus = _cpus()
        return Resources(cpus, gpu_count(), cpus)

    def probe_batch_size(self, config: ClassifyConfig, model: ModelPlan, gpus: float) -> int:
        """Measure the best batch size on the GPU (the model loaded for it is loaded once more for the job)."""
        predictor = Predictor(**model_arguments(config, model), device="cuda", dtype=config.dtype)
        return predictor.fastest_batch_size(model.spec.output_size)

    def make_planner(self, inputs: InputSpec, storage: Storage) -> ShardPlanner:
        self.planner = ShardPlanner(inputs, storage)
        return self.planner

    def _model(self, prepared: Prepared) -> Predictor:
        """The job's one model replica, loaded once (while the first shards decode)."""
        if self._predictor is None:
            if prepared.plan.replicas > 1:
                raise JobError("the local engine runs one model replica: use --engine ray for more")
            # No timing at start (fewer_threads): _CoreSplit follows what the job shows.
            # Candidate paths load once the job shows it is large enough to certify them.
            arguments = {**predictor_arguments(prepared.config, prepared.plan, prepared.plan.batch_size),
                         "fewer_threads": None, "defer_candidates": True}
            if _split_cores(prepared):
                arguments.update(num_threads=1, passes_at_once=prepared.plan.model_threads)  # a thread per lane
            self._predictor = Predictor(**arguments)
            self._start_candidates_if_worth_it()
        return self._predictor

    def _start_candidates_if_worth_it(self) -> None:
        """Start loading the candidate paths (an OpenVINO conversion costs seconds of CPU
        on a first run) once the job has images enough for a certificate to pass; a
        smaller job runs on the reference throughout, and says why."""
        status = self.planner.status()
        if self._predictor.paths.certification is None or status["images_listed"] >= images_needed():  # or resumed
            self._predictor.paths.start(lambda: self.planner.status()["images_listed"])
        elif status["listing_done"] and not self._predictor.paths.deferred:
            self._predictor.paths.deferred = (f"the job's {status['images_listed']} images are fewer than the "
                                                f"{images_needed()} a certificate needs: torch/float32 throughout")

    def runtime_report(self) -> dict | None:
        return self._predictor.paths.report() if self._predictor is not None else None

    def close(self) -> None:
        if self._predictor is not None:
            self._predictor.paths.close()
        if self._task_workers is not None:
            self._task_workers.close()
            self._task_workers = None

    def run(self, prepared: Prepared, writer: ShardWriter,
            shards: list[AnyShard] | None = None) -> Iterator[tuple[int, dict | None]]:
        plan, config = prepared.plan, prepared.config
        # A forward pass per block: here a block costs a pickle through a pipe, not a
        # scheduler's round (Ray's larger blocks, plan.block_images), and the first
        # result comes after one batch is decoded, not a shard.
        options = prepared.decode_options(plan.batch_size)
        if shards is None:  # the job: shards from the planner, a dead task's shard left unfinished
            workers = _decoders(prepared)
            # Shards in flight: until the model takes its first block, the plan's share
            # of workers (the model loads meanwhile: more workers starting would slow
            # it), then every worker and a shard queued ahead.
            tasks = _RetryingPool(_decode_task, _Feed(self.planner.next, workers + 1), workers, attempts=1,
                                  limit=plan.decode_concurrency, arguments=(options,),
                                  stall_timeout=config.stall_timeout)
            limit_after_start = workers + 1
        else:  # a redo: one worker, so that a death is the task's own; retried
            given = iter(shards)
            tasks = _RetryingPool(_decode_task, _Feed(lambda: next(given, None), 1), 1,
                                  attempts=config.max_retries + 1, limit=1, arguments=(options,),
                                  stall_timeout=config.stall_timeout)
            limit_after_start = 1
        lanes = None
        try:
            tasks.fill()
            model = self._model(prepared)  # loads while the first shards decode
            certify_pending = bool(model.paths.wanted) and not (model.paths.started or model.paths.deferred)
            cores = _CoreSplit(plan, _split_cores(prepared))
            # torch.compile would trace the hooks that stop a pass: its passes run to their end.
            lanes = _Lanes(model, cores.high, () if config.compile else model.model.modules())

            def write(wait: str) -> Iterator[tuple[int, dict | None]]:
                for predicted in lanes.results(wait):
                    yield from commit_events(writer(predicted))

            while not tasks.ended:
                tasks.fill()
                yield from write("lane")
                pool = tasks.pool
                try:
                    with cores.waiting(), pool.stall.waiting():
                        item = pool.blocks.get(timeout=_POLL_S)
                except queue.Empty:  # every block that came is taken: look at the workers
                    item = None
                except (EOFError, OSError):  # a block cut by a worker's death (see _Pool)
                    if not pool.gone(_WORKERS_EXIT_S):  # not the queue's end: an error of the driver's own
                        raise
                    item, tasks.broken = None, True
                if item is None:
                    if tasks.failed():
                        # A shard out of tries is left unfinished (the driver redoes it); one tried
                        # again sends its rows again, which the writer keeps once.
                        yield from write("all")
                        tasks.replace()
                    continue
                if isinstance(item, _ShardStarted):
                    pool.stall.heard(item.shard)
                    continue
                if isinstance(item, _ShardDone):
                    tasks.finished(item.task)
                    pool.stall.done(item.shard)
                    continue
                pool.stall.heard(item.column(SHARD_COLUMN)[0].as_py())
                tasks.limit = limit_after_start
                # OpenVINO runs a stream per lane: kept at every lane while it runs passes, where
                # torch's lanes follow the split (EfficientNet-Lite0, 3,200 JPEGs: see benchmarks/RESULTS.md).
                lanes.width = cores.high if model.paths.runs_openvino else cores.adjust(pool.blocks.full(),
                                                                                        pool.pids())
                lanes.start(item)
                if certify_pending and shards is None:
                    self._start_candidates_if_worth_it()
                    certify_pending = not (model.paths.started or model.paths.deferred)
            yield from write("all")
        finally:
            if lanes is not None:
                lanes.close()
            tasks.close()

    def map_tasks(self, fn: Callable, items: list, max_retries: int, address: str | None = None,
                  poll_s: float = 1.0) -> Iterator:
        """A worker per core, a few tasks queued ahead, on the same retrying pool as
        the job's decode tasks. The workers stay for the engine's next call (a command's
        next stage) unless one died: a fresh interpreter costs seconds."""
        workers = _cpus()
        given = iter(items)
        tasks = _RetryingPool(fn, _Feed(lambda: next(given, None), 2 * workers), workers, attempts=max_retries + 1,
                              limit=2 * workers, pool=self._task_workers)
        self._task_workers = None
        try:
            while not tasks.ended:
                tasks.fill()
                done = tasks.wait(poll_s)
                for key, result in done:
                    tasks.finished(key)
                    yield result
                if tasks.failed():
                    given_up = tasks.replace()
                    if given_up:
                        raise JobError(f"a task failed {max_retries + 1} times (its worker process died or it "
                                       f"raised: {given_up[0][1]})")
                elif not done:
                    yield None
            self._task_workers = tasks.keep()
        finally:
            tasks.close()


class _RetryingPool:
    """The local engine's one retrying pool: ``fn(item, *arguments)`` for the items
    ``feed`` gives, on worker processes (_Pool), at most ``limit`` in flight, each tried
    up to ``attempts`` times.

    A worker that dies breaks the whole pool (the standard library's pools cannot tell
    whose task killed it): :meth:`replace` starts a new one, and every task that was in
    flight goes again, unless it is out of tries: then it is given up. An item is keyed
    by its ``task`` attribute where it has one (a shard or a piece of one), else by its
    position in the feed."""

    def __init__(self, fn: Callable, feed: "_Feed", workers: int, attempts: int, limit: int, arguments: tuple = (),
                 stall_timeout: float | None = None, pool: "_Pool | None" = None):
        self.fn, self.feed, self.workers, self.attempts, self.limit = fn, feed, workers, attempts, limit
        self.arguments, self.stall_timeout = arguments, stall_timeout
        self.pool = pool or _Pool(workers, stall_timeout)
        self.broken = False  # a worker died since the last replace
        self._in_flight: dict[str, tuple[object, concurrent.futures.Future]] = {}
        self._tries: dict[str, int] = {}
        self._keys = itertools.count()

    @property
    def ended(self) -> bool:
        """Every item taken from the feed and finished (or given up)."""
        return self.feed.ended and not self._in_flight

    def _key(self, item) -> str:
        return getattr(item, "task", None) or f"{next(self._keys)}"

    def fill(self) -> None:
        """Keep the workers busy (not once the pool is found broken)."""
        while not self.broken and len(self._in_flight) < self.limit and (item := self.feed.take()) is not None:
            key = self._key(item)
            try:
                future = self.pool.submit(self.fn, item, *self.arguments)
            except BrokenProcessPool:  # a worker died since the last look: not this item's try
                self.feed.again(item)
                self.broken = True
                return
            if self.pool.stall is not None:
                self.pool.stall.submitted(getattr(item, "id", key))
            self._tries[key] = self._tries.get(key, 0) + 1
            self._in_flight[key] = (item, future)

    def wait(self, timeout: float) -> list[tuple[str, object]]:
        """The (key, result) of tasks that finished within ``timeout`` s (a failed one
        stays in flight: see :meth:`failed`)."""
        futures = {future: key for key, (_, future) in self._in_flight.items()}
        done, _ = concurrent.futures.wait(futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        return [(futures[future], future.result()) for future in done if future.exception() is None]

    def finished(self, key: str) -> None:
        self._in_flight.pop(key, None)

    def failed(self) -> bool:
        """Whether a worker died or a task raised (decode tasks never do, by design)."""
        return self.broken or any(future.done() and future.exception() for _, future in self._in_flight.values())

    def replace(self) -> list[tuple[object, BaseException]]:
        """A new pool; the tasks in flight go again, but those out of tries: the given
        up (item, error)."""
        log.warning("a worker process died (or its task failed) with %d task(s) in hand: they go again in new "
                    "workers, but those out of tries", len(self._in_flight))
        given_up = []
        for key, (item, future) in self._in_flight.items():
            if self._tries[key] < self.attempts:
                self.feed.again(item)
            else:
                error = future.exception() if future.done() else None
                given_up.append((item, error or BrokenProcessPool("its worker process died")))
        self._in_flight.clear()
        self.pool.close()
        self.pool, self.broken = _Pool(self.workers, self.stall_timeout), False
        return given_up

    def keep(self) -> "_Pool | None":
        """Once every task ended: the workers, for another caller (closed by it); else None."""
        if not self.ended or self.broken:
            return None
        pool, self.pool = self.pool, None
        return pool

    def close(self) -> None:
        self.feed.stop()
        if self.pool is not None:
            self.pool.close()


class _CoreSplit:
    """On CPU, how many forward passes run at once (lanes of one torch thread each, see
    _Lanes) follows what the job shows, in windows of a few seconds (so that another
    process taking cores on a shared machine moves the split too):

    - a lane goes back to the decoders (down to the replica's own cores) when the model
      waits for blocks, or when the decoders use the cores its lanes would run on (a
      light model: its lanes then only contend with them);
    - a lane more (up to the plan's threads) when the model is the bottleneck: the queue
      full, the model never waiting, and a core left by the decoders.

    Inactive (one lane, on the plan's threads) where nothing is split: see _split_cores."""

    WINDOW_S = 3.0
    WAITING_MORE_THAN = 0.15  # of the window: the model is starved
    # ... and, with the queue full, the model is the bottleneck. Taking a block costs
    # the model ~2% of its time even then (a pickle of its pixels through a pipe).
    WAITING_LESS_THAN = 0.05

    def __init__(self, plan, active: bool):
        self.active = active
        self.low, self.high = (plan.fewer_threads[0], plan.model_threads) if active else (1, 1)
        self.lanes = self.high
        self.cpus = _cpus()
        # From the first block on: waiting for the first ones is start-up, not the pace.
        self._window_started: float | None = None
        self._waited = 0.0
        self._decoder_seconds: dict[int, float] = {}
        self._first_window = True

    @contextlib.contextmanager
    def waiting(self):
        started = time.monotonic()
        try:
            yield
        finally:
            self._waited += time.monotonic() - started

    def adjust(self, queue_full: bool, decoders: list[int]) -> int:
        """After each block taken: ``queue_full`` as it is now, ``decoders`` the decode
        workers' pids. Returns the lanes to run."""
        if not self.active:
            return self.lanes
        now = time.monotonic()
        if self._window_started is None:
            self._window_started, self._waited, self._decoder_seconds = now, 0.0, _cpu_seconds(decoders)
        elapsed = now - self._window_started
        if elapsed < self.WINDOW_S:
            return self.lanes
        waiting = self._waited / elapsed
        seconds = _cpu_seconds(decoders)
        # Cores the decoders used (a worker started in the window counts from 0).
        decoding = sum(max(0.0, used - self._decoder_seconds.get(pid, 0.0)) for pid, used in seconds.items()) / elapsed
        left = self.cpus - decoding
        # Not in the first window: the workers beyond the plan's share start in it and
        # fill the queue (ViT-Ti's decoders used 0.54 cores then, 0.2 after).
        decoders_crowd = not self._first_window and left < self.lanes - 0.5
        self._first_window = False
        if self.lanes > self.low and (waiting > self.WAITING_MORE_THAN or decoders_crowd):
            self.lanes -= 1
        elif self.lanes < self.high and waiting < self.WAITING_LESS_THAN and queue_full and left > self.lanes + 0.75:
            self.lanes += 1
        self._window_started, self._waited, self._decoder_seconds = now, 0.0, seconds
        return self.lanes


def _split_cores(prepared: Prepared) -> bool:
    """Whether _CoreSplit moves cores between the model's lanes and the decoders: on CPU
    where the plan's threads reach into the decoders' cores (a small machine, no
    ``--threads``), and not under ``--compile`` (torch.compile is not thread-safe)."""
    return prepared.plan.fewer_threads is not None and not prepared.config.compile


class _Lanes:
    """The model's forward passes in threads of the driver, up to ``width`` at once (a
    block each), their results taken in the order the blocks came.

    Why lanes of one thread rather than one pass on every core: a pass on N torch
    threads meets a barrier at each op, so a decoder that takes one thread's core for a
    moment holds up the others, which spin there meanwhile. One-thread passes share no
    barrier (OpenVINO's throughput "streams" and PyTorch's multi-instance launcher for
    Xeons do the same). ViT-Ti, 2 cores, batch 16, beside a process decoding at 0.2 of a
    core: 54-55 images/s in two lanes, 45-47 in one pass on 2 threads
    (benchmarks/RESULTS.md). torch lets go of the GIL inside its ops.

    ``modules``: the torch modules of the model; a pass in flight when the lanes close
    (an interrupted job) stops at its next module, where it would otherwise run to its
    end before the process can exit (a heavy model's pass on one thread takes seconds)."""

    def __init__(self, model: Callable[[pa.Table], pa.Table], most: int, modules=()):
        self._model = model
        self._threads = concurrent.futures.ThreadPoolExecutor(most, thread_name_prefix="visionbatch-lane")
        self._running: collections.deque[concurrent.futures.Future] = collections.deque()
        self.width = most
        self._closing = threading.Event()
        self._hooks = [module.register_forward_pre_hook(self._stop_if_closing) for module in modules]

    def _stop_if_closing(self, module, args) -> None:
        if self._closing.is_set():
            raise _PassStopped

    @property
    def free(self) -> bool:
        """Whether a lane has no pass. A result that waits for an earlier block's still
        counts against a bound (2 x width), not against its lane, which goes on."""
        busy = sum(not future.done() for future in self._running)
        return busy < self.width and len(self._running) < 2 * self.width

    def start(self, block: pa.Table) -> None:
        self._running.append(self._threads.submit(self._model, block))

    def results(self, wait: str = "") -> Iterator[pa.Table]:
        """The results at the head that are ready, in order; ``wait="lane"``: waiting
        until a lane is free, ``"all"``: every one."""
        while True:
            while self._running and (self._running[0].done() or wait == "all"):
                yield self._running.popleft().result()
            if wait != "lane" or self.free:
                return
            concurrent.futures.wait([future for future in self._running if not future.done()],
                                    return_when=concurrent.futures.FIRST_COMPLETED)

    def close(self) -> None:
        self._closing.set()
        self._threads.shutdown(wait=True, cancel_futures=True)  # the passes in flight stop at their next module
        for hook in self._hooks:
            hook.remove()


class _PassStopped(BaseException):
    """Raised in a lane's forward pass once the lanes close; not an Exception, so that
    the Predictor does not take it for the model's failure on the images."""


class _Feed:
    """Shards taken ahead from ``source`` by a thread (the planner's ``next`` waits
    while it lists), and shards given back for another try."""

    def __init__(self, source: Callable[[], AnyShard | None], ahead: int):
        self._ready: queue.Queue = queue.Queue(maxsize=ahead)
        self._again: list[AnyShard] = []
        self._stopped = threading.Event()
        self.ended = False  # the source is exhausted and every shard taken
        self._source_done = False

        def fill() -> None:
            while not self._stopped.is_set():
                shard = source()
                self._ready.put(shard)
                if shard is None:
                    return

        threading.Thread(target=fill, daemon=True, name="visionbatch-feed").start()

    def take(self) -> AnyShard | None:
        """The next shard if one is ready (None: none now, or none left: see ``ended``)."""
        if self._again:
            return self._again.pop(0)
        if self._source_done:
            self.ended = True
            return None
        try:
            shard = self._ready.get_nowait()
        except queue.Empty:
            return None
        if shard is None:
            self._source_done = self.ended = True
        return shard

    def again(self, shard: AnyShard) -> None:
        self._again.append(shard)
        self.ended = False

    def stop(self) -> None:
        self._stopped.set()
