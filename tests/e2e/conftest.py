"""One real tritonserver for the end-to-end tests: our model repository, the shipped
config.yaml (tiny random pipeline on one CPU instance), free ports on loopback."""

from __future__ import annotations

import pytest

from tests.conftest import CONFIG, ROOT
from tests.e2e.gateway_process import GatewayProcess
from tests.e2e.helpers import Tally
from zimage_backend.triton_process import TritonServer
from zimage_client import ZImageClient

pytestmark = pytest.mark.e2e
_TALLY = pytest.StashKey[Tally]()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    log_file = tmp_path_factory.mktemp("triton") / "server.log"
    # One instance, not the two a GPU-less server gets (test_cpu_stalls.py): the queueing
    # tests hold "the" instance with one slow request.
    triton = TritonServer(ROOT / "model_repository", config_path=CONFIG, http_port=0,
                          grpc_port=0, metrics_port=0, log_file=log_file, cpu_instances=1)
    with triton:
        yield triton
    assert triton.returncode == 0, triton.log_tail()


@pytest.fixture(scope="session", params=["grpc", "http"])
def protocol(request):
    return request.param


@pytest.fixture()
def client(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with ZImageClient(url, protocol=protocol, inference_timeout_s=120) as c:
        yield c


@pytest.fixture(scope="session")
def tally(request) -> Tally:
    """Counts what the fuzz, soak and cancellation tests sent; printed after the run."""
    return request.config.stash.setdefault(_TALLY, Tally())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tally = config.stash.get(_TALLY, None)
    lines = tally.lines() if tally is not None else []
    if lines:
        terminalreporter.write_sep("-", "requests sent by the robustness tests")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def gateway(server, tmp_path_factory):
    """zimage-gateway in front of `server`, listed twice so that n images have two servers to
    spread over; API keys gateway_process.KEYS."""
    url = f"grpc://{server.grpc_url}"
    with GatewayProcess([url, url], tmp_path_factory.mktemp("gateway")) as running:
        yield running
