"""The client's image inputs (issue 14): the tensors it builds from a path, bytes or a PIL image,
the checks it makes before sending, and the command line's image options. The wire tests reuse
test_client's in-process stand-ins for Triton, which report the tensors they received."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.unit.test_client import grpc_url, http_url, server_url  # noqa: F401 (fixtures)
from zimage_client import AsyncZImageClient, ZImageClient, cli
from zimage_client._fanout import build_requests
from zimage_client._tensors import GenerateRequest, encode_image

IMAGE_INPUTS = {"image": "IMAGE_INPUT", "mask": "MASK", "control_image": "CONTROL_IMAGE"}


def _picture(mode: str = "RGB", size=(24, 16)) -> Image.Image:
    pixels = (np.arange(size[0] * size[1] * 3) % 251).astype(np.uint8).reshape(size[1], size[0], 3)
    return Image.fromarray(pixels).convert(mode)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ------------------------------------------------------------------ tensors per argument type


@pytest.mark.parametrize("argument", list(IMAGE_INPUTS))
@pytest.mark.parametrize("kind", ["str path", "Path", "bytes", "bytearray", "memoryview"])
def test_files_and_bytes_are_sent_unchanged(tmp_path, argument, kind):
    data = _png(_picture()) + b"trailing bytes are the server's to judge"
    path = tmp_path / "in.png"
    path.write_bytes(data)
    value = {"str path": str(path), "Path": path, "bytes": data, "bytearray": bytearray(data),
             "memoryview": memoryview(data)}[kind]
    needed = {"mask": {"image": data}}.get(argument, {})
    arrays = GenerateRequest("p", **{argument: value, **needed}).input_arrays()
    tensor = arrays[IMAGE_INPUTS[argument]]
    assert tensor.shape == (1, 1) and tensor.dtype == np.object_
    assert type(tensor[0, 0]) is bytes and tensor[0, 0] == data


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "1"])
def test_pil_images_are_sent_as_lossless_png(mode):
    picture = _picture(mode)
    data = GenerateRequest("p", image=picture).input_arrays()["IMAGE_INPUT"][0, 0]
    sent = _decoded(data)
    assert sent.format == "PNG" and sent.mode == picture.mode and sent.size == picture.size
    np.testing.assert_array_equal(np.asarray(sent), np.asarray(picture))


def test_pil_modes_png_cannot_hold_are_sent_as_rgb():
    picture = _picture("CMYK")
    sent = _decoded(encode_image("image", picture))
    assert sent.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(sent), np.asarray(picture.convert("RGB")))


def test_scales_are_fp32_rows_and_every_mode_together():
    data = _png(_picture())
    arrays = GenerateRequest("p", image=data, strength=0.6, mask=data, control_image=data,
                             control_scale=np.float64(0.7)).input_arrays()
    for name, value in (("STRENGTH", 0.6), ("CONTROL_SCALE", 0.7)):
        assert arrays[name].dtype == np.float32 and arrays[name].shape == (1, 1)
        assert arrays[name][0, 0] == np.float32(value)
    assert {"IMAGE_INPUT", "MASK", "CONTROL_IMAGE", "STRENGTH", "CONTROL_SCALE"} <= set(arrays)


def test_without_image_arguments_the_request_is_text_to_image_as_before():
    assert list(GenerateRequest("p").input_arrays()) == ["PROMPT", "OUTPUT_FORMAT"]


def test_control_image_alone_is_enough():
    arrays = GenerateRequest("p", control_image=b"x").input_arrays()
    assert "CONTROL_IMAGE" in arrays and "IMAGE_INPUT" not in arrays and "CONTROL_SCALE" not in arrays


def test_repr_leaves_the_image_bytes_out():
    text = repr(GenerateRequest("p", image=b"\x89PNG" + b"x" * 10_000, strength=0.5))
    assert "strength=0.5" in text and "xxxx" not in text and len(text) < 500


# ------------------------------------------------------------------ client-side checks


@pytest.mark.parametrize("kwargs, message", [
    ({"mask": b"m"}, "mask needs image"),
    ({"strength": 0.5}, "strength needs image"),
    ({"control_scale": 0.7}, "control_scale needs control_image"),
    ({"control_image": b"c", "mask": b"m"}, "mask needs image"),
])
def test_a_part_without_the_one_it_needs_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerateRequest("p", **kwargs)


@pytest.mark.parametrize("argument", list(IMAGE_INPUTS))
@pytest.mark.parametrize("value, shown", [(3, "int"), (np.zeros((4, 4, 3), np.uint8), "ndarray"),
                                          ([b"x"], "list")])
def test_wrong_types_are_refused_naming_the_argument(argument, value, shown):
    with pytest.raises(TypeError, match=rf"^{argument} must be a path \(str or os.PathLike\), bytes or a "
                                        rf"PIL.Image.Image, got {shown}$"):
        GenerateRequest("p", **{"image": b"i", argument: value})


@pytest.mark.parametrize("name", ["strength", "control_scale"])
def test_scales_must_be_numbers(name):
    with pytest.raises(TypeError, match=f"{name} must be a number, got str"):
        GenerateRequest("p", image=b"i", control_image=b"c", **{name: "0.5"})


def test_a_file_that_cannot_be_read_is_refused_naming_argument_and_path(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match=rf"^image: cannot read '{missing}': No such file or directory$"):
        GenerateRequest("p", image=missing)
    with pytest.raises(ValueError, match=r"^mask: cannot read .*: Is a directory$"):
        GenerateRequest("p", image=b"i", mask=tmp_path)


def test_fan_out_reads_each_file_once_and_sends_it_with_every_prompt(tmp_path, monkeypatch):
    path = tmp_path / "in.png"
    path.write_bytes(b"image bytes")
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda file, *a, **k: opened.append(file) or real_open(file, *a, **k))
    requests = build_requests(["a", "b", "c"], 5, image=path, strength=0.4, mask=None, control_image=None,
                              control_scale=None)
    assert opened == [path]
    assert [r.input_arrays()["IMAGE_INPUT"][0, 0] for r in requests] == [b"image bytes"] * 3
    assert [r.strength for r in requests] == [0.4] * 3 and [r.seed for r in requests] == [5, 6, 7]


# ------------------------------------------------------------------ over the wire (stand-in servers)


def _sent(image) -> dict:
    return {name: (image.metadata["dtypes"][name], image.metadata["shapes"][name])
            for name in image.metadata["received"]}


def test_sync_client_sends_the_image_tensors(server_url, tmp_path):  # noqa: F811
    path = tmp_path / "in.png"
    path.write_bytes(_png(_picture()))
    with ZImageClient(server_url) as client:
        image = client.generate("p", image=path, strength=0.6, mask=_picture("L"), control_image=path.read_bytes(),
                                control_scale=0.7)
        many = client.generate_many(["a", "b"], image=_picture(), seed=1)
    assert _sent(image) == {"PROMPT": ("object", [1, 1]), "OUTPUT_FORMAT": ("object", [1, 1]),
                            "IMAGE_INPUT": ("object", [1, 1]), "MASK": ("object", [1, 1]),
                            "CONTROL_IMAGE": ("object", [1, 1]), "STRENGTH": ("float32", [1, 1]),
                            "CONTROL_SCALE": ("float32", [1, 1]), }
    assert all("IMAGE_INPUT" in _sent(m) and "MASK" not in _sent(m) for m in many)


def test_async_client_sends_the_image_tensors(server_url):  # noqa: F811
    async def run():
        async with AsyncZImageClient(server_url) as client:
            one = await client.generate("p", image=_picture(), strength=0.5)
            many = await client.generate_many(["a", "b"], control_image=b"c", control_scale=0.3)
            with pytest.raises(ValueError, match="mask needs image"):
                await client.generate("p", mask=b"m")
            return one, many

    one, many = asyncio.run(run())
    assert {"IMAGE_INPUT", "STRENGTH"} <= set(_sent(one)) and "MASK" not in _sent(one)
    assert all({"CONTROL_IMAGE", "CONTROL_SCALE"} <= set(_sent(m)) for m in many)


# ------------------------------------------------------------------ command line


def test_cli_parses_the_image_options(tmp_path):
    args = cli.parse_args(["p", "--image", "in.png", "--strength", "0.6", "--mask", "m.png",
                           "--control-image", "edges.png", "--control-scale", "0.7"])
    assert (args.image, args.mask, args.control_image) == (Path("in.png"), Path("m.png"), Path("edges.png"))
    assert (args.strength, args.control_scale) == (0.6, 0.7)
    defaults = cli.parse_args(["p"])
    assert (defaults.image, defaults.strength, defaults.mask, defaults.control_image,
            defaults.control_scale) == (None,) * 5


@pytest.mark.parametrize("argv", [["p", "--strength", "much"], ["p", "--control-scale", "x"], ["p", "--image"]])
def test_cli_image_option_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2


def test_cli_sends_the_files_with_every_prompt(grpc_url, tmp_path, capsys):  # noqa: F811
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    image.write_bytes(_png(_picture()))
    mask.write_bytes(_png(_picture("L")))
    code = cli.main(["a", "b", "--url", grpc_url, "--image", str(image), "--mask", str(mask), "--strength", "0.6",
                     "--output-dir", str(tmp_path / "out"), "--wait-s", "2"])
    assert code == 0, capsys.readouterr().err
    assert len(capsys.readouterr().out.splitlines()) == 2 and len(list((tmp_path / "out").iterdir())) == 2


@pytest.mark.parametrize("extra, message", [
    (["--mask", "m.png"], "mask needs image"),
    (["--image", "/nonexistent/in.png"], "image: cannot read '/nonexistent/in.png': No such file or directory"),
])
def test_cli_refuses_before_sending_and_exits_2(tmp_path, capsys, extra, message):
    # A port nobody listens on: the refusal must come before any connection is tried.
    code = cli.main(["p", "--url", "grpc://127.0.0.1:9", "--wait-s", "0", "--output-dir", str(tmp_path), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
