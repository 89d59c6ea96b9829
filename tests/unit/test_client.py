"""Unit tests for the zimage_client package; no Triton server needed.

Besides pure functions, a few tests talk to tiny in-process stand-ins for Triton
(a gRPC servicer built from tritonclient's own protobufs and a KServe-v2 HTTP
handler) that follow the ``zimage`` contract.  They exercise the real tritonclient
transports, status codes and threading, which fakes of tritonclient itself would hide.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
    np_to_triton_dtype,
    triton_to_np_dtype,
)

import zimage_client
from zimage_client import (
    AsyncZImageClient,
    GeneratedImage,
    InvalidRequestError,
    QueueFullError,
    QueueTimeoutError,
    RequestCancelledError,
    ResourceExhaustedError,
    ServerUnavailableError,
    ZImageClient,
    ZImageConnectionError,
    ZImageError,
    ZImageResponseError,
    ZImageServerError,
    ZImageTimeoutError,
    map_triton_error,
)
from zimage_client import cli
from zimage_client._endpoint import parse_endpoint
from zimage_client._fanout import expand_seeds
from zimage_client._tensors import GenerateRequest, parse_result, to_infer_inputs
from zimage_client.errors import map_transport_error

CLIENT_ROOT = Path(zimage_client.__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_port():
    """A listening socket that accepts connections but never answers (a hung server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock
    sock.close()


class FakeResult:
    """Mimics tritonclient's InferResult: only ``as_numpy`` is used by the client."""

    def __init__(self, outputs):
        self._outputs = outputs

    def as_numpy(self, name):
        return self._outputs.get(name)


def _png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _metadata(obj) -> np.ndarray:
    return np.array([[json.dumps(obj).encode()]], dtype=np.object_)


def _test_pixels(height=32, width=48, seed=0) -> np.ndarray:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = seed % 256
    pixels[..., 1] = (np.arange(width) * 5 % 256)[None, :]
    pixels[..., 2] = (np.arange(height) * 7 % 256)[:, None]
    return pixels


# --------------------------------------------------------------- fake Triton model


class FakeFailure(Exception):
    def __init__(self, grpc_code, http_status, message):
        super().__init__(message)
        self.grpc_code, self.http_status, self.message = grpc_code, http_status, message


def fake_zimage(inputs, requested):
    """The zimage contract in miniature: magic prompts trigger the server errors under test."""
    prompt = inputs["PROMPT"][0, 0].decode("utf-8")
    if prompt == "__unavailable__":
        raise FakeFailure(grpc.StatusCode.UNAVAILABLE, 503, "Exceeds maximum queue size")
    if prompt == "__queue_timeout__":
        raise FakeFailure(grpc.StatusCode.UNAVAILABLE, 503, "Request timeout expired")
    if prompt == "__oom__":
        raise FakeFailure(grpc.StatusCode.INTERNAL, 500, "CUDA out of memory. Tried to allocate 2.00 GiB")
    if prompt == "__slow__":
        time.sleep(1.5)
    size = {}
    for name in ("HEIGHT", "WIDTH"):
        value = int(inputs[name][0, 0]) if name in inputs else 32
        if value % 16:
            message = f"{name}: {value} is not allowed; must be a multiple of 16 in [16, 2048]"
            raise FakeFailure(grpc.StatusCode.INVALID_ARGUMENT, 400, message)
        size[name] = value
    seed = int(inputs["SEED"][0, 0]) if "SEED" in inputs else 777
    fmt = inputs["OUTPUT_FORMAT"][0, 0].decode() if "OUTPUT_FORMAT" in inputs else "png"
    pixels = _test_pixels(size["HEIGHT"], size["WIDTH"], seed)
    metadata = {
        "timings_ms": {"queue": 1.5, "compute": 10.0},
        "received": sorted(inputs),
        "prompt": prompt,
        "dtypes": {k: str(v.dtype) for k, v in inputs.items()},
        "shapes": {k: list(v.shape) for k, v in inputs.items()},
    }
    outputs = {"SEED": np.array([[seed]], dtype=np.int64), "METADATA": _metadata(metadata)}
    if fmt == "raw":
        outputs["PIXELS"] = pixels[None]
    else:
        encoded = _png_bytes(pixels, {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt])
        outputs["IMAGE"] = np.array([[encoded]], dtype=np.object_)
    if requested:
        outputs = {k: v for k, v in outputs.items() if k in requested}
    return outputs


def _decode_tensor(datatype, shape, raw):
    if datatype == "BYTES":
        return deserialize_bytes_tensor(raw).reshape(shape)
    return np.frombuffer(raw, dtype=triton_to_np_dtype(datatype)).reshape(shape)


def _encode_tensor(array):
    if array.dtype == np.object_:
        return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
    return np.ascontiguousarray(array).tobytes()


class _FakeTritonGrpc(service_pb2_grpc.GRPCInferenceServiceServicer):
    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=request.name == "zimage")

    def ModelConfig(self, request, context):
        return service_pb2.ModelConfigResponse(config=model_config_pb2.ModelConfig(name=request.name, max_batch_size=4))

    def ModelInfer(self, request, context):
        if request.model_name != "zimage":
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.model_name}' is not found")
        inputs = {
            tensor.name: _decode_tensor(tensor.datatype, list(tensor.shape), raw)
            for tensor, raw in zip(request.inputs, request.raw_input_contents)
        }
        try:
            outputs = fake_zimage(inputs, [o.name for o in request.outputs])
        except FakeFailure as failure:
            context.abort(failure.grpc_code, failure.message)
        response = service_pb2.ModelInferResponse(model_name=request.model_name)
        for name, array in outputs.items():
            tensor = response.outputs.add(name=name, datatype=np_to_triton_dtype(array.dtype))
            tensor.shape.extend(array.shape)
            response.raw_output_contents.append(_encode_tensor(array))
        return response


