"""Image inputs (issue 14): decoding that an attacker cannot abuse, the size rule, and every
INVALID_ARG of the new fields, through parse_request as the server runs it."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from zimage_backend import image_input
from zimage_backend.request import (CONTROLNET, CONTROLNET_INPAINT, IMAGE_TO_IMAGE, INPAINT,
                                    TEXT_TO_IMAGE, RequestError, parse_request)

DTYPES = {"HEIGHT": np.int32, "WIDTH": np.int32, "NUM_INFERENCE_STEPS": np.int32,
          "GUIDANCE_SCALE": np.float32, "SEED": np.int64, "STRENGTH": np.float32,
          "CONTROL_SCALE": np.float32}


def encoded(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def picture(width: int = 96, height: int = 64, mode: str = "RGB") -> Image.Image:
    """A left-to-right gradient, so crops and turns are visible in the pixels."""
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    rgb = np.stack([ramp, 255 - ramp, np.full_like(ramp, 128)], axis=-1)
    return Image.fromarray(rgb).convert(mode)


def parse(settings, controlnet=True, **values):
    out = {}
    for name, value in values.items():
        dtype = DTYPES.get(name, np.object_)
        out[name] = np.array([[value.encode() if isinstance(value, str) else value]], dtype=dtype)
    out.setdefault("PROMPT", np.array([[b"a cat"]], dtype=np.object_))
    return parse_request(out, settings.defaults, settings.limits, controlnet=controlnet)


def refused(settings, field: str, *words: str, controlnet=True, **values) -> str:
    with pytest.raises(RequestError) as caught:
        parse(settings, controlnet=controlnet, **values)
    assert caught.value.field == field, str(caught.value)
    for word in words:
        assert word in str(caught.value), str(caught.value)
    return str(caught.value)


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height: a decompression bomb's header."""
    data = bytearray(encoded(Image.new("RGB", (1, 1))))
    ihdr = 8  # after the signature: length, b"IHDR", 13 bytes of data, CRC
    body = bytes(data[ihdr + 4:ihdr + 8]) + struct.pack(">II", width, height) + \
        bytes(data[ihdr + 16:ihdr + 21])
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21:ihdr + 25] = struct.pack(">I", zlib.crc32(body))
    return bytes(data)


# ------------------------------------------------------------------------------ decoding

