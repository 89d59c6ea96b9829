"""Start and supervise a Triton Inference Server that serves the Z-Image model.

Works with the tritonserver shipped in the ``nvidia-pytriton`` wheel (local
development, CI) and with NVIDIA's Triton container (``/opt/tritonserver``).
Also the ``zimage-serve`` console script (``python -m zimage_backend.launcher``).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import hashlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Mapping, Sequence

# Not __name__: under `python -m` that would be "__main__".
LOGGER = logging.getLogger("zimage_backend.launcher")

SYSTEM_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")
STUB_NAME = "triton_python_backend_stub"
LOG_TAIL_LINES = 60
# The header that Triton's model-repository API needs (build_command).
ADMIN_HEADER = "zimage-admin-key"
# Health checks go to our own server: an http_proxy from the environment must not see them.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class TritonServerError(RuntimeError):
    """The server could not be started, died, or did not become ready."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct ports that were free a moment ago.

    All sockets stay open until every port is picked so the kernel cannot
    hand out the same port twice; another process may still grab one before
    the server binds it, which is acceptable for tests.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


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


# Loaded before any fork: the child between fork and exec should do as little as possible.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: a killed launcher must not leave an orphan server.

    Linux ties this to the thread that started the server, so start it from a
    thread that outlives it (the main thread in the CLI and in pytest).
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _client_host(address: str) -> str:
    if address in ("", "0.0.0.0"):
        return "127.0.0.1"
    if address == "::":
        return "[::1]"
    return f"[{address}]" if ":" in address else address


