"""The OpenAI-compatible gateway through the official `openai` SDK, in front of the real
tritonserver (tiny pipeline, CPU): generations, n > 1 over two servers, every error mapping,
authentication, the per-key 429s, retries on another server, and a client that disconnects
mid-generation showing up as CANCELLED on the Triton server."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import threading
import time

import numpy as np
import openai
import pytest
from PIL import Image

from tests.e2e.gateway_process import KEYS, GatewayProcess
from tests.e2e.helpers import metric, scrape
from tests.e2e.test_cancellation import RUN_BEFORE_CANCEL_S, SLOW_SIZE, SLOW_STEPS, Cancellation
from zimage_backend.triton_process import free_port
from zimage_client import ZImageClient

pytestmark = pytest.mark.e2e

MODEL_ID = "Tongyi-MAI/Z-Image-Turbo"
QUICK = {"num_inference_steps": 1}


def sdk(gateway, key: str = KEYS[0]) -> openai.OpenAI:
    # No SDK retries: each test sees the gateway's first answer.
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=120)


def decoded(entry) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(entry.b64_json)))
    image.load()
    return image


def gateway_metric(gateway, name: str, **labels: str) -> float:
    return metric(scrape(gateway), name, **labels)


class SlowRequest:
    """A raw HTTP generation that runs until `drop()` closes its connection."""

    def __init__(self, gateway, key: str = KEYS[0]) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=120)
        body = json.dumps({"prompt": "a long one", "size": f"{SLOW_SIZE}x{SLOW_SIZE}",
                           "num_inference_steps": SLOW_STEPS, "seed": 1})
        self.connection.request("POST", "/v1/images/generations", body,
                                {"authorization": f"Bearer {key}", "content-type": "application/json"})

    def drop(self) -> None:
        self.connection.sock.shutdown(2)
        self.connection.close()


def wait_for_in_flight(gateway, count: float, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while gateway_metric(gateway, "zimage_gateway_images_in_flight") < count:
        assert time.monotonic() < deadline, "the slow request never reached a server"
        time.sleep(0.05)


# ---------------------------------------------------------------------- generations


def test_generation_is_the_servers_image_for_that_seed(gateway, server):
    raw_answer = sdk(gateway).images.with_raw_response.generate(
        model=MODEL_ID, prompt="a red fox", size="64x64", response_format="b64_json", extra_body={"seed": 7, **QUICK})
    # bench/gateway.py reads the servers' share of the answer time from this header.
    assert re.fullmatch(r"upstream;dur=[0-9]+\.[0-9]", raw_answer.headers["server-timing"])
    answer = raw_answer.parse()
    (entry,) = answer.data
    image = decoded(entry)
    assert (image.format, image.size) == ("PNG", (64, 64))
    assert answer.size == "64x64" and answer.output_format == "png"
    assert entry.model_extra["seed"] == 7 and "denoise" in entry.model_extra["timings_ms"]
    with ZImageClient(server.grpc_url, protocol="grpc") as direct:
        expected = direct.generate("a red fox", height=64, width=64, seed=7, **QUICK)
    assert np.array_equal(np.asarray(image.convert("RGB")), expected.pixels)


def test_n_images_spread_over_the_servers_with_consecutive_seeds(gateway):
    before = [gateway_metric(gateway, "zimage_gateway_images_total", server=f"server-{i}") for i in (0, 1)]
    answer = sdk(gateway).images.generate(prompt="four boats", size="80x64", n=4,
                                          extra_body={"seed": 100, **QUICK})
    assert [e.model_extra["seed"] for e in answer.data] == [100, 101, 102, 103]
    images = [np.asarray(decoded(e)) for e in answer.data]
    assert all(i.shape == (64, 80, 3) for i in images)
    assert len({i.tobytes() for i in images}) == 4
    after = [gateway_metric(gateway, "zimage_gateway_images_total", server=f"server-{i}") for i in (0, 1)]
    assert [a - b for a, b in zip(after, before)] == [2, 2]


@pytest.mark.parametrize("output_format, pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_format(gateway, output_format, pil_format):
    answer = sdk(gateway).images.generate(prompt="a cat", size="64x64", output_format=output_format,
                                          extra_body=QUICK)
    assert decoded(answer.data[0]).format == pil_format
    assert answer.output_format == output_format


def test_extensions_reach_the_server(gateway, server):
    extensions = {"num_inference_steps": 2, "guidance_scale": 1.5, "negative_prompt": "blur", "seed": 3}
    client = sdk(gateway)
    entry = client.images.generate(prompt="a dog", size="64x64", extra_body=extensions).data[0]
    with ZImageClient(server.grpc_url, protocol="grpc") as direct:
        expected = direct.generate("a dog", height=64, width=64, **extensions)
    assert np.array_equal(np.asarray(decoded(entry).convert("RGB")), expected.pixels)
    fewer_steps = client.images.generate(prompt="a dog", size="64x64", extra_body={**extensions, **QUICK})
    assert not np.array_equal(np.asarray(decoded(fewer_steps.data[0]).convert("RGB")), expected.pixels)


def test_models(gateway):
    client = sdk(gateway)
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("dall-e-3")
    assert raised.value.code == "model_not_found"


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize("fields, param, words", [
    ({"size": "100x64"}, "size", "WIDTH: 100 is not allowed"),
    ({"size": "big"}, "size", "'WIDTHxHEIGHT'"),
    ({"n": 5}, "n", "must be an integer in [1, 4]"),
    ({"n": "2"}, "n", "'2' is not allowed"),
    ({"model": "dall-e-3"}, "model", "'dall-e-3' is not served"),
    ({"response_format": "url"}, "response_format", "'url' is not served"),
    ({"output_format": "gif"}, "output_format", "must be one of png, jpeg, webp"),
    ({"quality": "hd"}, "quality", "'hd' is not supported"),
    ({"background": "transparent"}, "background", "opaque RGB"),
    ({"num_inference_steps": 0}, "num_inference_steps", "NUM_INFERENCE_STEPS: 0"),
    ({"guidance_scale": 99.0}, "guidance_scale", "GUIDANCE_SCALE: 99"),
    ({"prompt": ""}, "prompt", "PROMPT"),
    ({"seed": -1}, "seed", "-1 is not allowed"),
    ({"adapters": ["x"]}, "adapters", "unknown parameter"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_fields_are_400_naming_the_field(gateway, fields, param, words):
    body = {"prompt": "a fox", "size": "64x64", **QUICK, **fields}
    prompt = body.pop("prompt")
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(gateway).images.generate(prompt=prompt, extra_body=body)
    error = raised.value
    assert error.status_code == 400 and error.param == param, error.body
    assert words in error.message and error.type == "invalid_request_error"


def raw(gateway, method: str, path: str, body: dict | None = None, **headers: str):
    """One plain HTTP request: (status, headers, JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=120)
    connection.request(method, path, None if body is None else json.dumps(body), headers)
    response = connection.getresponse()
    answer = (response.status, dict(response.headers), json.loads(response.read()))
    connection.close()
    return answer


