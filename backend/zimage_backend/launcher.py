"""The ``zimage-serve`` command line: start tritonserver on the model repository, log where it
serves, stop it on SIGINT/SIGTERM (``python -m zimage_backend.launcher``)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Sequence

from .checked_settings import load_checked_settings
from .cpu_instances import DEFAULT_CPU_INSTANCES
from .settings import SettingsError
from .triton_error import TritonServerError
from .triton_process import DEFAULT_READY_TIMEOUT_S, TritonServer

# Not __name__: under `python -m` that would be "__main__".
LOGGER = logging.getLogger("zimage_backend.launcher")


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
    parser.add_argument("--ready-timeout-s", type=float, default=DEFAULT_READY_TIMEOUT_S)
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--log-file", type=Path, default=None, help="server log file; default: this process's output")
    parser.add_argument("--tritonserver", default=None, help="tritonserver binary to run")
    parser.add_argument("--cpu-instances", type=int, default=DEFAULT_CPU_INSTANCES,
                        help="instances of the model when the server sees no GPU (one sequential "
                        "client stalls 500 ms in Triton's queue with one); GPUs keep one each")
    args = parser.parse_args(argv)
    if args.cpu_instances < 1:
        parser.error(f"--cpu-instances must be at least 1, got {args.cpu_instances}")
    if not args.config.is_file():
        parser.error(f"config file not found: {args.config.resolve()} (pass --config)")
    if not args.model_repository.is_dir():
        parser.error(f"model repository not found: {args.model_repository.resolve()} (pass --model-repository)")
    return args, extra


# How often a ready server's model readiness is checked, and the exit code once it is gone.
READY_POLL_S = 1.0
EXIT_LEFT_SERVICE = 3


def _exit_status(code: int) -> int:
    # Popen reports death by signal N as -N; shells report it as 128 + N.
    return code if code >= 0 else 128 - code


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parse_args(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # The model runs the same check, but only after tritonserver has started (seconds later)
        # and its answer ends up in Triton's model table.
        load_checked_settings(args.config)
    except SettingsError as exc:
        LOGGER.error("%s", exc)
        return 2

    shutdown = threading.Event()
    received: list[str] = []

    def request_shutdown(signum: int, frame: FrameType | None) -> None:
        # Only a flag: an exception raised here could land inside a logging call, which swallows
        # it, and the launcher would ignore the signal. A second signal must not cut short the
        # graceful stop already under way.
        if not shutdown.is_set():
            received.append(signal.Signals(signum).name)
        shutdown.set()

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
            cpu_instances=args.cpu_instances,
        )
        server.start()
        code = None
        if server.wait_until_ready(args.ready_timeout_s, interrupt=shutdown):
            LOGGER.info(
                "model %r ready: HTTP http://%s  gRPC %s  metrics http://%s/metrics",
                args.model, server.http_url, server.grpc_url, server.metrics_url,
            )
            while (code := server.returncode) is None and not shutdown.wait(READY_POLL_S):
                if not server.is_ready() and server.returncode is None:
                    # The model unloads itself when its GPU breaks (model.py): a restarted
                    # process gets a fresh CUDA context, so exit for the supervisor to restart.
                    LOGGER.error("model %r left service (see the server log above); stopping "
                                 "tritonserver so that the container can be restarted",
                                 args.model)
                    server.stop()
                    return EXIT_LEFT_SERVICE
        if code is None:
            LOGGER.info("%s received; stopping tritonserver", received[0])
            code = server.stop()
            if code:
                LOGGER.warning("tritonserver stopped with code %d", code)
            return 0
        LOGGER.error("%s", server.failure(f"tritonserver exited with code {code} after it was ready"))
        return _exit_status(code)
    except TritonServerError as exc:
        LOGGER.error("%s", exc)
        code = server.stop() if server is not None else None
        return _exit_status(code) if code else 1
    finally:
        if server is not None:
            # Also after the server exited by itself: stop() removes the regions it left.
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
