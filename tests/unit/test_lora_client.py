"""The client's side of LoRA: the LORA text it sends, what it refuses, the CLI flags and the
listing it reads. The server's answers to these are tested in tests/e2e/test_lora.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zimage_backend.lora_field import parse_lora
from zimage_backend.settings import AdapterSettings, Limits
from zimage_client._tensors import GenerateRequest, parse_adapter_listing
from zimage_client.cli import parse_args
from zimage_client.errors import ZImageResponseError


def test_loras_become_one_lora_row_the_server_parses_back():
    request = GenerateRequest("a cat", loras={"ink": 0.1 + 0.2, "film-grain": None})
    (text,), = request.input_arrays()["LORA"]
    assert text == b"film-grain, ink:0.30000000000000004"
    registry = {"ink": AdapterSettings("/x", None, None, 1.0),
                "film-grain": AdapterSettings("/y", None, None, 0.5)}
    limits = Limits(64, 2048, 2**22, 50, 20.0, 512, 4, 2**20, gpu_memory_gib=None,
                    max_adapters_per_request=2, max_adapter_scale=4.0, max_input_bytes=2**20,
                    max_input_pixels=2**22, max_control_scale=2.0)
    # Exactly the scales asked for, and the registry's default where none was given.
    assert parse_lora(text.decode(), registry, limits) == (("film-grain", 0.5),
                                                           ("ink", 0.1 + 0.2))


def test_no_loras_sends_no_lora_input():
    assert "LORA" not in GenerateRequest("a cat").input_arrays()
    assert "LORA" not in GenerateRequest("a cat", loras={}).input_arrays()


@pytest.mark.parametrize("loras, error", [
    ({"a,b": 1.0}, ValueError), ({"a:1": 1.0}, ValueError), ({" ": 1.0}, ValueError),
    ({"ink": "1"}, TypeError), (["ink"], TypeError), ({"ink": True}, TypeError),
])
def test_loras_that_would_change_meaning_are_refused(loras, error):
    with pytest.raises(error, match="loras"):
        GenerateRequest("a cat", loras=loras)


def test_cli_lora_flags():
    args = parse_args(["a cat", "--lora", "ink:0.5", "--lora", "film-grain"])
    assert dict(args.lora) == {"ink": 0.5, "film-grain": None}
    assert parse_args(["--list-adapters"]).prompt_list == []


@pytest.mark.parametrize("argv", [["a", "--lora", "ink:x"], ["a", "--lora", ":1"],
                                  ["a", "--lora", "ink", "--lora", "ink:2"]])
def test_cli_bad_lora_is_a_usage_error(argv):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2


class _Result:
    def __init__(self, value):
        self.value = value

    def as_numpy(self, name):
        return None if self.value is None else np.array([[self.value]], dtype=object)


def test_listing_is_read_from_the_adapters_output():
    listing = {"adapters": {"ink": {"scale": 0.8}}, "max_adapters_per_request": 2}
    assert parse_adapter_listing(_Result(json.dumps(listing).encode())) == listing
    for bad in (None, b"not json", b"[1]"):
        with pytest.raises(ZImageResponseError, match="ADAPTERS"):
            parse_adapter_listing(_Result(bad))