def test_authentication(gateway):
    for key in ("test-key-alpha-012345678X", KEYS[0] + "X", KEYS[0][:-1]):
        with pytest.raises(openai.AuthenticationError) as raised:
            sdk(gateway, key).images.generate(prompt="a fox", size="64x64", extra_body=QUICK)
        assert raised.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            sdk(gateway, key).models.list()
    for headers in ({}, {"authorization": f"Basic {KEYS[0]}"}, {"authorization": "Bearer "}):
        status, answer_headers, body = raw(gateway, "POST", "/v1/images/generations",
                                           {"prompt": "a fox", "size": "64x64"}, **headers)
        assert (status, answer_headers["www-authenticate"], answer_headers["x-should-retry"]) == (401, "Bearer", "false")
        assert body["error"]["code"] == "invalid_api_key" and KEYS[0] not in json.dumps(body)
    assert sdk(gateway, KEYS[1]).models.list().data[0].id == MODEL_ID


def test_body_limit_is_413(gateway):
    with pytest.raises(openai.APIStatusError) as raised:
        sdk(gateway).images.generate(prompt="x" * 70_000, size="64x64")
    assert raised.value.status_code == 413 and "larger than 65536 bytes" in raised.value.message
    # Without a Content-Length the gateway counts what arrives.
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    chunks = (b'{"prompt": "' + b"x" * 8192 if i == 0 else b"x" * 8192 for i in range(9))
    connection.request("POST", "/v1/images/generations", chunks, {"authorization": f"Bearer {KEYS[0]}"},
                       encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()


def test_the_grpc_deadline_is_504(server, tmp_path):
    with GatewayProcess([f"grpc://{server.grpc_url}"], tmp_path, "--inference-timeout-s=1") as gateway:
        started = time.perf_counter()
        with pytest.raises(openai.InternalServerError) as raised:
            sdk(gateway).images.generate(prompt="too slow", size=f"{SLOW_SIZE}x{SLOW_SIZE}",
                                         extra_body={"num_inference_steps": SLOW_STEPS})
        assert raised.value.status_code == 504 and raised.value.code == "timeout"
        assert time.perf_counter() - started < 10


def test_no_server_reachable_is_503(server, tmp_path):
    dead = f"grpc://127.0.0.1:{free_port()}"
    with GatewayProcess([dead], tmp_path, "--retries=1", "--retry-backoff-s=0.05",
                        "--ready-timeout-s=0.5") as gateway:
        with pytest.raises(openai.InternalServerError) as raised:
            sdk(gateway).images.generate(prompt="a fox", size="64x64", extra_body=QUICK)
        assert raised.value.status_code == 503 and raised.value.code == "server_unreachable"
        assert "127.0.0.1" not in raised.value.message  # internal addresses stay in the log
        assert gateway_metric(gateway, "zimage_gateway_upstream_retries_total", server="server-0") == 1
        assert readiness(gateway) == (503, {"status": "not ready", "servers": {"server-0": "not ready"}})


def readiness(gateway) -> tuple[int, dict]:
    status, _, body = raw(gateway, "GET", "/health/ready")
    return status, body


def test_unreachable_server_is_retried_on_another(server, tmp_path):
    dead = f"grpc://127.0.0.1:{free_port()}"
    with GatewayProcess([dead, f"grpc://{server.grpc_url}"], tmp_path, "--retry-backoff-s=0.05") as gateway:
        assert readiness(gateway) == (200, {"status": "ready",
                                            "servers": {"server-0": "not ready", "server-1": "ready"}})
        client = sdk(gateway)
        for seed in range(4):  # the first pick takes turns, so some start on the dead server
            assert client.images.generate(prompt="a fox", size="64x64",
                                          extra_body={"seed": seed, **QUICK}).data[0].model_extra["seed"] == seed
        assert gateway_metric(gateway, "zimage_gateway_upstream_retries_total", server="server-0") >= 1
        assert gateway_metric(gateway, "zimage_gateway_images_total", server="server-1") == 4


# ---------------------------------------------------------------------- load


def test_per_key_limit_and_bounded_wait_answer_429(server, tmp_path):
    url = f"grpc://{server.grpc_url}"
    with GatewayProcess([url], tmp_path, "--max-concurrent-per-key=1", "--max-waiting-per-key=1",
                        "--max-wait-s=1") as gateway:
        slow = SlowRequest(gateway)
        outcomes: dict[str, BaseException | object] = {}

        def attempt(name: str, key: str) -> None:
            try:
                outcomes[name] = sdk(gateway, key).images.generate(prompt=name, size="64x64", extra_body=QUICK)
            except openai.APIError as exc:
                outcomes[name] = exc

        try:
            wait_for_in_flight(gateway, 1)
            waiting = threading.Thread(target=attempt, args=("waits", KEYS[0]))
            waiting.start()
            time.sleep(0.3)
            attempt("queue full", KEYS[0])
            other = threading.Thread(target=attempt, args=("other key", KEYS[1]))
            other.start()
            waiting.join(10)
            # A waiter that disconnects gives its waiting place back at once, not after its wait.
            leaver = SlowRequest(gateway)
            time.sleep(0.3)
            leaver.drop()
            time.sleep(0.3)
            attempt("after a waiter left", KEYS[0])
        finally:
            slow.drop()
        other.join(60)
        full, waited = outcomes["queue full"], outcomes["waits"]
        assert isinstance(full, openai.RateLimitError) and "1 waiting already" in full.message, full
        assert isinstance(waited, openai.RateLimitError) and "within 1 s" in waited.message, waited
        assert full.response.headers["retry-after"] == "1"
        after = outcomes["after a waiter left"]
        assert isinstance(after, openai.RateLimitError) and "within 1 s" in after.message, after
        # The other key had its own slots: it waited for the server, not for a gateway slot.
        assert not isinstance(outcomes["other key"], BaseException), outcomes["other key"]
        assert gateway_metric(gateway, "zimage_gateway_rejected_total", reason="rate_limited") == 3


def test_client_disconnect_cancels_the_generation_on_the_server(gateway, server, tally):
    watch = Cancellation(server, tally, "gateway HTTP client disconnect")
    disconnects = gateway_metric(gateway, "zimage_gateway_client_disconnects_total")
    slow = SlowRequest(gateway)
    wait_for_in_flight(gateway, 1)
    time.sleep(RUN_BEFORE_CANCEL_S)
    slow.drop()
    watch.cancelled()
    started = time.perf_counter()
    sdk(gateway).images.generate(prompt="right after", size="64x64", extra_body={"seed": 2, **QUICK})
    watch.check(time.perf_counter() - started)
    assert gateway_metric(gateway, "zimage_gateway_client_disconnects_total") == disconnects + 1
    assert "client left, gRPC calls cancelled" in gateway.log()
