"""The gateway's pieces without a server: request parsing, API keys, per-key admission, settings,
and its Docker image and compose service (which cannot be built here)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import tomllib

import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import ROOT
from zimage_gateway import GatewaySettings, create_app
from zimage_gateway.app import images_body
from zimage_gateway import settings as gateway_settings
from zimage_gateway.auth import ApiKeys, load_keys
from zimage_gateway.errors import ApiError, from_client_error
from zimage_gateway.limits import KeyLimiter
from zimage_gateway.metrics import GatewayMetrics
from zimage_gateway.params import parse_generation
from zimage_gateway.pool import ServerPool
from zimage_client import GeneratedImage, InvalidRequestError, ServerUnavailableError, ZImageConnectionError

MODEL = "Tongyi-MAI/Z-Image-Turbo"
KEY = "k" * 20


def parse(**fields):
    return parse_generation({"prompt": "a fox", **fields}, model_id=MODEL, max_n=4)


@pytest.fixture(autouse=True)
def no_gateway_environment(monkeypatch):
    for name in [n for n in os.environ if n.startswith(gateway_settings.ENV_PREFIX)]:
        monkeypatch.delenv(name)


# ---------------------------------------------------------------------- requests


def test_openai_fields_and_extensions():
    request = parse(model=MODEL, n=3, size="1344x768", response_format="b64_json", output_format="webp",
                    user="u1", seed=10, num_inference_steps=4, guidance_scale=2, negative_prompt="blur",
                    quality="auto", background="opaque", moderation="low", stream=False)
    assert (request.width, request.height, request.n, request.output_format) == (1344, 768, 3, "webp")
    assert request.seeds() == (10, 11, 12) and request.guidance_scale == 2.0
    assert parse(size="auto").width is None and parse().seeds() == (None,)


@pytest.mark.parametrize("fields, param", [
    ({"n": 0}, "n"), ({"n": True}, "n"), ({"n": 2.0}, "n"), ({"size": "64X64"}, "size"),
    ({"size": "-64x64"}, "size"), ({"size": 64}, "size"), ({"seed": 2**63 - 1, "n": 2}, "seed"),
    ({"seed": "1"}, "seed"), ({"guidance_scale": "1"}, "guidance_scale"), ({"guidance_scale": True}, "guidance_scale"),
    ({"num_inference_steps": 2**31}, "num_inference_steps"), ({"negative_prompt": 3}, "negative_prompt"),
    ({"prompt": None}, "prompt"), ({"stream": True}, "stream"), ({"partial_images": 2}, "partial_images"),
    ({"style": "vivid"}, "style"), ({"output_compression": 50}, "output_compression"),
    ({"output_format": "raw"}, "output_format"), ({"image": "x"}, "image"), ({"model": "zimage"}, "model"),
])
def test_refused_fields_are_named(fields, param):
    with pytest.raises(ApiError) as raised:
        parse(**fields)
    assert raised.value.status == 400 and raised.value.param == param
    assert raised.value.message.startswith(f"{param}:") or param in raised.value.message
    assert raised.value.headers["x-should-retry"] == "false"  # the SDKs would not change it by retrying


def test_body_must_be_an_object():
    with pytest.raises(ApiError, match="JSON object"):
        parse_generation(["a fox"], model_id=MODEL, max_n=4)


def test_server_errors_map_to_statuses_and_fields():
    bad = from_client_error(InvalidRequestError("HEIGHT: 100 is not allowed; must be ...", "INVALID_ARG"))
    assert (bad.status, bad.param, bad.message) == (400, "size", "size: HEIGHT: 100 is not allowed; must be ...")
    triton = from_client_error(InvalidRequestError("inference input 'SEED' data-type is 'FP32'", "INVALID_ARG"))
    assert triton.param == "seed"
    busy = from_client_error(ServerUnavailableError("Exceeds maximum queue size", "UNAVAILABLE"))
    assert (busy.status, busy.headers["retry-after"]) == (503, "1") and "x-should-retry" not in busy.headers
    gone = from_client_error(ZImageConnectionError("cannot reach grpc://10.1.2.3:8001: refused"))
    assert gone.status == 503 and "10.1.2.3" not in gone.message


# ---------------------------------------------------------------------- keys


def test_keys_identify_by_label_only():
    keys = ApiKeys([KEY, "m" * 20])
    assert keys.identify(f"Bearer {KEY}") == "key-1" and keys.identify("bearer " + "m" * 20) == "key-2"
    for header in (None, "", KEY, f"Basic {KEY}", "Bearer ", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x"):
        assert keys.identify(header) is None
    assert not ApiKeys([]).enabled


def test_key_file_and_environment(tmp_path, monkeypatch):
    path = tmp_path / "keys"
    path.write_text(f"# ops team\n{KEY}\n\n")
    monkeypatch.setenv("TEST_KEYS", "m" * 20 + ", " + "n" * 20)
    assert load_keys(path, "TEST_KEYS") == (KEY, "m" * 20, "n" * 20)
    path.write_text("short-key\n")
    with pytest.raises(ValueError, match="entry 1: an API key must be at least 16") as raised:
        load_keys(path, "TEST_KEYS")
    assert "short-key" not in str(raised.value)


def test_settings_refuse_to_start_open(monkeypatch):
    with pytest.raises(ValueError, match="no API keys"):
        gateway_settings.parse_args(["--server", "grpc://h:8001"])
    with pytest.raises(ValueError, match="at least one Triton gRPC server"):
        gateway_settings.parse_args(["--allow-anonymous"])
    assert gateway_settings.parse_args(["--server", "h:8001", "--allow-anonymous"]).allow_anonymous
    monkeypatch.setenv("ZIMAGE_GATEWAY_SERVERS", "grpc://a:8001, grpc://b:8001")
    monkeypatch.setenv("ZIMAGE_GATEWAY_API_KEYS", KEY)
    monkeypatch.setenv("ZIMAGE_GATEWAY_MAX_N", "8")
    settings = gateway_settings.parse_args([])
    assert (settings.servers, settings.api_keys, settings.max_n) == (("grpc://a:8001", "grpc://b:8001"), (KEY,), 8)


# ---------------------------------------------------------------------- admission


def test_limiter_admits_waits_and_refuses():
    async def scenario():
        limiter = KeyLimiter(max_concurrent=1, max_waiting=1, max_wait_s=0.3)
        release = asyncio.Event()
        order = []

        async def hold(name):
            async with limiter.slot("key-1"):
                order.append(name)
                await release.wait()

        first = asyncio.create_task(hold("first"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(hold("second"))
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError, match="1 generating and 1 waiting already") as full:
            async with limiter.slot("key-1"):
                pass
        assert full.value.status == 429
        async with limiter.slot("key-2"):  # another key has its own slots
            order.append("other key")
        release.set()
        await asyncio.gather(first, second)
        assert order == ["first", "other key", "second"]
        release.clear()
        held = asyncio.create_task(hold("held"))
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError, match="no slot came free within 0.3 s"):
            async with limiter.slot("key-1"):
                pass
        release.set()
        await held

    asyncio.run(scenario())


# ---------------------------------------------------------------------- image and compose

GATEWAY_DOCKERFILE = (ROOT / "docker" / "gateway.Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def test_image_copies_every_package_the_project_installs():
    where = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
    for folder in where:
        assert f"COPY {folder} {folder}" in GATEWAY_DOCKERFILE
    assert 'RUN pip install ".[gateway]"' in GATEWAY_DOCKERFILE
    assert re.search(r"^USER 10001", GATEWAY_DOCKERFILE, re.M)


def test_compose_gateway_talks_grpc_to_the_zimage_service(monkeypatch):
    service = COMPOSE["services"]["gateway"]
    assert service["build"]["dockerfile"] == "docker/gateway.Dockerfile"
    entrypoint = yaml.safe_load(re.search(r"ENTRYPOINT (\[.*?\])", GATEWAY_DOCKERFILE, re.S).group(1))
    monkeypatch.setenv("ZIMAGE_GATEWAY_API_KEYS", KEY)  # compose passes the host's through
    assert "ZIMAGE_GATEWAY_API_KEYS" in service["environment"]
    settings = gateway_settings.parse_args(entrypoint[1:] + service["command"])
    (server,) = settings.servers
    host, port = server.removeprefix("grpc://").split(":")
    assert host in COMPOSE["services"] and host in service["depends_on"]
    assert f"{port}:{port}" in [p.split()[0].strip('"') for p in COMPOSE["services"][host]["ports"]]
    assert service["ports"] == [f"{settings.port}:{settings.port}"]
    assert f"EXPOSE {settings.port}" in GATEWAY_DOCKERFILE


# ---------------------------------------------------------------------- servers and app


def pool_with(outcomes_by_server):
    """A ServerPool whose clients answer from lists: an exception is raised, anything else returned."""
    metrics = GatewayMetrics()
    pool = ServerPool([f"grpc://s{i}:8001" for i in range(len(outcomes_by_server))], model_name="zimage",
                      inference_timeout_s=10, retries=2, retry_backoff_s=0.01, metrics=metrics)
    calls = []
    for index, (server, outcomes) in enumerate(zip(pool._servers, outcomes_by_server)):
        async def generate(prompt, *, seed, _outcomes=outcomes, _index=index, **kwargs):
            calls.append((_index, seed))
            outcome = _outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        server.client.generate = generate
    return pool, metrics, calls


def test_unavailable_is_retried_on_another_server():
    busy = ServerUnavailableError("Exceeds maximum queue size", "UNAVAILABLE")
    pool, metrics, calls = pool_with([[busy], ["image from s1"]])
    request = parse(seed=5)
    assert asyncio.run(pool.generate(request)) == ["image from s1"]
    assert calls == [(0, 5), (1, 5)]
    assert metrics.retries.labels("server-0")._value.get() == 1


def test_invalid_requests_are_not_retried_and_retries_are_bounded():
    bad = InvalidRequestError("HEIGHT: 100 is not allowed", "INVALID_ARG")
    pool, _, calls = pool_with([[bad], ["unused"]])
    with pytest.raises(InvalidRequestError):
        asyncio.run(pool.generate(parse()))
    assert len(calls) == 1
    busy = [ServerUnavailableError("busy", "UNAVAILABLE") for _ in range(3)]
    pool, _, calls = pool_with([busy[:2], busy[2:]])
    with pytest.raises(ServerUnavailableError):
        asyncio.run(pool.generate(parse()))
    assert len(calls) == 3  # the first try and --retries 2


def test_cors_is_off_unless_an_origin_is_given():
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization"}
    closed = TestClient(create_app(GatewaySettings(servers=("grpc://s:8001",), api_keys=(KEY,))))
    assert "access-control-allow-origin" not in closed.options("/v1/images/generations", headers=preflight).headers
    assert "access-control-allow-origin" not in closed.get("/health/live", headers={"origin": "https://app.example"}).headers
    opened = TestClient(create_app(GatewaySettings(servers=("grpc://s:8001",), api_keys=(KEY,),
                                                   cors_origins=("https://app.example",))))
    answer = opened.options("/v1/images/generations", headers=preflight)
    assert answer.headers["access-control-allow-origin"] == "https://app.example"
    other = opened.options("/v1/images/generations", headers={**preflight, "origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_pages_errors_and_hostile_bodies():
    client = TestClient(create_app(GatewaySettings(servers=("grpc://s:8001",), api_keys=(KEY,))))
    page = client.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert 'src="playground.js"' in page.text and client.get("/playground.js").status_code == 200
    missing = client.get("/../config.yaml")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    auth = {"authorization": f"Bearer {KEY}"}
    for body in (b"{", b"[" * 40000 + b"]" * 40000):
        answer = client.post("/v1/images/generations", content=body[:60000], headers=auth)
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json", answer.text


def test_answer_body_is_the_json_of_the_images():
    pictures = []
    for seed, colour in ((1, "red"), (2, "blue")):
        buffer = io.BytesIO()
        Image.new("RGB", (80, 64), colour).save(buffer, format="PNG")
        data = buffer.getvalue()
        pictures.append(GeneratedImage(Image.open(io.BytesIO(data)), data, None, seed, "png",
                                       {"denoise": 1.5, "note": 'a "quoted"\nline'}, {}))
    answer = json.loads(images_body(pictures, "png"))
    assert answer.pop("created") > 0
    assert answer == {"output_format": "png", "size": "80x64", "background": "opaque", "data": [
        {"b64_json": base64.b64encode(p.data).decode(), "seed": p.seed, "timings_ms": p.timings_ms}
        for p in pictures]}
