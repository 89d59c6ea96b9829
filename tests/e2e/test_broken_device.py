"""A broken device takes its instance out of service, and clients cannot unload the model.

A server of its own, started with ZIMAGE_FAULT_CALL: its second pipeline call fails the way a
sticky CUDA error does (on a GPU, bench/failure_served.py makes a real device-side assert).
One instance, as on one GPU: the calls it counts are that instance's.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import CONFIG, ROOT
from zimage_backend.engine import FAULT_ENV
from zimage_backend.triton_process import TritonServer
from zimage_client import ServerUnavailableError, ZImageClient

pytestmark = pytest.mark.e2e
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def status(url: str, method: str = "GET") -> int:
    request = urllib.request.Request(url, data=b"{}" if method == "POST" else None,
                                     method=method)
    try:
        with _DIRECT.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def breaking_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("broken") / "server.log"
    server = TritonServer(ROOT / "model_repository", config_path=CONFIG, http_port=0,
                          grpc_port=0, metrics_port=0, log_file=log,
                          extra_env={FAULT_ENV: "2"}, cpu_instances=1)
    with server:
        yield server


def test_clients_cannot_unload_the_model(breaking_server):
    http = f"http://{breaking_server.http_url}/v2/repository/models/zimage/unload"
    assert status(http, "POST") == 403
    client = grpcclient.InferenceServerClient(breaking_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("zimage")
    finally:
        client.close()
    assert status(f"http://{breaking_server.http_url}/v2/models/zimage/ready") == 200


def test_a_broken_device_answers_unavailable_and_leaves_service(breaking_server):
    ready = f"http://{breaking_server.http_url}/v2/models/zimage/ready"
    with ZImageClient(breaking_server.grpc_url, inference_timeout_s=120) as client:
        client.generate("fine", height=64, width=64, num_inference_steps=1)
        with pytest.raises(ServerUnavailableError, match="is broken and the instance is "
                                                         "leaving service"):
            client.generate("breaks it", height=64, width=64, num_inference_steps=1)
    deadline = time.monotonic() + 30
    while status(ready) == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status(ready) != 200
    assert "leaves service" in breaking_server.log_tail(400)