class _FakeTritonHttp(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status, body=b"", headers=()):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout tests)

    def do_GET(self):
        if self.path in ("/v2/health/live", "/v2/health/ready", "/v2/models/zimage/ready"):
            self._send(200)
        elif self.path == "/v2/models/zimage/config":
            self._send(200, json.dumps({"name": "zimage", "max_batch_size": 4}).encode())
        else:
            self._send(400, json.dumps({"error": f"unknown path {self.path}"}).encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != "/v2/models/zimage/infer":
            self._send(404, json.dumps({"error": "Request for unknown model"}).encode())
            return
        header_length = int(self.headers.get("Inference-Header-Content-Length", len(body)))
        header = json.loads(body[:header_length])
        offset, inputs = header_length, {}
        for spec in header["inputs"]:
            size = spec["parameters"]["binary_data_size"]
            inputs[spec["name"]] = _decode_tensor(spec["datatype"], spec["shape"], body[offset : offset + size])
            offset += size
        try:
            outputs = fake_zimage(inputs, [o["name"] for o in header.get("outputs", [])])
        except FakeFailure as failure:
            self._send(failure.http_status, json.dumps({"error": failure.message}).encode())
            return
        specs, blobs = [], []
        for name, array in outputs.items():
            blob = _encode_tensor(array)
            specs.append(
                {"name": name, "datatype": np_to_triton_dtype(array.dtype), "shape": list(array.shape),
                 "parameters": {"binary_data_size": len(blob)}}
            )
            blobs.append(blob)
        head = json.dumps({"model_name": "zimage", "outputs": specs}).encode()
        self._send(200, head + b"".join(blobs), [("Inference-Header-Content-Length", str(len(head)))])


@pytest.fixture(scope="module")
def grpc_url():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_FakeTritonGrpc(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"grpc://127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def http_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeTritonHttp)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(params=["grpc", "http"])
def server_url(request, grpc_url, http_url):
    return grpc_url if request.param == "grpc" else http_url


def _received(image: GeneratedImage):
    return image.metadata["received"]


# ------------------------------------------------------------------ request tensors


def test_minimal_request_sends_only_prompt_and_format():
    arrays = GenerateRequest("a fox").input_arrays()
    assert list(arrays) == ["PROMPT", "OUTPUT_FORMAT"]
    assert arrays["PROMPT"].shape == (1, 1) and arrays["PROMPT"].dtype == np.object_
    assert arrays["PROMPT"][0, 0] == b"a fox"
    assert arrays["OUTPUT_FORMAT"][0, 0] == b"png"


def test_output_format_none_is_left_to_server_default():
    assert "OUTPUT_FORMAT" not in GenerateRequest("a fox", output_format=None).input_arrays()


def test_full_request_names_dtypes_and_shapes():
    request = GenerateRequest(
        "rainy street, 夜",
        negative_prompt="blurry",
        height=512,
        width=768,
        num_inference_steps=8,
        guidance_scale=1.5,
        seed=2**40,
        output_format="JPG",
    )
    arrays = request.input_arrays()
    expected = {
        "PROMPT": np.object_,
        "NEGATIVE_PROMPT": np.object_,
        "HEIGHT": np.int32,
        "WIDTH": np.int32,
        "NUM_INFERENCE_STEPS": np.int32,
        "GUIDANCE_SCALE": np.float32,
        "SEED": np.int64,
        "OUTPUT_FORMAT": np.object_,
    }
    assert {name: array.dtype.type for name, array in arrays.items()} == expected
    assert all(array.shape == (1, 1) for array in arrays.values())
    assert arrays["PROMPT"][0, 0] == "rainy street, 夜".encode("utf-8")
    assert arrays["SEED"][0, 0] == 2**40
    assert arrays["GUIDANCE_SCALE"][0, 0] == pytest.approx(1.5)
    assert arrays["OUTPUT_FORMAT"][0, 0] == b"jpeg"  # "JPG" normalised


def test_infer_inputs_carry_triton_datatypes():
    import tritonclient.grpc as tgrpc

    request = GenerateRequest("x", height=256, guidance_scale=0.0, seed=1)
    inputs = {i.name(): i for i in to_infer_inputs(request.input_arrays(), tgrpc)}
    assert {n: i.datatype() for n, i in inputs.items()} == {
        "PROMPT": "BYTES", "HEIGHT": "INT32", "GUIDANCE_SCALE": "FP32", "SEED": "INT64", "OUTPUT_FORMAT": "BYTES"
    }
    assert all(list(i.shape()) == [1, 1] for i in inputs.values())


def test_requested_outputs_depend_on_format():
    assert GenerateRequest("x").output_names() == ("IMAGE", "SEED", "METADATA")
    assert GenerateRequest("x", output_format="raw").output_names() == ("PIXELS", "SEED", "METADATA")


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"height": "512"}, TypeError),
        ({"width": 512.0}, TypeError),
        ({"num_inference_steps": True}, TypeError),
        ({"guidance_scale": "1"}, TypeError),
        ({"height": 2**31}, ValueError),
        ({"seed": 2**63}, ValueError),
        ({"negative_prompt": b"bytes"}, TypeError),
        ({"output_format": 3}, TypeError),
    ],
)
def test_request_rejects_values_that_cannot_be_tensors(kwargs, error):
    with pytest.raises(error):
        GenerateRequest("x", **kwargs)


def test_prompt_must_be_text():
    with pytest.raises(TypeError):
        GenerateRequest(b"bytes prompt")


