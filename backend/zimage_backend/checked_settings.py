"""The settings a server may start with: config.yaml as `settings` reads it, with the request
defaults and the warmup sizes held to the same checks as a client's request.

Above both `settings` and `request` so that neither imports the other in a function body. Both
startup paths use it: `zimage-serve` before it spawns tritonserver, and the model's initialize.
No torch here: the launcher reports a bad file in well under a second.
"""

from __future__ import annotations

import os

from .request import GenerationRequest, RequestError
from .settings import Settings, SettingsError, load_settings

# A request field as the key of config.yaml that supplies it by default.
_DEFAULT_KEYS = {
    "HEIGHT": "defaults.height",
    "WIDTH": "defaults.width",
    "NUM_INFERENCE_STEPS": "defaults.num_inference_steps",
    "GUIDANCE_SCALE": "defaults.guidance_scale",
    "OUTPUT_FORMAT": "defaults.output_format",
}


def _reason(exc: RequestError) -> str:
    return str(exc).removeprefix(f"{exc.field}: ")


def check_against_requests(settings: Settings) -> Settings:
    """Raises SettingsError, naming the key, when a bare request or a warmup call would fail."""
    d, lim, warmup = settings.defaults, settings.limits, settings.optimizations.warmup
    try:
        GenerationRequest(prompt="defaults", height=d.height, width=d.width,
                          num_inference_steps=d.num_inference_steps,
                          guidance_scale=d.guidance_scale, seed=0,
                          output_format=d.output_format).validate(lim)
    except RequestError as exc:
        key = _DEFAULT_KEYS.get(exc.field, "defaults")
        raise SettingsError(f"{key}: {_reason(exc)} (from the limits section)") from None
    for i, (height, width) in enumerate(warmup.sizes):
        try:
            GenerationRequest(prompt="warmup", height=height, width=width,
                              num_inference_steps=warmup.num_inference_steps,
                              guidance_scale=d.guidance_scale, seed=0,
                              output_format="raw").validate(lim)
        except RequestError as exc:
            key = ("optimizations.warmup.num_inference_steps" if exc.field == "NUM_INFERENCE_STEPS"
                   else f"optimizations.warmup.sizes[{i}]")
            raise SettingsError(f"{key}: {_reason(exc)} (from the limits section)") from None
    return settings


def load_checked_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """`load_settings` plus `check_against_requests`; every error is one line naming the file."""
    return load_settings(path, check=check_against_requests)