class TritonServer:
    """A tritonserver child process; as a context manager it starts, waits and stops."""

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        *,
        config_path: str | os.PathLike[str] | None = None,
        model: str | None = None,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        address: str = "127.0.0.1",
        log_verbose: int = 0,
        tritonserver: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
        log_file: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        ready_timeout_s: float = 600.0,
    ) -> None:
        """Port 0 means "pick a free port" (at construction, so the URLs are known early).

        ``log_file=None`` lets the server write to this process's stdout/stderr.
        ``model`` is the model whose readiness ``wait_until_ready`` also checks.
        """
        self.model_repository = Path(model_repository).resolve()
        self.config_path = Path(config_path).resolve() if config_path is not None else None
        self.model = model
        wanted = [http_port, grpc_port, metrics_port]
        picked = iter(free_ports(wanted.count(0)))
        self.http_port, self.grpc_port, self.metrics_port = (p if p else next(picked) for p in wanted)
        self.address = address
        self.log_verbose = log_verbose
        self.binary = find_tritonserver(tritonserver)
        self.extra_args = list(extra_args)
        self._admin_key = secrets.token_urlsafe(24)
        self.extra_env = dict(extra_env or {})
        self.log_file = Path(log_file).resolve() if log_file is not None else None
        self.ready_timeout_s = ready_timeout_s
        self._wheel_dist = wheel_dist_of(self.binary)
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"{_client_host(self.address)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_client_host(self.address)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{_client_host(self.address)}:{self.metrics_port}"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._process

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def backend_directory(self) -> Path | None:
        """Prepared backend dir for the wheel's server; None means the server's own default."""
        if self._wheel_dist is None:
            return None
        cache_dir = self._cache_dir or default_cache_dir(self._wheel_dist)
        return prepare_backend_dir(self._wheel_dist, cache_dir)

    def build_command(self, backend_directory: Path | None = None) -> list[str]:
        # Explicit model control lets the model unload itself when its device breaks (model.py,
        # README "A broken GPU"): Triton's readiness then says so. Clients still cannot load or
        # unload models: the model-repository API needs a header whose value is a secret made
        # for this start and handed to no one.
        restricted = f"model-repository:{ADMIN_HEADER}={self._admin_key}"
        cmd = [
            str(self.binary),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
        ]
        if backend_directory is not None:
            cmd.append(f"--backend-directory={backend_directory}")
        if self._wheel_dist is not None and (self._wheel_dist / "caches").is_dir():
            # The default /opt/tritonserver/caches does not exist outside the container.
            cmd.append(f"--cache-directory={self._wheel_dist / 'caches'}")
        return cmd + self.extra_args

    def build_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        if self._wheel_dist is not None:
            # The stub links libpython3.X.so.1.0 and our copies lost their RPATH to the
            # wheel's libs; this interpreter's libpython must win over the system's
            # (an older Debian copy breaks `import ssl` in the model).
            libpython = prepare_libpython_dir(self._cache_dir or default_cache_dir(self._wheel_dist))
            parts = [str(p) for p in (libpython, self._wheel_dist.parent.parent / "nvidia_pytriton.libs") if p]
            parts += [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p not in parts]
            env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
        if sys.prefix != sys.base_prefix:
            # The embedded interpreter finds its prefix through `python3` on PATH, so the
            # venv's bin must come first for the model to see the venv's packages.
            env["VIRTUAL_ENV"] = sys.prefix
            env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", os.defpath)])
        if self.config_path is not None:
            env["ZIMAGE_CONFIG"] = str(self.config_path)
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        if self.is_running():
            raise TritonServerError("tritonserver is already running")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository not found: {self.model_repository}")
        if self.config_path is not None and not self.config_path.is_file():
            raise TritonServerError(f"config file not found: {self.config_path}")
        cmd = self.build_command(self.backend_directory())
        env = self.build_env()
        output: IO[bytes] | None = None
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = output = open(self.log_file, "wb")
        LOGGER.info("starting %s", " ".join(cmd))
        try:
            self._process = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output is not None else None,
                # Own session: a terminal Ctrl-C reaches only the launcher, which then
                # stops the server once, in order.
                start_new_session=True,
                preexec_fn=_die_with_parent if _LIBC is not None else None,
            )
        except OSError as exc:
            if self._log_handle is not None:
                self._log_handle.close()
                self._log_handle = None
            raise TritonServerError(f"cannot run {self.binary}: {exc}") from exc

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log_file is None:
            return "(server output went to this process's stdout/stderr)"
        try:
            with open(self.log_file, "rb") as f:
                tail = collections.deque(f, maxlen=lines)
        except OSError as exc:
            return f"(cannot read {self.log_file}: {exc})"
        return b"".join(tail).decode("utf-8", errors="replace")

    def _fail(self, reason: str) -> TritonServerError:
        return TritonServerError(f"{reason}\n--- last {LOG_TAIL_LINES} lines of the server log ---\n{self.log_tail()}")

    def _url_ok(self, path: str) -> bool:
        try:
            with _DIRECT.open(f"http://{self.http_url}{path}", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            # Refused, reset or 400 "not ready" while the server is still coming up.
            return False

    def is_ready(self) -> bool:
        if not self._url_ok("/v2/health/ready"):
            return False
        return self.model is None or self._url_ok(f"/v2/models/{self.model}/ready")

    def wait_until_ready(self, timeout_s: float | None = None) -> None:
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        if self._process is None:
            raise TritonServerError("tritonserver was not started")
        deadline = time.monotonic() + timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise self._fail(f"tritonserver exited with code {code} before it was ready")
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                what = f"model {self.model!r}" if self.model else "tritonserver"
                raise self._fail(f"{what} not ready at http://{self.http_url} after {timeout_s:.0f} s")
            time.sleep(0.25)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGINT (graceful), then SIGTERM, then SIGKILL; returns the exit code."""
        process = self._process
        if process is not None:
            steps = ((signal.SIGINT, timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))
            for sig, wait_s in steps:
                if process.poll() is not None:
                    break
                if sig != signal.SIGINT:
                    LOGGER.warning("tritonserver still running; sending %s", sig.name)
                process.send_signal(sig)
                try:
                    process.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    continue
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        return process.poll() if process is not None else None

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class _ShutdownRequested(Exception):
    pass


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    # Split by hand: argparse.REMAINDER mishandles options that follow "--".
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="zimage-serve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve Z-Image-Turbo with Triton. Arguments after -- go to tritonserver unchanged.",
    )
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--address", default="127.0.0.1", help="bind address; 0.0.0.0 exposes the server")
    parser.add_argument("--model", default="zimage", help="model that must be ready")
    parser.add_argument("--ready-timeout-s", type=float, default=600.0)
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--log-file", type=Path, default=None, help="server log file; default: this process's output")
    parser.add_argument("--tritonserver", default=None, help="tritonserver binary to run")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"config file not found: {args.config.resolve()} (pass --config)")
    if not args.model_repository.is_dir():
        parser.error(f"model repository not found: {args.model_repository.resolve()} (pass --model-repository)")
    return args, extra


def _exit_status(code: int) -> int:
    # Popen reports death by signal N as -N; shells report it as 128 + N.
    return code if code >= 0 else 128 - code


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parse_args(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stopping = False

    def request_shutdown(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        # A second signal must not cut short the graceful stop already under way.
        if stopping:
            return
        stopping = True
        # Raising interrupts whatever the main thread waits on (readiness poll, sleep).
        raise _ShutdownRequested(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, request_shutdown) for sig in (signal.SIGINT, signal.SIGTERM)}
    server: TritonServer | None = None
    try:
        server = TritonServer(
            args.model_repository,
            config_path=args.config,
            model=args.model,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            address=args.address,
            log_verbose=args.log_verbose,
            tritonserver=args.tritonserver,
            extra_args=extra,
            log_file=args.log_file,
        )
        server.start()
        server.wait_until_ready(args.ready_timeout_s)
        LOGGER.info(
            "model %r ready: HTTP http://%s  gRPC %s  metrics http://%s/metrics",
            args.model, server.http_url, server.grpc_url, server.metrics_url,
        )
        while (code := server.returncode) is None:
            time.sleep(0.5)
        stopping = True
        LOGGER.error("tritonserver exited with code %d", code)
        return _exit_status(code)
    except _ShutdownRequested as exc:
        LOGGER.info("%s received; stopping tritonserver", exc)
        code = server.stop() if server is not None else None
        if code:
            LOGGER.warning("tritonserver stopped with code %d", code)
        return 0
    except TritonServerError as exc:
        stopping = True
        LOGGER.error("%s", exc)
        code = server.stop() if server is not None else None
        return _exit_status(code) if code else 1
    finally:
        stopping = True
        if server is not None and server.is_running():
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