def test_numpy_integers_are_accepted():
    arrays = GenerateRequest("x", height=np.int64(512), seed=np.uint32(7)).input_arrays()
    assert arrays["HEIGHT"][0, 0] == 512 and arrays["SEED"][0, 0] == 7


@pytest.mark.parametrize(
    "seed, expected",
    [(None, [None, None, None]), (10, [10, 11, 12]), ([5, 1, 9], [5, 1, 9]), ((0, 0, 0), [0, 0, 0])],
)
def test_expand_seeds(seed, expected):
    assert expand_seeds(seed, 3) == expected


@pytest.mark.parametrize("seed, error", [([1, 2], ValueError), ("12", TypeError), (1.5, TypeError)])
def test_expand_seeds_rejects_bad_seeds(seed, error):
    with pytest.raises(error):
        expand_seeds(seed, 3)


# ------------------------------------------------------------------ response parsing


def test_parse_png_result():
    pixels = _test_pixels(32, 48, seed=3)
    data = _png_bytes(pixels)
    metadata = {"timings_ms": {"queue": 1.2, "denoise": 500.0, "custom": 3}, "batch_size": 2, "weights": "random"}
    result = FakeResult(
        {
            "IMAGE": np.array([[data]], dtype=np.object_),
            "SEED": np.array([[1234]], dtype=np.int64),
            "METADATA": _metadata(metadata),
        }
    )
    image = parse_result(result, GenerateRequest("x"))
    assert image.data == data
    assert image.format == "png" and image.extension == ".png"
    assert image.seed == 1234 and isinstance(image.seed, int)
    assert image.image.size == (48, 32)
    assert image.pixels.shape == (32, 48, 3) and image.pixels.dtype == np.uint8
    np.testing.assert_array_equal(image.pixels, pixels)
    assert image.metadata == metadata
    assert image.timings_ms == {"queue": 1.2, "denoise": 500.0, "custom": 3}
    assert "1234" in repr(image) and len(repr(image)) < 1000  # no image bytes in the repr
    assert image != parse_result(result, GenerateRequest("x"))  # identity, not an ambiguous array comparison


def test_parse_jpeg_result_reports_detected_format():
    data = _png_bytes(_test_pixels(), "JPEG")
    result = FakeResult({"IMAGE": np.array([[data]], dtype=np.object_), "SEED": np.array([[1]]), "METADATA": None})
    image = parse_result(result, GenerateRequest("x", output_format="jpeg"))
    assert image.format == "jpeg" and image.extension == ".jpg"
    assert image.data == data


def test_parse_raw_result():
    pixels = _test_pixels(16, 32, seed=9)
    result = FakeResult(
        {"PIXELS": pixels[None], "SEED": np.array([[5]], dtype=np.int64), "METADATA": _metadata({"timings_ms": {}})}
    )
    image = parse_result(result, GenerateRequest("x", output_format="raw"))
    assert image.data is None
    assert image.format == "raw" and image.extension == ".png"
    assert image.image.mode == "RGB" and image.image.size == (32, 16)
    np.testing.assert_array_equal(image.pixels, pixels)
    np.testing.assert_array_equal(np.asarray(image.image), pixels)


def test_save_writes_encoded_bytes_unchanged(tmp_path):
    data = _png_bytes(_test_pixels(), "JPEG")
    image = parse_result(
        FakeResult({"IMAGE": np.array([[data]], dtype=np.object_), "SEED": np.array([[1]]), "METADATA": None}),
        GenerateRequest("x", output_format="jpeg"),
    )
    path = image.save(tmp_path / "out.jpg")
    assert path.read_bytes() == data


def test_save_raw_writes_lossless_png(tmp_path):
    pixels = _test_pixels(16, 16, seed=200)
    image = parse_result(
        FakeResult({"PIXELS": pixels[None], "SEED": np.array([[1]]), "METADATA": None}),
        GenerateRequest("x", output_format="raw"),
    )
    path = image.save(tmp_path / "raw.png")
    with Image.open(path) as reloaded:
        assert reloaded.format == "PNG"
        np.testing.assert_array_equal(np.asarray(reloaded), pixels)


@pytest.mark.parametrize("metadata", [None, np.array([[b"not json"]], dtype=np.object_), _metadata([1, 2])])
def test_unusable_metadata_does_not_lose_the_image(metadata):
    data = _png_bytes(_test_pixels())
    image = parse_result(
        FakeResult({"IMAGE": np.array([[data]], dtype=np.object_), "SEED": np.array([[1]]), "METADATA": metadata}),
        GenerateRequest("x"),
    )
    assert image.metadata == {} and image.timings_ms == {} and image.data == data


@pytest.mark.parametrize(
    "outputs, request_kwargs",
    [
        ({"IMAGE": np.array([[b"png?"]], dtype=np.object_), "SEED": None}, {}),
        ({"SEED": np.array([[1]])}, {}),
        ({"IMAGE": np.array([[b"\x89PNG garbage"]], dtype=np.object_), "SEED": np.array([[1]])}, {}),
        ({"SEED": np.array([[1]])}, {"output_format": "raw"}),
        ({"PIXELS": np.zeros((1, 4, 4), np.uint8), "SEED": np.array([[1]])}, {"output_format": "raw"}),
        ({"PIXELS": np.zeros((1, 4, 4, 3), np.float32), "SEED": np.array([[1]])}, {"output_format": "raw"}),
    ],
)
def test_contract_violations_raise_response_error(outputs, request_kwargs):
    with pytest.raises(ZImageResponseError):
        parse_result(FakeResult(outputs), GenerateRequest("x", **request_kwargs))



