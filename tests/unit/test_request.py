from __future__ import annotations

import math

import numpy as np
import pytest

from zimage_backend.request import MAX_SEED, RequestError, check_requested_outputs, parse_request


def tensors(**values):
    """Triton-shaped inputs: [1, 1] arrays of the contract's dtypes."""
    dtypes = {"HEIGHT": np.int32, "WIDTH": np.int32, "NUM_INFERENCE_STEPS": np.int32,
              "GUIDANCE_SCALE": np.float32, "SEED": np.int64}
    out = {}
    for name, value in values.items():
        if name in dtypes:
            out[name] = np.array([[value]], dtype=dtypes[name])
        else:
            out[name] = np.array([[value.encode() if isinstance(value, str) else value]],
                                 dtype=np.object_)
    return out


def parse(settings, count_tokens=None, **values):
    return parse_request(tensors(**values), settings.defaults, settings.limits, count_tokens)


def test_defaults_fill_missing_inputs(settings):
    [request] = parse(settings, PROMPT="a cat")
    d = settings.defaults
    assert (request.height, request.width) == (d.height, d.width)
    assert request.num_inference_steps == d.num_inference_steps == 8
    assert request.guidance_scale == 0.0
    assert request.output_format == "png"
    assert 0 <= request.seed <= MAX_SEED


def test_random_seeds_differ(settings):
    seeds = {parse(settings, PROMPT="a")[0].seed for _ in range(20)}
    assert len(seeds) == 20


def test_given_values_are_kept(settings):
    [r] = parse(settings, PROMPT="a cat", NEGATIVE_PROMPT="blurry", HEIGHT=512, WIDTH=768,
                NUM_INFERENCE_STEPS=4, GUIDANCE_SCALE=1.5, SEED=42, OUTPUT_FORMAT="JPG")
    assert (r.prompt, r.negative_prompt, r.height, r.width) == ("a cat", "blurry", 512, 768)
    assert (r.num_inference_steps, r.guidance_scale, r.seed) == (4, 1.5, 42)
    assert r.output_format == "jpeg"


@pytest.mark.parametrize("values, field, words", [
    ({"PROMPT": ""}, "PROMPT", "empty"),
    ({"PROMPT": "   "}, "PROMPT", "empty"),
    ({"PROMPT": b"\xff\xfe"}, "PROMPT", "UTF-8"),
    ({"PROMPT": "a", "HEIGHT": 100}, "HEIGHT", "100 is not allowed; must be a multiple of 16 in [64, 2048]"),
    ({"PROMPT": "a", "WIDTH": 4096}, "WIDTH", "4096"),
    ({"PROMPT": "a", "WIDTH": 0}, "WIDTH", "multiple of 16"),
    ({"PROMPT": "a", "HEIGHT": -16}, "HEIGHT", "-16"),
    ({"PROMPT": "a", "NUM_INFERENCE_STEPS": 0}, "NUM_INFERENCE_STEPS", "0 is outside [1, 50]"),
    ({"PROMPT": "a", "NUM_INFERENCE_STEPS": 51}, "NUM_INFERENCE_STEPS", "51"),
    ({"PROMPT": "a", "GUIDANCE_SCALE": math.nan}, "GUIDANCE_SCALE", "nan is outside"),
    ({"PROMPT": "a", "GUIDANCE_SCALE": math.inf}, "GUIDANCE_SCALE", "inf"),
    ({"PROMPT": "a", "GUIDANCE_SCALE": -1.0}, "GUIDANCE_SCALE", "-1.0"),
    ({"PROMPT": "a", "SEED": -1}, "SEED", "-1 is outside"),
    ({"PROMPT": "a", "OUTPUT_FORMAT": "gif"}, "OUTPUT_FORMAT", "'gif' is not one of png, jpeg"),
])
def test_bad_values_name_field_and_range(settings, values, field, words):
    with pytest.raises(RequestError) as info:
        parse(settings, **values)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert words in str(info.value)


def test_too_many_pixels(settings):
    limit = _smaller(settings.limits)
    with pytest.raises(RequestError, match=f"pixels; at most {limit.max_pixels} are allowed"):
        parse_request(tensors(PROMPT="a", HEIGHT=limit.max_size, WIDTH=limit.max_size),
                      settings.defaults, limit)


