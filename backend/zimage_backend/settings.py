"""Typed view of config.yaml.

The YAML file is the one source of truth; these dataclasses only give it types and checks, so a
typo in a key fails at startup with the key's path instead of being silently ignored. Whether the
defaults and warmup sizes also pass a request's checks is `checked_settings`' job, which sits
above both this module and `request`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

CONFIG_ENV = "ZIMAGE_CONFIG"
LOAD_FORMATS = ("auto", "dummy", "tiny")
DTYPES = ("bfloat16", "float16", "float32")
OUTPUT_FORMATS = ("png", "jpeg", "webp", "raw")
ATTENTION_BACKENDS = ("_flash_3", "flash", "_native_cudnn", "_native_flash", "native")
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_MODULES = ("transformer", "vae_decoder", "text_encoder")
# The engine marks each text encode and each transformer forward as a new graph run and copies
# out what it keeps; the VAE decoder's output would be overwritten by its next replay.
CUDA_GRAPH_MODULES = ("text_encoder", "transformer")
# The transformer's static code was no faster than its dynamic code (bench/results/
# 2026-11-26-h200x2-c/results.md), and the text encoder meets every caption length.
STATIC_SHAPE_MODULES = ("vae_decoder",)
MEMORY_MODES = ("performance", "balanced", "memory_constrained")
PROMPT_PADDING = ("longest", "max_length")
# LoRA adapters (issue 13): a name is a word, so a request's LORA text can never hold a path or URL.
ADAPTER_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"


class SettingsError(ValueError):
    """config.yaml is malformed or holds a value outside what is allowed."""


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    load_format: str
    source: str
    revision: str | None
    dtype: str
    cpu_dtype: str
    demo_dir: str
    seed_for_random_weights: int

    @property
    def random_weights(self) -> bool:
        return self.load_format != "auto"

    @property
    def weights_label(self) -> str:
        """How served images describe their weights, so random ones are never mistaken for real."""
        # A local folder is named by its last part: a served image never shows a server path.
        local = Path(self.source).expanduser()
        name = local.name if local.is_absolute() or local.exists() or self.source.startswith(
            (".", "~")) else self.source
        return {
            "auto": f"pretrained ({name})",
            "dummy": "random (full Z-Image-Turbo shape, dummy load format)",
            "tiny": "random (tiny demo pipeline)",
        }[self.load_format]


@dataclasses.dataclass(frozen=True)
class Defaults:
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    output_format: str
    strength: float  # image-to-image and inpainting without STRENGTH
    control_scale: float  # ControlNet modes without CONTROL_SCALE


@dataclasses.dataclass(frozen=True)
class Limits:
    min_size: int
    max_size: int
    max_pixels: int
    max_steps: int
    max_guidance_scale: float
    max_prompt_tokens: int
    max_images_per_call: int
    max_pixels_per_call: int
    gpu_memory_gib: float | None  # None: the whole GPU
    max_adapters_per_request: int  # LoRA adapters one image may use at once
    max_adapter_scale: float  # a request's adapter scale must lie in [-max, max]
    max_input_bytes: int  # each image input's encoded size
    max_input_pixels: int  # each image input's decoded size, read from its header first
    max_control_scale: float  # CONTROL_SCALE must lie in [0, max]

    def images_per_call(self, height: int, width: int) -> int:
        """How many images of this size one pipeline call may hold."""
        return max(1, min(self.max_images_per_call, self.max_pixels_per_call // (height * width)))


@dataclasses.dataclass(frozen=True)
class Encoding:
    png_compress_level: int
    png_threads: int
    jpeg_quality: int
    webp_quality: int


@dataclasses.dataclass(frozen=True)
class TorchCompile:
    enabled: bool
    mode: str
    modules: tuple[str, ...]
    fullgraph: bool
    dynamic: bool | None  # None: torch's automatic dynamic shapes after a first recompile
    attention_in_graph: bool  # false: SDPA runs eagerly between the compiled pieces
    cuda_graphs: tuple[str, ...]  # compiled modules that replay CUDA graphs (reduce-overhead)
    graph_max_pixels: int  # the transformer replays graphs for images of at most this many
    graph_pool_size: int  # ...and for at most this many (batch, size, caption, mode) keys
    static_shapes: tuple[str, ...]  # compiled modules with static code for every warmed shape


@dataclasses.dataclass(frozen=True)
class Warmup:
    enabled: bool
    sizes: tuple[tuple[int, int], ...]
    num_inference_steps: int


@dataclasses.dataclass(frozen=True)
class Optimizations:
    inference_mode: bool
    cudnn_benchmark: bool
    tf32: bool
    channels_last: bool
    attention_backends: tuple[str, ...]
    unmasked_attention_backends: tuple[str, ...]  # empty: attention_backends serves all
    vae_tiling: bool
    vae_slicing: bool
    attention_slicing: bool
    memory_mode: str
    fuse_projections: bool
    qk_norm_rope: bool  # one Triton kernel for the q/k norms and RoPE
    prompt_padding: str
    text_encoder_stack: bool  # the text encoder's layers as one module (text_stack.TextStack)
    fp8: bool
    # Shell-style patterns on the transformer's module names whose linear layers stay bf16 with
    # fp8 (float8.select); each must match a linear layer, checked when the step runs.
    fp8_keep_bf16: tuple[str, ...]
    fp8_text_encoder: bool  # the same FP8 products in the text encoder's linear layers
    fp8_text_encoder_keep_bf16: tuple[str, ...]  # as fp8_keep_bf16, on the text encoder's names
    torch_compile: TorchCompile
    warmup: Warmup


# --- ControlNet (issue 14) ------------------------------------------------------------------
CONTROLNET_LOAD_FORMATS = ("none", "auto", "dummy", "tiny")
# PIL's own decompression-bomb check warns above 64 Mi pixels (image_input.py).
MAX_INPUT_PIXELS = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class ControlNetSettings:
    """config.yaml's `controlnet:`: loaded at startup only when load_format is not none."""

    load_format: str  # none | auto (from_pretrained or from_single_file) | dummy | tiny
    source: str | None  # auto: a hub repo id, a local folder, or a local .safetensors file
    revision: str | None

    @property
    def enabled(self) -> bool:
        return self.load_format != "none"


