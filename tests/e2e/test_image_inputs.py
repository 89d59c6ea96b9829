"""Image inputs (issue 14) through the real tritonserver over HTTP and gRPC: each mode answers
with the image the in-process engine draws and METADATA of its mode, steps and stages; a bad
image fails only its own request and the server stays ready; the stage histogram counts the
new stages; a server without a ControlNet refuses CONTROL_IMAGE by name."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import CONFIG, ROOT
from tests.e2e.helpers import (INVALID_STATUS, metadata_of, metric, names_field, new_client,
                               send, settled_scrape)
from zimage_backend.engine import Engine
from zimage_backend.request import parse_request
from zimage_backend.settings import load_settings
from zimage_backend.triton_process import TritonServer

pytestmark = pytest.mark.e2e

HEIGHT, WIDTH, STEPS = 64, 80, 3


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _photo(seed: int) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC))


def _mask() -> np.ndarray:
    out = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    out[16:48, 24:64] = 255
    return out


IMAGE, MASK, CONTROL = png(_photo(1)), png(_mask()), png(_photo(2))
MODES = {
    "image_to_image": {"IMAGE_INPUT": IMAGE, "STRENGTH": 0.6},
    "inpaint": {"IMAGE_INPUT": IMAGE, "MASK": MASK, "STRENGTH": 0.9},
    "controlnet": {"CONTROL_IMAGE": CONTROL, "CONTROL_SCALE": 0.7},
    "controlnet_inpaint": {"CONTROL_IMAGE": CONTROL, "IMAGE_INPUT": IMAGE, "MASK": MASK},
}


def tensors(seed: int, output_format: str = "raw", **fields) -> list:
    out = [("PROMPT", np.array([[b"a lighthouse"]], dtype=np.object_), "BYTES"),
           ("SEED", np.array([[seed]], dtype=np.int64), "INT64"),
           ("NUM_INFERENCE_STEPS", np.array([[STEPS]], dtype=np.int32), "INT32"),
           ("OUTPUT_FORMAT", np.array([[output_format.encode()]], dtype=np.object_), "BYTES")]
    for name, value in fields.items():
        if isinstance(value, float):
            out.append((name, np.array([[value]], dtype=np.float32), "FP32"))
        else:
            out.append((name, np.array([[value]], dtype=np.object_), "BYTES"))
    return out


@pytest.fixture(scope="module")
def image_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image-server")
    data = yaml.safe_load(CONFIG.read_text())
    data["optimizations"]["warmup"]["sizes"] = [[HEIGHT, WIDTH]]
    data["controlnet"] = {"load_format": "tiny", "source": None, "revision": None}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def image_server(image_config):
    triton = TritonServer(ROOT / "model_repository", config_path=image_config, http_port=0,
                          grpc_port=0, metrics_port=0,
                          log_file=image_config.parent / "server.log")
    with triton:
        yield triton
    assert triton.returncode == 0, triton.log_tail()


@pytest.fixture(scope="module")
def local_engine(image_config, image_server):
    """The same settings in this process (after the server wrote the tiny folders)."""
    return Engine(load_settings(image_config), torch.device("cpu"))


def _expected(engine, seed: int, fields: dict) -> np.ndarray:
    rows = {name: array for name, array, _ in tensors(seed, **fields)}
    return engine.run(parse_request(rows, engine.settings.defaults, engine.settings.limits,
                                    controlnet=True)).pixels[0]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_each_mode_through_the_server(image_server, local_engine, protocol, mode):
    client = new_client(image_server, protocol)
    answer = send(client, protocol, tensors(11, **MODES[mode]))
    assert answer.ok, answer
    pixels = answer.outputs["PIXELS"][0]
    assert pixels.shape == (HEIGHT, WIDTH, 3)  # the input's size: no HEIGHT/WIDTH given
    diff = np.abs(pixels.astype(int) - _expected(local_engine, 11, MODES[mode]).astype(int))
    assert diff.max() <= 1
    [meta] = metadata_of(answer.outputs)
    assert meta["mode"] == mode
    strength = MODES[mode].get("STRENGTH")
    assert meta["denoise_steps"] == (STEPS - int(STEPS - STEPS * np.float32(strength))
                                     if strength else STEPS)
    assert meta["timings_ms"]["vae_encode"] > 0
    assert ("control" in meta["timings_ms"]) == mode.startswith("controlnet")


def test_a_png_answer_and_an_explicit_size(image_server):
    client = new_client(image_server, "grpc")
    answer = send(client, "grpc", tensors(3, "png", **MODES["image_to_image"]) + [
        ("HEIGHT", np.array([[128]], dtype=np.int32), "INT32"),
        ("WIDTH", np.array([[64]], dtype=np.int32), "INT32")])
    assert answer.ok, answer
    assert Image.open(io.BytesIO(answer.outputs["IMAGE"][0][0])).size == (64, 128)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_bad_image_fails_only_its_own_request(image_server, protocol):
    bad = {"IMAGE_INPUT": IMAGE[:len(IMAGE) // 2], "STRENGTH": 0.6}
    mismatched = {"IMAGE_INPUT": IMAGE, "MASK": png(np.zeros((32, 32), np.uint8))}
    jobs = [MODES["image_to_image"], bad, MODES["controlnet"], mismatched, {}]

    def one(fields):
        extra = [] if fields else [("HEIGHT", np.array([[64]], dtype=np.int32), "INT32"),
                                   ("WIDTH", np.array([[64]], dtype=np.int32), "INT32")]
        return send(new_client(image_server, protocol), protocol,
                    tensors(5, "png", **fields) + extra)

    with ThreadPoolExecutor(len(jobs)) as pool:  # together, so they can share an execute()
        answers = list(pool.map(one, jobs))
    assert [a.ok for a in answers] == [True, False, True, False, True], answers
    for answer, field in ((answers[1], "IMAGE_INPUT"), (answers[3], "MASK")):
        assert answer.status == INVALID_STATUS[protocol]
        assert names_field(answer.message, field), answer.message
    assert "corrupt" in answers[1].message and "32x32" in answers[3].message
    assert image_server.is_ready()


def test_the_new_stages_are_in_the_histogram(image_server):
    client = new_client(image_server, "grpc")
    assert send(client, "grpc", tensors(8, "png", **MODES["controlnet"])).ok
    samples = settled_scrape(image_server)
    for stage in ("vae_encode", "control"):
        assert metric(samples, "zimage_stage_duration_ms_count", stage=stage) >= 1


def test_the_startup_log_says_a_controlnet_is_loaded(image_server, image_config):
    log = (image_config.parent / "server.log").read_text()
    assert "controlnet: loaded (tiny" in log


def test_without_a_controlnet_control_image_is_refused(server, protocol):
    answer = send(new_client(server, protocol), protocol, tensors(1, **MODES["controlnet"]))
    assert answer.status == INVALID_STATUS[protocol]
    assert names_field(answer.message, "CONTROL_IMAGE") and "config.yaml" in answer.message
