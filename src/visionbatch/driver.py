"""The driver of every committed run (``classify``, ``export``, ``duplicates``): its life
cycle, stated once.

A command is the loop body (:class:`Command`); the driver gives it a :class:`Run`:

1. takes the output's lease (one job per DEST; refused where it holds results and
   neither --overwrite nor --resume says what to do with them);
2. lets the command prepare (start its engine, plan, choose rows), with stop signals
   held until that is done: a signal then stops before anything is written;
3. confirms the lease, fences the output (every write checks the lease's generation)
   and opens the manifest: resume and the option check against the command's identity;
4. runs the command's work: each commit record it takes goes to the manifest, which is
   written as it falls due, with the lease checked at each event;
5. maps every way of stopping to one line and an exit status (:mod:`visionbatch.errors`):
   Ctrl-C/SIGTERM/SIGHUP (130), a newer job holding DEST, an unwritable output, the
   engine's own failure or a bug (the traceback to the log): what was committed is kept,
   and the line says how to go on;
6. releases the lease and closes the command (its engine), whatever happened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import traceback
from typing import Callable, Generic, Protocol, TypeVar

from visionbatch.errors import (DestinationError, JobError, JobInterrupted, SourceError, Superseded,
                                UsageError)
from visionbatch.destination import Destination
from visionbatch.lease import Lease
from visionbatch.manifest import Manifest
from visionbatch.storage import describe
from visionbatch.writer import CommitRecord

log = logging.getLogger("visionbatch")

Result = TypeVar("Result")

# A failpoint for the tests that stop or kill a run midway: a run that has listed this
# many finished units commits them and then waits for its stop (see Run.commit).
HOLD_AFTER_COMMITS = "VISIONBATCH_FAILPOINT_HOLD_AFTER_COMMITS"


class Command(Protocol[Result]):
    """A committed run's own part: what it prepares, what it is, what it does."""

    name: str  # "classify", "export": in the progress bar and in messages

    def prepare(self) -> None:
        """Before the output is written (stop signals held meanwhile): check the inputs,
        start the engine, plan. Raises JobError/UsageError to refuse the run."""

    def identity(self) -> dict:
        """Everything that changes the output: the manifest records it, and --resume with
        another is refused."""

    def work(self, run: "Run") -> Result:
        """Do the run, committing through ``run``; ends with ``run.write(complete=True)``."""

    def failure(self, err: BaseException) -> str | None:
        """The one-line reason for an engine's own failure (None: not the engine's)."""

    def close(self) -> None:
        """Stop whatever ``prepare`` started."""


class Run:
    """A committed run under way: the fenced output, its manifest and its lease."""

    def __init__(self, lease: Lease, manifest: Manifest, flush_seconds: float,
                 before_write: Callable[[Manifest, bool], None] | None = None):
        self.lease, self.manifest, self.flush_seconds = lease, manifest, flush_seconds
        self._before_write = before_write
        self._commits, self._hold_after = 0, int(os.environ.get(HOLD_AFTER_COMMITS) or 0)

    @property
    def destination(self) -> Destination:
        """The output as this run writes it (fenced)."""
        return self.manifest.destination

    def commit(self, record: CommitRecord) -> None:
        """List a finished shard (written to the output by the next :meth:`write`)."""
        self.manifest.add(record)
        self._commits += 1
        if self._commits == self._hold_after:
            self._hold()

    def _hold(self) -> None:
        """The failpoint HOLD_AFTER_COMMITS: commit, then wait for a stop (or a newer job)
        with the engine's work in hand, as a run whose next unit is slow would. A test
        that stops the run there waits for an event (the commit), never for a run that
        is slow enough not to have ended."""
        self.write()
        while True:
            self.tick()  # raises once a stop came or the output is another job's
            time.sleep(0.01)

    def tick(self) -> None:
        """At each event: stop if a stop signal came (its KeyboardInterrupt may have been
        raised where Python drops it: in a finalizer) or a newer job holds the output;
        commit when due."""
        if _stop_came.is_set():
            raise KeyboardInterrupt
        self.lease.check()
        if self.manifest.due(self.flush_seconds):
            self.write()

    def write(self, complete: bool = False) -> None:
        """Commit what is listed (``complete``: the run is done, _SUCCESS follows)."""
        if self._before_write is not None:
            self._before_write(self.manifest, complete)
        self.manifest.write(complete)

    def stopped(self, why: str, resumable: bool = True) -> str:
        """Commit what finished; the message says what was kept and how to go on."""
        with contextlib.suppress(Exception):
            self.write()
        kept = self.manifest.saved_rows  # what the output's manifest lists (the last write may have failed)
        if not resumable:
            return why
        if not kept:
            return f"{why}; no results had been committed yet, so nothing was kept"
        return (f"{why}; {kept} finished rows are saved in {self.destination.uri}: "
                "rerun the same command with --resume")


