"""Which TCP ports a process itself listens on, read from Linux's /proc.

An HTTP answer on a port proves only that someone listens there; a readiness check must know the
listener is the process it started (another server holding the port answered "ready" before).
"""

from __future__ import annotations

import os
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's state column


def _socket_inodes(pid: int) -> set[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes: set[str] = set()
    try:
        fds = list(fd_dir.iterdir())
    except (FileNotFoundError, ProcessLookupError):  # the process is gone
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:  # closed since the listing
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def listening_ports(pid: int) -> set[int]:
    """TCP ports (IPv4 and IPv6) on which a socket held open by `pid` is listening; empty when
    the process is gone. PermissionError when /proc does not let this process look."""
    inodes = _socket_inodes(pid)
    ports: set[int] = set()
    if not inodes:
        return ports
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:  # no IPv6, or the process just exited
            continue
        # The table lists the whole network namespace; the inode ties a row to this process.
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _LISTEN and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
