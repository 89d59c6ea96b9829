"""The real zimage-gateway as a subprocess in front of the test tritonserver."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from zimage_backend.triton_process import free_port

# Two API keys, so that per-key limits can be told apart.
KEYS = ("test-key-alpha-0123456789", "test-key-bravo-0123456789")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class GatewayProcess:
    """``python -m zimage_gateway`` on a free loopback port; ``metrics_url`` suits helpers.scrape."""

    def __init__(self, servers: Sequence[str], log_dir: Path, *args: str, keys: Sequence[str] = KEYS) -> None:
        self.port = free_port()
        self.log_file = Path(log_dir) / f"gateway-{self.port}.log"
        self.command = [sys.executable, "-m", "zimage_gateway", "--port", str(self.port),
                        *(f"--server={s}" for s in servers), *args]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_GATEWAY_")}
        self.env["ZIMAGE_GATEWAY_API_KEYS"] = ",".join(keys)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __enter__(self) -> "GatewayProcess":
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with _DIRECT.open(f"{self.url}/health/live", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the gateway did not start: {self.log()[-3000:]}")
            time.sleep(0.2)

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