class Driver(Generic[Result]):
    """Runs one :class:`Command` to its end on ``destination`` (module docstring)."""

    def __init__(self, command: Command[Result], destination: Destination, *, overwrite: bool, resume: bool,
                 flush_seconds: float, before_write: Callable[[Manifest, bool], None] | None = None):
        self.command, self.destination = command, destination
        self.overwrite, self.resume, self.flush_seconds = overwrite, resume, flush_seconds
        self.before_write = before_write

    def __call__(self) -> Result:
        with sigterm_as_interrupt():
            _stop_came.clear()  # a stop of an earlier run in this process is not this one's
            try:
                lease = Lease.take(self.destination, self.overwrite, self.resume)
            except (SourceError, DestinationError) as err:
                raise JobError(str(err)) from None
            try:
                run = self._start(lease)
                return self._work(run)
            finally:
                lease.release()
                self.command.close()

    def _start(self, lease: Lease) -> Run:
        try:
            with _interrupts_held() as interrupted:
                try:
                    self.command.prepare()
                except SystemExit:  # SIGTERM met the handler that ray.init installs first
                    interrupted.set()
            if interrupted.is_set():
                raise KeyboardInterrupt
            lease.confirm()
            manifest = Manifest.open(lease.fenced(), self.command.identity(), overwrite=self.overwrite,
                                     resume=self.resume)
        except KeyboardInterrupt:
            raise JobInterrupted("interrupted during start-up; nothing was written") from None
        except DestinationError as err:
            raise JobError(str(err)) from None
        return Run(lease, manifest, self.flush_seconds, self.before_write)

    def _work(self, run: Run) -> Result:
        try:
            return self.command.work(run)
        except KeyboardInterrupt:
            raise JobInterrupted(run.stopped("interrupted")) from None
        except Superseded as err:  # the output is the newer job's: nothing more to commit
            raise JobError(str(err)) from None
        except UsageError:  # refused before anything was done (a bad --where)
            raise
        except JobError as err:  # the command's own stop: keep what was committed
            raise type(err)(run.stopped(str(err), err.resumable)) from None
        except (DestinationError, SourceError) as err:  # a full disk, a read-only mount, a bucket gone
            raise JobError(run.stopped(str(err))) from None
        except Exception as err:  # the engine's own failure, or a bug: keep what was committed
            why = self.command.failure(err)
            if why is None:
                traceback.print_exc()  # to the log file (the command line sends library output there)
                why = f"the {self.command.name} failed: {describe(err)} (the traceback is in the log)"
            raise JobError(run.stopped(why)) from None


# --------------------------------------------------------------------------- stop signals


def _stop_signals() -> list[int]:
    """Ctrl-C, SIGTERM and SIGHUP, except those the job was started with ignored
    (``nohup`` ignores SIGHUP; a shell script's ``&`` ignores SIGINT): those stay ignored."""
    named = [getattr(signal, name, None) for name in ("SIGINT", "SIGTERM", "SIGHUP")]
    return [signum for signum in named if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN]


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signals are handled there only


class _SignalFlag:
    """Set by a signal handler: a plain attribute, where a threading.Event's set()
    takes a lock, and a second signal landing inside that set() runs the handler again
    in the same thread, to wait on the lock it holds forever (a storm of stop signals
    did so, about 1 job in 20)."""

    def __init__(self) -> None:
        self._up = False

    def set(self) -> None:
        self._up = True

    def clear(self) -> None:
        self._up = False

    def is_set(self) -> bool:
        return self._up


_stop_came = _SignalFlag()  # set by the first stop signal, for Run.tick


def _interrupt_once(signum, frame):
    """The first stop signal raises KeyboardInterrupt in the main thread; from then on
    the stop signals are ignored: raised again while the stop cleans up (a thread's
    join, a pool's close), they would cut it short and leave threads and processes
    behind, the interpreter then waiting for them at exit."""
    _stop_came.set()
    _ignore_further_interrupts()
    raise KeyboardInterrupt


@contextlib.contextmanager
def _interrupts_held():
    """Stop signals during start-up take effect once it is done: raised at any point,
    they could break an import half done in the thread that loads the model's configs.
    Yields the flag that says one came (then the stop signals stay ignored)."""
    came = _SignalFlag()
    if not _in_main_thread():
        yield came
        return
    saved = {signum: signal.signal(signum, lambda *_: came.set()) for signum in _stop_signals()}
    try:
        yield came
    finally:
        if came.is_set():
            _ignore_further_interrupts()
        else:
            for signum, handler in saved.items():
                signal.signal(signum, handler)


@contextlib.contextmanager
def sigterm_as_interrupt(restore_after_a_stop: bool = True):
    """SIGTERM and SIGHUP stop the job like Ctrl-C, and any of them only once (see
    _interrupt_once): committed rows stay and --resume continues. Every handler is as
    before once the block ends, unless a stop came and ``restore_after_a_stop`` is
    False (the command line, whose process exits next). Inside another such block,
    nothing changes: the outer one decides."""
    if not _in_main_thread():
        yield
        return
    signals = [signum for signum in _stop_signals() if signal.getsignal(signum) is not _interrupt_once]
    saved = {signum: signal.signal(signum, _interrupt_once) for signum in signals}
    try:
        yield
    finally:
        stopped = any(signal.getsignal(signum) is not _interrupt_once for signum in signals)
        if restore_after_a_stop or not stopped:
            for signum, handler in saved.items():
                signal.signal(signum, handler)


def _ignore_further_interrupts() -> None:
    """Once a job is stopping, another Ctrl-C or SIGTERM changes nothing: the stop
    finishes (commit, lease, engine) and the exit status stays 130."""
    if _in_main_thread():
        for signum in _stop_signals():
            signal.signal(signum, signal.SIG_IGN)


def progress_bar(stream, desc: str, initial: int = 0, total: int | None = None, unit: str = "img"):
    """A run's progress bar on ``stream`` (None: none shown)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=unit, disable=stream is None, dynamic_ncols=True, file=stream,
                desc=desc, smoothing=0.1)
