"""Supervising one tritonserver child process: command, environment, start, readiness, stop.

Works with the tritonserver shipped in the ``nvidia-pytriton`` wheel (local
development, CI) and with NVIDIA's Triton container (``/opt/tritonserver``).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, Mapping, Sequence

from .cpu_instances import DEFAULT_CPU_INSTANCES, cpu_overrides, threads_per_instance
from .cuda_devices import server_sees_gpus
from .listening_sockets import listening_ports
from .python_backend import (default_cache_dir, new_shm_prefix, prepare_backend_dir,
                             prepare_libpython_dir, remove_shm_regions, shm_prefix_arg,
                             shm_prefix_in)
from .triton_binary import find_tritonserver, wheel_dist_of
from .triton_error import TritonServerError

# The header that Triton's model-repository API needs (build_command).
ADMIN_HEADER = "zimage-admin-key"

LOGGER = logging.getLogger(__name__)

LOG_TAIL_LINES = 60
# A first start with real weights downloads them (README: Docker) and compiles before it is
# ready. docker/Dockerfile's HEALTHCHECK start period must equal this (tests/unit/test_docker.py).
DEFAULT_READY_TIMEOUT_S = 1800.0
# Health checks go to our own server: an http_proxy from the environment must not see them.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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


def _port_taken(address: str, port: int) -> bool:
    """Whether another socket already holds (address, port) the way tritonserver would bind it."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As tritonserver does: connections in TIME_WAIT do not keep it from binding.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address or "0.0.0.0", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


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
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
        cpu_instances: int = DEFAULT_CPU_INSTANCES,
    ) -> None:
        """Port 0 means "pick a free port" (at construction, so the URLs are known early).

        ``log_file=None`` lets the server write to this process's stdout/stderr.
        ``model`` is the model whose readiness ``wait_until_ready`` also checks.
        ``cpu_instances``: instances of each KIND_AUTO model when the server sees no GPU
        (cpu_instances.py says why); 1 loads config.pbtxt unchanged.
        """
        if cpu_instances < 1:
            raise TritonServerError(f"cpu_instances must be at least 1, got {cpu_instances}")
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
        # Ours unless the extra arguments set one: either way, stop() removes exactly these.
        self.shm_prefix = shm_prefix_in(self.extra_args) or new_shm_prefix()
        self.cpu_instances = cpu_instances
        # Models that wait_until_ready loads through the repository API, with their override
        # config (decided in start(), once the server's environment is known).
        self._overrides: dict[str, str] = {}
        self._loading: threading.Thread | None = None
        self._load_error: str | None = None
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
            *self._startup_loads(),
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
        if shm_prefix_in(self.extra_args) is None:
            cmd.append(shm_prefix_arg(self.shm_prefix))
        return cmd + self.extra_args

    def _startup_loads(self) -> list[str]:
        # Models with an override load once the server is up (wait_until_ready): Triton has
        # no command-line form of a config override, and loading them as config.pbtxt says
        # first would load them twice (a reload took 102 s on the 2-core machine).
        if not self._overrides:
            return ["--load-model=*"]
        others = sorted(p.parent.name for p in self.model_repository.glob("*/config.pbtxt"))
        return [f"--load-model={name}" for name in others if name not in self._overrides]

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
        # tritonserver binds its ports only after loading the models, many seconds later.
        for name, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port),
                           ("metrics", self.metrics_port)):
            if _port_taken(self.address, port):
                raise TritonServerError(f"{name} port {port} on {self.address or '0.0.0.0'} is "
                                        "already in use by another process; pick another port")
        env = self.build_env()
        self._overrides = ({} if self.cpu_instances == 1 or server_sees_gpus(env)
                           else cpu_overrides(self.model_repository, self.cpu_instances))
        self._loading, self._load_error = None, None
        if self._overrides:
            env.setdefault("OMP_NUM_THREADS", str(threads_per_instance(self.cpu_instances)))
            LOGGER.info("no GPU visible: %s get %d CPU instances each (config.pbtxt's "
                        "instance_group overridden at load), OMP_NUM_THREADS=%s",
                        ", ".join(self._overrides), self.cpu_instances, env["OMP_NUM_THREADS"])
        cmd = self.build_command(self.backend_directory())
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

    def failure(self, reason: str) -> TritonServerError:
        """The error to raise or log for `reason`, with the server log's last lines."""
        return TritonServerError(f"{reason}\n--- last {LOG_TAIL_LINES} lines of the server log ---\n{self.log_tail()}")

    def _url_ok(self, path: str) -> bool:
        try:
            with _DIRECT.open(f"http://{self.http_url}{path}", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            # Refused, reset or 400 "not ready" while the server is still coming up.
            return False

    def owns_http_port(self) -> bool:
        """Whether our process itself listens on its HTTP port, where the health checks go.

        Not the gRPC port: `--allow-grpc=false` may turn it off, Triton opens it before HTTP,
        and when another process holds it Triton exits, which the readiness wait reports.
        """
        process = self._process
        if process is None or process.poll() is not None:
            return False
        try:
            ports = listening_ports(process.pid)
        except PermissionError as exc:
            # Waiting on would only end at the ready timeout, many minutes later.
            raise TritonServerError(f"cannot tell whether tritonserver (pid {process.pid}) listens "
                                    f"on its ports: {exc}") from None
        return self.http_port in ports

    def is_ready(self) -> bool:
        # An answer alone could come from another server on the port.
        if not self.owns_http_port() or not self._url_ok("/v2/health/ready"):
            return False
        if self.model is not None and not self._url_ok(f"/v2/models/{self.model}/ready"):
            return False
        return self.is_running()

    def _load_overridden(self, timeout_s: float) -> None:
        headers = {ADMIN_HEADER: self._admin_key, "Content-Type": "application/json"}
        for name, config in self._overrides.items():
            body = json.dumps({"parameters": {"config": config}}).encode()
            request = urllib.request.Request(f"http://{self.http_url}/v2/repository/models/"
                                             f"{name}/load", data=body, headers=headers)
            try:
                with _DIRECT.open(request, timeout=timeout_s):
                    pass
            except urllib.error.HTTPError as exc:
                answer = exc.read().decode("utf-8", errors="replace")
                try:
                    answer = json.loads(answer)["error"]
                except (ValueError, KeyError, TypeError):
                    pass
                self._load_error = f"model {name!r} failed to load before it was ready: {answer}"
                return
            except OSError as exc:
                self._load_error = f"model {name!r} failed to load before it was ready: {exc}"
                return

    def _loads_pending(self, deadline: float) -> bool:
        """Starts the override loads once the server answers, and says whether any remain."""
        if not self._overrides:
            return False
        if self._loading is None:
            if not self.owns_http_port() or not self._url_ok("/v2/health/live"):
                return True
            # A thread: the load call returns only once the model is loaded, and an interrupt
            # or the server's death must be seen meanwhile.
            self._loading = threading.Thread(
                target=self._load_overridden, args=(max(1.0, deadline - time.monotonic()),),
                name="zimage-load-overridden", daemon=True)
            self._loading.start()
        if self._loading.is_alive():
            return True
        if self._load_error is not None:
            raise self.failure(self._load_error)
        return False

    def wait_until_ready(self, timeout_s: float | None = None,
                         interrupt: threading.Event | None = None) -> bool:
        """True once ready; False as soon as `interrupt` is set. Raises, with the log tail, the
        moment the server exits or a model fails to load, or when `timeout_s` passes."""
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        if self._process is None:
            raise TritonServerError("tritonserver was not started")
        interrupt = interrupt or threading.Event()
        deadline = time.monotonic() + timeout_s
        while not interrupt.is_set():
            code = self._process.poll()
            if code is not None:
                raise self.failure(f"tritonserver exited with code {code} before it was ready")
            if not self._loads_pending(deadline) and self.is_ready():
                return True
            if time.monotonic() > deadline:
                what = f"model {self.model!r}" if self.model else "tritonserver"
                raise self.failure(f"{what} not ready at http://{self.http_url} after {timeout_s:.0f} s")
            interrupt.wait(0.25)
        return False

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
        code = process.poll() if process is not None else None
        if process is None or code is not None:
            # Triton removes its regions on a clean exit only; a crash or a kill leaves them.
            removed = remove_shm_regions(self.shm_prefix)
            if removed:
                LOGGER.info("removed %d shared-memory region(s) the server left: %s",
                            len(removed), ", ".join(removed))
        return code

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