def _smaller(limits):
    import dataclasses

    return dataclasses.replace(limits, max_pixels=limits.max_size * limits.max_size // 2)


def test_missing_prompt(settings):
    with pytest.raises(RequestError, match="PROMPT: is required and missing"):
        parse_request({"HEIGHT": np.array([[64]], np.int32)}, settings.defaults, settings.limits)


def test_wrong_dtype_and_shape(settings):
    bad = tensors(PROMPT="a")
    bad["HEIGHT"] = np.array([[64.0]], dtype=np.float32)
    with pytest.raises(RequestError, match="HEIGHT: has dtype float32; expected INT32"):
        parse_request(bad, settings.defaults, settings.limits)
    bad = tensors(PROMPT="a")
    bad["SEED"] = np.array([[1]], dtype=np.int32)
    with pytest.raises(RequestError, match="SEED: has dtype int32; expected INT64"):
        parse_request(bad, settings.defaults, settings.limits)
    bad = tensors(PROMPT="a")
    bad["WIDTH"] = np.array([[64, 64]], dtype=np.int32)
    with pytest.raises(RequestError, match=r"WIDTH: has shape \[1, 2\]; expected \[batch, 1\]"):
        parse_request(bad, settings.defaults, settings.limits)


def test_unknown_input(settings):
    bad = tensors(PROMPT="a")
    bad["STEPS"] = np.array([[4]], np.int32)
    with pytest.raises(RequestError, match="STEPS: is not an input of this model"):
        parse_request(bad, settings.defaults, settings.limits)


def test_prompt_token_limit(settings):
    limit = settings.limits.max_prompt_tokens
    parse(settings, count_tokens=lambda text: limit, PROMPT="fits")
    with pytest.raises(RequestError, match=f"PROMPT: is {limit + 1} tokens long; at most {limit}"):
        parse(settings, count_tokens=lambda text: limit + 1, PROMPT="too long")
    with pytest.raises(RequestError, match="NEGATIVE_PROMPT: is"):
        parse(settings, count_tokens=lambda text: 1 if text == "p" else limit + 5,
              PROMPT="p", NEGATIVE_PROMPT="n")


def test_rows_become_requests(settings):
    batch = {"PROMPT": np.array([[b"one"], [b"two"], [b"three"]], dtype=np.object_),
             "SEED": np.array([[1], [2], [3]], dtype=np.int64)}
    requests = parse_request(batch, settings.defaults, settings.limits)
    assert [(r.prompt, r.seed) for r in requests] == [("one", 1), ("two", 2), ("three", 3)]


def test_raw_rows_must_share_size(settings):
    batch = {"PROMPT": np.array([[b"one"], [b"two"]], dtype=np.object_),
             "HEIGHT": np.array([[64], [128]], dtype=np.int32),
             "OUTPUT_FORMAT": np.array([[b"raw"], [b"raw"]], dtype=np.object_)}
    with pytest.raises(RequestError, match="HEIGHT: rows of one raw request"):
        parse_request(batch, settings.defaults, settings.limits)


@pytest.mark.parametrize("fmt, requested, error", [
    ("png", set(), None),
    ("png", {"IMAGE", "SEED"}, None),
    # Only SEED and METADATA: a whole generation for an empty success.
    ("png", {"SEED", "METADATA"}, "'png' returns IMAGE, but the request asked only for "
                                  "METADATA, SEED"),
    ("png", {"PIXELS"}, "'png' returns IMAGE, but the request asked only for PIXELS"),
    ("raw", {"PIXELS", "IMAGE"}, None),
    ("raw", {"IMAGE"}, "'raw' returns PIXELS, but the request asked only for IMAGE"),
    ("raw", {"SEED"}, "'raw' returns PIXELS, but the request asked only for SEED"),
])
def test_requested_outputs_must_match_the_format(settings, fmt, requested, error):
    requests = parse(settings, PROMPT="a", OUTPUT_FORMAT=fmt)
    if error is None:
        check_requested_outputs(requests, requested)
    else:
        with pytest.raises(RequestError, match=f"OUTPUT_FORMAT: {error}"):
            check_requested_outputs(requests, requested)


def test_a_bad_row_names_its_row_and_fails_the_request(settings):
    batch = {"PROMPT": np.array([[b"a"], [b"b"], [b"c"]], dtype=np.object_),
             "HEIGHT": np.array([[64], [72], [64]], dtype=np.int32)}
    with pytest.raises(RequestError, match=r"^HEIGHT: 72 is not allowed; must be a multiple of "
                                           r"16 .*\(in row index 1 of 3 rows; one bad row fails "
                                           r"the whole request\)$"):
        parse_request(batch, settings.defaults, settings.limits)


def test_a_single_row_error_has_no_row_suffix(settings):
    with pytest.raises(RequestError, match=r"^HEIGHT: 72 is not allowed; must be a multiple of "
                                           r"16 in \[64, 2048\]$"):
        parse(settings, PROMPT="a", HEIGHT=72)
