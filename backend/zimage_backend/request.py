"""The request contract: tensors in, validated generation requests out. No Triton imports.

Each batch row of a Triton request is one image. Every check raises `RequestError`, which names
the field, the value given and what is allowed, so a client can fix its request without reading
server logs.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from . import image_input
from .lora_field import FIELD as LORA_FIELD
from .lora_field import AdapterSet, LoraFieldError, parse_lora
from .settings import OUTPUT_FORMATS, AdapterSettings, Defaults, Limits

MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    triton_dtype: str  # as in config.pbtxt, without the TYPE_ prefix
    dims: tuple[int, ...]
    optional: bool = False


# The tensor contract. model.py registers these with Triton (auto_complete_config), so the
# config Triton reports, perf_analyzer and this parser all read the same table.
INPUTS = (
    TensorSpec("PROMPT", "STRING", (1,)),
    TensorSpec("NEGATIVE_PROMPT", "STRING", (1,), optional=True),
    TensorSpec("HEIGHT", "INT32", (1,), optional=True),
    TensorSpec("WIDTH", "INT32", (1,), optional=True),
    TensorSpec("NUM_INFERENCE_STEPS", "INT32", (1,), optional=True),
    TensorSpec("GUIDANCE_SCALE", "FP32", (1,), optional=True),
    TensorSpec("SEED", "INT64", (1,), optional=True),
    TensorSpec("OUTPUT_FORMAT", "STRING", (1,), optional=True),
    TensorSpec("LORA", "STRING", (1,), optional=True),  # adapters by name (lora_field.py)
    # Image inputs (image_input.py; README, "Image inputs"): encoded PNG, JPEG or WebP files.
    TensorSpec("IMAGE_INPUT", "STRING", (1,), optional=True),
    TensorSpec("STRENGTH", "FP32", (1,), optional=True),
    TensorSpec("MASK", "STRING", (1,), optional=True),  # white = repaint; needs IMAGE_INPUT
    TensorSpec("CONTROL_IMAGE", "STRING", (1,), optional=True),  # needs config.yaml controlnet
    TensorSpec("CONTROL_SCALE", "FP32", (1,), optional=True),
)
OUTPUTS = (
    TensorSpec("IMAGE", "STRING", (1,)),        # encoded png/jpeg/webp bytes
    TensorSpec("PIXELS", "UINT8", (-1, -1, 3)),  # raw HxWx3, only for OUTPUT_FORMAT raw
    TensorSpec("SEED", "INT64", (1,)),           # the seed actually used
    TensorSpec("METADATA", "STRING", (1,)),      # JSON: timings, batch size, weights label
    # JSON: the LoRA adapters requests may name; asked for alone, nothing is generated.
    TensorSpec("ADAPTERS", "STRING", (1,)),
)
_NUMPY_KINDS = {"STRING": ("O", "S", "U"), "INT32": ("i",), "INT64": ("i",), "FP32": ("f",)}
OUTPUT_ALIASES = {"jpg": "jpeg"}
# The modes, each run by the diffusers pipeline of the same task (engine.py).
TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINT, CONTROLNET, CONTROLNET_INPAINT = (
    "text_to_image", "image_to_image", "inpaint", "controlnet", "controlnet_inpaint")
STRENGTH_MODES = (IMAGE_TO_IMAGE, INPAINT)  # diffusers' ControlNet pipelines take no strength
CONTROL_MODES = (CONTROLNET, CONTROLNET_INPAINT)


class RequestError(ValueError):
    """A request that breaks the contract; answered with INVALID_ARG and never retried."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.detail = field, message


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    output_format: str
    negative_prompt: str | None = None
    loras: AdapterSet = ()  # LoRA adapters and scales, sorted by name
    # Decoded image inputs at height x width (image_input.py); compared by identity only.
    image: Image.Image | None = dataclasses.field(default=None, compare=False, repr=False)
    mask: Image.Image | None = dataclasses.field(default=None, compare=False, repr=False)
    control_image: Image.Image | None = dataclasses.field(default=None, compare=False,
                                                          repr=False)
    strength: float = 1.0  # used by STRENGTH_MODES only
    control_scale: float = 0.0  # used by CONTROL_MODES only

    @property
    def mode(self) -> str:
        if self.control_image is not None:
            return CONTROLNET_INPAINT if self.mask is not None else CONTROLNET
        if self.image is None:
            return TEXT_TO_IMAGE
        return INPAINT if self.mask is not None else IMAGE_TO_IMAGE

    @property
    def denoise_steps(self) -> int:
        """Denoising steps actually run: diffusers' get_timesteps skips the first
        int(steps - steps * strength) of the schedule in the strength modes."""
        steps = self.num_inference_steps
        if self.mode not in STRENGTH_MODES:
            return steps
        return steps - int(max(steps - min(steps * self.strength, steps), 0))

    @property
    def group_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (one adapter set per call)."""
        mode = self.mode
        return (mode, self.height, self.width, self.num_inference_steps, self.guidance_scale,
                self.loras, self.strength if mode in STRENGTH_MODES else None,
                self.control_scale if mode in CONTROL_MODES else None)

    def validate(self, limits: Limits) -> GenerationRequest:
        if not self.prompt.strip():
            raise RequestError("PROMPT", "is empty; give a non-empty text")
        _check_size(self.height, self.width, limits)
        if not 1 <= self.num_inference_steps <= limits.max_steps:
            raise RequestError("NUM_INFERENCE_STEPS", f"{self.num_inference_steps} is outside "
                                                      f"[1, {limits.max_steps}]")
        if not math.isfinite(self.guidance_scale) or not (
                0.0 <= self.guidance_scale <= limits.max_guidance_scale):
            raise RequestError("GUIDANCE_SCALE", f"{self.guidance_scale} is outside "
                                                 f"[0.0, {limits.max_guidance_scale}]")
        if not 0 <= self.seed <= MAX_SEED:
            raise RequestError("SEED", f"{self.seed} is outside [0, {MAX_SEED}]")
        if self.output_format not in OUTPUT_FORMATS:
            raise RequestError("OUTPUT_FORMAT", f"{self.output_format!r} is not one of "
                                                f"{', '.join(OUTPUT_FORMATS)}")
        if not math.isfinite(self.strength) or not 0.0 < self.strength <= 1.0:
            raise RequestError("STRENGTH", f"{self.strength} is outside (0.0, 1.0]")
        if self.denoise_steps < 1:
            raise RequestError("STRENGTH", (
                f"{self.strength} with {self.num_inference_steps} steps runs no denoising "
                f"step (diffusers runs int(steps * strength)); give at least "
                f"{1 / self.num_inference_steps:g}"))
        if not math.isfinite(self.control_scale) or not (
                0.0 <= self.control_scale <= limits.max_control_scale):
            raise RequestError("CONTROL_SCALE", f"{self.control_scale} is outside "
                                                f"[0.0, {limits.max_control_scale}]")
        return self


def _check_size(height: int, width: int, limits: Limits) -> None:
    for field, value in (("HEIGHT", height), ("WIDTH", width)):
        if value % 16 or not limits.min_size <= value <= limits.max_size:
            raise RequestError(
                field, f"{value} is not allowed; must be a multiple of 16 in "
                       f"[{limits.min_size}, {limits.max_size}]")
    if height * width > limits.max_pixels:
        raise RequestError(
            "HEIGHT", f"{height}x{width} is {height * width} pixels; "
                      f"at most {limits.max_pixels} are allowed")


def _column(tensors: Mapping[str, Any], spec: TensorSpec) -> np.ndarray | None:
    """Checks one input's dtype and [batch, 1] shape; returns it flattened to [batch]."""
    array = tensors.get(spec.name)
    if array is None:
        if spec.optional:
            return None
        raise RequestError(spec.name, "is required and missing")
    array = np.asarray(array)
    if array.dtype.kind not in _NUMPY_KINDS[spec.triton_dtype] or (
            spec.triton_dtype == "INT32" and array.dtype.itemsize != 4) or (
            spec.triton_dtype in ("INT64",) and array.dtype.itemsize != 8) or (
            spec.triton_dtype == "FP32" and array.dtype.itemsize != 4):
        raise RequestError(spec.name, f"has dtype {array.dtype}; expected {spec.triton_dtype}")
    if array.ndim != 2 or array.shape[1] != 1 or array.shape[0] < 1:
        raise RequestError(spec.name, f"has shape {list(array.shape)}; expected [batch, 1]")
    return array[:, 0]


