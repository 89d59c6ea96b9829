"""A server without GPUs loads its model with two CPU instances, so that a sequential client
never waits out the 500 ms that Triton 2.51's dynamic batcher sleeps after a lost wakeup
(issue 12, point 12; bench/results/2026-12-01-cpu-stall/NOTES.md).

A server of its own: the session's server runs one instance, which its tests hold.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.conftest import CONFIG, ROOT
from zimage_backend.cpu_instances import DEFAULT_CPU_INSTANCES
from zimage_backend.request import INPUTS
from zimage_backend.triton_process import TritonServer
from zimage_client import ZImageClient

pytestmark = pytest.mark.e2e
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    log_file = tmp_path_factory.mktemp("cpu-stalls") / "server.log"
    triton = TritonServer(ROOT / "model_repository", config_path=CONFIG, model="zimage",
                          http_port=0, grpc_port=0, metrics_port=0, log_file=log_file)
    with triton:
        yield triton
    assert triton.returncode == 0, triton.log_tail()


def served(server, path: str) -> dict:
    with _DIRECT.open(f"http://{server.http_url}{path}", timeout=10) as response:
        return json.load(response)


def queue_stats(server) -> tuple[int, int]:
    """Requests Triton has counted, and their nanoseconds in its queue."""
    queue = served(server, "/v2/models/zimage/stats")["model_stats"][0]["inference_stats"]["queue"]
    return int(queue["count"]), int(queue["ns"])


def test_only_the_instance_group_differs_from_config_pbtxt(shipped_server):
    config = served(shipped_server, "/v2/models/zimage/config")
    assert [(g["kind"], g["count"]) for g in config["instance_group"]] == [
        ("KIND_CPU", DEFAULT_CPU_INSTANCES)]
    # The rest is config.pbtxt's, and model.py still completes the tensor contract.
    queue = config["dynamic_batching"]["default_queue_policy"]
    assert (config["max_batch_size"], queue["max_queue_size"], queue["timeout_action"]) == (
        4, 16, "REJECT")
    assert config["dynamic_batching"]["preferred_batch_size"] == [1]
    assert config["parameters"]["config_file"]["string_value"] == "../../config.yaml"
    assert {i["name"] for i in config["input"]} == {spec.name for spec in INPUTS}


def test_sequential_requests_do_not_wait_in_the_queue(shipped_server):
    # The client: 64x64 requests one after another. With one instance about one in ten
    # slept 0.5 s in Triton's queue, so 60 of them without a stall happen 3 times in 1000.
    with ZImageClient(shipped_server.grpc_url, inference_timeout_s=120) as client:
        client.generate("warm", height=64, width=64, seed=0)
        before = queue_stats(shipped_server)
        for seed in range(60):
            client.generate("a cat", height=64, width=64, seed=seed)
    # Triton counts a request once execute() has returned, a moment after its answer.
    deadline = time.monotonic() + 10
    while (after := queue_stats(shipped_server))[0] < before[0] + 60:
        assert time.monotonic() < deadline, (before, after)
        time.sleep(0.2)
    # Under the half second that one stall puts there; a quiet queue adds under a millisecond.
    assert (after[1] - before[1]) / 1e6 < 400, (before, after)
