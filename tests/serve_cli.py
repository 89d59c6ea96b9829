"""`zimage-serve` in a subprocess for the launcher's tests; a thread collects its stderr."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

BACKEND_ROOT = Path(__file__).resolve().parents[1] / "backend"


class ServeCli:
    def __init__(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "zimage_backend.launcher", *args]
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(BACKEND_ROOT), **(env or {})),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 45) -> bool:
        """Whether `text` appeared in stderr within `timeout` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: text in "".join(self.lines), timeout)

    def wait(self, timeout: float) -> int:
        """The exit code; a launcher still running after `timeout` is killed (and the test fails)."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.close()

    def close(self) -> None:
        """Kills the launcher if it still runs (its server follows: it dies with its parent)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)

    def server_pid(self) -> int:
        """The tritonserver the launcher started (its only child)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def shm_prefix(self) -> str:
        """The Python backend's shared-memory prefix, from the logged tritonserver command."""
        match = re.search(r"shm-region-prefix-name=(\S+)", self.output)
        assert match, self.output
        return match.group(1)