# --- LoRA adapters (issue 13) ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AdapterSettings:
    """One entry of config.yaml's `adapters:` registry; loaded by adapters.py at startup."""

    source: str  # a local .safetensors file or folder (absolute), or a hub repo id with `file`
    file: str | None  # with a hub repo id: the file inside the repo; null for a local source
    revision: str | None  # with a hub repo id: the commit or tag to pin
    scale: float  # used when a request names the adapter without a scale

    @property
    def from_hub(self) -> bool:
        return self.file is not None


def _validate_adapters(adapters: dict[str, AdapterSettings], limits: Limits) -> None:
    if not 0 <= limits.max_adapters_per_request <= 16:
        raise SettingsError(f"limits.max_adapters_per_request: {limits.max_adapters_per_request} "
                            "is outside [0, 16]")
    if not (math.isfinite(limits.max_adapter_scale) and limits.max_adapter_scale > 0):
        raise SettingsError(f"limits.max_adapter_scale: {limits.max_adapter_scale} must be a "
                            "finite number above 0")
    for name, adapter in adapters.items():
        key = f"adapters.{name}"
        if not isinstance(name, str) or not re.fullmatch(ADAPTER_NAME, name):
            raise SettingsError(f"adapters: name {name!r} is not allowed; names are 1-64 letters, "
                                "digits, '_', '.' or '-', starting with a letter or digit")
        if not (math.isfinite(adapter.scale)
                and abs(adapter.scale) <= limits.max_adapter_scale):
            raise SettingsError(f"{key}.scale: {adapter.scale} is outside "
                                f"[-{limits.max_adapter_scale}, {limits.max_adapter_scale}]")
        if adapter.from_hub:
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", adapter.source):
                raise SettingsError(f"{key}.source: {adapter.source!r} is not a hub repo id "
                                    "(owner/name), which `file` asks for")
            if not adapter.file.endswith(".safetensors") or adapter.file.startswith("/") \
                    or ".." in Path(adapter.file).parts:
                raise SettingsError(f"{key}.file: {adapter.file!r} must be a .safetensors file "
                                    "inside the repo")
        else:
            if adapter.revision is not None:
                raise SettingsError(f"{key}.revision: a local source has no revision; set it to "
                                    "null, or give `file` for a hub repo")
            if not Path(adapter.source).expanduser().is_absolute():
                raise SettingsError(f"{key}.source: {adapter.source!r} is not an absolute path; "
                                    "a local adapter is an absolute file or folder path (or give "
                                    "`file` for a hub repo)")


