"""Image inputs (issue 14) through the real server with our client, its command line and
perf_analyzer: image-to-image, inpainting and ControlNet (test_image_inputs' server with a tiny
random ControlNet), over gRPC and HTTP. That each mode gives diffusers' image is the server's tests' job;
here: the client's arguments arrive as the images they stand for, and errors name the field."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import ROOT
from tests.e2e.helpers import perf_analyzer
# The server side's server with the tiny random ControlNet (config.yaml ``controlnet``).
from tests.e2e.test_image_inputs import image_config, image_server  # noqa: F401 (fixtures)
from zimage_client import InvalidRequestError, ZImageClient

pytestmark = pytest.mark.e2e

SIZE = 64
# Four steps at strength 0.5 run the last two (diffusers' rule): at strength 1, or at 0.6 of two
# steps, the schedule starts from pure noise and the image makes no difference.
QUICK = {"num_inference_steps": 4, "seed": 3}
STRENGTH = 0.5


def picture(shade: int = 0) -> Image.Image:
    rows = np.linspace(0, 255, SIZE, dtype=np.float32)[:, None]
    pixels = np.stack([np.broadcast_to(rows, (SIZE, SIZE)),
                       np.broadcast_to(rows.T, (SIZE, SIZE)),
                       np.full((SIZE, SIZE), shade, np.float32)], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).ellipse([16, 8, 40, 32], fill=(250, 220, 90))
    return image


def repaint_lower_half() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle([0, SIZE // 2, SIZE - 1, SIZE - 1], fill=255)
    return mask


def edges() -> Image.Image:
    control = Image.new("RGB", (SIZE, SIZE), 0)
    ImageDraw.Draw(control).ellipse([16, 8, 40, 32], outline=(255, 255, 255), width=2)
    return control


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(result) -> np.ndarray:
    return np.asarray(result.image.convert("RGB"))


@pytest.fixture()
def control_client(image_server, protocol):  # noqa: F811
    url = image_server.grpc_url if protocol == "grpc" else image_server.http_url
    with ZImageClient(url, protocol=protocol, inference_timeout_s=120) as c:
        yield c


# ---------------------------------------------------------------------- image-to-image, inpainting


def test_image_to_image_is_the_same_for_a_path_bytes_and_a_pil_image(client, tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(png(picture()))
    from_pil = client.generate("a fox", image=picture(), strength=STRENGTH, **QUICK)
    assert from_pil.image.size == (SIZE, SIZE)  # no HEIGHT/WIDTH: the input's size
    for same in (path, str(path), path.read_bytes()):
        np.testing.assert_array_equal(pixels(client.generate("a fox", image=same, strength=STRENGTH, **QUICK)),
                                      pixels(from_pil))


def test_the_image_and_the_strength_change_the_result(client):
    base = pixels(client.generate("a fox", image=picture(), strength=STRENGTH, **QUICK))
    text_only = pixels(client.generate("a fox", height=SIZE, width=SIZE, **QUICK))
    other_image = pixels(client.generate("a fox", image=picture(shade=200), strength=STRENGTH, **QUICK))
    other_strength = pixels(client.generate("a fox", image=picture(), strength=0.75, **QUICK))
    for different in (text_only, other_image, other_strength):
        assert not np.array_equal(base, different)


def test_inpainting_takes_the_mask(client):
    img2img = pixels(client.generate("a pond", image=picture(), strength=1.0, **QUICK))
    inpaint = client.generate("a pond", image=picture(), mask=repaint_lower_half(), strength=1.0, **QUICK)
    assert inpaint.image.size == (SIZE, SIZE) and not np.array_equal(pixels(inpaint), img2img)
    again = client.generate("a pond", image=png(picture()), mask=png(repaint_lower_half()), strength=1.0, **QUICK)
    np.testing.assert_array_equal(pixels(again), pixels(inpaint))


@pytest.mark.parametrize("kwargs, field", [
    ({"image": b"not an image"}, "IMAGE_INPUT"),
    ({"image": picture(), "mask": Image.new("L", (SIZE * 2, SIZE), 255)}, "MASK"),
    ({"image": picture(), "strength": 1.5}, "STRENGTH"),
    ({"control_image": edges()}, "CONTROL_IMAGE"),  # this server has no ControlNet
])
def test_the_server_refuses_naming_the_field(client, kwargs, field):
    with pytest.raises(InvalidRequestError) as raised:
        client.generate("a fox", **kwargs, **QUICK)
    assert re.search(rf"(^|\W){field}\b", raised.value.message), raised.value.message


def test_generate_many_sends_the_image_with_every_prompt(client):
    results = client.generate_many(["a fox", "a cat"], image=picture(), strength=STRENGTH, seed=3,
                                   num_inference_steps=4)
    single = client.generate("a cat", image=picture(), strength=STRENGTH, seed=4, num_inference_steps=4)
    assert [r.seed for r in results] == [3, 4]
    np.testing.assert_array_equal(pixels(results[1]), pixels(single))


# ---------------------------------------------------------------------- ControlNet


def test_controlnet_follows_the_control_image_and_its_scale(control_client):
    guided = control_client.generate("a fox", control_image=edges(), control_scale=0.7, **QUICK)
    assert guided.image.size == (SIZE, SIZE)
    again = control_client.generate("a fox", control_image=png(edges()), control_scale=0.7, **QUICK)
    np.testing.assert_array_equal(pixels(again), pixels(guided))
    weaker = control_client.generate("a fox", control_image=edges(), control_scale=0.2, **QUICK)
    assert not np.array_equal(pixels(weaker), pixels(guided))


def test_controlnet_inpainting(control_client):
    result = control_client.generate("a pond", image=picture(), mask=repaint_lower_half(), control_image=edges(),
                                     control_scale=0.7, **QUICK)
    assert result.image.size == (SIZE, SIZE)


# ---------------------------------------------------------------------- command line


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zimage_client", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_inpainting_writes_the_servers_image(server, tmp_path):
    (tmp_path / "in.png").write_bytes(png(picture()))
    (tmp_path / "mask.png").write_bytes(png(repaint_lower_half()))
    run = cli("a pond", "--url", f"grpc://{server.grpc_url}", "--image", str(tmp_path / "in.png"),
              "--mask", str(tmp_path / "mask.png"), "--strength", "1.0", "--steps", "4", "--seed", "3",
              "--output-dir", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    (written,) = (tmp_path / "out").iterdir()
    with ZImageClient(server.grpc_url) as client:
        expected = client.generate("a pond", image=picture(), mask=repaint_lower_half(), strength=1.0, **QUICK)
    with Image.open(written) as image:
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), pixels(expected))


def test_cli_exits_2_with_the_servers_message(server, tmp_path):
    (tmp_path / "broken.png").write_bytes(png(picture())[:100])
    run = cli("a fox", "--url", f"grpc://{server.grpc_url}", "--image", str(tmp_path / "broken.png"),
              "--steps", "4", "--output-dir", str(tmp_path / "out"))
    assert run.returncode == 2 and "IMAGE_INPUT" in run.stderr, run.stderr


# ---------------------------------------------------------------------- perf_analyzer


def image_inputs(tmp_path, mode: str):
    path = tmp_path / f"{mode}.json"
    run = subprocess.run([sys.executable, str(ROOT / "perf" / "make_image_input.py"), "--mode", mode,
                          "--size", str(SIZE), "--steps", "1", "--output", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return path


# Count windows: a window of time on a loaded 2-core machine may hold no finished image-mode request.
PERF_ARGS = ["--concurrency-range", "1:1", "--measurement-mode", "count_windows", "--measurement-request-count", "3",
             "--max-trials", "3", "--stability-percentage", "1000"]


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_perf_analyzer_with_the_image_input_data(server, tmp_path, mode):
    output = perf_analyzer(server, tmp_path, 1, PERF_ARGS, timeout_s=240, inputs=image_inputs(tmp_path, mode))
    throughputs = [float(x) for x in re.findall(r"Throughput: ([\d.]+) infer/sec", output)]
    assert len(throughputs) == 1 and throughputs[0] > 0, output
    assert "error" not in output.lower(), output


def test_perf_analyzer_with_the_control_input_data(image_server, tmp_path):  # noqa: F811
    output = perf_analyzer(image_server, tmp_path, 1, PERF_ARGS, timeout_s=240,
                           inputs=image_inputs(tmp_path, "control"))
    assert re.search(r"Throughput: [\d.]*[1-9][\d.]* infer/sec", output) and "error" not in output.lower(), output
