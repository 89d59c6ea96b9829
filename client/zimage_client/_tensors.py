"""Request tensors and response parsing for the ``zimage`` model, shared by sync and asyncio clients.

Everything here is protocol-agnostic: requests are plain numpy arrays until
``to_infer_inputs`` wraps them with whichever tritonclient module is in use, and
responses are read through ``as_numpy(name)`` only, which both gRPC and HTTP
``InferResult`` objects provide.  That is also what makes this testable without
a server.
"""

from __future__ import annotations

import io
import json
import logging
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .errors import ZImageResponseError
from .generated_image import GeneratedImage, open_encoded

__all__ = [
    "GenerateRequest",
    "IMAGE_ARGUMENTS",
    "IMAGE_ARGUMENT_NAMES",
    "ImageArgument",
    "encode_image",
    "image_arguments",
    "OUTPUT_FORMATS",
    "normalize_output_format",
    "to_infer_inputs",
    "to_requested_outputs",
    "parse_result",
]

_LOGGER = logging.getLogger(__name__)

OUTPUT_FORMATS = ("png", "jpeg", "webp", "raw")
_FORMAT_ALIASES = {"jpg": "jpeg"}
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}

_INT32 = np.iinfo(np.int32)
_INT64 = np.iinfo(np.int64)


def normalize_output_format(output_format: Optional[str]) -> Optional[str]:
    """Lower-case and de-alias a format name.

    Unknown names are passed through rather than rejected: the server owns the
    list of formats, and its INVALID_ARG error names the allowed values.
    """
    if output_format is None:
        return None
    if not isinstance(output_format, str):
        raise TypeError(f"output_format must be a str, got {type(output_format).__name__}")
    name = output_format.strip().lower()
    return _FORMAT_ALIASES.get(name, name)


def _check_int(name: str, value: Any, bounds: np.iinfo) -> Optional[int]:
    if value is None:
        return None
    # bool is an int subclass; True as a height is almost certainly a bug.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not bounds.min <= value <= bounds.max:
        raise ValueError(f"{name}={value} does not fit the server's {bounds.dtype} input")
    return value