def test_a_bomb_is_refused_from_its_header_before_decoding(settings, monkeypatch):
    limit = settings.limits.max_input_pixels
    bombs = [png_declaring(width, height) for width, height in
             ((limit // 1000 + 1, 1000), (50_000, 50_000), (2**31 - 1, 2**31 - 1))]
    loads = []
    for cls in (Image.Image, ImageFile.ImageFile):
        monkeypatch.setattr(cls, "load", lambda self: loads.append(self) or None)
    for bomb in bombs:
        assert "pixels" in refused(settings, "IMAGE_INPUT", "at most", IMAGE_INPUT=bomb)
    assert loads == []  # not one pixel decoded


def test_formats_come_from_the_bytes_not_a_name(settings):
    for fmt in ("GIF", "BMP", "TIFF", "ICO"):
        refused(settings, "IMAGE_INPUT", "not a PNG, JPEG or WebP",
                IMAGE_INPUT=encoded(picture(), fmt))
    for fmt in ("PNG", "JPEG", "WEBP"):
        [request] = parse(settings, IMAGE_INPUT=encoded(picture(), fmt))
        assert request.image.size == (96, 64)


@pytest.mark.parametrize("data, words", [
    (b"", ("empty",)),
    (b"not an image at all", ("not a PNG, JPEG or WebP",)),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, ("not a PNG, JPEG or WebP",)),
])
def test_garbage_is_refused(settings, data, words):
    refused(settings, "IMAGE_INPUT", *words, IMAGE_INPUT=data)


def test_truncated_files_are_refused(settings):
    for fmt in ("PNG", "JPEG", "WEBP"):
        data = encoded(picture(256, 256), fmt)
        refused(settings, "IMAGE_INPUT", "corrupt", IMAGE_INPUT=data[:len(data) // 2])


def test_the_byte_limit_comes_first(settings):
    limit = settings.limits.max_input_bytes
    refused(settings, "CONTROL_IMAGE", f"{limit + 1} bytes", f"at most {limit}",
            CONTROL_IMAGE=b"\x00" * (limit + 1))


def test_animated_images_are_refused(settings):
    frames = [picture(), picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    refused(settings, "IMAGE_INPUT", "animated", IMAGE_INPUT=buffer.getvalue())


def test_exif_orientation_is_applied(settings):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: the viewer rotates it 90 degrees clockwise
    data = encoded(picture(96, 64), "JPEG", exif=exif.tobytes(), quality=95)
    [request] = parse(settings, IMAGE_INPUT=data)
    assert request.image.size == (64, 96)
    pixels = np.asarray(request.image).astype(int)
    # The gradient ran left to right; turned clockwise it runs top to bottom.
    assert pixels[0, :, 0].mean() < 40 and pixels[-1, :, 0].mean() > 215


def test_transparency_is_composited_onto_white(settings):
    rgba = picture(64, 64, "RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))  # fully transparent
    [request] = parse(settings, IMAGE_INPUT=encoded(rgba))
    assert request.image.mode == "RGB"
    assert np.asarray(request.image).min() == 255
    palette = Image.new("P", (64, 64), 0)
    palette.info["transparency"] = 0
    [request] = parse(settings, IMAGE_INPUT=encoded(palette))
    assert np.asarray(request.image).min() == 255


def test_the_mask_is_its_luminance(settings):
    image = encoded(picture(64, 64))
    mask = Image.new("RGBA", (64, 64), (255, 255, 255, 0))  # white, transparent: still white
    [request] = parse(settings, IMAGE_INPUT=image, MASK=encoded(mask))
    assert request.mode == INPAINT and request.mask.mode == "L"
    assert np.asarray(request.mask).min() == 255


# ------------------------------------------------------------------------------ size rule

@pytest.mark.parametrize("size, expected", [
    ((96, 64), (64, 96)),  # (width, height) in; (height, width) out
    ((1000, 777), (768, 992)),  # rounded down to multiples of 16
    ((4000, 3000), (1536, 2048)),  # over max_size: scaled down, aspect kept
    ((2000, 2000), (2000 // 16 * 16, 2000 // 16 * 16)),
    ((40, 30), (64, 64)),  # under min_size: raised to it
])
def test_size_without_height_and_width(settings, size, expected):
    lim = settings.limits
    assert image_input.size_from_input(*size, lim.min_size, lim.max_size, lim.max_pixels) == \
        expected


def test_size_keeps_max_pixels():
    height, width = image_input.size_from_input(3000, 3000, 64, 4096, 2**22)
    assert height * width <= 2**22 and height % 16 == 0 and width % 16 == 0
    assert abs(height / width - 1) < 0.02


def test_the_input_sets_the_size_or_is_fitted_to_height_and_width(settings):
    data = encoded(picture(200, 100))
    [request] = parse(settings, IMAGE_INPUT=data)
    assert (request.height, request.width) == (96, 192) == request.image.size[::-1]
    [request] = parse(settings, IMAGE_INPUT=data, HEIGHT=128, WIDTH=128)
    assert request.image.size == (128, 128)
    # Cover then center-crop: the middle of the gradient stays, the ends are cut.
    red = np.asarray(request.image)[:, :, 0].astype(int)
    assert 40 < red[:, 0].mean() < 80 and 175 < red[:, -1].mean() < 215
    refused(settings, "WIDTH", "together", IMAGE_INPUT=data, HEIGHT=128)
    refused(settings, "HEIGHT", "multiple of 16", IMAGE_INPUT=data, HEIGHT=100, WIDTH=128)


# ------------------------------------------------------------------------------ modes and checks

def test_each_combination_is_its_mode(settings):
    image, mask, control = (encoded(picture(64, 64)) for _ in range(3))
    cases = [({}, TEXT_TO_IMAGE), ({"IMAGE_INPUT": image}, IMAGE_TO_IMAGE),
             ({"IMAGE_INPUT": image, "MASK": mask}, INPAINT),
             ({"CONTROL_IMAGE": control}, CONTROLNET),
             ({"CONTROL_IMAGE": control, "IMAGE_INPUT": image, "MASK": mask}, CONTROLNET_INPAINT)]
    for values, mode in cases:
        [request] = parse(settings, **values)
        assert request.mode == mode
    keys = {parse(settings, **values)[0].group_key for values, _ in cases}
    assert len(keys) == len(cases)


def test_strength_scales_the_steps_as_diffusers_does(settings):
    data = encoded(picture(64, 64))
    [request] = parse(settings, IMAGE_INPUT=data, STRENGTH=0.6, NUM_INFERENCE_STEPS=8)
    assert request.denoise_steps == 5  # int(8 - 4.8) = 3 of 8 skipped
    [request] = parse(settings, IMAGE_INPUT=data)
    assert request.strength == pytest.approx(settings.defaults.strength)
    [request] = parse(settings, IMAGE_INPUT=data, STRENGTH=0.01, NUM_INFERENCE_STEPS=8)
    assert request.denoise_steps == 1
    [request] = parse(settings, PROMPT="a")
    assert request.denoise_steps == request.num_inference_steps
    other = parse(settings, IMAGE_INPUT=data, STRENGTH=0.5)[0]
    assert other.group_key != parse(settings, IMAGE_INPUT=data, STRENGTH=0.6)[0].group_key


@pytest.mark.parametrize("values, field, words", [
    ({"MASK": "m"}, "MASK", ("needs IMAGE_INPUT",)),
    ({"STRENGTH": 0.5}, "STRENGTH", ("IMAGE_INPUT",)),
    ({"IMAGE_INPUT": "i", "STRENGTH": math.nan}, "STRENGTH", ("nan", "(0.0, 1.0]")),
    ({"IMAGE_INPUT": "i", "STRENGTH": math.inf}, "STRENGTH", ("inf",)),
    ({"IMAGE_INPUT": "i", "STRENGTH": 0.0}, "STRENGTH", ("0.0 is outside",)),
    ({"IMAGE_INPUT": "i", "STRENGTH": 1.5}, "STRENGTH", ("1.5 is outside",)),
    ({"IMAGE_INPUT": "i", "STRENGTH": -0.1}, "STRENGTH", ("outside",)),
    ({"IMAGE_INPUT": "i", "STRENGTH": 1e-45, "NUM_INFERENCE_STEPS": 1}, "STRENGTH",
     ("runs no denoising step",)),
    ({"CONTROL_IMAGE": "c", "STRENGTH": 0.5}, "STRENGTH", ("without CONTROL_IMAGE",)),
    ({"CONTROL_SCALE": 0.5}, "CONTROL_SCALE", ("needs CONTROL_IMAGE",)),
    ({"CONTROL_IMAGE": "c", "CONTROL_SCALE": 2.5}, "CONTROL_SCALE", ("2.5 is outside [0.0, 2.0]",)),
    ({"CONTROL_IMAGE": "c", "CONTROL_SCALE": -1.0}, "CONTROL_SCALE", ("outside",)),
    ({"CONTROL_IMAGE": "c", "CONTROL_SCALE": math.nan}, "CONTROL_SCALE", ("nan",)),
    ({"CONTROL_IMAGE": "c", "IMAGE_INPUT": "i"}, "IMAGE_INPUT", ("needs MASK",)),
])
def test_bad_fields_name_themselves(settings, values, field, words):
    files = {"i": encoded(picture(64, 64)), "m": encoded(picture(64, 64, "L")),
             "c": encoded(picture(64, 64))}
    values = {k: files.get(v, v) if isinstance(v, str) else v for k, v in values.items()}
    refused(settings, field, *words, **values)


def test_control_image_needs_a_configured_controlnet(settings):
    refused(settings, "CONTROL_IMAGE", "config.yaml controlnet", controlnet=False,
            CONTROL_IMAGE=encoded(picture(64, 64)))


def test_a_missing_controlnet_is_named_before_a_missing_side(settings):
    # Found by test_fuzz: WIDTH alone with a control image named HEIGHT, so a client fixed HEIGHT
    # only to hear next that the server has no ControlNet at all.
    refused(settings, "CONTROL_IMAGE", "config.yaml controlnet", controlnet=False,
            CONTROL_IMAGE=encoded(picture(64, 64)), WIDTH=64)


def test_a_mask_of_another_size_is_refused(settings):
    refused(settings, "MASK", "is 32x32", "64x64", IMAGE_INPUT=encoded(picture(64, 64)),
            MASK=encoded(picture(32, 32, "L")))


def test_the_mask_is_compared_after_exif_orientation(settings):
    exif = Image.Exif()
    exif[0x0112] = 6
    image = encoded(picture(96, 64), "JPEG", exif=exif.tobytes())
    [request] = parse(settings, IMAGE_INPUT=image, MASK=encoded(picture(64, 96, "L")))
    assert request.mask.size == request.image.size


def test_one_bad_row_names_its_row(settings):
    good, bad = encoded(picture(64, 64)), b"garbage"
    tensors = {"PROMPT": np.array([[b"a"], [b"b"]], dtype=np.object_),
               "IMAGE_INPUT": np.array([[good], [bad]], dtype=np.object_)}
    with pytest.raises(RequestError) as caught:
        parse_request(tensors, settings.defaults, settings.limits)
    assert caught.value.field == "IMAGE_INPUT" and "row index 1" in str(caught.value)


# ------------------------------------------------------------------------------ config.yaml

@pytest.mark.parametrize("path, value, words", [
    ("controlnet.load_format", "big", "controlnet.load_format: 'big' is not one of none, auto"),
    ("controlnet.load_format", "auto", "controlnet.source: load_format auto needs a source"),
    ("limits.max_input_pixels", 2**27, "limits.max_input_pixels"),
    ("limits.max_input_pixels", 1024, "limits.max_input_pixels"),
    ("limits.max_input_bytes", 0, "limits.max_input_bytes"),
    ("limits.max_control_scale", float("nan"), "limits.max_control_scale"),
    ("defaults.strength", 0.0, "defaults.strength: 0.0 is outside (0.0, 1.0]"),
    ("defaults.control_scale", 3.0, "defaults.control_scale: 3.0 is outside"),
])
def test_bad_image_settings_fail_startup_by_key(path, value, words):
    import yaml

    from tests.conftest import CONFIG
    from zimage_backend.settings import SettingsError, parse_settings

    data = yaml.safe_load(CONFIG.read_text())
    section, key = path.split(".")
    data[section][key] = value
    with pytest.raises(SettingsError) as caught:
        parse_settings(data)
    assert words in str(caught.value)
