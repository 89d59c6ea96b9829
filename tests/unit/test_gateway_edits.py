"""``POST /v1/images/edits`` without a server: the multipart form, OpenAI's masks turned into the
servers' (white where to repaint), and the request that reaches the server pool."""

from __future__ import annotations

import asyncio
import io
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from zimage_client import GeneratedImage, InvalidRequestError
from zimage_gateway import GatewaySettings, create_app
from zimage_gateway import settings as gateway_settings
from zimage_gateway.errors import ApiError, from_client_error
from zimage_gateway.masks import MAX_MASK_PIXELS, repaint_mask
from zimage_gateway.params import form_values, parse_edit
from zimage_gateway.pool import ServerPool
from zimage_gateway.metrics import GatewayMetrics

MODEL = "Tongyi-MAI/Z-Image-Turbo"
KEY = "k" * 20
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(autouse=True)
def no_gateway_environment(monkeypatch):
    for name in [n for n in os.environ if n.startswith(gateway_settings.ENV_PREFIX)]:
        monkeypatch.delenv(name)


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def openai_mask(size=(32, 16), mode="RGBA") -> Image.Image:
    """Opaque everywhere but the left half of the top row band, which is fully transparent (edit)."""
    alpha = np.full((size[1], size[0]), 255, np.uint8)
    alpha[: size[1] // 2, : size[0] // 2] = 0
    alpha[-1, -1] = 1  # almost transparent is not transparent: OpenAI edits alpha 0 only
    colour = Image.new("RGB", size, (200, 30, 30))
    if mode == "LA":
        return Image.merge("LA", (colour.convert("L"), Image.fromarray(alpha)))
    return Image.merge("RGBA", (*colour.split(), Image.fromarray(alpha)))


def expected_repaint(size=(32, 16)) -> np.ndarray:
    repaint = np.zeros((size[1], size[0]), np.uint8)
    repaint[: size[1] // 2, : size[0] // 2] = 255
    return repaint


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


IMAGE = encoded(Image.new("RGB", (32, 16), "white"))


def edit(fields=None, files=None, **kwargs):
    return parse_edit({"prompt": "a fox", **(fields or {})}, {"image": [IMAGE], **(files or {})},
                      model_id=MODEL, max_n=4, **kwargs)


# ---------------------------------------------------------------------- masks


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_become_white_the_rest_black(mode):
    mask = decoded(repaint_mask(encoded(openai_mask(mode=mode))))
    assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (32, 16))
    np.testing.assert_array_equal(np.asarray(mask), expected_repaint())


def test_palette_and_webp_masks_carry_their_transparency():
    palette = openai_mask().convert("P")  # Pillow keeps the transparent entry as tRNS
    palette.info["transparency"] = palette.getpixel((0, 0))
    np.testing.assert_array_equal(np.asarray(decoded(repaint_mask(encoded(palette))))[:8, :16], 255)
    webp = decoded(repaint_mask(encoded(openai_mask(), "WEBP", lossless=True)))
    np.testing.assert_array_equal(np.asarray(webp), expected_repaint())


@pytest.mark.parametrize("data, message", [
    (encoded(Image.new("RGB", (8, 8))), "a RGB image without an alpha channel is not allowed"),
    (encoded(Image.new("L", (8, 8))), "a L image without an alpha channel is not allowed"),
    (encoded(Image.new("RGB", (8, 8)), "JPEG"), "not a PNG or WEBP image"),
    (b"GIF89a not really", "not a PNG or WEBP image"),
    (encoded(openai_mask())[:60], "cannot be decoded"),
])
def test_unusable_masks_are_refused_naming_the_field(data, message):
    with pytest.raises(ApiError) as raised:
        repaint_mask(data)
    assert (raised.value.status, raised.value.param) == (400, "mask")
    assert raised.value.message.startswith("mask: ") and message in raised.value.message


def test_a_mask_over_the_pixel_limit_is_refused_before_decoding(monkeypatch):
    big = encoded(Image.new("LA", (4097, 4096)))  # compresses to a few KiB
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self) or None)
    with pytest.raises(ApiError, match=rf"mask: 4097x4096 is not allowed; at most {MAX_MASK_PIXELS} pixels"):
        repaint_mask(big)
    assert loads == []


# ---------------------------------------------------------------------- form fields


def test_form_text_is_typed_as_a_json_body_would_be():
    assert form_values({"n": "2", "seed": "-1", "guidance_scale": "1.5", "strength": "0.6", "stream": "false",
                        "partial_images": "0", "prompt": "12", "size": "64x64"}) == {
        "n": 2, "seed": -1, "guidance_scale": 1.5, "strength": 0.6, "stream": False, "partial_images": 0,
        "prompt": "12", "size": "64x64"}
    assert form_values({"n": "2.0", "strength": "much", "stream": "maybe"}) == {
        "n": "2.0", "strength": "much", "stream": "maybe"}