def _check_float(name: str, value: Any) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _check_text(name: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _check_loras(value: Any) -> Tuple[Tuple[str, Optional[float]], ...]:
    """LoRA adapters as ``{name: scale}`` (None: the server's default scale) to sorted pairs.

    Names are the server's to check (its INVALID_ARG lists the allowed ones); only what would
    change the LORA text's meaning is refused here.
    """
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise TypeError(f"loras must be a mapping of adapter name to scale, got {type(value).__name__}")
    pairs = []
    for name, scale in value.items():
        if not isinstance(name, str) or not name.strip() or any(c in name for c in ",:"):
            raise ValueError(f"loras: adapter name {name!r} must be a non-empty str without ',' or ':'")
        pairs.append((name.strip(), _check_float(f"loras[{name!r}]", scale)))
    return tuple(sorted(pairs))


# What an image argument may be: a path read by the client, the encoded file, or a PIL image.
ImageArgument = Union[str, "os.PathLike[str]", bytes, Image.Image]
# Image arguments (issue 14) and the input tensor each becomes.
IMAGE_ARGUMENTS = {"image": "IMAGE_INPUT", "mask": "MASK", "control_image": "CONTROL_IMAGE"}
# Every argument of the image modes, as generate() names them.
IMAGE_ARGUMENT_NAMES = ("image", "strength", "mask", "control_image", "control_scale")
# Modes Pillow writes as PNG as they are; any other (CMYK, YCbCr, HSV, ...) is sent as RGB.
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


def encode_image(name: str, value: Any) -> Optional[bytes]:
    """An image argument as the encoded file the server decodes.

    bytes are sent as they are; a path (str or os.PathLike) is read here, on the caller's
    machine; a PIL image is encoded as PNG (lossless, so the server sees its pixels). Whether
    the bytes are an image of an allowed format and size is the server's to check.
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value, "rb") as stream:
                return stream.read()
        except OSError as exc:
            raise ValueError(f"{name}: cannot read {os.fspath(value)!r}: {exc.strerror or exc}") from None
    if isinstance(value, Image.Image):
        image = value if value.mode in _PNG_MODES else value.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"{name} must be a path (str or os.PathLike), bytes or a PIL.Image.Image, "
                    f"got {type(value).__name__}")


def image_arguments(image: Any = None, strength: Any = None, mask: Any = None, control_image: Any = None,
                    control_scale: Any = None) -> Dict[str, Any]:
    """The image arguments checked, the images encoded (``encode_image``), as keyword arguments.

    Refused here is what the client can tell without the server: a part given without the one
    it needs, and arguments of the wrong type; values and decoding are the server's to judge.
    """
    given = {"image": image, "mask": mask, "control_image": control_image, "strength": strength,
             "control_scale": control_scale}
    needs = (("mask", "image", "inpainting repaints the white part of image"),
             ("strength", "image", "strength says how much of image is repainted"),
             ("control_scale", "control_image", "control_scale weighs the control image's guidance"))
    for name, needed, why in needs:
        if given[name] is not None and given[needed] is None:
            raise ValueError(f"{name} needs {needed} ({why}); got {name} without {needed}")
    checked = {name: encode_image(name, given[name]) for name in IMAGE_ARGUMENTS}
    checked.update((name, _check_float(name, given[name])) for name in ("strength", "control_scale"))
    return checked


def lora_text(loras: Sequence[Tuple[str, Optional[float]]]) -> str:
    """The LORA input's text: ``name[:scale]`` items separated by commas."""
    return ", ".join(name if scale is None else f"{name}:{scale!r}" for name, scale in loras)


@dataclass(frozen=True)
class GenerateRequest:
    """One image request, validated for type and tensor range only.

    Value limits (multiples of 16, step counts, ...) are the server's to enforce so
    that there is one source of truth; the client only refuses what it cannot put
    into the tensors at all.  ``None`` fields are left out of the request so the
    server's defaults apply.
    """

    prompt: str
    negative_prompt: Optional[str] = None
    height: Optional[int] = None
    width: Optional[int] = None
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    seed: Optional[int] = None
    output_format: Optional[str] = "png"
    # LoRA adapters of the server's registry: {name: scale}, stored as sorted pairs.
    loras: Optional[Any] = None
    # Image inputs (issue 14): a path, bytes or a PIL image, stored as the encoded bytes sent.
    # repr=False: a request's repr (logs, tracebacks) should not print megabytes.
    image: Optional[Any] = field(default=None, repr=False)
    strength: Optional[float] = None
    mask: Optional[Any] = field(default=None, repr=False)
    control_image: Optional[Any] = field(default=None, repr=False)
    control_scale: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a str, got {type(self.prompt).__name__}")
        set_ = object.__setattr__
        set_(self, "negative_prompt", _check_text("negative_prompt", self.negative_prompt))
        set_(self, "height", _check_int("height", self.height, _INT32))
        set_(self, "width", _check_int("width", self.width, _INT32))
        set_(self, "num_inference_steps", _check_int("num_inference_steps", self.num_inference_steps, _INT32))
        set_(self, "guidance_scale", _check_float("guidance_scale", self.guidance_scale))
        set_(self, "seed", _check_int("seed", self.seed, _INT64))
        set_(self, "output_format", normalize_output_format(self.output_format))
        set_(self, "loras", _check_loras(self.loras))
        images = image_arguments(self.image, self.strength, self.mask, self.control_image, self.control_scale)
        for name, value in images.items():
            set_(self, name, value)

    @property
    def is_raw(self) -> bool:
        return self.output_format == "raw"

    def input_arrays(self) -> Dict[str, np.ndarray]:
        """Input tensors by name, each shaped ``[1, 1]`` (one batch row)."""
        arrays: Dict[str, np.ndarray] = {"PROMPT": _bytes_tensor(self.prompt)}
        if self.negative_prompt is not None:
            arrays["NEGATIVE_PROMPT"] = _bytes_tensor(self.negative_prompt)
        for name, value in (
            ("HEIGHT", self.height),
            ("WIDTH", self.width),
            ("NUM_INFERENCE_STEPS", self.num_inference_steps),
        ):
            if value is not None:
                arrays[name] = np.array([[value]], dtype=np.int32)
        if self.guidance_scale is not None:
            arrays["GUIDANCE_SCALE"] = np.array([[self.guidance_scale]], dtype=np.float32)
        if self.seed is not None:
            arrays["SEED"] = np.array([[self.seed]], dtype=np.int64)
        if self.output_format is not None:
            arrays["OUTPUT_FORMAT"] = _bytes_tensor(self.output_format)
        if self.loras:
            arrays["LORA"] = _bytes_tensor(lora_text(self.loras))
        for argument, input_name in IMAGE_ARGUMENTS.items():
            data = getattr(self, argument)
            if data is not None:
                arrays[input_name] = np.array([[data]], dtype=np.object_)
        for name, value in (("STRENGTH", self.strength), ("CONTROL_SCALE", self.control_scale)):
            if value is not None:
                arrays[name] = np.array([[value]], dtype=np.float32)
        return arrays

    def output_names(self) -> Tuple[str, ...]:
        """Outputs to ask for; asking for PIXELS with an encoded format would cost a second copy."""
        if self.is_raw:
            return ("PIXELS", "SEED", "METADATA")
        return ("IMAGE", "SEED", "METADATA")


def _bytes_tensor(text: str) -> np.ndarray:
    return np.array([[text.encode("utf-8")]], dtype=np.object_)


def to_infer_inputs(arrays: Dict[str, np.ndarray], module: Any) -> list:
    """Wrap numpy arrays as ``module.InferInput`` (``module`` is tritonclient.grpc or .http, sync or aio)."""
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        infer_input = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def to_requested_outputs(names: Sequence[str], module: Any) -> list:
    return [module.InferRequestedOutput(name) for name in names]


def _first(array: np.ndarray, name: str) -> Any:
    if array.size == 0:
        raise ZImageResponseError(f"server returned an empty {name} tensor")
    return array.reshape(-1)[0]


def _parse_metadata(array: Optional[np.ndarray]) -> Dict[str, Any]:
    # Metadata is informational: a missing or malformed one must not throw away
    # an image that was generated successfully.
    if array is None or array.size == 0:
        return {}
    raw = array.reshape(-1)[0]
    if isinstance(raw, (bytes, bytearray, np.bytes_)):
        raw = bytes(raw).decode("utf-8", errors="replace")
    try:
        value = json.loads(raw)
    except (TypeError, ValueError) as exc:
        _LOGGER.warning("ignoring unparseable METADATA from server: %s", exc)
        return {}
    if not isinstance(value, dict):
        _LOGGER.warning("ignoring METADATA that is not a JSON object: %r", type(value).__name__)
        return {}
    return value


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def parse_result(result: Any, request: GenerateRequest) -> GeneratedImage:
    """Build a ``GeneratedImage`` from a tritonclient ``InferResult`` (anything with ``as_numpy``).

    Only batch row 0 is read: the client sends one prompt, so one row, per request.
    """
    metadata = _parse_metadata(result.as_numpy("METADATA"))
    timings = metadata.get("timings_ms")
    timings = dict(timings) if isinstance(timings, dict) else {}

    seed_array = result.as_numpy("SEED")
    if seed_array is None:
        raise ZImageResponseError("server response has no SEED output")
    seed = int(_first(seed_array, "SEED"))

    if request.is_raw:
        pixels = result.as_numpy("PIXELS")
        if pixels is None:
            raise ZImageResponseError("server response has no PIXELS output for output_format='raw'")
        if pixels.ndim != 4 or pixels.shape[0] < 1 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
            raise ZImageResponseError(
                f"PIXELS must be uint8 [batch, H, W, 3], got {pixels.dtype} {tuple(pixels.shape)}"
            )
        pixels = _readonly(np.ascontiguousarray(pixels[0]))
        # An (H, W, 3) uint8 array is RGB to Pillow; no mode argument needed.
        image = Image.fromarray(pixels)
        return GeneratedImage(
            image=image,
            data=None,
            pixels=pixels,
            seed=seed,
            format="raw",
            timings_ms=timings,
            metadata=metadata,
        )

    image_array = result.as_numpy("IMAGE")
    if image_array is None:
        raise ZImageResponseError("server response has no IMAGE output")
    data = _first(image_array, "IMAGE")
    if not isinstance(data, (bytes, bytearray, np.bytes_)):
        raise ZImageResponseError(f"IMAGE must hold encoded bytes, got {type(data).__name__}")
    data = bytes(data)
    # Header only: enough to fail inside the request on a body that is not an
    # image; the full decode waits until someone reads the pixels.
    image = open_encoded(data, load=False)
    return GeneratedImage(
        image=image,
        data=data,
        pixels=None,
        seed=seed,
        format=_PIL_FORMATS.get(image.format or "") or request.output_format or "png",
        timings_ms=timings,
        metadata=metadata,
    )



# LoRA (issue 13): a request that asks for the ADAPTERS output alone gets the server's adapter
# listing and generates nothing; PROMPT is sent only because the contract requires it.
LISTING_OUTPUT = "ADAPTERS"
LISTING_INPUTS = {"PROMPT": "list adapters"}


def listing_arrays() -> Dict[str, np.ndarray]:
    return {name: _bytes_tensor(text) for name, text in LISTING_INPUTS.items()}


def parse_adapter_listing(result: Any) -> Dict[str, Any]:
    """``{"adapters": {name: {"scale": default}}, "max_adapters_per_request": n, ...}`` from
    the ADAPTERS output of a listing request."""
    array = result.as_numpy(LISTING_OUTPUT)
    if array is None:
        raise ZImageResponseError("server response has no ADAPTERS output")
    raw = _first(array, LISTING_OUTPUT)
    try:
        listing = json.loads(bytes(raw).decode("utf-8") if not isinstance(raw, str) else raw)
    except (TypeError, ValueError) as exc:
        raise ZImageResponseError(f"ADAPTERS is not JSON: {exc}") from None
    if not isinstance(listing, dict) or not isinstance(listing.get("adapters"), dict):
        raise ZImageResponseError("ADAPTERS holds no 'adapters' mapping")
    return listing
