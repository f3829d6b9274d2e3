"""A test helper, not part of visionbatch: with this folder on PYTHONPATH and
VISIONBATCH_TEST_SOCKET_LOG naming a folder, every Python process started so (a job's
driver, its decode workers, Ray's Python processes) writes ``<pid>.jsonl`` there: a
``start`` record with its command line, then one record per socket it binds (the
``socket.bind`` audit event) or listens on (``socket.listen``), written as the call
happens. Nothing is sampled, so a socket that lives a millisecond is seen too. Sockets
made in C code (Ray's gRPC servers, its raylet) are not Python calls and are not seen."""

import os

_FOLDER = os.environ.get("VISIONBATCH_TEST_SOCKET_LOG")

if _FOLDER:
    import json
    import socket
    import sys

    def _record(event: str, **fields) -> None:
        pid = os.getpid()  # at the call: a forked child writes its own file
        with open(os.path.join(_FOLDER, f"{pid}.jsonl"), "a") as log:
            log.write(json.dumps({"event": event, "pid": pid, **fields}) + "\n")

    def _address(sock) -> str:
        try:
            return repr(sock.getsockname())
        except OSError:
            return "?"

    def _on_audit(event: str, args: tuple) -> None:
        if event == "socket.bind":
            sock, address = args
            _record("bind", family=int(sock.family), address=repr(address))

    _listen = socket.socket.listen

    def _listening(self, *args):
        _record("listen", family=int(self.family), address=_address(self))
        return _listen(self, *args)

    with open("/proc/self/cmdline", "rb") as _cmdline:
        _record("start", command=_cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip())
    socket.socket.listen = _listening
    sys.addaudithook(_on_audit)