def test_edit_fields_and_extensions():
    request = edit({"n": "2", "size": "64x48", "seed": "7", "strength": "0.6", "num_inference_steps": "4",
                    "negative_prompt": "blur", "response_format": "b64_json", "output_format": "webp",
                    "model": MODEL, "user": "u1", "stream": "false", "quality": "auto"},
                   {"mask": [encoded(openai_mask())]})
    assert (request.prompt, request.n, request.width, request.height, request.seeds()) == (
        "a fox", 2, 64, 48, (7, 8))
    assert (request.strength, request.num_inference_steps, request.output_format) == (0.6, 4, "webp")
    assert request.image == IMAGE
    np.testing.assert_array_equal(np.asarray(decoded(request.mask)), expected_repaint())
    plain = edit()
    assert (plain.mask, plain.strength, plain.image) == (None, None, IMAGE)


def test_the_first_of_image_list_is_the_image():
    request = parse_edit({"prompt": "p"}, {"image[]": [IMAGE]}, model_id=MODEL, max_n=4)
    assert request.image == IMAGE


@pytest.mark.parametrize("fields, files, param, message", [
    ({}, {"image": []}, "image", "0 image files are not allowed; exactly one is served"),
    ({}, {"image": [IMAGE], "image[]": [IMAGE]}, "image", "2 image files are not allowed"),
    ({}, {"image[]": [IMAGE, IMAGE]}, "image", "3 image files are not allowed"),
    ({}, {"mask": [b"a", b"b"]}, "mask", "2 mask files are not allowed; at most one"),
    ({"image": "https://example.com/a.png"}, {}, "image", "must be an uploaded file"),
    ({"mask": "x"}, {}, "mask", "must be an uploaded file"),
    ({"strength": "much"}, {}, "strength", "'much' is not allowed; must be a number"),
    ({"n": "2.0"}, {}, "n", "'2.0' is not allowed"),
    ({"n": "9"}, {}, "n", "9 is not allowed"),
    ({"stream": "true"}, {}, "stream", "streaming answers are not served"),
    ({"size": "big"}, {}, "size", "must be 'auto' or 'WIDTHxHEIGHT'"),
    ({"input_fidelity": "high"}, {}, "input_fidelity", "unknown parameter"),
])
def test_refused_edit_fields_are_named(fields, files, param, message):
    with pytest.raises(ApiError) as raised:
        parse_edit({"prompt": "p", **fields}, {"image": [IMAGE], **files}, model_id=MODEL, max_n=4)
    assert (raised.value.status, raised.value.param) == (400, param)
    assert message in raised.value.message


def test_the_mask_is_decoded_only_after_the_form_passed(monkeypatch):
    decoded_masks = []
    monkeypatch.setattr("zimage_gateway.params.repaint_mask", lambda data: decoded_masks.append(data))
    with pytest.raises(ApiError):
        edit({"n": "99"}, {"mask": [b"mask"]})
    assert decoded_masks == []
    with pytest.raises(ApiError, match="prompt: None is not allowed"):
        parse_edit({}, {"image": [IMAGE], "mask": [b"mask"]}, model_id=MODEL, max_n=4)
    assert decoded_masks == []


def test_server_errors_about_image_inputs_name_the_form_fields():
    for tensor, param in (("IMAGE_INPUT", "image"), ("MASK", "mask"), ("STRENGTH", "strength")):
        answer = from_client_error(InvalidRequestError(f"{tensor}: 3 bytes are not an image", "INVALID_ARG"))
        assert (answer.status, answer.param) == (400, param)


# ---------------------------------------------------------------------- the route


class RecordingPool(ServerPool):
    """The real pool, with each server's client answering from here: what the route sends is kept."""

    def __init__(self):
        super().__init__(["grpc://s0:8001"], model_name="zimage", inference_timeout_s=10, retries=0,
                         retry_backoff_s=0.01, metrics=GatewayMetrics())
        self.calls = []

        async def generate(prompt, **kwargs):
            self.calls.append({"prompt": prompt, **kwargs})
            data = encoded(Image.new("RGB", (32, 16), "red"))
            return GeneratedImage(Image.open(io.BytesIO(data)), data, None, kwargs["seed"] or 1, "png", {}, {})

        self._servers[0].client.generate = generate


def app_client(**settings):
    pool = RecordingPool()
    app = create_app(GatewaySettings(servers=("grpc://s0:8001",), api_keys=(KEY,), **settings), pool=pool)
    return TestClient(app), pool


