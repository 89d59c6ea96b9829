"""``POST /v1/images/generations`` bodies and ``/v1/images/edits`` forms: OpenAI's fields, our
extensions, and what is refused.

Only types and the gateway's own limits are checked here. Value limits of the model (sizes,
steps, guidance, prompt length) are the servers' (config.yaml ``limits``), whose INVALID_ARG
messages come back to the caller naming the field (errors.from_client_error).
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .errors import ApiError, invalid
from .masks import repaint_mask

__all__ = ["ImageRequest", "parse_generation", "parse_edit", "form_values", "OUTPUT_FORMATS", "IGNORED",
           "REFUSED", "EDIT_FILES"]

OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_SEED = 2**63 - 1
_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")

# OpenAI fields accepted and ignored: the values that change nothing the model can do.
IGNORED: Dict[str, Tuple[Any, ...]] = {
    "quality": (None, "auto", "standard"),
    "background": (None, "auto", "opaque"),
    "moderation": (None, "auto", "low"),  # the gateway filters nothing: see README
    "stream": (None, False),
    "partial_images": (None, 0),
    "style": (None,),
    "output_compression": (None,),
}
# Why the other values of those fields are refused.
REFUSED = {
    "quality": "one quality is served; num_inference_steps is the knob",
    "background": "images are opaque RGB",
    "moderation": "the gateway does no moderation",
    "stream": "streaming answers are not served",
    "partial_images": "streaming answers are not served",
    "style": "style presets are DALL-E 3's",
    "output_compression": "the servers encode at the quality set in their config.yaml",
}
_KNOWN = {"prompt", "model", "n", "size", "response_format", "output_format", "user", "seed",
          "num_inference_steps", "guidance_scale", "negative_prompt", *IGNORED}
# The files of an edit form: OpenAI's SDKs send one image as ``image``, a list as ``image[]``.
EDIT_FILES = ("image", "image[]", "mask")
_EDIT_KNOWN = {*_KNOWN, "strength"}
# A form's values are text; these fields are numbers or booleans in a JSON body.
_FORM_INTEGERS = {"n", "seed", "num_inference_steps", "partial_images", "output_compression"}
_FORM_NUMBERS = {"guidance_scale", "strength"}
_FORM_BOOLEANS = {"stream": {"true": True, "false": False}}
_INTEGER_TEXT = re.compile(r"^-?[0-9]{1,20}$")


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """One generation request, n images of one prompt. ``None`` leaves a server default."""

    prompt: str
    n: int = 1
    width: Optional[int] = None
    height: Optional[int] = None
    output_format: str = "png"
    seed: Optional[int] = None
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    negative_prompt: Optional[str] = None
    user: Optional[str] = None
    # Edits (issue 14): the image as uploaded, the mask as the servers' white-where-to-repaint.
    image: Optional[bytes] = dataclasses.field(default=None, repr=False)
    mask: Optional[bytes] = dataclasses.field(default=None, repr=False)
    strength: Optional[float] = None

    def seeds(self) -> Tuple[Optional[int], ...]:
        """Image i gets ``seed + i``: n distinct images, each reproducible alone."""
        if self.seed is None:
            return (None,) * self.n
        return tuple(self.seed + i for i in range(self.n))


def _int(body: Mapping[str, Any], name: str, low: int, high: int, allowed: Optional[str] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(name, f"{value!r} is not allowed; must be {allowed or f'an integer in [{low}, {high}]'}")
    return value


def _text(body: Mapping[str, Any], name: str) -> Optional[str]:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise invalid(name, f"{value!r} is not allowed; must be a string")
    return value


def _size(value: Any) -> Tuple[Optional[int], Optional[int]]:
    if value is None or value == "auto":
        return None, None
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise invalid("size", f"{value!r} is not allowed; must be 'auto' or 'WIDTHxHEIGHT' such as '1024x1024'")
    return int(match.group(1)), int(match.group(2))


def _number(body: Mapping[str, Any], name: str) -> Optional[float]:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise invalid(name, f"{value!r} is not allowed; must be a number")
    return None if value is None else float(value)


def parse_generation(body: Any, *, model_id: str, max_n: int) -> ImageRequest:
    """The request a JSON body asks for, or a 400 ``ApiError`` naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return _parse(body, _KNOWN, model_id=model_id, max_n=max_n)


