"""The server runs with model control mode none: clients cannot load, unload or replace models
(the repository API's load also accepts a config and files, i.e. code, in explicit mode).
And no request field reaches a file path, a shell or an interpreter."""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from tests.conftest import ROOT
from tests.e2e.helpers import UNAVAILABLE_STATUS, new_client
from zimage_client import ZImageClient

pytestmark = pytest.mark.e2e

REFUSED = "explicit model load / unload is not allowed if polling is enabled"


def test_server_runs_with_model_control_mode_none(server):
    assert re.search(r"\|\s*model_control_mode\s*\|\s*MODE_NONE\s*\|",
                     Path(server.log_file).read_text())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_repository_api_is_refused(server, protocol):
    client = new_client(server, protocol)
    attempts = {
        "unload": lambda: client.unload_model("zimage"),
        "load": lambda: client.load_model("zimage"),
        "load with new code": lambda: client.load_model(
            "zimage", config=json.dumps({"backend": "python", "max_batch_size": 4}),
            files={"file:1/model.py": b"import os\nos.system('touch /tmp/pwned')\n"}),
        "load another model": lambda: client.load_model(
            "evil", config=json.dumps({"backend": "python"})),
    }
    try:
        for what, attempt in attempts.items():
            with pytest.raises(InferenceServerException) as info:
                attempt()
            assert (str(info.value.status()), info.value.message()) == (
                UNAVAILABLE_STATUS[protocol], REFUSED), what
        assert client.is_model_ready("zimage")
        index = client.get_model_repository_index()  # read-only; allowed
        models = ([(m["name"], m["state"]) for m in index] if protocol == "http"
                  else [(m.name, m.state) for m in index.models])
        assert models == [("zimage", "READY")]
    finally:
        client.close()


def test_raw_http_unload_is_refused(server):
    connection = http.client.HTTPConnection(server.http_url, timeout=10)
    try:
        connection.request("POST", "/v2/repository/models/zimage/unload", body=b"{}")
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    assert (response.status, body) == (503, {"error": REFUSED})
    assert server.is_ready()
    with ZImageClient(server.http_url, protocol="http") as c:
        assert c.generate("after unload", height=64, width=64, num_inference_steps=1,
                          seed=5).seed == 5


# Where a request's values go: these modules and model.py. None of them may run a shell, an
# interpreter or open a file; the paths they do use (weights, config.yaml) come from settings.
REQUEST_PATH = [ROOT / "backend" / "zimage_backend" / name for name in (
    "request.py", "service.py", "engine.py", "encoding.py", "batching.py", "metrics.py")] + [
    ROOT / "model_repository" / "zimage" / "1" / "model.py"]
FORBIDDEN = re.compile(r"\b(eval|exec|__import__|subprocess|os\.system|os\.popen|pickle|marshal|"
                       r"shelve|open|importlib)\b\s*[.(]")


@pytest.mark.parametrize("path", REQUEST_PATH, ids=[p.name for p in REQUEST_PATH])
def test_request_path_has_no_shell_eval_or_file_access(path):
    found = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1)
             if FORBIDDEN.search(line) and not line.lstrip().startswith("#")]
    assert not found, found
