"""Generation through the real server, over gRPC and HTTP, through our client."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.e2e.helpers import metadata_of, new_client, send, url_of
from zimage_client import ZImageClient

pytestmark = pytest.mark.e2e


def test_model_config_is_what_triton_serves(client):
    config = client.model_config()
    config = config.get("config", config)
    assert config["max_batch_size"] > 1
    assert "dynamic_batching" in config
    # KIND_AUTO became a CPU instance on this GPU-less machine.
    assert [g["kind"] for g in config["instance_group"]] == ["KIND_CPU"]
    names = {i["name"] for i in config["input"]}
    assert names == {"PROMPT", "NEGATIVE_PROMPT", "HEIGHT", "WIDTH", "NUM_INFERENCE_STEPS",
                     "GUIDANCE_SCALE", "SEED", "OUTPUT_FORMAT", "LORA", "IMAGE_INPUT", "STRENGTH",
                     "MASK", "CONTROL_IMAGE", "CONTROL_SCALE"}


@pytest.mark.parametrize("height, width", [(64, 64), (96, 160), (256, 128)])
def test_sizes(client, height, width):
    result = client.generate("a red fox", height=height, width=width, seed=3)
    assert (result.image.width, result.image.height) == (width, height)
    assert result.seed == 3
    assert result.metadata["weights"].startswith("random")
    assert {"text_encode", "denoise", "vae_decode", "image_encode"} <= set(result.timings_ms)


@pytest.mark.parametrize("fmt, pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_encoded_formats(client, fmt, pil_format):
    result = client.generate("a boat", height=64, width=96, seed=5, output_format=fmt)
    image = Image.open(io.BytesIO(result.data))
    assert image.format == pil_format
    assert image.size == (96, 64)


def test_raw_pixels_match_png(client):
    raw = client.generate("a boat", height=64, width=96, seed=5, output_format="raw")
    png = client.generate("a boat", height=64, width=96, seed=5, output_format="png")
    assert raw.data is None
    assert raw.pixels.shape == (64, 96, 3) and raw.pixels.dtype == np.uint8
    assert np.array_equal(raw.pixels, np.asarray(png.image.convert("RGB")))


def test_png_says_its_weights_are_random(client):
    result = client.generate("label", height=64, width=64)
    assert Image.open(io.BytesIO(result.data)).text["Weights"].startswith("random")


def test_seed_is_returned_and_reproducible(client):
    first = client.generate("a castle", height=64, width=64)
    again = client.generate("a castle", height=64, width=64, seed=first.seed)
    other = client.generate("a castle", height=64, width=64, seed=first.seed + 1)
    assert 0 <= first.seed < 2**63
    assert again.seed == first.seed
    assert again.data == first.data
    assert other.data != first.data


def test_same_seed_same_image_over_both_protocols(server):
    images = []
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        with ZImageClient(url, protocol=protocol) as c:
            images.append(c.generate("a bridge", height=64, width=64, seed=11).data)
    assert images[0] == images[1]


def _burst(client, blocker_size, jobs):
    """Holds the instance with a slow request, then sends `jobs` so they queue behind it."""
    started = threading.Event()

    def blocker():
        started.set()
        return client.generate("blocker", height=blocker_size, width=blocker_size)

    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        slow = pool.submit(blocker)
        started.wait()
        threading.Event().wait(0.3)  # let the blocker reach the instance first
        futures = [pool.submit(client.generate, prompt, **kwargs) for prompt, kwargs in jobs]
        slow.result()
        return [f.result() for f in futures]


def test_rows_of_one_request_batch_and_equal_single_images(server, protocol):
    """A request may carry several rows: they share one pipeline call, and each image is the
    one its prompt and seed draw alone."""
    prompts = [f"prompt number {i} " * (i + 1) for i in range(3)]
    rows = len(prompts)
    tensors = [("PROMPT", np.array([[p.encode()] for p in prompts], dtype=np.object_), "BYTES"),
               ("HEIGHT", np.full((rows, 1), 64, np.int32), "INT32"),
               ("WIDTH", np.full((rows, 1), 64, np.int32), "INT32"),
               ("SEED", np.array([[100 + i] for i in range(rows)], np.int64), "INT64"),
               ("OUTPUT_FORMAT", np.array([[b"raw"]] * rows, dtype=np.object_), "BYTES")]
    answer = send(new_client(server, protocol), protocol, tensors)
    assert answer.ok, answer
    assert [m["batch_size"] for m in metadata_of(answer.outputs)] == [rows] * rows
    with ZImageClient(url_of(server, protocol), protocol=protocol) as client:
        for i, prompt in enumerate(prompts):
            alone = client.generate(prompt, height=64, width=64, seed=100 + i,
                                    output_format="raw")
            assert alone.metadata["batch_size"] == 1
            diff = np.abs(alone.pixels.astype(int) - answer.outputs["PIXELS"][i].astype(int))
            # Batched matmuls may round one float bit differently: at most 1 of 255, rarely.
            assert diff.max() <= 1 and (diff > 0).mean() < 0.005


def test_mixed_sizes_in_one_burst(client):
    sizes = [(64, 64), (128, 64), (64, 128), (64, 64), (128, 64)]
    jobs = [("mixed", dict(height=h, width=w, seed=i)) for i, (h, w) in enumerate(sizes)]
    results = _burst(client, 1024, jobs)
    assert [(r.image.height, r.image.width) for r in results] == sizes
    assert [r.seed for r in results] == list(range(len(sizes)))


def test_generate_many_keeps_order(client):
    prompts = [f"many {i}" for i in range(5)]
    results = client.generate_many(prompts, height=64, width=64, seed=[7, 8, 9, 10, 11],
                                   concurrency=5)
    assert [r.seed for r in results] == [7, 8, 9, 10, 11]
    assert all(r.image.size == (64, 64) for r in results)