@dataclasses.dataclass(frozen=True)
class Settings:
    model: ModelSettings
    defaults: Defaults
    limits: Limits
    encoding: Encoding
    optimizations: Optimizations
    adapters: dict[str, AdapterSettings]  # LoRA registry (issue 13); {}: none, nothing wrapped
    controlnet: ControlNetSettings  # issue 14; load_format none: CONTROL_IMAGE is refused

    def validate(self) -> Settings:
        m, d, lim, o = self.model, self.defaults, self.limits, self.optimizations
        tc = o.torch_compile
        _one_of("model.load_format", m.load_format, LOAD_FORMATS)
        _one_of("model.dtype", m.dtype, DTYPES)
        _one_of("model.cpu_dtype", m.cpu_dtype, DTYPES)
        _one_of("defaults.output_format", d.output_format, OUTPUT_FORMATS)
        _one_of("optimizations.memory_mode", o.memory_mode, MEMORY_MODES)
        _one_of("optimizations.prompt_padding", o.prompt_padding, PROMPT_PADDING)
        for name in o.attention_backends:
            _one_of("optimizations.attention_backends[]", name, ATTENTION_BACKENDS)
        for name in o.unmasked_attention_backends:
            _one_of("optimizations.unmasked_attention_backends[]", name, ATTENTION_BACKENDS)
        for key in ("fp8_keep_bf16", "fp8_text_encoder_keep_bf16"):
            for pattern in getattr(o, key):
                if not pattern.strip():
                    raise SettingsError(f"optimizations.{key}: {pattern!r} is not a pattern; "
                                        "give module-name patterns such as 'layers.1[5-9]'")
        if lim.gpu_memory_gib is not None and not lim.gpu_memory_gib > 0:
            raise SettingsError(f"limits.gpu_memory_gib: {lim.gpu_memory_gib} must be positive "
                                "or null (the whole GPU)")
        if not o.attention_backends:
            raise SettingsError("optimizations.attention_backends: give at least one backend")
        _one_of("optimizations.torch_compile.mode", tc.mode, TORCH_COMPILE_MODES)
        for name in tc.modules:
            _one_of("optimizations.torch_compile.modules[]", name, COMPILE_MODULES)
        for name in tc.cuda_graphs:
            _one_of("optimizations.torch_compile.cuda_graphs[]", name, CUDA_GRAPH_MODULES)
            if name not in tc.modules:
                raise SettingsError(f"optimizations.torch_compile.cuda_graphs: {name!r} is not "
                                    "compiled; add it to optimizations.torch_compile.modules")
        for name in tc.static_shapes:
            _one_of("optimizations.torch_compile.static_shapes[]", name, STATIC_SHAPE_MODULES)
            if name not in tc.modules:
                raise SettingsError(f"optimizations.torch_compile.static_shapes: {name!r} is not "
                                    "compiled; add it to optimizations.torch_compile.modules")
        for key in ("graph_max_pixels", "graph_pool_size"):
            if getattr(tc, key) < 0:
                raise SettingsError(f"optimizations.torch_compile.{key}: {getattr(tc, key)} "
                                    "must be 0 or more")
        if lim.min_size % 16 or lim.max_size % 16 or not 16 <= lim.min_size <= lim.max_size:
            raise SettingsError(
                f"limits.min_size/max_size: {lim.min_size}/{lim.max_size}; both must be multiples "
                "of 16 with 16 <= min_size <= max_size"
            )
        for i, size in enumerate(o.warmup.sizes):
            if any(side < 16 or side % 16 for side in size):
                raise SettingsError(f"optimizations.warmup.sizes[{i}]: {list(size)} is not allowed; "
                                    "give [height, width], both positive multiples of 16")
        for key, value, low, high in (
            ("limits.max_steps", lim.max_steps, 1, 1000),
            ("limits.max_prompt_tokens", lim.max_prompt_tokens, 16, 4096),
            ("limits.max_images_per_call", lim.max_images_per_call, 1, 256),
            ("limits.max_pixels_per_call", lim.max_pixels_per_call, 1, 2**30),
            ("encoding.png_compress_level", self.encoding.png_compress_level, 0, 9),
            ("encoding.png_threads", self.encoding.png_threads, 1, 256),
            ("encoding.jpeg_quality", self.encoding.jpeg_quality, 1, 100),
            ("encoding.webp_quality", self.encoding.webp_quality, 1, 100),
            ("optimizations.warmup.num_inference_steps", o.warmup.num_inference_steps, 1, 1000),
        ):
            if not low <= value <= high:
                raise SettingsError(f"{key}: {value} is outside [{low}, {high}]")
        _validate_adapters(self.adapters, lim)
        _one_of("controlnet.load_format", self.controlnet.load_format, CONTROLNET_LOAD_FORMATS)
        if self.controlnet.load_format == "auto" and not self.controlnet.source:
            raise SettingsError("controlnet.source: load_format auto needs a source")
        if not 1 <= lim.max_input_bytes <= 2**30:
            raise SettingsError(f"limits.max_input_bytes: {lim.max_input_bytes} is outside "
                                f"[1, {2**30}]")
        if not lim.max_pixels <= lim.max_input_pixels <= MAX_INPUT_PIXELS:
            raise SettingsError(f"limits.max_input_pixels: {lim.max_input_pixels} is outside "
                                f"[limits.max_pixels ({lim.max_pixels}), {MAX_INPUT_PIXELS}]")
        if not (math.isfinite(lim.max_control_scale) and lim.max_control_scale > 0):
            raise SettingsError(f"limits.max_control_scale: {lim.max_control_scale} must be a "
                                "finite number above 0")
        if not (0.0 < d.strength <= 1.0):
            raise SettingsError(f"defaults.strength: {d.strength} is outside (0.0, 1.0]")
        if not 0.0 <= d.control_scale <= lim.max_control_scale:
            raise SettingsError(f"defaults.control_scale: {d.control_scale} is outside "
                                f"[0.0, limits.max_control_scale ({lim.max_control_scale})]")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise SettingsError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _build(cls: type, data: Any, path: str) -> Any:
    """Builds dataclass `cls` from YAML data, rejecting unknown keys and wrong types by path."""
    if not isinstance(data, dict):
        raise SettingsError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = sorted(f.name for f in dataclasses.fields(cls))
    # Unknown before missing: a misspelled key is both, and its spelling is what to fix.
    unknown = sorted((key for key in data if key not in names), key=str)
    if unknown:
        key = str(unknown[0])
        closest = difflib.get_close_matches(key, names, n=1)
        hint = f"the closest known key is {closest[0]}; " if closest else ""
        raise SettingsError(f"{_join(path, key)}: unknown key; {hint}known keys here: "
                            f"{', '.join(names)}")
    missing = [name for name in names if name not in data]
    if missing:
        raise SettingsError(f"{path or 'config'}: missing key(s) {', '.join(missing)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, _join(path, key))
    return cls(**kwargs)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _coerce(hint, value, path)
    if origin is dict:  # adapters: name -> entry
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise SettingsError(f"{path}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{path}: expected a list, got {value!r}")
        if args[-1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise SettingsError(f"{path}: expected a list of {len(args)} items, got {value!r}")
        return tuple(_coerce(inner, v, f"{path}[{i}]") for i, (inner, v) in enumerate(zip(args, value)))
    if hint is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SettingsError(f"{path}: expected a string, got {value!r}")
        return value
    raise SettingsError(f"{path}: unsupported setting type {hint}")  # a bug in this module


def parse_settings(data: dict[str, Any] | None) -> Settings:
    return _build(Settings, data or {}, "").validate()


def load_settings(path: str | os.PathLike[str] | None = None,
                  check: Callable[[Settings], Settings] | None = None) -> Settings:
    """Reads config.yaml from `path`, else from $ZIMAGE_CONFIG; `check` runs further checks
    that belong to other modules (see `checked_settings`).

    Every error is one line that starts with the file, so a launcher can show it as it is.
    """
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        raise SettingsError(f"no config file given and ${CONFIG_ENV} is not set")
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise SettingsError(f"{path}: not valid YAML{where}: {problem}") from None
    try:
        settings = parse_settings(data)
        return check(settings) if check is not None else settings
    except SettingsError as exc:
        raise SettingsError(f"{path}: {exc}") from None
