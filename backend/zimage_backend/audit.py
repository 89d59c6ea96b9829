"""A recording audit hook (PEP 578) for the security tests: what the serving process opened, ran,
compiled and connected to, as the interpreter itself reports it.

Off by default: model.py's initialize() calls `install_from_env()`, which installs it only when
$ZIMAGE_AUDIT_RECORD names a file (tests/e2e/test_security.py sets it for its own server). Not
a sitecustomize: the Python backend stub's embedded interpreter ignores PYTHONPATH. Each event is
one JSON line appended to the file; the test decides what is allowed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

AUDIT_ENV = "ZIMAGE_AUDIT_RECORD"
# The events that would let a request reach a file, a process, an interpreter or the network.
EVENTS = frozenset({
    "open", "exec", "compile", "subprocess.Popen", "os.system", "os.exec",
    "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn", "socket.connect",
    "socket.sendto", "socket.getaddrinfo", "urllib.Request", "ctypes.dlopen",
    "pickle.find_class", "marshal.loads", "shutil.rmtree", "os.remove", "os.rename",
})
# Arguments are cut here: a compiled source is kept long enough to find request text in it.
MAX_ARG_CHARS = 200_000
_local = threading.local()


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    elif not isinstance(value, str):
        value = repr(value)
    return value[:MAX_ARG_CHARS]


def install(record_path: str) -> None:
    """Appends every event of EVENTS to `record_path`, one JSON object per line:
    {"event", "args", "time", "pid", "thread"}. Audit hooks cannot be removed."""
    # Opened before the hook exists, so writing the record raises no event of its own.
    fd = os.open(record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def hook(event: str, args: tuple) -> None:
        if event not in EVENTS or getattr(_local, "busy", False):
            return
        _local.busy = True  # repr() of an argument must not record itself
        try:
            line = json.dumps({"event": event, "args": [_text(a) for a in args],
                               "time": time.time(), "pid": os.getpid(),
                               "thread": threading.current_thread().name})
            # One write per line on an O_APPEND descriptor: lines of threads never interleave.
            os.write(fd, line.encode() + b"\n")
        finally:
            _local.busy = False

    sys.addaudithook(hook)


def install_from_env() -> bool:
    """Installs the hook when $ZIMAGE_AUDIT_RECORD is set; returns whether it did."""
    path = os.environ.get(AUDIT_ENV)
    if not path:
        return False
    install(path)
    return True