def test_route_sends_image_mask_and_strength_to_the_servers():
    client, pool = app_client()
    answer = client.post("/v1/images/edits", headers=AUTH,
                         data={"prompt": "a fox", "n": "2", "seed": "3", "strength": "0.6", "size": "32x16"},
                         files=[("image", ("in.png", IMAGE, "image/png")),
                                ("mask", ("mask.png", encoded(openai_mask()), "image/png"))])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["data"]) == 2 and [d["seed"] for d in body["data"]] == [3, 4]
    assert [c["seed"] for c in pool.calls] == [3, 4]
    for call in pool.calls:
        assert (call["prompt"], call["image"], call["strength"], call["width"], call["height"]) == (
            "a fox", IMAGE, 0.6, 32, 16)
        np.testing.assert_array_equal(np.asarray(decoded(call["mask"])), expected_repaint())


def test_route_without_mask_is_image_to_image():
    client, pool = app_client()
    answer = client.post("/v1/images/edits", headers=AUTH, data={"prompt": "a fox"},
                         files={"image[]": ("in.png", IMAGE, "image/png")})
    assert answer.status_code == 200, answer.text
    assert (pool.calls[0]["image"], pool.calls[0]["mask"], pool.calls[0]["strength"]) == (IMAGE, None, None)


@pytest.mark.parametrize("kwargs, status, code", [
    ({"data": {"prompt": "p"}, "files": {"mask": ("m.png", encoded(openai_mask()))}}, 400, "invalid_value"),
    ({"data": {"prompt": "p"}}, 400, "invalid_form"),  # urlencoded: no files
    ({"json": {"prompt": "p", "image": "x"}}, 400, "invalid_form"),
    ({"data": {"prompt": "p"}, "files": {"image": ("a", IMAGE), "other": ("b", b"x")}}, 400, "unknown_parameter"),
    ({"data": {"prompt": "p", "n": ["1", "2"]}, "files": {"image": ("a", IMAGE)}}, 400, "invalid_value"),
    # python-multipart reads a broken form as an empty one: no image.
    ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400,
     "invalid_value"),
    ({"content": b"--x\r\n\r\n", "headers": {"content-type": "multipart/form-data"}}, 400, "invalid_form"),
])
def test_route_refuses_bad_forms(kwargs, status, code):
    client, pool = app_client()
    headers = {**AUTH, **kwargs.pop("headers", {})}
    answer = client.post("/v1/images/edits", headers=headers, **kwargs)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code and answer.headers["x-should-retry"] == "false"
    assert pool.calls == []


def test_route_limits_the_body_and_asks_for_a_key():
    client, pool = app_client(max_image_bytes=4096)
    big = client.post("/v1/images/edits", headers=AUTH, data={"prompt": "p"},
                      files={"image": ("a.png", os.urandom(5000), "image/png")})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    anonymous = client.post("/v1/images/edits", data={"prompt": "p"}, files={"image": ("a.png", IMAGE)})
    assert anonymous.status_code == 401
    assert pool.calls == []


def test_uploads_stay_in_memory(monkeypatch):
    """The gateway's root filesystem is read-only in Kubernetes: a multi-MiB upload must not spool to disk."""
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    client, pool = app_client()
    photo = os.urandom(3 * 2**20)
    answer = client.post("/v1/images/edits", headers=AUTH, data={"prompt": "p"},
                         files={"image": ("a.png", photo, "image/png")})
    assert answer.status_code == 200, answer.text
    assert pool.calls[0]["image"] == photo


def test_variations_stay_unserved():
    client, _ = app_client()
    answer = client.post("/v1/images/variations", headers=AUTH, files={"image": ("a.png", IMAGE)})
    assert answer.status_code == 501 and answer.json()["error"]["code"] == "unsupported_endpoint"
    assert "/v1/images/edits" in answer.json()["error"]["message"]


def test_settings_take_the_edit_body_limit(monkeypatch):
    monkeypatch.setenv("ZIMAGE_GATEWAY_MAX_IMAGE_BYTES", "1234")
    assert gateway_settings.parse_args(["--server", "h:8001", "--allow-anonymous"]).max_image_bytes == 1234
    with pytest.raises(ValueError, match="max_image_bytes must be at least 1"):
        GatewaySettings(servers=("h:8001",), allow_anonymous=True, max_image_bytes=0)


def test_pool_passes_no_image_inputs_for_generations():
    pool = RecordingPool()
    from zimage_gateway.params import parse_generation

    asyncio.run(pool.generate(parse_generation({"prompt": "p"}, model_id=MODEL, max_n=4)))
    assert (pool.calls[0]["image"], pool.calls[0]["mask"], pool.calls[0]["strength"]) == (None, None, None)
