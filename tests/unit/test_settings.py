from __future__ import annotations

import copy

import pytest
import yaml

from zimage_backend.settings import SettingsError, parse_settings

from tests.conftest import CONFIG


@pytest.fixture()
def data():
    return yaml.safe_load(CONFIG.read_text())


def test_shipped_config_loads(settings):
    assert settings.defaults.num_inference_steps == 8
    assert settings.defaults.guidance_scale == 0.0
    assert settings.model.load_format in ("auto", "dummy", "tiny")
    assert settings.optimizations.attention_backends[-1] == "native"


def test_unknown_key_is_named(data):
    data["optimizations"]["torch_compil"] = True
    with pytest.raises(SettingsError, match=r"optimizations: unknown key\(s\) torch_compil"):
        parse_settings(data)


def test_missing_key_is_named(data):
    del data["limits"]["max_steps"]
    with pytest.raises(SettingsError, match=r"limits: missing key\(s\) max_steps"):
        parse_settings(data)


@pytest.mark.parametrize("path, value, message", [
    (("model", "load_format"), "fast", "model.load_format: 'fast' is not one of auto, dummy, tiny"),
    (("model", "dtype"), "int8", "model.dtype"),
    (("optimizations", "attention_backends"), ["flash", "xformers"], "attention_backends"),
    (("optimizations", "memory_mode"), "always", "optimizations.memory_mode"),
    (("optimizations", "prompt_padding"), "some", "optimizations.prompt_padding"),
    (("limits", "min_size"), 100, "multiples of 16"),
    (("optimizations", "tf32"), "yes", "optimizations.tf32: expected true or false"),
    (("limits", "max_steps"), 2.5, "limits.max_steps: expected an integer"),
    (("defaults", "height"), 4096, "defaults or warmup break the limits: HEIGHT"),
    (("optimizations", "warmup", "sizes"), [[100, 64]], "defaults or warmup break the limits"),
    (("optimizations", "torch_compile", "cuda_graphs"), ["transformer"],
     "cuda_graphs.*'transformer' is not one of text_encoder"),
])
def test_bad_values_are_rejected(data, path, value, message):
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_settings(data)


def test_weights_label_marks_random_weights(settings):
    import dataclasses

    for fmt, random in (("tiny", True), ("dummy", True), ("auto", False)):
        model = dataclasses.replace(settings.model, load_format=fmt)
        assert model.random_weights is random
        assert model.weights_label.startswith("random") is random


def test_cuda_graphs_need_the_module_compiled(data):
    data["optimizations"]["torch_compile"]["modules"] = ["transformer"]
    data["optimizations"]["torch_compile"]["cuda_graphs"] = ["text_encoder"]
    with pytest.raises(SettingsError, match="'text_encoder' is not compiled; add it to "
                       r"optimizations.torch_compile.modules"):
        parse_settings(data)
