"""Finding the tritonserver binary: the pytriton wheel's, one on PATH, or NVIDIA's container's."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from .triton_error import TritonServerError

SYSTEM_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")


def pytriton_dist_dir() -> Path | None:
    """The wheel's ``pytriton/tritonserver`` folder, or None without the wheel."""
    # find_spec does not import pytriton, which would pull in its heavy deps.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    dist = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return dist if (dist / "bin" / "tritonserver").is_file() else None


def find_tritonserver(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Explicit path > $TRITONSERVER > pytriton wheel > PATH > /opt/tritonserver."""
    for given in (explicit, os.environ.get("TRITONSERVER") or None):
        if given is not None:
            path = Path(given).expanduser()
            if not path.is_file():
                raise TritonServerError(f"tritonserver binary not found: {path}")
            return path.resolve()
    dist = pytriton_dist_dir()
    if dist is not None:
        return (dist / "bin" / "tritonserver").resolve()
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path).resolve()
    if SYSTEM_TRITONSERVER.is_file():
        return SYSTEM_TRITONSERVER
    raise TritonServerError(
        "no tritonserver found: install nvidia-pytriton, put tritonserver on PATH, "
        "set $TRITONSERVER, or run inside NVIDIA's Triton container"
    )


def wheel_dist_of(binary: Path) -> Path | None:
    """The wheel folder if ``binary`` is the pytriton wheel's server, else None."""
    dist = pytriton_dist_dir()
    if dist is not None and binary.resolve() == (dist / "bin" / "tritonserver").resolve():
        return dist.resolve()
    return None