def form_values(fields: Mapping[str, str]) -> Dict[str, Any]:
    """A form's text fields typed as a JSON body would have them; text that is not of its field's
    type stays text, for the field's check to refuse with its message."""
    values: Dict[str, Any] = {}
    for name, text in fields.items():
        value: Any = text
        if name in _FORM_INTEGERS and _INTEGER_TEXT.match(text.strip()):
            value = int(text)
        elif name in _FORM_NUMBERS:
            try:
                value = float(text)
            except ValueError:
                pass
        elif name in _FORM_BOOLEANS:
            value = _FORM_BOOLEANS[name].get(text.strip().lower(), text)
        values[name] = value
    return values


def parse_edit(fields: Mapping[str, str], files: Mapping[str, Sequence[bytes]], *, model_id: str,
               max_n: int) -> ImageRequest:
    """The request an edit form asks for: ``fields`` its text, ``files`` its uploads by field name
    (EDIT_FILES). One image is served; the mask becomes the servers' (masks.repaint_mask), decoded
    only once every other field has passed, since decoding is the costly part."""
    for name in fields:
        if name in EDIT_FILES:
            raise invalid(name, "must be an uploaded file, not a text field")
    images = [*files.get("image", ()), *files.get("image[]", ())]
    if len(images) != 1:
        raise invalid("image", f"{len(images)} image files are not allowed; exactly one is served "
                               f"(send it as 'image')")
    masks = files.get("mask", ())
    if len(masks) > 1:
        raise invalid("mask", f"{len(masks)} mask files are not allowed; at most one")
    body = form_values(fields)
    request = _parse(body, _EDIT_KNOWN, model_id=model_id, max_n=max_n)
    return dataclasses.replace(request, image=images[0], strength=_number(body, "strength"),
                               mask=repaint_mask(masks[0]) if masks else None)


def _parse(body: Mapping[str, Any], known: Sequence[str], *, model_id: str, max_n: int) -> ImageRequest:
    for name in body:
        if name not in known:
            raise ApiError(400, f"unknown parameter: {name!r}", param=name, code="unknown_parameter")
    for name, allowed in IGNORED.items():
        if body.get(name) not in allowed:
            shown = ", ".join(repr(a) for a in allowed if a is not None) or "null"
            raise invalid(name, f"{body[name]!r} is not supported ({REFUSED[name]}); allowed: {shown}")

    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise invalid("prompt", f"{prompt!r} is not allowed; must be a string")
    model = body.get("model")
    if model is not None and model != model_id:
        raise ApiError(400, f"model: {model!r} is not served; available: {model_id!r}", param="model",
                       code="model_not_found")
    response_format = body.get("response_format")
    if response_format not in (None, "b64_json"):
        raise invalid("response_format", f"{response_format!r} is not served; images come inline only, "
                                         f"as 'b64_json' (the gateway keeps no image store to link to)")
    output_format = body.get("output_format") or "png"
    if output_format not in OUTPUT_FORMATS:
        raise invalid("output_format", f"{output_format!r} is not allowed; must be one of {', '.join(OUTPUT_FORMATS)}")

    n = _int(body, "n", 1, max_n) or 1
    seed = _int(body, "seed", 0, MAX_SEED - (n - 1))
    # Its range is the servers' (limits.max_steps); here only what fits their INT32 input.
    steps = _int(body, "num_inference_steps", -(2**31), 2**31 - 1, "a 32-bit integer")
    width, height = _size(body.get("size"))
    return ImageRequest(
        prompt=prompt, n=n, width=width, height=height, output_format=output_format, seed=seed,
        num_inference_steps=steps, guidance_scale=_number(body, "guidance_scale"),
        negative_prompt=_text(body, "negative_prompt"), user=_text(body, "user"),
    )