def _text(field: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(field, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _blob(value: Any) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _check_combination(given: Callable[[str], Any], controlnet: bool) -> None:
    """Which image fields need which. Checked before the size and before any decoding, so a
    request that cannot be served in this combination hears that first."""
    image, mask, control = (given(name) for name in ("IMAGE_INPUT", "MASK", "CONTROL_IMAGE"))
    if mask is not None and image is None:
        raise RequestError("MASK", "needs IMAGE_INPUT, the image to repaint")
    if control is not None and not controlnet:
        raise RequestError("CONTROL_IMAGE", "needs a ControlNet, and this server has none "
                                            "configured (config.yaml controlnet)")
    if control is not None and image is not None and mask is None:
        raise RequestError("IMAGE_INPUT", "with CONTROL_IMAGE needs MASK (ControlNet "
                                          "inpainting); ControlNet image-to-image is not offered")
    if given("STRENGTH") is not None and (image is None or control is not None):
        raise RequestError("STRENGTH", "applies to IMAGE_INPUT without CONTROL_IMAGE "
                                       "(image-to-image, inpainting) only")
    if given("CONTROL_SCALE") is not None and control is None:
        raise RequestError("CONTROL_SCALE", "needs CONTROL_IMAGE")


def _images(given: Callable[[str], Any], limits: Limits,
            size: tuple[int, int] | None) -> dict[str, Any]:
    """The image fields of one row, which passed `_check_combination`, decoded and fitted to the
    generated size. `size` is HEIGHT x WIDTH when the row gives both, None when it gives
    neither."""
    image, mask, control = (given(name) for name in ("IMAGE_INPUT", "MASK", "CONTROL_IMAGE"))
    if image is None and control is None:
        return {}
    try:
        decoded = {name: image_input.decode(name, _blob(data), limits.max_input_bytes,
                                            limits.max_input_pixels)
                   for name, data in (("IMAGE_INPUT", image), ("MASK", mask),
                                      ("CONTROL_IMAGE", control)) if data is not None}
    except image_input.ImageInputError as exc:
        raise RequestError(exc.field, exc.detail) from None
    first = decoded.get("IMAGE_INPUT") or decoded["CONTROL_IMAGE"]
    if "MASK" in decoded and decoded["MASK"].size != first.size:
        raise RequestError("MASK", "is {}x{}; it must be the size of IMAGE_INPUT, {}x{}".format(
            *decoded["MASK"].size, *first.size))
    height, width = size or image_input.size_from_input(
        *first.size, limits.min_size, limits.max_size, limits.max_pixels)
    fitted = {}
    for name, key, convert in (("IMAGE_INPUT", "image", image_input.to_rgb),
                               ("MASK", "mask", image_input.to_mask),
                               ("CONTROL_IMAGE", "control_image", image_input.to_rgb)):
        if name in decoded:
            fitted[key] = image_input.fit(convert(decoded[name]), height, width)
    return {"height": height, "width": width, **fitted}


def parse_request(
    tensors: Mapping[str, Any],
    defaults: Defaults,
    limits: Limits,
    count_tokens: Callable[[str], int] | None = None,
    new_seed: Callable[[], int] = lambda: secrets.randbelow(MAX_SEED + 1),
    adapters: Mapping[str, AdapterSettings] | None = None,
    controlnet: bool = False,
) -> list[GenerationRequest]:
    """Turns one Triton request's input tensors into one validated request per batch row.

    `count_tokens` measures a prompt as the text encoder will see it, so the length limit is the
    one that actually truncates; without it only the other checks run. `controlnet`: whether
    the server has a ControlNet, which CONTROL_IMAGE needs.
    """
    known = {spec.name for spec in INPUTS}
    extra = sorted(set(tensors) - known)
    if extra:
        raise RequestError(extra[0], f"is not an input of this model; inputs are "
                                     f"{', '.join(sorted(known))}")
    columns = {spec.name: _column(tensors, spec) for spec in INPUTS}
    rows = len(columns["PROMPT"])
    for name, column in columns.items():
        if column is not None and len(column) != rows:
            raise RequestError(name, f"has {len(column)} rows; PROMPT has {rows}")

    def value(name: str, row: int, default: Any) -> Any:
        column = columns[name]
        return default if column is None else column[row]

    def parse_row(row: int) -> GenerationRequest:
        def given(name: str) -> Any:
            return value(name, row, None)

        prompt = _text("PROMPT", value("PROMPT", row, b""))
        negative = value("NEGATIVE_PROMPT", row, None)
        output_format = _text("OUTPUT_FORMAT",
                              value("OUTPUT_FORMAT", row, defaults.output_format)).strip().lower()
        seed = value("SEED", row, None)
        try:
            loras = parse_lora(_text(LORA_FIELD, value(LORA_FIELD, row, b"")), adapters or {},
                               limits)
        except LoraFieldError as exc:
            raise RequestError(LORA_FIELD, str(exc)) from None
        _check_combination(given, controlnet)
        sized = [given(name) is not None for name in ("HEIGHT", "WIDTH")]
        has_image = any(given(name) is not None for name in ("IMAGE_INPUT", "CONTROL_IMAGE"))
        if has_image and sized[0] != sized[1]:
            raise RequestError("HEIGHT" if sized[1] else "WIDTH", (
                "is missing; with an image input give HEIGHT and WIDTH together, or neither "
                "to generate at the input's size"))
        size = (int(value("HEIGHT", row, 0)), int(value("WIDTH", row, 0))) if all(sized) else None
        if size is not None and has_image:
            # Checked before decoding: the fit to this size must not meet an unchecked size.
            _check_size(*size, limits)
        images = _images(given, limits, size)
        request = GenerationRequest(
            prompt=prompt,
            negative_prompt=None if negative is None else _text("NEGATIVE_PROMPT", negative),
            height=images.pop("height", int(value("HEIGHT", row, defaults.height))),
            width=images.pop("width", int(value("WIDTH", row, defaults.width))),
            num_inference_steps=int(value("NUM_INFERENCE_STEPS", row,
                                          defaults.num_inference_steps)),
            guidance_scale=float(value("GUIDANCE_SCALE", row, defaults.guidance_scale)),
            seed=new_seed() if seed is None else int(seed),
            output_format=OUTPUT_ALIASES.get(output_format, output_format),
            loras=loras,
            strength=float(value("STRENGTH", row, defaults.strength)),
            control_scale=float(value("CONTROL_SCALE", row, defaults.control_scale)),
            **images,
        ).validate(limits)
        if count_tokens is not None:
            for field, text in (("PROMPT", request.prompt),
                                ("NEGATIVE_PROMPT", request.negative_prompt)):
                if text is not None and (n := count_tokens(text)) > limits.max_prompt_tokens:
                    raise RequestError(field, f"is {n} tokens long; at most "
                                              f"{limits.max_prompt_tokens} are allowed")
        return request

    requests = []
    for row in range(rows):
        try:
            requests.append(parse_row(row))
        except RequestError as exc:
            if rows == 1:
                raise
            raise RequestError(exc.field, f"{exc.detail} (in row index {row} of {rows} rows; "
                                          "one bad row fails the whole request)") from None
    if len({r.output_format for r in requests}) > 1 and any(
            r.output_format == "raw" for r in requests):
        raise RequestError("OUTPUT_FORMAT", "raw cannot be mixed with encoded formats in one "
                                            "request")
    if any(r.output_format == "raw" for r in requests) and len(
            {(r.height, r.width) for r in requests}) > 1:
        raise RequestError("HEIGHT", "rows of one raw request must share one size, since "
                                     "PIXELS is one [batch, H, W, 3] tensor")
    return requests


def check_requested_outputs(requests: list[GenerationRequest], requested: set[str]) -> None:
    """A request that names its outputs must name the one its format fills, or it would get an
    empty success after the whole generation."""
    if not requested:
        return  # Triton's default: every output the model produces
    needed = "PIXELS" if requests[0].output_format == "raw" else "IMAGE"
    if needed not in requested:
        raise RequestError("OUTPUT_FORMAT", (
            f"{requests[0].output_format!r} returns {needed}, but the request asked only for "
            f"{', '.join(sorted(requested))}; request {needed} too, or no outputs for all"))
