"""zimage-serve exits once its model leaves service (a broken GPU unloads it), so that Docker's
restart policy or Kubernetes restarts the container with a fresh CUDA context."""

from __future__ import annotations

import pytest

from tests.conftest import CONFIG, ROOT
from tests.serve_cli import ServeCli
from zimage_backend.engine import FAULT_ENV
from zimage_backend.launcher import EXIT_LEFT_SERVICE
from zimage_backend.triton_process import free_ports
from zimage_client import ServerUnavailableError, ZImageClient

pytestmark = pytest.mark.e2e


def test_the_launcher_exits_when_the_model_leaves_service(tmp_path):
    http, grpc, metrics = free_ports(3)
    cli = ServeCli(["--config", str(CONFIG), "--model-repository", str(ROOT / "model_repository"),
                    "--http-port", str(http), "--grpc-port", str(grpc),
                    "--metrics-port", str(metrics), "--log-file", str(tmp_path / "server.log")],
                   env={FAULT_ENV: "1"})
    try:
        assert cli.wait_for("ready: HTTP", timeout=300), cli.output
        with ZImageClient(f"127.0.0.1:{grpc}", inference_timeout_s=120) as client:
            with pytest.raises(ServerUnavailableError, match="is broken"):
                client.generate("breaks it", height=64, width=64, num_inference_steps=1)
        assert cli.wait(timeout=120) == EXIT_LEFT_SERVICE
    finally:
        cli.close()
    assert "model 'zimage' left service" in cli.output
    assert "leaves service" in (tmp_path / "server.log").read_text()