def _png_result(data: bytes) -> FakeResult:
    return FakeResult({"IMAGE": np.array([[data]], dtype=np.object_), "SEED": np.array([[7]]), "METADATA": None})


@pytest.fixture
def count_loads(monkeypatch):
    """Records each full decode; header parsing never calls ``ImageFile.load``."""
    from PIL import ImageFile

    calls = []
    original = ImageFile.ImageFile.load

    def load(self):
        if self.tile:  # load() on an already decoded image is a no-op with no tiles left
            calls.append(self)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


def test_parse_encoded_result_does_not_decode(count_loads, tmp_path):
    data = _png_bytes(_test_pixels(32, 48, seed=1))
    image = parse_result(_png_result(data), GenerateRequest("x"))
    assert (image.width, image.height) == (48, 32)
    assert image.data == data and image.format == "png"
    assert image.save(tmp_path / "out.png").read_bytes() == data
    assert "seed=7" in repr(image)
    assert count_loads == []


def test_pixels_decode_once_on_first_access(count_loads):
    pixels = _test_pixels(32, 48, seed=2)
    image = parse_result(_png_result(_png_bytes(pixels)), GenerateRequest("x"))
    first = image.pixels
    assert len(count_loads) == 1
    np.testing.assert_array_equal(first, pixels)
    assert not first.flags.writeable
    assert image.pixels is first
    assert image.image.size == (48, 32) and image.image.mode == "RGB"
    assert len(count_loads) == 1  # image reuses the decode pixels needed


def test_image_access_decodes_without_building_pixels(count_loads):
    pixels = _test_pixels(16, 16, seed=4)
    image = parse_result(_png_result(_png_bytes(pixels)), GenerateRequest("x"))
    decoded = image.image
    assert image.image is decoded and len(count_loads) == 1
    np.testing.assert_array_equal(np.asarray(decoded), pixels)


def test_non_rgb_encoded_image_gives_rgb_pixels():
    rgba = np.dstack([_test_pixels(8, 8, seed=5), np.full((8, 8), 128, np.uint8)])
    image = parse_result(_png_result(_png_bytes(rgba)), GenerateRequest("x"))
    assert image.image.mode == "RGBA"
    np.testing.assert_array_equal(image.pixels, rgba[..., :3])


