"""A fork server for the tests' ``visionbatch`` processes.

Each job process would otherwise import torch and transformers' model code anew: ~3
CPU s before any work, a third of the suite's CPU (benchmarks/RESULTS.md, "Where the
test suite's time goes"). The server (one per pytest worker, started at its first
request; one more for the runs on the Ray engine, which preloads Ray too) imports them
once, then forks a process per run. The child makes itself what
an ``exec`` of the command would have been: a session of its own, the default stop
signals, the run's environment and working folder, files for stdout and stderr, and
the console script run as ``__main__``, so that spawned workers re-import the command,
not this module. Whatever a run reads at
start-up from its environment (a failpoint, TMPDIR, the lease's timing) it reads in the
child. As with ``Popen``, the run is set up when :meth:`JobServer.popen` returns, and
an ended run stays a zombie, its pid taken, until the test polls or waits for it.

What differs from an exec: a run's /proc cmdline is the server's, and it shares the
server's hash seed. A run is exec'd as before where the server cannot stand in: the
environment differs in a variable that the preloaded libraries (or the interpreter)
read at start-up (PRELOAD_ENV), the server has more threads than after its imports (a
pool started: a fork would copy it broken), or the server is gone. (multiprocessing's
forkserver runs functions, not commands with their own stdio, session and exit status:
hence this small one.)
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
# Prefixes of the variables that the preloaded libraries and the interpreter read at
# start-up: a run whose value of one differs from the server's is exec'd.
PRELOAD_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "USE_TORCH", "USE_TF", "TORCH", "PYTORCH_", "OMP_", "MKL_",
               "KMP_", "OPENBLAS_", "NPY_", "NUMPY_", "PYTHON", "LD_", "MALLOC_", "CUDA_", "ARROW_", "TQDM_",
               "LANG", "LC_", "TZ", "HOME", "XDG_")
# What a run on the Ray engine imports besides (~1.6 CPU s), preloaded by a server of
# its own: Ray's import changes the interpreter (sys.excepthook, atexit hooks), which a
# run on the local engine must not inherit. Ray reads variables of its own when
# imported (RAY_AUTH_MODE among them): a Ray server serves runs with its RAY_* values.
RAY_PRELOAD = ("ray", "ray.data")
RAY_PRELOAD_ENV = ("RAY_",)
NAME = "visionbatch-jobserver"  # in the server's (and so its children's) command line
RAY = "--ray"  # in a Ray server's


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _serve() -> tuple[dict, int] | None:
    """The server: answers each request (a JSON line on stdin) with the pid of a forked
    child once it is set up, and reports each child's exit, reaping it when asked. In a
    forked child, returns its request and the pipe to say it is set up on."""
    replies = os.dup(1)
    os.dup2(2, 1)  # what a library prints goes to stderr, not into the replies
    for name in PRELOAD + (RAY_PRELOAD if RAY in sys.argv else ()):
        importlib.import_module(name)
    threads, pending, running = _threads(), b"", set()
    # A child's exit wakes the loop (a byte in this pipe), as a request does.
    exits, exits_write = os.pipe()
    os.set_blocking(exits_write, False)
    signal.set_wakeup_fd(exits_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)

    def reply(message: dict) -> None:
        os.write(replies, json.dumps(message).encode() + b"\n")

    while True:
        for pid in list(running):  # exited: reported, left a zombie until reaped
            ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if ended is not None:
                running.discard(pid)
                code = -ended.si_status if ended.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else ended.si_status
                reply({"exited": pid, "code": code})
        ready = select.select([0, exits], [], [])[0]
        if exits in ready:
            os.read(exits, 1 << 12)
        if 0 not in ready:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return None  # the tests are gone: so is the server
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            if "reap" in request:
                os.waitpid(request["reap"], 0)
                continue
            if _threads() > threads:
                reply({"refused": f"{_threads()} threads, {threads} after the imports"})
                continue
            set_up, set_up_write = os.pipe()
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                for fd in (exits, exits_write, replies, set_up):
                    os.close(fd)
                return request, set_up_write
            os.close(set_up_write)
            failure = b"".join(iter(lambda: os.read(set_up, 1 << 16), b""))  # EOF once set up
            os.close(set_up)
            if failure:  # the child could not set itself up (and has exited)
                os.waitpid(pid, 0)
                reply({"refused": failure.decode(errors="replace")})
                continue
            running.add(pid)
            reply({"started": pid})


def _become(request: dict, set_up: int) -> None:
    """In the child: become the run the request describes (saying so, or why not, on
    ``set_up``), then run its command."""
    import runpy
    import tempfile

    import numpy

    try:
        os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None  # found again from TMPDIR
        numpy.random.seed()  # not the server's state
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):
            opened = os.open(path, flags | (os.O_CREAT if fd else 0), 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        # As a terminal starts a command: Python's Ctrl-C handler, the default SIGTERM and SIGHUP.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
    except BaseException as err:  # noqa: BLE001 - told to the test, which execs the run instead
        os.write(set_up, repr(err).encode())
        os._exit(1)
    os.close(set_up)
    sys.argv = request["argv"]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as for a script run by its path
    runpy.run_path(sys.argv[0], run_name="__main__")


# --------------------------------------------------------------------------- the tests' side


def preload_key(env: dict, ray: bool) -> tuple:
    """What a server's imports depend on in ``env``: runs with equal keys can share one."""
    prefixes = PRELOAD_ENV + (RAY_PRELOAD_ENV if ray else ())
    return ray, tuple(sorted((key, value) for key, value in env.items() if key.startswith(prefixes)))


class ServedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a run the server forked. As
    with Popen, an ended run's pid stays taken (a zombie) until poll or wait sees it."""

    def __init__(self, server: "JobServer", pid: int):
        self.args, self.pid, self.returncode = [], pid, None
        self._server, self._code, self._exited = server, None, threading.Event()

    def _reaped(self) -> int | None:
        if self._exited.is_set() and self.returncode is None:
            self.returncode = self._code
            self._server._send({"reap": self.pid})
        return self.returncode

    def poll(self) -> int | None:
        return self._reaped()

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._reaped()


class JobServer:
    """The server as a pytest worker sees it: :meth:`popen` forks a run."""

    def __init__(self, env: dict | None = None, ray: bool = False):
        """A server with ``env`` (this process's by default); ``ray``: one for runs on the Ray engine."""
        self.env, self.ray = dict(os.environ if env is None else env), ray
        self.server = subprocess.Popen([sys.executable, os.path.abspath(__file__), NAME, *([RAY] if ray else [])],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env,
                                       start_new_session=True)
        self._lock = threading.Lock()  # one request at a time: the reply to it is the next "started"
        self._write_lock = threading.Lock()
        self._replies: list[dict] = []
        self._reply_came = threading.Condition()
        self._processes: dict[int, ServedProcess] = {}
        self._gone = False
        threading.Thread(target=self._read, name="jobserver-replies", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.server.stdout:
                message = json.loads(line)
                with self._reply_came:
                    if "exited" in message:
                        process = self._processes.pop(message["exited"])
                        process._code = message["code"]
                        process._exited.set()
                        continue
                    if "started" in message:  # registered before its exit can be read
                        message["process"] = self._processes[message["started"]] = ServedProcess(
                            self, message["started"])
                    self._replies.append(message)
                    self._reply_came.notify_all()
        finally:  # the server is gone: its runs' ends will not be reported (waits end, code None)
            with self._reply_came:
                self._gone = True
                for process in self._processes.values():
                    process._exited.set()
                self._replies.append({"refused": "the server exited"})
                self._reply_came.notify_all()

    def _send(self, message: dict) -> bool:
        try:
            with self._write_lock:  # a request, and a reap from any thread
                self.server.stdin.write(json.dumps(message).encode() + b"\n")
                self.server.stdin.flush()
            return True
        except OSError:  # it died
            return False

    def can_serve(self, env: dict) -> bool:
        if self._gone or self.server.poll() is not None:
            return False
        return preload_key(env, self.ray) == preload_key(self.env, self.ray)

    def popen(self, argv: list, stdout, stderr, env: dict, cwd: str | None = None) -> ServedProcess | None:
        """Fork a run of ``argv`` (``[console script, its arguments...]``)
        writing to the files ``stdout`` and ``stderr``; None where the server cannot."""
        if not self.can_serve(env):
            return None
        request = {"argv": [str(a) for a in argv], "stdout": str(stdout), "stderr": str(stderr), "env": env,
                   "cwd": cwd or os.getcwd()}
        with self._lock, self._reply_came:
            if not self._send(request):
                return None
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
        _become(*served)
