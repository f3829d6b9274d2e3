"""A fork server for the tests' ``visionbatch`` processes.

Each job process would otherwise import torch and transformers' model code anew: ~3
CPU s before any work, a third of the suite's CPU (benchmarks/RESULTS.md, "Where the
test suite's time goes"). The server (one per pytest worker, started at its first
request) imports them once, then forks a process per run. The child becomes what an
``exec`` of the command would have been: a session of its own, the default stop
signals, the run's environment and working folder, files for stdout and stderr, and
the command run as ``__main__`` (the console script, or ``-m visionbatch.cli``), so
that spawned workers re-import the command, not this module. The tests see the same
process tree, signals and exit codes; whatever a run reads at start-up from its
environment (a failpoint, TMPDIR, the lease's timing) it reads in the child.

A run is exec'd as before where the server cannot stand in: the environment differs in
a variable that the preloaded libraries read when imported (PRELOAD_ENV), the server
has more threads than after its imports (a pool started: a fork would copy it
broken), or the server is gone. (multiprocessing's forkserver runs functions, not
commands with their own stdio, session and exit status: hence this small one.)
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading

# What every job imports before its first image, torch and transformers' model code
# the bulk of it; visionbatch itself is left out (cheap, and its modules read settings
# from the environment when imported).
PRELOAD = ("numpy", "PIL.Image", "pyarrow", "pyarrow.compute", "pyarrow.parquet", "pyarrow.fs", "torch",
           "transformers", "transformers.modeling_utils", "transformers.image_processing_utils",
           "transformers.models.auto.modeling_auto", "tqdm", "pandas")
# Prefixes of the variables the preloaded libraries (and the interpreter) read when
# imported: a run whose value differs from the server's is exec'd.
PRELOAD_ENV = ("HF_", "TRANSFORMERS_", "TORCH", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "PYTHON", "LD_", "MALLOC_",
               "CUDA_", "ARROW_")
NAME = "visionbatch-jobserver"  # in the server's (and so its children's) command line


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _serve() -> dict:
    """The server: answers each request (a JSON line on stdin) with the pid of a forked
    child, and reports each child's exit; returns the request in the child."""
    for name in PRELOAD:
        importlib.import_module(name)
    threads, pending = _threads(), b""
    # A child's exit wakes the loop (a byte in this pipe), as a request does.
    exits, exits_write = os.pipe()
    os.set_blocking(exits_write, False)
    signal.set_wakeup_fd(exits_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)

    def reply(message: dict) -> None:
        os.write(1, json.dumps(message).encode() + b"\n")

    while True:
        while True:  # reap, reporting exit statuses as Popen.returncode has them
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reply({"exited": pid, "code": os.waitstatus_to_exitcode(status)})
        ready = select.select([0, exits], [], [])[0]
        if exits in ready:
            os.read(exits, 1 << 12)
        if 0 not in ready:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return {}  # the tests are gone: so is the server
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            if _threads() > threads:
                reply({"refused": f"{_threads()} threads, {threads} after the imports"})
                continue
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                os.close(exits)
                os.close(exits_write)
                return request
            reply({"started": pid})


def _become(request: dict) -> None:
    """In the child: become the run the request describes, then run its command."""
    import runpy
    import tempfile

    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # found again from TMPDIR
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):
        opened = os.open(path, flags | (os.O_CREAT if fd else 0), 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    # As a terminal starts a command: Python's Ctrl-C handler, the default SIGTERM and SIGHUP.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    argv = request["argv"]
    sys.argv = argv[2:] if argv[1:2] == ["-m"] else argv[:]
    if argv[1:2] == ["-m"]:
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


# --------------------------------------------------------------------------- the tests' side


class ServedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a run the server forked."""

    def __init__(self, argv: list[str], pid: int):
        self.args, self.pid, self.returncode = argv, pid, None
        self._exited = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode


class JobServer:
    """The server as a pytest worker sees it: :meth:`popen` forks a run."""

    def __init__(self):
        self.env = dict(os.environ)
        self.server = subprocess.Popen([sys.executable, os.path.abspath(__file__), NAME], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=self.env, start_new_session=True)
        self._lock = threading.Lock()  # one request at a time: the reply to it is the next "started"
        self._replies: list[dict] = []
        self._reply_came = threading.Condition()
        self._processes: dict[int, ServedProcess] = {}
        threading.Thread(target=self._read, name="jobserver-replies", daemon=True).start()

    def _read(self) -> None:
        for line in self.server.stdout:
            message = json.loads(line)
            if "exited" in message:
                with self._reply_came:
                    process = self._processes.pop(message["exited"], None)
                if process is not None:
                    process.returncode = message["code"]
                    process._exited.set()
                continue
            with self._reply_came:
                if "started" in message:  # registered before its exit can be read
                    message["process"] = self._processes[message["started"]] = ServedProcess([], message["started"])
                self._replies.append(message)
                self._reply_came.notify_all()
        with self._reply_came:  # the server is gone
            self._replies.append({"refused": "the server exited"})
            self._reply_came.notify_all()

    def can_serve(self, env: dict) -> bool:
        if self.server.poll() is not None:
            return False
        keys = {key for key in {*env, *self.env} if key.startswith(PRELOAD_ENV)}
        return all(env.get(key) == self.env.get(key) for key in keys)

    def popen(self, argv: list[str], stdout: str, stderr: str, env: dict, cwd: str | None = None) -> ServedProcess | None:
        """Fork a run of ``argv`` (``[console script, ...]`` or ``[python, -m, module, ...]``)
        writing to the files ``stdout`` and ``stderr``; None where the server cannot."""
        if not self.can_serve(env):
            return None
        request = {"argv": [str(a) for a in argv], "stdout": str(stdout), "stderr": str(stderr), "env": env,
                   "cwd": cwd or os.getcwd()}
        with self._lock:
            with self._reply_came:
                self.server.stdin.write(json.dumps(request).encode() + b"\n")
                self.server.stdin.flush()
                while not self._replies:
                    self._reply_came.wait()
                message = self._replies.pop(0)
            if "process" not in message:
                return None
            message["process"].args = request["argv"]
            return message["process"]


if __name__ == "__main__":
    served = _serve()
    if served:
        _become(served)