def test_truncated_body_fails_on_first_pixel_access():
    data = _png_bytes(_test_pixels(64, 64, seed=6))
    truncated = data[: len(data) // 2]
    image = parse_result(_png_result(truncated), GenerateRequest("x"))  # the header is intact
    assert (image.width, image.height) == (64, 64)
    with pytest.raises(ZImageResponseError, match=rf"\({len(truncated)} B\)"):
        _ = image.pixels
    with pytest.raises(ZImageResponseError):
        _ = image.image


@pytest.mark.parametrize("body", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_garbage_body_fails_inside_parse(body):
    with pytest.raises(ZImageResponseError, match=rf"\({len(body)} B\)"):
        parse_result(_png_result(body), GenerateRequest("x"))


@pytest.mark.parametrize(
    "timings, expected",
    [
        ({"total": 99.0, "queue": 1.0}, 99.0),
        ({"queue": 1.0, "compute": 50.0}, 51.0),
        (
            dict(wait=0.5, text_encode=9.0, denoise=12.0, vae_decode=17.0, compute=38.0, image_encode=9.0),
            47.5,
        ),
        ({"denoise": 10.0, "note": "n/a"}, 10.0),
        ({}, None),
    ],
)
def test_server_ms(timings, expected):
    pixels = _test_pixels(16, 16)
    image = GeneratedImage(
        image=Image.fromarray(pixels), data=None, pixels=pixels, seed=1, format="raw", timings_ms=timings, metadata={}
    )
    assert image.server_ms == (pytest.approx(expected) if expected is not None else None)


# ------------------------------------------------------------------- error mapping

_HEIGHT_ERROR = "HEIGHT: 100 is not allowed; must be a multiple of 16 in [256, 2048]"
_EXHAUSTED = "RESOURCE_EXHAUSTED"



@pytest.mark.parametrize(
    "status, message, cls, code",
    [
        ("StatusCode.INVALID_ARGUMENT", _HEIGHT_ERROR, InvalidRequestError, "INVALID_ARG"),
        # Triton's scheduler refusals, as tritonserver 2.51 words them (tests/e2e/test_soak.py).
        ("StatusCode.UNAVAILABLE", "[request id: <id_unknown>] Exceeds maximum queue size", QueueFullError,
         "UNAVAILABLE"),
        ("503", "[request id: <id_unknown>] Exceeds maximum queue size", QueueFullError, "UNAVAILABLE"),
        ("StatusCode.UNAVAILABLE", "Request timeout expired", QueueTimeoutError, "UNAVAILABLE"),
        ("503", "Request timeout expired", QueueTimeoutError, "UNAVAILABLE"),
        # The words alone are not enough: an INVALID_ARG that quotes them stays one.
        ("StatusCode.INVALID_ARGUMENT", "PROMPT: 'Exceeds maximum queue size' is fine", InvalidRequestError,
         "INVALID_ARG"),
        # Our server's out-of-memory answer: Triton has no RESOURCE_EXHAUSTED code.
        ("StatusCode.UNAVAILABLE", "RESOURCE_EXHAUSTED: out of device memory generating 3072x3072 with 1 "
         "steps; memory was released, retry smaller or later", ResourceExhaustedError, _EXHAUSTED),
        ("503", "RESOURCE_EXHAUSTED: out of device memory generating 3072x3072", ResourceExhaustedError,
         _EXHAUSTED),
        ("StatusCode.CANCELLED", "Locally cancelled by application!", RequestCancelledError, "CANCELLED"),
        ("StatusCode.RESOURCE_EXHAUSTED", "Received message larger than max", ResourceExhaustedError, _EXHAUSTED),
        ("StatusCode.INTERNAL", "CUDA out of memory. Tried to allocate 2.00 GiB", ResourceExhaustedError, _EXHAUSTED),
        ("StatusCode.INTERNAL", "denoiser exploded", ZImageServerError, "INTERNAL"),
        ("StatusCode.UNKNOWN", "???", ZImageServerError, "UNKNOWN"),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'zimage' is not found", ZImageServerError, "NOT_FOUND"),
        ("StatusCode.UNIMPLEMENTED", "not supported", InvalidRequestError, "UNSUPPORTED"),
        ("400", _HEIGHT_ERROR, InvalidRequestError, "INVALID_ARG"),
        ("400", "Request for model 'zimage' was cancelled", RequestCancelledError, "CANCELLED"),
        ("499", "client closed request", RequestCancelledError, "CANCELLED"),
        ("503", "Server is overloaded, retry later", ServerUnavailableError, "UNAVAILABLE"),
        ("429", "too many requests", ResourceExhaustedError, _EXHAUSTED),
        ("500", "torch.OutOfMemoryError: CUDA out of memory", ResourceExhaustedError, _EXHAUSTED),
        ("500", "denoiser exploded", ZImageServerError, "INTERNAL"),
        ("404", "Request for unknown model", ZImageServerError, "NOT_FOUND"),
        ("501", "not implemented", InvalidRequestError, "UNSUPPORTED"),
        (None, "an exception occurred in the client", ZImageServerError, "UNKNOWN"),
        (None, "out of memory", ResourceExhaustedError, _EXHAUSTED),
    ],
)
def test_map_server_errors(status, message, cls, code):
    error = map_triton_error(InferenceServerException(message, status=status))
    assert type(error) is cls
    assert error.code == code
    assert error.message == message
    assert error.status == status
    assert str(error) == message


@pytest.mark.parametrize(
    "status, message, cls",
    [
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", ZImageTimeoutError),
        ("504", "gateway timeout", ZImageTimeoutError),
        (None, "Deadline Exceeded", ZImageTimeoutError),
        ("StatusCode.UNAVAILABLE",
         "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: "
         "Connection refused", ZImageConnectionError),
        ("StatusCode.UNAVAILABLE", "DNS resolution failed for nohost:8001", ZImageConnectionError),
    ],
)
def test_map_client_side_failures(status, message, cls):
    error = map_triton_error(InferenceServerException(message, status=status))
    assert type(error) is cls
    assert not isinstance(error, ZImageServerError)
    assert message in str(error)


def test_transport_errors():
    assert isinstance(map_transport_error(ConnectionRefusedError(111, "refused"), where="x"), ZImageConnectionError)
    assert isinstance(map_transport_error(TimeoutError("timed out"), where="x", timeout_s=2), ZImageTimeoutError)
    assert isinstance(map_transport_error(asyncio.TimeoutError(), where="x"), ZImageTimeoutError)
    assert map_transport_error(ValueError("bug"), where="x") is None


def test_error_hierarchy():
    for cls in (InvalidRequestError, ServerUnavailableError, RequestCancelledError, ResourceExhaustedError):
        assert issubclass(cls, ZImageServerError)
    # Queue refusals are "unavailable, retry" too, so existing retry code keeps catching them.
    for cls in (QueueFullError, QueueTimeoutError):
        assert issubclass(cls, ServerUnavailableError)
    assert not issubclass(QueueFullError, QueueTimeoutError) and not issubclass(QueueTimeoutError, QueueFullError)
    # Out of memory is a kind of "unavailable, retry": callers catching that still catch it.
    assert issubclass(ResourceExhaustedError, ServerUnavailableError)
    for cls in (ZImageServerError, ZImageConnectionError, ZImageTimeoutError, ZImageResponseError):
        assert issubclass(cls, ZImageError)


# ---------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    "url, protocol, expected",
    [
        (None, None, "grpc://localhost:8001"),
        (None, "http", "http://localhost:8000"),
        ("localhost:9001", None, "grpc://localhost:9001"),
        ("example.org", "http", "http://example.org:8000"),
        ("http://triton:1234", None, "http://triton:1234"),
        ("grpc://triton", None, "grpc://triton:8001"),
        ("HTTP://Triton:80/", None, "http://triton:80"),
        ("http://triton:8000", "HTTP", "http://triton:8000"),
        ("[::1]:8001", "grpc", "grpc://[::1]:8001"),
    ],
)
def test_parse_endpoint(url, protocol, expected):
    assert parse_endpoint(url, protocol).url == expected
    assert ZImageClient(url, protocol).url == expected
    assert AsyncZImageClient(url, protocol).url == expected


def test_endpoint_address_is_what_tritonclient_wants():
    endpoint = parse_endpoint("http://[::1]:8000")
    assert (endpoint.protocol, endpoint.host, endpoint.port, endpoint.address) == ("http", "::1", 8000, "[::1]:8000")


@pytest.mark.parametrize(
    "url, protocol",
    [
        ("http://triton:8000", "grpc"),
        ("https://triton", None),
        ("triton:notaport", None),
        ("triton:8000/v2", None),
        ("", None),
        (None, "tcp"),
        ("user:pw@triton:8000", None),
    ],
)
def test_parse_endpoint_rejects(url, protocol):
    with pytest.raises(ValueError):
        parse_endpoint(url, protocol)


@pytest.mark.parametrize("kwargs", [{"inference_timeout_s": 0}, {"init_timeout_s": -1}, {"model_name": ""}])
def test_constructor_validates_settings(kwargs):
    with pytest.raises(ValueError):
        ZImageClient("localhost", "grpc", **kwargs)


# ------------------------------------------------------- connection and readiness


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_constructor_does_no_network_io(protocol, silent_port):
    port = silent_port.getsockname()[1]
    sync_client = ZImageClient(f"127.0.0.1:{port}", protocol)
    async_client = AsyncZImageClient(f"127.0.0.1:{port}", protocol)
    silent_port.settimeout(0.2)
    with pytest.raises(socket.timeout):
        silent_port.accept()
    sync_client.close()
    asyncio.run(async_client.close())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_first_call_to_closed_port_raises_connection_error_fast(protocol):
    started = time.monotonic()
    with ZImageClient(f"127.0.0.1:{_free_port()}", protocol, inference_timeout_s=30) as client:
        with pytest.raises(ZImageConnectionError) as info:
            client.generate("x")
    assert time.monotonic() - started < 3.0
    assert f"{protocol}://127.0.0.1" in str(info.value)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_first_call_to_closed_port_raises_connection_error(protocol):
    async def run():
        async with AsyncZImageClient(f"127.0.0.1:{_free_port()}", protocol, inference_timeout_s=30) as client:
            await client.generate("x")

    started = time.monotonic()
    with pytest.raises(ZImageConnectionError):
        asyncio.run(run())
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_wait_for_ready_times_out_on_closed_port(protocol):
    with ZImageClient(f"127.0.0.1:{_free_port()}", protocol) as client:
        started = time.monotonic()
        with pytest.raises(ZImageTimeoutError, match="not ready after 0.5 s"):
            client.wait_for_ready(0.5)
        assert 0.45 <= time.monotonic() - started < 1.5


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_wait_for_ready_is_bounded_when_server_hangs(protocol, silent_port):
    """A server that accepts but never answers must not stretch the wait to the inference timeout."""
    with ZImageClient(f"127.0.0.1:{silent_port.getsockname()[1]}", protocol, inference_timeout_s=60) as client:
        started = time.monotonic()
        with pytest.raises(ZImageTimeoutError):
            client.wait_for_ready(0.6)
        assert time.monotonic() - started < 1.6


def test_async_wait_for_ready_times_out(silent_port):
    async def run(url, protocol):
        async with AsyncZImageClient(url, protocol, inference_timeout_s=60) as client:
            await client.wait_for_ready(0.5)

    for url, protocol in ((f"127.0.0.1:{_free_port()}", "grpc"), (f"127.0.0.1:{silent_port.getsockname()[1]}", "http")):
        started = time.monotonic()
        with pytest.raises(ZImageTimeoutError):
            asyncio.run(run(url, protocol))
        assert time.monotonic() - started < 1.5


def test_both_clients_wait_for_an_unready_model_alike(server_url):
    """The fake server is live but has no model 'other': both clients poll until their wait is
    over, then name the last reason."""
    expected = f"{server_url} model 'other' not ready after 0.4 s: server is live but model 'other' is not ready"

    async def run():
        async with AsyncZImageClient(server_url, model_name="other") as client:
            await client.wait_for_ready(0.4)

    with ZImageClient(server_url, model_name="other") as client:
        with pytest.raises(ZImageTimeoutError) as sync_info:
            client.wait_for_ready(0.4)
    with pytest.raises(ZImageTimeoutError) as async_info:
        asyncio.run(run())
    assert str(sync_info.value) == str(async_info.value) == expected


def test_init_timeout_makes_first_call_wait_then_time_out():
    with ZImageClient(f"127.0.0.1:{_free_port()}", "grpc", init_timeout_s=0.4) as client:
        started = time.monotonic()
        with pytest.raises(ZImageTimeoutError):
            client.generate("x")
        assert time.monotonic() - started >= 0.35


def test_closed_client_refuses_calls(grpc_url):
    client = ZImageClient(grpc_url)
    with client:
        pass
    with pytest.raises(RuntimeError):
        client.generate("x")
    client.close()  # idempotent


# ------------------------------------------------------ against the fake servers


def test_wait_for_ready_and_generate(server_url):
    with ZImageClient(server_url, init_timeout_s=5) as client:
        client.wait_for_ready(5)
        image = client.generate("a red fox", height=64, width=32, seed=42)
    assert image.seed == 42
    assert image.image.size == (32, 64)
    assert image.format == "png" and image.data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(image.pixels, _test_pixels(64, 32, seed=42))
    assert image.timings_ms == {"queue": 1.5, "compute": 10.0}
    assert image.metadata["prompt"] == "a red fox"


def test_generate_omits_unset_optional_inputs(server_url):
    with ZImageClient(server_url) as client:
        bare = client.generate("x", output_format=None)
        full = client.generate(
            "x", negative_prompt="n", height=32, width=32, num_inference_steps=4, guidance_scale=0.5, seed=1,
            output_format="webp",
        )
    assert _received(bare) == ["PROMPT"]
    assert bare.seed == 777  # the server's choice
    assert _received(full) == sorted(
        ["PROMPT", "NEGATIVE_PROMPT", "HEIGHT", "WIDTH", "NUM_INFERENCE_STEPS", "GUIDANCE_SCALE", "SEED",
         "OUTPUT_FORMAT"]
    )
    assert full.metadata["dtypes"]["GUIDANCE_SCALE"] == "float32"
    assert full.metadata["shapes"]["SEED"] == [1, 1]
    assert full.format == "webp"


def test_generate_raw(server_url):
    with ZImageClient(server_url) as client:
        image = client.generate("x", height=16, width=48, seed=3, output_format="raw")
    assert image.data is None and image.format == "raw"
    np.testing.assert_array_equal(image.pixels, _test_pixels(16, 48, seed=3))


@pytest.mark.parametrize(
    "prompt, kwargs, cls, message",
    [
        ("x", {"height": 100}, InvalidRequestError,
         "HEIGHT: 100 is not allowed; must be a multiple of 16 in [16, 2048]"),
        ("__unavailable__", {}, QueueFullError, "Exceeds maximum queue size"),
        ("__queue_timeout__", {}, QueueTimeoutError, "Request timeout expired"),
        ("__oom__", {}, ResourceExhaustedError, "CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
)
def test_server_errors_are_typed_with_verbatim_message(server_url, prompt, kwargs, cls, message):
    with ZImageClient(server_url) as client:
        with pytest.raises(cls) as info:
            client.generate(prompt, **kwargs)
    assert type(info.value) is cls
    assert info.value.message == message
    assert info.value.index is None


def test_inference_timeout(server_url):
    with ZImageClient(server_url, inference_timeout_s=0.3) as client:
        started = time.monotonic()
        with pytest.raises(ZImageTimeoutError):
            client.generate("__slow__")
        assert time.monotonic() - started < 1.2


def test_generate_many_keeps_prompt_order_and_spreads_seeds(server_url):
    prompts = [f"prompt {i}" for i in range(6)]
    seen = []
    # A worker thread that hangs (e.g. an HTTP client shared across threads) must fail the test, not stall it.
    holder = {}

    def run():
        with ZImageClient(server_url) as client:
            holder["images"] = client.generate_many(
                prompts, concurrency=4, seed=100, height=16, width=16, progress=lambda i, o: seen.append((i, o))
            )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "generate_many hung"
    images = holder["images"]
    assert [im.metadata["prompt"] for im in images] == prompts
    assert [im.seed for im in images] == list(range(100, 106))
    assert sorted(i for i, _ in seen) == list(range(6))
    assert all(o is images[i] for i, o in seen)


def test_generate_many_with_seed_list_and_tqdm_like_progress(grpc_url):
    class Bar:
        count = 0

        def update(self, n):
            self.count += n

    bar = Bar()
    with ZImageClient(grpc_url) as client:
        images = client.generate_many(["a", "b", "c"], seed=[7, 3, 5], progress=bar, output_format="raw")
    assert [im.seed for im in images] == [7, 3, 5]
    assert bar.count == 3


def test_generate_many_raises_first_failure_after_all_finish(server_url):
    prompts = ["ok 0", "__oom__", "ok 2", "__unavailable__"]
    with ZImageClient(server_url) as client:
        with pytest.raises(ResourceExhaustedError) as info:
            client.generate_many(prompts, concurrency=4)
    error = info.value
    assert error.index == 1
    assert str(error).startswith("prompt #1: ") and "CUDA out of memory" in str(error)
    assert error.message == "CUDA out of memory. Tried to allocate 2.00 GiB"
    assert [type(r).__name__ for r in error.results] == ["GeneratedImage", "NoneType", "GeneratedImage", "NoneType"]
    assert error.results[2].metadata["prompt"] == "ok 2"
    assert sorted(error.errors) == [1, 3]
    assert isinstance(error.errors[3], ServerUnavailableError) and error.errors[3].index == 3


def test_generate_many_validates_before_sending():
    with ZImageClient(f"127.0.0.1:{_free_port()}") as client:
        assert client.generate_many([]) == []
        with pytest.raises(ValueError):
            client.generate_many(["a", "b"], seed=[1])
        with pytest.raises(TypeError):
            client.generate_many("one string")
        with pytest.raises(ValueError):
            client.generate_many(["a"], concurrency=0)


def test_generate_many_reraises_progress_hook_errors(grpc_url):
    def hook(index, outcome):
        raise OSError("disk full")

    with ZImageClient(grpc_url) as client:
        with pytest.raises(OSError, match="disk full"):
            client.generate_many(["a", "b"], progress=hook)


def test_model_config_has_same_shape_for_both_protocols(server_url):
    with ZImageClient(server_url) as client:
        config = client.model_config()
    assert config["name"] == "zimage"
    assert int(config["max_batch_size"]) == 4


def test_unknown_model_is_a_server_error(server_url):
    with ZImageClient(server_url, model_name="nope") as client:
        with pytest.raises(ZImageServerError) as info:
            client.generate("x")
    assert info.value.code == "NOT_FOUND"


def test_async_client(server_url):
    async def run():
        async with AsyncZImageClient(server_url, init_timeout_s=5) as client:
            await client.wait_for_ready(5)
            single = await client.generate("solo", seed=9, height=32, width=16)
            seen = []
            many = await client.generate_many(
                ["a", "b", "c"], seed=1, concurrency=2, output_format="raw", progress=lambda i, o: seen.append(i)
            )
            with pytest.raises(InvalidRequestError) as info:
                await client.generate("x", width=17)
            with pytest.raises(ServerUnavailableError) as many_info:
                await client.generate_many(["ok", "__unavailable__"])
            return single, many, seen, info.value, many_info.value

    single, many, seen, error, many_error = asyncio.run(run())
    assert single.seed == 9 and single.image.size == (16, 32)
    assert [im.seed for im in many] == [1, 2, 3]
    assert [im.metadata["prompt"] for im in many] == ["a", "b", "c"]
    assert all(im.data is None and im.pixels.shape == (32, 32, 3) for im in many)
    assert sorted(seen) == [0, 1, 2]
    assert error.message.startswith("WIDTH: 17 is not allowed")
    assert many_error.index == 1 and many_error.results[0].metadata["prompt"] == "ok"


def test_async_inference_timeout(grpc_url):
    async def run():
        async with AsyncZImageClient(grpc_url, inference_timeout_s=0.3) as client:
            await client.generate("__slow__")

    with pytest.raises(ZImageTimeoutError):
        asyncio.run(run())


# ----------------------------------------------------------------------------- CLI


def test_cli_parses_prompts_and_options(tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("from file 1\n\n  from file 2  \n", encoding="utf-8")
    args = cli.parse_args(
        ["first", "--prompts-file", str(prompts_file), "--url", "http://h:1", "--height", "512", "--width", "768",
         "--steps", "4", "--guidance-scale", "1.5", "--seed", "3", "--negative-prompt", "ugly", "--format", "raw",
         "--output-dir", str(tmp_path / "out"), "--concurrency", "2", "--wait-s", "0"]
    )
    assert args.prompt_list == ["first", "from file 1", "from file 2"]
    assert (args.height, args.width, args.num_inference_steps, args.guidance_scale) == (512, 768, 4, 1.5)
    assert (args.seed, args.negative_prompt, args.output_format) == (3, "ugly", "raw")
    assert (args.concurrency, args.wait_s) == (2, 0)
    assert args.output_dir == tmp_path / "out"


def test_cli_defaults():
    args = cli.parse_args(["p"])
    assert args.output_format == "png" and args.output_dir == Path(".")
    assert args.wait_s == 60 and args.concurrency == 8
    assert args.url is None and args.protocol is None
    assert args.height is None and args.seed is None and args.num_inference_steps is None


@pytest.mark.parametrize(
    "argv",
    [[], ["p", "--format", "gif"], ["p", "--concurrency", "0"], ["p", "--protocol", "tcp"], ["p", "--height", "x"],
     ["--prompts-file", "/nonexistent/prompts.txt"]],
)
def test_cli_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("A red fox in the snow!", "a-red-fox-in-the-snow"),
        ("Café Ünïcode", "cafe-unicode"),
        ("夜", ""),
        ("x" * 60, "x" * 40),
        ("one two three four five six seven eight nine", "one-two-three-four-five-six-seven-eight"),
    ],
)
def test_slugify(prompt, expected):
    assert cli.slugify(prompt) == expected


def test_output_path_names():
    assert cli.output_path(Path("out"), 3, "A red fox", ".png") == Path("out/zimage_0003_a-red-fox.png")
    assert cli.output_path(Path("."), 12, "夜", ".jpg") == Path("zimage_0012.jpg")


def test_cli_writes_one_file_per_prompt(grpc_url, tmp_path, capsys):
    code = cli.main(
        ["A red fox", "a blue bird", "--url", grpc_url, "--seed", "10", "--height", "16", "--width", "32",
         "--output-dir", str(tmp_path), "--wait-s", "2"]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    expected = [tmp_path / "zimage_0000_a-red-fox.png", tmp_path / "zimage_0001_a-blue-bird.png"]
    assert sorted(lines) == [f"{expected[0]}\tseed=10\tserver_ms=11.5", f"{expected[1]}\tseed=11\tserver_ms=11.5"]
    for path, seed in zip(expected, (10, 11)):
        with Image.open(path) as image:
            assert image.format == "PNG"
            np.testing.assert_array_equal(np.asarray(image), _test_pixels(16, 32, seed=seed))


def test_cli_raw_format_writes_png(grpc_url, tmp_path, capsys):
    assert cli.main(["p", "--url", grpc_url, "--format", "raw", "--seed", "4", "--output-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.iterdir()
    assert path.name == "zimage_0000_p.png"
    with Image.open(path) as image:
        np.testing.assert_array_equal(np.asarray(image), _test_pixels(32, 32, seed=4))


def test_cli_invalid_request_exits_2_with_server_message(http_url, tmp_path, capsys):
    code = cli.main(["ok", "bad", "--url", http_url, "--height", "100", "--output-dir", str(tmp_path), "--wait-s", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "HEIGHT: 100 is not allowed; must be a multiple of 16 in [16, 2048]" in err
    assert "prompt #0" in err and "prompt #1" in err


def test_cli_keeps_successful_images_when_one_fails(grpc_url, tmp_path, capsys):
    code = cli.main(["fine", "__unavailable__", "--url", grpc_url, "--output-dir", str(tmp_path), "--wait-s", "0"])
    assert code == 1
    assert [p.name for p in tmp_path.iterdir()] == ["zimage_0000_fine.png"]
    assert "Exceeds maximum queue size" in capsys.readouterr().err


def test_cli_bad_url_exits_2(tmp_path, capsys):
    assert cli.main(["p", "--url", "https://secure:443", "--output-dir", str(tmp_path)]) == 2
    assert "unsupported URL scheme" in capsys.readouterr().err


def test_cli_unreachable_server_exits_1(tmp_path, capsys):
    code = cli.main(["p", "--url", f"http://127.0.0.1:{_free_port()}", "--wait-s", "0", "--output-dir", str(tmp_path)])
    assert code == 1
    assert "cannot reach" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "zimage_client", "--help"],
        capture_output=True, text=True, timeout=30, env={"PYTHONPATH": str(CLIENT_ROOT), "PATH": ""},
    )
    assert result.returncode == 0
    assert "--prompts-file" in result.stdout and "zimage-client" in result.stdout


def test_package_stays_thin():
    """Importing the client must not drag in the server stack."""
    code = (
        "import sys, zimage_client, zimage_client.cli, zimage_client.aio; "
        "print(sorted(m for m in ('torch', 'diffusers', 'zimage_backend') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
        env={"PYTHONPATH": str(CLIENT_ROOT), "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
