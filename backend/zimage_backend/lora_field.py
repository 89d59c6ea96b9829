"""The LORA request field: one row's text to a validated adapter set.

The text is `name[:scale]` items separated by commas, e.g. `film_grain:0.8, ink`. A name must be
one of config.yaml's `adapters:`; nothing in the text is ever used as a path, a URL or code, so
the only thing a client chooses is which of the operator's adapters run, and how strongly.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from .settings import ADAPTER_NAME, AdapterSettings, Limits

FIELD = "LORA"
LISTING_OUTPUT = "ADAPTERS"  # the output that lists the registry (see `listing`)
FORMAT = "name[:scale] items separated by commas"

# (name, scale) pairs sorted by name: rows naming the same adapters at the same scales, in any
# order, have equal sets and may share a pipeline call.
AdapterSet = tuple[tuple[str, float], ...]


class LoraFieldError(ValueError):
    """The message of an INVALID_ARG answer for the LORA field (without the field name)."""


def parse_lora(text: str, adapters: Mapping[str, AdapterSettings], limits: Limits) -> AdapterSet:
    """Parses one row's LORA text; raises LoraFieldError naming the value and what is allowed."""
    items = [item.strip() for item in text.split(",")]
    if items == [""]:
        return ()
    allowed = ", ".join(sorted(adapters)) or "none (this server has no adapters)"
    chosen: dict[str, float] = {}
    for item in items:
        name, sep, scale_text = (part.strip() for part in item.partition(":"))
        if not re.fullmatch(ADAPTER_NAME, name) or name not in adapters:
            raise LoraFieldError(f"{item!r} does not name an adapter of this server; allowed "
                                 f"names: {allowed} (format: {FORMAT})")
        if name in chosen:
            raise LoraFieldError(f"{name!r} is named twice; name each adapter once")
        scale = adapters[name].scale
        if sep:
            try:
                scale = float(scale_text)
            except ValueError:
                raise LoraFieldError(f"{item!r}: scale {scale_text!r} is not a number "
                                     f"(format: {FORMAT})") from None
        bound = limits.max_adapter_scale
        if not (math.isfinite(scale) and -bound <= scale <= bound):
            raise LoraFieldError(f"{item!r}: scale {scale} is outside [-{bound}, {bound}]")
        chosen[name] = scale
    if len(chosen) > limits.max_adapters_per_request:
        raise LoraFieldError(f"{text!r} names {len(chosen)} adapters; at most "
                             f"{limits.max_adapters_per_request} are allowed per image")
    return tuple(sorted(chosen.items()))



def listing(adapters: Mapping[str, AdapterSettings], limits: Limits) -> str:
    """What a client may name in LORA, as JSON: names with default scales, and the limits.
    Sources stay on the server: a client learns no path."""
    return json.dumps({
        "adapters": {name: {"scale": entry.scale} for name, entry in sorted(adapters.items())},
        "max_adapters_per_request": limits.max_adapters_per_request,
        "max_adapter_scale": limits.max_adapter_scale,
        "format": FORMAT,
    }, sort_keys=True)
