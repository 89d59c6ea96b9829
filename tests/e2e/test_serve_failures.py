"""Startups that must fail, on the real tritonserver and our model repository (the shipped tiny
config): zimage-serve against another server on its HTTP port (the hard case answers 200 to every
health check, so only the listening socket's owner tells the two apart), and the model's own
check of config.yaml for servers started without zimage-serve.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONFIG, ROOT
from tests.serve_cli import ServeCli
from zimage_backend.python_backend import SHM_DIR
from zimage_backend.triton_error import TritonServerError
from zimage_backend.triton_process import TritonServer, free_ports

pytestmark = pytest.mark.e2e


class _AlwaysReady(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass


@contextmanager
def impostor(port: int) -> Iterator[None]:
    """Another HTTP server on 127.0.0.1:port that says every model is ready."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _AlwaysReady)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _serve(ports: list[int], log_file: Path, *extra: str) -> ServeCli:
    return ServeCli([
        "--config", str(CONFIG),
        "--model-repository", str(ROOT / "model_repository"),
        "--http-port", str(ports[0]),
        "--grpc-port", str(ports[1]),
        "--metrics-port", str(ports[2]),
        "--ready-timeout-s", "300",
        "--log-file", str(log_file),
        *extra,
    ])  # fmt: skip


def _regions(prefix: str) -> list[str]:
    return [p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix)]


def test_a_port_held_before_the_start_fails_at_once(tmp_path):
    ports = free_ports(3)
    with impostor(ports[0]):
        started = time.monotonic()
        cli = _serve(ports, tmp_path / "server.log")
        code = cli.wait(timeout=60)
        elapsed = time.monotonic() - started
    assert code == 1, cli.output
    assert f"HTTP port {ports[0]} on 127.0.0.1 is already in use by another process" in cli.output
    assert "ready: HTTP" not in cli.output
    assert "starting " not in cli.output, "no tritonserver may be spawned"
    assert elapsed < 10, f"{elapsed:.1f} s"


def test_a_port_taken_while_the_model_loads_is_never_ready(tmp_path):
    ports = free_ports(3)
    # One instance: a GPU-less server's two load after it has bound its ports (cpu_instances.py).
    cli = _serve(ports, tmp_path / "server.log", "--cpu-instances", "1")
    try:
        assert cli.wait_for("starting ", timeout=30), cli.output
        # tritonserver binds its ports only after the model has loaded, seconds from now.
        with impostor(ports[0]):
            code = cli.wait(timeout=240)
    finally:
        cli.close()
    assert code == 1, cli.output
    assert "ready: HTTP" not in cli.output, "the impostor's answer was taken for our server's"
    assert "tritonserver exited with code 1 before it was ready" in cli.output
    # The tail of Triton's own log says why.
    assert f"Socket '127.0.0.1:{ports[0]}' already in use" in cli.output
    assert _regions(cli.shm_prefix()) == []


def test_the_model_holds_the_defaults_to_the_limits_too(tmp_path):
    # Without zimage-serve's check in front, initialize must still refuse defaults that every
    # bare request would break.
    data = yaml.safe_load(CONFIG.read_text())
    data["defaults"]["height"] = 4096
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    server = TritonServer(ROOT / "model_repository", config_path=config, model="zimage",
                          http_port=0, grpc_port=0, metrics_port=0,
                          log_file=tmp_path / "server.log")
    server.start()
    try:
        with pytest.raises(TritonServerError, match="before it was ready") as exc:
            server.wait_until_ready(timeout_s=300)
    finally:
        server.stop()
    assert f"{config}: defaults.height: 4096 is not allowed" in str(exc.value)
