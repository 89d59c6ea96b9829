from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
import yaml

from zimage_backend.checked_settings import check_against_requests, load_checked_settings
from zimage_backend.settings import SettingsError, load_settings, parse_settings

from tests.conftest import CONFIG


@pytest.fixture()
def data():
    return yaml.safe_load(CONFIG.read_text())


def _as_yaml(value):
    """A typed value as YAML writes it: tuples are lists."""
    if isinstance(value, dict):
        return {k: _as_yaml(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_yaml(v) for v in value]
    return value


def test_shipped_config_loads_every_value_as_written(settings, data):
    # The typed view must neither drop, add nor change a value of the file.
    assert _as_yaml(settings.to_dict()) == data
    assert settings.optimizations.warmup.sizes == ((1024, 1024), (512, 512))
    assert isinstance(settings.defaults.guidance_scale, float)


def test_unknown_key_is_named(data):
    data["optimizations"]["torch_compil"] = True
    with pytest.raises(SettingsError, match=r"optimizations.torch_compil: unknown key"):
        parse_settings(data)


def test_misspelled_key_is_unknown_with_the_closest_known_key(data):
    # The right key is missing too; the misspelling is what to report.
    data["encoding"]["png_thread"] = data["encoding"].pop("png_threads")
    with pytest.raises(SettingsError) as exc:
        parse_settings(data)
    assert str(exc.value).startswith("encoding.png_thread: unknown key; the closest known key "
                                     "is png_threads; known keys here: jpeg_quality, ")


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
    (("optimizations", "torch_compile", "mode"), "fast",
     "optimizations.torch_compile.mode: 'fast' is not one of default, reduce-overhead, "
     "max-autotune, max-autotune-no-cudagraphs"),
    (("optimizations", "warmup", "sizes"), [[1024, 1024], [100, 64]],
     "optimizations.warmup.sizes[1]: [100, 64] is not allowed; give [height, width], both "
     "positive multiples of 16"),
    (("optimizations", "warmup", "sizes"), [[1024]],
     "optimizations.warmup.sizes[0]: expected a list of 2 items, got [1024]"),
    (("optimizations", "warmup", "sizes"), [[512, 512, 3]],
     "optimizations.warmup.sizes[0]: expected a list of 2 items"),
    (("optimizations", "warmup", "sizes"), [[0, 512]], "optimizations.warmup.sizes[0]: [0, 512]"),
    (("optimizations", "torch_compile", "cuda_graphs"), ["vae_decoder"],
     "cuda_graphs.*'vae_decoder' is not one of text_encoder, transformer"),
    (("optimizations", "torch_compile", "static_shapes"), ["transformer"],
     "static_shapes.*'transformer' is not one of vae_decoder"),
    (("optimizations", "torch_compile", "graph_pool_size"), -1,
     "optimizations.torch_compile.graph_pool_size: -1 must be 0 or more"),
])
def test_bad_values_are_rejected(data, path, value, message):
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(SettingsError, match=re.sub(r"([()\[\]])", r"\\\1", message)):
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


@pytest.mark.parametrize("path, value, message", [
    (("defaults", "height"), 4096, "defaults.height: 4096 is not allowed; must be a multiple of 16 "
                                   "in [64, 2048] (from the limits section)"),
    (("defaults", "num_inference_steps"), 60, "defaults.num_inference_steps: 60 is outside [1, 50]"),
    (("optimizations", "warmup", "sizes"), [[512, 512], [4096, 512]],
     "optimizations.warmup.sizes[1]: 4096 is not allowed"),
    (("optimizations", "warmup", "num_inference_steps"), 51,
     "optimizations.warmup.num_inference_steps: 51 is outside [1, 50]"),
])
def test_defaults_and_warmup_must_pass_a_requests_checks(data, path, value, message):
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    settings = parse_settings(data)  # each value alone is in range; only the limits reject it
    with pytest.raises(SettingsError) as exc:
        check_against_requests(settings)
    assert str(exc.value).startswith(message)


def _write(tmp_path, data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_file_errors_are_one_line_that_names_the_file(tmp_path, data):
    data["defaults"]["height"] = 4096
    path = _write(tmp_path, data)
    assert load_settings(path).defaults.height == 4096  # the file's own checks pass
    with pytest.raises(SettingsError) as exc:
        load_checked_settings(path)
    assert str(exc.value).startswith(f"{path}: defaults.height: 4096 is not allowed")

    data["defaults"]["height"] = 1024
    data["encoding"]["png_threads"] = 0
    path = _write(tmp_path, data)
    with pytest.raises(SettingsError, match=rf"^{path}: encoding.png_threads: 0 is outside \[1, 256\]$"):
        load_checked_settings(path)

    path = _write(tmp_path, "model:\n  load_format: tiny\n   dtype: [\n")
    with pytest.raises(SettingsError) as exc:
        load_settings(path)
    assert str(exc.value).startswith(f"{path}: not valid YAML at line 3, column ")
    assert "\n" not in str(exc.value)

    with pytest.raises(SettingsError, match=f"^{tmp_path / 'missing.yaml'}: cannot read: "):
        load_settings(tmp_path / "missing.yaml")


def test_settings_do_not_import_the_request_contract():
    # request imports settings; the reverse, even in a function body, would be an import cycle.
    code = ("import sys, yaml; from zimage_backend.settings import parse_settings; "
            f"parse_settings(yaml.safe_load(open({str(CONFIG)!r}))); "
            "print('zimage_backend.request' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
