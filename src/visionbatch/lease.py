"""One job per DEST: the lease (``_lease.json``) and the fencing token its writes carry.

Fencing: a job's writes carry its lease's generation (:class:`Fence`), a number that
grows with every job that takes DEST. Before a file of a job appears in DEST (and before
it deletes any), the job reads the lease and stops (:class:`Superseded`) where a newer
generation holds it; a stale job's late part, written between that check and the
rename, has its own generation in its name, so it never replaces a part a newer job
committed, and it is listed by no manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from visionbatch.destination import LEASE, LEASE_STALE_S, Destination, fresh_lease, read_lease
from visionbatch.errors import DestinationError, Superseded

LEASE_RENEW_S = LEASE_STALE_S / 6  # a live job rewrites its lease this often
LEASE_SETTLE_S = 1.0  # between writing a lease and reading it back (longer than any two writes race)


@dataclass(frozen=True)
class Fence:
    """A job's fencing token: its lease's holder id and generation, and where the lease
    is (DEST, and the lease's path on its filesystem). Plain values: it travels to writer
    processes."""

    dest: str
    lease: str
    holder: str
    generation: int

    def newer_holder(self, lease: dict | None) -> dict | None:
        """The lease of the job that took DEST from this one ({} where the lease file is
        gone); None while this job holds it, or where only an older generation wrote over
        it (a stale job's heartbeat: the newer generation wins, and rewrites its lease)."""
        if lease is None:
            return {}
        if lease.get("id") == self.holder or lease.get("generation", 0) < self.generation:
            return None
        return lease

    def check(self, fs: pafs.FileSystem) -> None:
        """Read the lease; Superseded, naming the newer job, where it is no longer this job's."""
        newer = self.newer_holder(read_lease(fs, self.lease))
        if newer is not None:
            raise superseded(self.dest, newer)


def superseded(where: str, lease: dict) -> Superseded:
    """The error of a job whose DEST (``where``) a newer job (``lease``) took over."""
    if not lease:
        return Superseded(f"{where} is no longer this job's: its lease file is gone (removed by something other "
                          "than visionbatch); this job stopped without writing more")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.get("started", 0)))
    return Superseded(
        f"{where} was taken over by a newer job (holder {lease.get('id')}, pid {lease.get('pid')} on "
        f"{lease.get('host')}, lease generation {lease.get('generation')}, since {when}) while this job's lease "
        f"was stale (not renewed for {LEASE_STALE_S:.0f} s: the process was paused or cut off); this job stopped "
        "without writing more, and DEST holds that job's results")


class Lease:
    """One live job per DEST: a lease file naming its holder (id, host, pid) and its
    generation, renewed by a heartbeat thread; a second job is refused while the lease
    is fresh, and a lease whose holder is dead (stale, released, or its pid gone on this
    host) is taken over with the next generation. A released lease stays in DEST (marked
    released), so that generations only grow and a stale job can name its successor.

    pyarrow's filesystems have no exclusive create (nor S3 conditional writes), so
    taking a lease is write, settle, read back: of two jobs that start together the
    later write wins and the other sees a foreign holder and stops. The settle time
    overlaps the job's start-up (Ray, the model's configs). The generation is the job's
    fencing token (:class:`Fence`): its writes check it, and the heartbeat stops renewing
    once a newer generation holds DEST (:meth:`check` then raises).
    """

    def __init__(self, destination: "Destination"):
        self.destination = destination
        self.holder = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.time()}
        self.lost: dict | None = None  # the newer job's lease, once the heartbeat has seen one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        return read_lease(self.destination.fs, self.destination._path(LEASE))

    def _write(self, **more) -> None:
        self.destination.write_bytes(LEASE, json.dumps({**self.holder, "heartbeat": time.time(), **more}).encode())

    @property
    def fence(self) -> Fence:
        return Fence(self.destination.uri, self.destination._path(LEASE), self.holder["id"], self.holder["generation"])

    def fenced(self) -> "Destination":
        """DEST as this job writes it: each write and delete checks the lease first."""
        destination = self.destination
        return type(destination)(destination.uri, destination.storage, self.fence)

    def _alive(self, lease: dict) -> bool:
        if not fresh_lease(lease):
            return False
        if lease.get("host") == self.holder["host"]:
            try:
                os.kill(int(lease["pid"]), 0)
            except ProcessLookupError:
                return False
            except (PermissionError, ValueError, KeyError):
                pass
        return True

    def _refuse(self, lease: dict) -> DestinationError:
        seen = time.time() - lease.get("heartbeat", 0)
        return DestinationError(f"{self.destination.uri} is in use by another job (pid {lease.get('pid')} on "
                                f"{lease.get('host')}, last seen {seen:.0f} s ago): wait for it to end, or "
                                "write to another DEST")

    def claim(self) -> None:
        """Write our lease, one generation past the last, unless a live job holds DEST
        (call :meth:`confirm` later)."""
        current = self._read()
        if current and current["id"] != self.holder["id"] and self._alive(current):
            raise self._refuse(current)
        self.holder["generation"] = (current or {}).get("generation", 0) + 1
        self._write()

    def confirm(self) -> None:
        """After the settle time: still ours? Then keep it fresh until :meth:`release`."""
        time.sleep(max(0.0, self.holder["started"] + LEASE_SETTLE_S - time.time()))
        current = self._read()
        if current is None:  # gone meanwhile (removed by hand): take it again
            self.claim()
            current = self._read()
        if current is None or current["id"] != self.holder["id"]:
            raise self._refuse(current or {})
        heartbeat = threading.Thread(target=self._heartbeat, daemon=True, name="visionbatch-lease")
        heartbeat.start()
        # Kept once started: a stop signal inside start() left release() a thread it could
        # not join ("cannot join thread before it is started", exit 1 instead of 130). One
        # that starts unkept finds _stop set by release() and ends without a write.
        self._thread = heartbeat

    def _heartbeat(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            with contextlib.suppress(Exception):  # a missed beat is retried; 6 in a row make it stale
                if not self.renew():
                    return

    def renew(self) -> bool:
        """Rewrite our lease (also over one an older generation wrote), unless a newer job
        holds DEST: then never again (False; :meth:`check` raises from then on)."""
        newer = self.fence.newer_holder(self._read())
        if newer is not None:  # taken over while this job was paused
            self.lost = newer
            return False
        self._write()
        return True

    def check(self) -> None:
        """Superseded once the heartbeat has seen a newer job hold DEST (no I/O: for every
        event the driver takes; the writes check the lease themselves)."""
        if self.lost is not None:
            raise superseded(self.destination.uri, self.lost)

    @classmethod
    def take(cls, destination: "Destination", overwrite: bool, resume: bool) -> "Lease":
        """Before any work: refuse a DEST that holds results unless told what to do with
        them, or that cannot be written; then claim it (:meth:`confirm` later)."""
        if destination.has_results() and not (overwrite or resume):
            raise DestinationError(f"{destination.uri} already holds results: pass --overwrite to replace them "
                                   "or --resume to continue")
        destination.check_writable()
        lease = cls(destination)
        lease.claim()
        return lease

    def release(self) -> None:
        """Mark our lease released (a newer one stays as it is): the next job takes DEST
        at once, with the next generation."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self._read()
        if current is not None and current["id"] == self.holder["id"]:
            with contextlib.suppress(Exception):
                self._write(released=time.time())
