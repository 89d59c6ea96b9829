"""The LoRA registry's config checks and the LORA request field, without a model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from tests.conftest import CONFIG
from zimage_backend.request import RequestError, parse_request
from zimage_backend.settings import SettingsError, parse_settings

LOCAL = {"source": "/models/lora/ink.safetensors", "file": None, "revision": None, "scale": 0.8}
HUB = {"source": "someone/z-image-ink", "file": "ink.safetensors", "revision": "0123abc",
       "scale": 1.0}


@pytest.fixture()
def data():
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture()
def settings(data):
    data["adapters"] = {"ink": LOCAL, "film-grain": dict(LOCAL, scale=1.0), "hub.one": HUB}
    return parse_settings(data)


def test_registry_entries_are_typed(settings):
    assert settings.adapters["ink"].scale == 0.8
    assert not settings.adapters["ink"].from_hub
    assert settings.adapters["hub.one"].from_hub


@pytest.mark.parametrize("name, entry, message", [
    ("bad/name", LOCAL, "adapters: name 'bad/name' is not allowed"),
    ("ink", dict(LOCAL, scale=9.0), r"adapters.ink.scale: 9.0 is outside \[-4.0, 4.0\]"),
    ("ink", dict(LOCAL, scale=float("nan")), "adapters.ink.scale: nan is outside"),
    ("ink", dict(LOCAL, source="loras/ink.safetensors"), "is not an absolute path"),
    ("ink", dict(LOCAL, revision="main"), "adapters.ink.revision: a local source has no revision"),
    ("ink", dict(HUB, source="https://example.com/x"), "is not a hub repo id"),
    ("ink", dict(HUB, file="ink.bin"), "adapters.ink.file: 'ink.bin' must be a .safetensors"),
    ("ink", dict(HUB, file="../../etc/x.safetensors"), "must be a .safetensors file inside"),
    ("ink", {"source": "/x.safetensors", "scale": 1.0}, r"adapters.ink: missing key\(s\) file"),
    ("ink", dict(LOCAL, weight=1.0), r"adapters\.ink\.weight: unknown key; known keys here: file, revision, scale, source"),
])
def test_bad_registry_entries_name_the_key(data, name, entry, message):
    data["adapters"] = {name: entry}
    with pytest.raises(SettingsError, match=message):
        parse_settings(data)


def test_adapter_limits_are_checked(data):
    data = copy.deepcopy(data)
    data["limits"]["max_adapter_scale"] = float("inf")
    with pytest.raises(SettingsError, match="limits.max_adapter_scale: inf"):
        parse_settings(data)


def _parse(settings, *texts):
    tensors = {"PROMPT": np.array([[b"a cat"]] * len(texts), dtype=object),
               "LORA": np.array([[t.encode()] for t in texts], dtype=object)}
    return parse_request(tensors, settings.defaults, settings.limits, adapters=settings.adapters)


def test_lora_rows_parse_to_sorted_sets_with_default_scales(settings):
    rows = _parse(settings, "ink", " film-grain:0.5 , ink:-1.25", "", "ink:0.8")
    assert [r.loras for r in rows] == [(("ink", 0.8),), (("film-grain", 0.5), ("ink", -1.25)),
                                       (), (("ink", 0.8),)]
    # Same set, same call; a different set never shares one.
    assert rows[0].group_key == rows[3].group_key != rows[2].group_key
    assert rows[1].group_key != rows[0].group_key


def test_no_lora_input_means_no_adapters(settings):
    tensors = {"PROMPT": np.array([[b"a cat"]], dtype=object)}
    assert parse_request(tensors, settings.defaults, settings.limits,
                         adapters=settings.adapters)[0].loras == ()


ALLOWED = "allowed names: film-grain, hub.one, ink"


@pytest.mark.parametrize("text, words", [
    ("sketch", f"'sketch' does not name an adapter of this server; {ALLOWED}"),
    ("/etc/passwd", f"'/etc/passwd' does not name an adapter of this server; {ALLOWED}"),
    ("https://example.com/x.safetensors", "does not name an adapter"),
    ("../ink", "'../ink' does not name an adapter"),
    ("ink:abc", "'ink:abc': scale 'abc' is not a number"),
    ("ink:nan", r"'ink:nan': scale nan is outside \[-4.0, 4.0\]"),
    ("ink:inf", "scale inf is outside"),
    ("ink:5", r"'ink:5': scale 5.0 is outside \[-4.0, 4.0\]"),
    ("ink,ink:0.5", "'ink' is named twice"),
    ("ink, film-grain, hub.one", "names 3 adapters; at most 2 are allowed per image"),
    ("ink,", "'' does not name an adapter"),
])
def test_bad_lora_text_names_field_value_and_allowed(settings, text, words):
    with pytest.raises(RequestError, match=words) as info:
        _parse(settings, "ink", text)
    assert info.value.field == "LORA"
    assert str(info.value).startswith("LORA: ")


def test_server_without_adapters_says_so(data):
    settings = parse_settings(data)
    with pytest.raises(RequestError, match="allowed names: none .this server has no adapters"):
        _parse(settings, "ink")
    assert _parse(settings, " ")[0].loras == ()
