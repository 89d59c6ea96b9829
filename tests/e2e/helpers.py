"""Helpers for the robustness tests: raw tritonclient requests, answers as plain records,
Prometheus scraping, process memory and the server log. No fixtures here (see conftest.py)."""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

MODEL = "zimage"
# An answer that does not come within this long counts as lost.
ANSWER_TIMEOUT_S = 120.0
# Our field names as the server's messages use them: "HEIGHT: ..." (ours) or 'HEIGHT' (Triton's).
INVALID_STATUS = {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400"}
UNAVAILABLE_STATUS = {"grpc": "StatusCode.UNAVAILABLE", "http": "503"}
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

Tensor = tuple[str, np.ndarray, str]  # input name, data, Triton wire datatype


def module(protocol: str):
    return grpcclient if protocol == "grpc" else httpclient


def url_of(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def new_client(server, protocol: str):
    """A raw tritonclient client; HTTP ones must stay on the thread that made them."""
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(server.grpc_url)
    return httpclient.InferenceServerClient(server.http_url, network_timeout=ANSWER_TIMEOUT_S,
                                            connection_timeout=30.0)


def infer_inputs(protocol: str, tensors: Sequence[Tensor]) -> list:
    inputs = []
    for name, array, datatype in tensors:
        tensor = module(protocol).InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@dataclasses.dataclass
class Answer:
    """One answer as the client saw it: outputs, or an error with its raw status."""

    outputs: dict[str, np.ndarray] | None = None
    status: str | None = None
    message: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outputs is not None

    def __str__(self) -> str:
        if self.ok:
            return f"ok({sorted(self.outputs)}, {self.seconds:.2f} s)"
        return f"error({self.status}: {self.message!r}, {self.seconds:.2f} s)"


def outputs_of(result, names: Iterable[str]) -> dict[str, np.ndarray]:
    found = {}
    for name in names:
        array = result.as_numpy(name)
        if array is not None:
            found[name] = array
    return found


OUTPUT_NAMES = ("IMAGE", "PIXELS", "SEED", "METADATA")


def send(client, protocol: str, tensors: Sequence[Tensor], outputs: Sequence[str] | None = None,
         **kwargs: Any) -> Answer:
    """One synchronous request through raw tritonclient; never raises a server error."""
    lib = module(protocol)
    requested = None if outputs is None else [lib.InferRequestedOutput(o) for o in outputs]
    if protocol == "grpc":
        kwargs.setdefault("client_timeout", ANSWER_TIMEOUT_S)
    started = time.perf_counter()
    try:
        result = client.infer(MODEL, infer_inputs(protocol, tensors), outputs=requested, **kwargs)
    except InferenceServerException as exc:
        return Answer(status=str(exc.status()), message=exc.message(),
                      seconds=time.perf_counter() - started)
    return Answer(outputs=outputs_of(result, OUTPUT_NAMES), seconds=time.perf_counter() - started)


def image_size(data: bytes) -> tuple[str, tuple[int, int]]:
    """(PIL format, (width, height)) of encoded bytes; decodes fully, so truncation fails."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.format, image.size


def names_field(message: str, field: str) -> bool:
    """Whether an error message names `field` the way ours ("FIELD: ...") or Triton's
    ('FIELD') do, not merely contains the letters."""
    return bool(re.search(rf"(^{re.escape(field)}:|'{re.escape(field)}')", message))


# ---------------------------------------------------------------------- request tallies


class Tally:
    """Requests sent and answers received per robustness test, printed after the run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, collections.Counter] = {}
        self._notes: dict[str, list[str]] = {}

    def count(self, name: str, outcome: str, sent: int = 1, answered: int = 1) -> None:
        with self._lock:
            counter = self._counts.setdefault(name, collections.Counter())
            counter["sent"] += sent
            counter["answered"] += answered
            counter[outcome] += answered

    def note(self, name: str, text: str) -> None:
        with self._lock:
            self._counts.setdefault(name, collections.Counter())
            self._notes.setdefault(name, []).append(text)

    def lines(self) -> list[str]:
        lines = []
        with self._lock:
            for name, counter in self._counts.items():
                outcomes = ", ".join(f"{n} {k}" for k, n in sorted(counter.items())
                                     if k not in ("sent", "answered"))
                line = (f"{name}: {counter['sent']} requests sent, {counter['answered']} "
                        f"answered" + (f" ({outcomes})" if outcomes else ""))
                lines.append("; ".join([line, *self._notes.get(name, [])]))
        return lines


def outcome_label(protocol: str, answer: Answer) -> str:
    if answer.ok:
        return "ok"
    codes = {INVALID_STATUS[protocol]: "INVALID_ARG", UNAVAILABLE_STATUS[protocol]: "UNAVAILABLE",
             "StatusCode.CANCELLED": "CANCELLED"}
    return codes.get(answer.status, f"status {answer.status}")


# ---------------------------------------------------------------------- metrics


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """Triton's /metrics as {(sample name, labels): value}."""
    with _DIRECT.open(f"http://{server.metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        labels = frozenset(_LABEL.findall(match.group(3) or ""))
        samples[(match.group(1), labels)] = float(match.group(4))
    return samples


def settled_scrape(server, timeout_s: float = 10.0) -> dict[tuple[str, frozenset], float]:
    """A scrape once Triton's request counters stop moving. An answer leaves through its response
    sender before execute() returns, and Triton counts the request only then, so its count may
    trail the answer by a moment."""
    counters = ("nv_inference_request_success", "nv_inference_request_failure",
                "nv_inference_count", "zimage_images_generated_total")
    previous, deadline = scrape(server), time.monotonic() + timeout_s
    while True:
        time.sleep(0.3)
        current = scrape(server)
        if time.monotonic() > deadline or all(
                metric(current, name) == metric(previous, name) for name in counters):
            return current
        previous = current


def metric(samples, name: str, **labels: str) -> float:
    """The sum of `name` over all label sets that include `labels` (0 when absent)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


# ---------------------------------------------------------------------- memory, log


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def tree_rss(pid: int) -> dict[int, int]:
    """Resident memory in bytes of `pid` and all its descendants (the Python backend stubs)."""
    rss, todo = {}, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        kb = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        rss[current] = int(kb.group(1)) * 1024 if kb else 0
        todo += _children(current)
    return rss


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class LogWatch:
    """The server log lines written since this object was made."""

    def __init__(self, path: os.PathLike[str] | None):
        self.path = Path(path) if path is not None else None
        self.offset = self.path.stat().st_size if self.path is not None else 0

    def new_lines(self) -> list[str]:
        if self.path is None:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().decode("utf-8", "replace").splitlines()

    def wait_for(self, pattern: str, timeout_s: float = 30.0) -> list[re.Match]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = [m for line in self.new_lines() if (m := re.search(pattern, line))]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def metadata_of(outputs: dict[str, np.ndarray]) -> list[dict]:
    return [json.loads(row[0]) for row in outputs.get("METADATA", [])]


def perf_analyzer(server, tmp_path: Path, steps: int, args: Sequence[str],
                  timeout_s: float = 300, inputs: Path | None = None) -> str:
    """perf/perf_analyzer.sh over gRPC with the shipped inputs made CPU-sized (64x64, `steps`
    steps), or with the input data file `inputs` as it is; asserts it exited 0 and returns its
    output."""
    root = Path(__file__).resolve().parents[2]
    if inputs is None:
        data = json.loads((root / "perf" / "inputs.json").read_text())
        for row in data["data"]:  # the shipped file is for GPUs
            row.update(HEIGHT=[64], WIDTH=[64], NUM_INFERENCE_STEPS=[steps])
        inputs = tmp_path / "inputs.json"
        inputs.write_text(json.dumps(data))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run([str(root / "perf" / "perf_analyzer.sh"), str(inputs), "-i", "grpc",
                          "-u", server.grpc_url, *args],
                         capture_output=True, text=True, timeout=timeout_s, env=env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    return output

