"""API keys: where they come from, and checking a bearer token against them in constant time."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

__all__ = ["ApiKeys", "load_keys", "MIN_KEY_LENGTH"]

# Short keys can be guessed; refusing them at startup is cheaper than a rate limit on 401s.
MIN_KEY_LENGTH = 16


def _parse(text: str, origin: str) -> Tuple[str, ...]:
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
            # The key itself stays out of the message: it ends up in logs.
            raise ValueError(f"{origin}, entry {number}: an API key must be at least {MIN_KEY_LENGTH} "
                             f"characters without spaces")
        keys.append(key)
    return tuple(keys)


def load_keys(key_file: Optional[Path], env_var: str) -> Tuple[str, ...]:
    """Keys from ``key_file`` (one a line, ``#`` comments) and the comma-separated ``$env_var``."""
    keys: Tuple[str, ...] = ()
    if key_file is not None:
        keys += _parse(Path(key_file).read_text(encoding="utf-8"), str(key_file))
    value = os.environ.get(env_var, "")
    if value.strip():
        keys += _parse(value.replace(",", "\n"), f"${env_var}")
    return keys


class ApiKeys:
    """Which configured key, if any, a request's ``Authorization`` header carries.

    Tokens are compared as SHA-256 digests with ``hmac.compare_digest`` against every key, with
    no early exit, so neither the position of the first wrong character nor which key matched
    shows in the time taken. Callers get a label (``key-1``, ...) for limits, metrics and logs,
    never the key.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, authorization: Optional[str]) -> Optional[str]:
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode("utf-8")).digest()
        found = None
        for index, known in enumerate(self._digests):
            if hmac.compare_digest(known, digest) and found is None:
                found = index
        return None if found is None else f"key-{found + 1}"
