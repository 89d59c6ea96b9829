"""LoRA adapters through the real tritonserver: a registry of one file per published format,
served images equal to the in-process engine's, per-row adapter sets that never share a call,
bad LORA values refused by name, the listing, the metric, and a bad adapter failing startup."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import CONFIG, ROOT
from tests.e2e.helpers import (
    INVALID_STATUS,
    metadata_of,
    metric,
    new_client,
    send,
    settled_scrape,
)
from zimage_backend import random_adapters, random_models
from zimage_backend.engine import Engine
from zimage_backend.triton_error import TritonServerError
from zimage_backend.triton_process import TritonServer
from zimage_backend.settings import parse_settings
from zimage_client import AsyncZImageClient, InvalidRequestError, ZImageClient

pytestmark = pytest.mark.e2e

SIZE, STEPS, SEED = 64, 2, 5


def _adapter_files(folder):
    shapes = random_adapters.module_shapes(random_models.build_tiny_pipeline(0).transformer)
    attention = {m: s for m, s in shapes.items() if ".attention." in m}
    return {
        "ink": random_adapters.write(folder / "ink.safetensors", random_adapters.factors(
            shapes, 4, seed=1, b_std=0.3), "kohya", alpha=4.0),
        "film-grain": random_adapters.write(folder / "film" / "film.safetensors",
                                            random_adapters.factors(attention, 8, seed=2,
                                                                    b_std=0.3), "comfyui",
                                            alpha=8.0).parent,  # a folder
        "plain": random_adapters.write(folder / "plain.safetensors", random_adapters.factors(
            shapes, 4, seed=3, b_std=0.3), "diffusers"),
    }


def _config(folder, files, **extra) -> dict:
    data = yaml.safe_load(CONFIG.read_text())
    data["optimizations"]["warmup"]["sizes"] = [[SIZE, SIZE]]
    data["adapters"] = {name: {"source": str(path), "file": None, "revision": None,
                               "scale": 0.5 if name == "film-grain" else 1.0}
                        for name, path in files.items()}
    data["adapters"].update(extra)
    return data


@pytest.fixture(scope="module")
def lora_config(tmp_path_factory):
    """A copy of the shipped config.yaml with a registry of three adapters."""
    folder = tmp_path_factory.mktemp("lora-server")
    data = _config(folder, _adapter_files(folder / "adapters"))
    (folder / "config.yaml").write_text(yaml.safe_dump(data))
    return folder / "config.yaml", data


@pytest.fixture(scope="module")
def lora_server(lora_config):
    path, _ = lora_config
    triton = TritonServer(ROOT / "model_repository", config_path=path, http_port=0,
                          grpc_port=0, metrics_port=0, log_file=path.parent / "server.log")
    with triton:
        yield triton
    assert triton.returncode == 0, triton.log_tail()


@pytest.fixture(scope="module")
def reference(lora_config):
    """The same config in this process: the images the server must send."""
    return Engine(parse_settings(lora_config[1]), torch.device("cpu"))


@pytest.fixture(params=["grpc", "http"])
def lora_client(request, lora_server):
    url = lora_server.grpc_url if request.param == "grpc" else lora_server.http_url
    with ZImageClient(url, protocol=request.param, inference_timeout_s=120) as c:
        yield c


def test_the_server_lists_its_adapters_without_their_paths(lora_server, lora_client):
    before = settled_scrape(lora_server)
    listing = lora_client.adapters()
    after = settled_scrape(lora_server)
    # The listing is an answer of its own: no pipeline call ran for it.
    assert metric(after, "zimage_batch_size_count") == metric(before, "zimage_batch_size_count")
    assert listing["adapters"] == {"film-grain": {"scale": 0.5}, "ink": {"scale": 1.0},
                                   "plain": {"scale": 1.0}}
    assert listing["max_adapters_per_request"] == 2
    assert "/" not in json.dumps(listing["adapters"])


def test_startup_log_describes_each_adapter(lora_server):
    log = lora_server.log_file.read_text(errors="replace")
    found = {m.group(1): m.group(0)
             for m in re.finditer(r"adapter (\S+): rank \d+, .* MiB on cpu", log)}
    assert sorted(found) == ["film-grain", "ink", "plain"]
    assert "rank 8, 16 modules: attention.to_k (x4)" in found["film-grain"]
    assert "feed_forward.w2" not in found["film-grain"]
    assert "rank 4, 31 modules" in found["ink"]


@pytest.mark.parametrize("loras", [None, {"ink": None}, {"film-grain": 1.5, "plain": -0.75}],
                         ids=["none", "one-default-scale", "two-mixed"])
def test_served_image_is_the_engines(lora_client, reference, loras):
    image = lora_client.generate("a red fox", height=SIZE, width=SIZE, num_inference_steps=STEPS,
                                 seed=SEED, output_format="raw", loras=loras)
    registry = reference.settings.adapters
    adapter_set = tuple(sorted((n, registry[n].scale if s is None else s)
                               for n, s in (loras or {}).items()))
    request = dataclasses.replace(reference._request("a red fox", SIZE, STEPS), seed=SEED,
                                  loras=adapter_set)
    want = reference.run([request]).pixels[0]
    assert np.abs(image.pixels.astype(int) - want.astype(int)).max() <= 1
    assert image.metadata.get("loras", {}) == dict(adapter_set)
    if loras:
        plain = reference.run([dataclasses.replace(request, loras=())]).pixels[0]
        assert np.abs(want.astype(int) - plain.astype(int)).mean() > 5


def test_async_client_sends_loras(lora_server):
    import asyncio

    async def both():
        async with AsyncZImageClient(lora_server.grpc_url, protocol="grpc") as c:
            kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, seed=SEED,
                          output_format="raw")
            return (await c.generate("a fox", loras={"ink": 1.0}, **kwargs),
                    await c.generate("a fox", **kwargs), await c.adapters())

    with_ink, without, listing = asyncio.run(both())
    assert with_ink.metadata["loras"] == {"ink": 1.0} and "loras" not in without.metadata
    assert not np.array_equal(with_ink.pixels, without.pixels)
    assert "ink" in listing["adapters"]


def _rows(*loras: str):
    n = len(loras)
    return [("PROMPT", np.array([[b"a cat"]] * n, dtype=np.object_), "BYTES"),
            ("HEIGHT", np.array([[SIZE]] * n, np.int32), "INT32"),
            ("WIDTH", np.array([[SIZE]] * n, np.int32), "INT32"),
            ("NUM_INFERENCE_STEPS", np.array([[1]] * n, np.int32), "INT32"),
            ("SEED", np.array([[SEED]] * n, np.int64), "INT64"),
            ("LORA", np.array([[t.encode()] for t in loras], dtype=np.object_), "BYTES")]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_rows_share_a_call_only_with_the_same_adapter_set(lora_server, protocol):
    client = new_client(lora_server, protocol)
    try:
        answer = send(client, protocol, _rows("ink:1", "", "ink:1.0", "plain:1, ink:1"))
    finally:
        client.close()
    assert answer.ok, answer
    sizes = [m["batch_size"] for m in metadata_of(answer.outputs)]
    # ink:1 twice shares a call; no adapter and ink+plain run alone.
    assert sizes == [2, 1, 2, 1]
    images = answer.outputs["IMAGE"][:, 0]
    assert images[0] == images[2] and len({images[0], images[1], images[3]}) == 3


ALLOWED = "allowed names: film-grain, ink, plain"
BAD_LORA = [
    ("watercolor", f"LORA: 'watercolor' does not name an adapter of this server; {ALLOWED}"),
    ("/etc/passwd", f"LORA: '/etc/passwd' does not name an adapter of this server; {ALLOWED}"),
    ("https://example.com/evil.safetensors", "LORA: 'https://example.com/evil.safetensors' does "
                                             "not name an adapter"),
    ("ink:nan", "LORA: 'ink:nan': scale nan is outside [-4.0, 4.0]"),
    ("ink:-inf", "LORA: 'ink:-inf': scale -inf is outside"),
    ("ink:7", "LORA: 'ink:7': scale 7.0 is outside [-4.0, 4.0]"),
    ("ink:x", "LORA: 'ink:x': scale 'x' is not a number"),
    ("ink, plain, film-grain", "names 3 adapters; at most 2 are allowed per image"),
]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("text, words", BAD_LORA, ids=[b[0][:12] for b in BAD_LORA])
def test_bad_lora_is_invalid_arg_naming_field_value_and_allowed(lora_server, protocol, text,
                                                               words):
    client = new_client(lora_server, protocol)
    try:
        answer = send(client, protocol, _rows(text))
    finally:
        client.close()
    assert answer.status == INVALID_STATUS[protocol], answer
    assert answer.message.startswith("LORA: ") and words in answer.message


def test_client_gets_invalid_request_for_an_unknown_adapter(lora_client):
    with pytest.raises(InvalidRequestError) as info:
        lora_client.generate("a", height=SIZE, width=SIZE, loras={"nope": 1.0})
    assert info.value.code == "INVALID_ARG" and ALLOWED in info.value.message


def test_images_per_adapter_are_counted(lora_server, lora_client):
    before = settled_scrape(lora_server)
    for loras in ({"ink": 1.0}, {"ink": 0.5, "plain": 1.0}, None):
        lora_client.generate("a", height=SIZE, width=SIZE, num_inference_steps=1, loras=loras)
    after = settled_scrape(lora_server)

    def delta(adapter):
        return (metric(after, "zimage_adapter_images_total", adapter=adapter)
                - metric(before, "zimage_adapter_images_total", adapter=adapter))

    assert (delta("ink"), delta("plain"), delta("film-grain")) == (2, 1, 0)


def test_an_adapter_that_cannot_load_fails_startup_with_its_name(tmp_path):
    data = _config(tmp_path, {}, broken={"source": str(tmp_path / "gone.safetensors"),
                                         "file": None, "revision": None, "scale": 1.0})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    triton = TritonServer(ROOT / "model_repository", config_path=tmp_path / "config.yaml",
                          http_port=0, grpc_port=0, metrics_port=0,
                          log_file=tmp_path / "server.log")
    with pytest.raises(TritonServerError):
        with triton:
            pass
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert f"adapter 'broken': {tmp_path / 'gone.safetensors'} does not exist" in log
