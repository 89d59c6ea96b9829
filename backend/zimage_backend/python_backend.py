"""The Python backend's side of running tritonserver: assembling the pytriton wheel's backend
(the backend folder with this Python's stub, and the libpython the stub links), and the
shared-memory regions its stubs leave in /dev/shm."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import sys
import sysconfig
from pathlib import Path

from .triton_error import TritonServerError

STUB_NAME = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
# The backend's own option; its regions are named <prefix><uuid>.
_SHM_PREFIX_OPTION = "python,shm-region-prefix-name="


def default_cache_dir(dist: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    # Keyed by interpreter version and wheel location: each venv needs its own stub.
    key = hashlib.sha1(str(dist).encode()).hexdigest()[:10]
    return base / "zimage-triton" / f"triton-py{sys.version_info[0]}.{sys.version_info[1]}-{key}"


def prepare_backend_dir(dist: Path, cache_dir: Path) -> Path:
    """Build ``cache_dir/backends/python`` (wheel's backend + this Python's stub).

    The wheel ships one stub per Python version and none beside
    libtriton_python.so, and site-packages may be read-only, so the backend
    is assembled in a cache dir. Returns the folder for ``--backend-directory``.
    """
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        raise TritonServerError(f"the pytriton wheel has no Python backend stub for Python {version}: {stub}")
    target = cache_dir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = [p for p in (dist / "backends" / "python").iterdir() if p.is_file()] + [stub]
    for src in sources:
        dst = target / src.name
        src_stat = src.stat()
        if dst.is_file():
            dst_stat = dst.stat()
            if dst_stat.st_size == src_stat.st_size and int(dst_stat.st_mtime) == int(src_stat.st_mtime):
                continue
        # Copy then rename so a concurrent launcher never sees a half-written file.
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    return cache_dir / "backends"


def prepare_libpython_dir(cache_dir: Path) -> Path | None:
    """A folder holding only this interpreter's libpython (a symlink), for the stub's
    LD_LIBRARY_PATH; None when the interpreter has no shared libpython.

    Not LIBDIR itself: on a system Python that is /usr/lib/x86_64-linux-gnu, and first on the
    path it also hands torch the system's libraries by soname. On the GPU machines torch then
    loaded the system's cuDNN 9.14 instead of its bundled 9.19: SDPA chose FlashAttention-2
    over cuDNN attention (76 ms slower per 1024x1024 image), and asking torch for the cuDNN
    version failed.
    """
    name = sysconfig.get_config_var("INSTSONAME")
    source = Path(sysconfig.get_config_var("LIBDIR") or "") / (name or "")
    if not name or not source.is_file():
        return None
    target = cache_dir / "libpython"
    target.mkdir(parents=True, exist_ok=True)
    link = target / name
    if not (link.is_symlink() and link.resolve() == source.resolve()):
        tmp = target / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(source)
        os.replace(tmp, link)
    return target


def new_shm_prefix() -> str:
    """A region prefix no other server on this host uses, so the launcher can remove exactly
    its own server's regions (a server that dies abruptly leaves them behind)."""
    return f"zimage_shm_{os.getpid()}_{secrets.token_hex(4)}_"


def shm_prefix_arg(prefix: str) -> str:
    return f"--backend-config={_SHM_PREFIX_OPTION}{prefix}"


def shm_prefix_in(args: list[str]) -> str | None:
    """The prefix that tritonserver arguments already set, if any (the last one counts)."""
    found = None
    for i, arg in enumerate(args):
        value = arg.removeprefix("--backend-config=") if arg.startswith("--backend-config=") else (
            args[i + 1] if arg == "--backend-config" and i + 1 < len(args) else None)
        if value is not None and value.startswith(_SHM_PREFIX_OPTION):
            found = value[len(_SHM_PREFIX_OPTION):]
    return found


def remove_shm_regions(prefix: str, shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlinks the regions named `prefix*`; returns their names. Safe once the server is gone."""
    removed: list[str] = []
    if not prefix or not shm_dir.is_dir():
        return removed
    for region in sorted(p for p in shm_dir.iterdir() if p.name.startswith(prefix)):
        try:
            region.unlink()
        except FileNotFoundError:  # the server removed it itself
            continue
        removed.append(region.name)
    return removed
