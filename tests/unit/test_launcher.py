"""Tests for zimage-serve and the modules it is built from (triton_binary, python_backend,
triton_process); the slow ones start the real tritonserver from the pytriton wheel.

Run with: PYTHONPATH=backend pytest tests/unit/test_launcher.py
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import yaml

from tests.conftest import CONFIG
from tests.serve_cli import ServeCli
from zimage_backend import (cpu_instances, cuda_devices, launcher, listening_sockets,
                            python_backend, triton_binary, triton_process)
from zimage_backend.triton_error import TritonServerError
from zimage_backend.triton_process import TritonServer

DIST = triton_binary.pytriton_dist_dir()
needs_wheel = pytest.mark.skipif(DIST is None, reason="needs the nvidia-pytriton wheel's tritonserver")

ECHO_CONFIG = """\
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

ECHO_MODEL = '''\
import os
import sys

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        if os.environ.get("ECHO_FAIL"):
            raise RuntimeError("echo model refused to start")
        probe = os.environ.get("ECHO_PROBE_FILE")
        if probe:
            import ssl  # noqa: F401  fails when the stub picked up the wrong libpython
            with open(probe, "a") as f:
                f.write(sys.prefix + "\\n" + os.environ.get("ZIMAGE_CONFIG", "") + "\\n"
                        + os.environ.get("OMP_NUM_THREADS", "") + "\\n")

    def execute(self, requests):
        responses = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", data)]))
        return responses
'''


@pytest.fixture(autouse=True)
def _no_tritonserver_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITONSERVER", raising=False)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One backend cache for the session: the launcher must not write to ~/.cache in tests.
    return tmp_path_factory.mktemp("triton-cache")


@pytest.fixture
def echo_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "model_repository"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return repo


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    # A valid config: zimage-serve checks it before it starts the (echo) server.
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.read_text())
    return path


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As tritonserver does: connections in TIME_WAIT must not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- locating the binary and preparing the backend -------------------------------------------


@needs_wheel
def test_finds_the_wheels_tritonserver() -> None:
    assert DIST is not None
    found = triton_binary.find_tritonserver()
    assert found == (DIST / "bin" / "tritonserver").resolve()
    assert os.access(found, os.X_OK)
    assert triton_binary.wheel_dist_of(found) == DIST.resolve()


def test_explicit_path_beats_env_and_env_beats_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, from_env = tmp_path / "explicit", tmp_path / "from_env"
    explicit.write_text("")
    from_env.write_text("")
    monkeypatch.setenv("TRITONSERVER", str(from_env))
    assert triton_binary.find_tritonserver(explicit) == explicit.resolve()
    assert triton_binary.find_tritonserver() == from_env.resolve()
    assert triton_binary.wheel_dist_of(from_env) is None


def test_missing_explicit_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TritonServerError, match="tritonserver binary not found"):
        triton_binary.find_tritonserver(tmp_path / "nope")


@needs_wheel
def test_backend_dir_has_backend_and_this_pythons_stub(tmp_path: Path) -> None:
    assert DIST is not None
    backends = python_backend.prepare_backend_dir(DIST, tmp_path)
    python_dir = backends / "python"
    assert (python_dir / "libtriton_python.so").is_file()
    assert (python_dir / "triton_python_backend_utils.py").is_file()
    stub = python_dir / "triton_python_backend_stub"
    expected = DIST / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / stub.name
    assert stub.read_bytes() == expected.read_bytes()
    assert os.access(stub, os.X_OK)

    before = {p.name: p.stat().st_ino for p in python_dir.iterdir()}
    assert python_backend.prepare_backend_dir(DIST, tmp_path) == backends
    assert {p.name: p.stat().st_ino for p in python_dir.iterdir()} == before, "second run must not copy again"

    stub.write_bytes(b"truncated")
    python_backend.prepare_backend_dir(DIST, tmp_path)
    assert stub.read_bytes() == expected.read_bytes(), "a damaged copy must be replaced"


# --- environment and command line ----------------------------------------------------------


@needs_wheel
def test_env_puts_interpreter_libpython_alone_before_wheel_libs(tmp_path: Path,
                                                                config_file: Path) -> None:
    assert DIST is not None
    server = TritonServer(
        tmp_path, config_path=config_file, http_port=0, extra_env={"FOO": "bar"},
        cache_dir=tmp_path / "cache",
    )
    env = server.build_env({"LD_LIBRARY_PATH": "/opt/user/lib", "PATH": "/usr/bin"})
    parts = env["LD_LIBRARY_PATH"].split(os.pathsep)
    wheel_libs = str(DIST.resolve().parent.parent / "nvidia_pytriton.libs")
    assert Path(wheel_libs).is_dir()
    # The interpreter's libpython, and nothing else of its LIBDIR (a system lib folder there
    # would hand torch the system's cuDNN).
    name = sysconfig.get_config_var("INSTSONAME")
    libpython = Path(parts[0])
    assert [p.name for p in libpython.iterdir()] == [name]
    assert (libpython / name).resolve() == \
        (Path(sysconfig.get_config_var("LIBDIR")) / name).resolve()
    assert sysconfig.get_config_var("LIBDIR") not in parts
    assert parts.index(wheel_libs) == 1 and parts[2] == "/opt/user/lib"
    assert env["ZIMAGE_CONFIG"] == str(config_file.resolve())
    assert env["FOO"] == "bar"
    if sys.prefix != sys.base_prefix:
        assert env["VIRTUAL_ENV"] == sys.prefix
        assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.prefix) / "bin")


def test_system_server_env_leaves_ld_library_path_alone(tmp_path: Path) -> None:
    fake = tmp_path / "tritonserver"
    fake.write_text("")
    server = TritonServer(tmp_path, tritonserver=fake)
    env = server.build_env({"LD_LIBRARY_PATH": "/opt/tritonserver/lib", "PATH": "/usr/bin"})
    assert env["LD_LIBRARY_PATH"] == "/opt/tritonserver/lib"
    assert "ZIMAGE_CONFIG" not in env
    assert server.backend_directory() is None
    assert not any(a.startswith(("--backend-directory", "--cache-directory")) for a in server.build_command())


def test_command_has_ports_addresses_and_extra_args_but_no_model_control(tmp_path: Path) -> None:
    fake = tmp_path / "tritonserver"
    fake.write_text("")
    server = TritonServer(
        tmp_path,
        tritonserver=fake,
        http_port=18000,
        grpc_port=18001,
        metrics_port=18002,
        log_verbose=2,
        extra_args=["--exit-timeout-secs=5", "--log-format", "ISO8601"],
    )
    cmd = server.build_command(tmp_path / "backends")
    assert cmd[0] == str(fake.resolve())
    for arg in (
        f"--model-repository={tmp_path.resolve()}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        "--http-port=18000",
        "--grpc-port=18001",
        "--metrics-port=18002",
        "--log-verbose=2",
        f"--backend-directory={tmp_path / 'backends'}",
    ):
        assert arg in cmd
    assert cmd[-3:] == ["--exit-timeout-secs=5", "--log-format", "ISO8601"]
    # The model may unload itself (a broken GPU); clients may not: the repository API is
    # behind a header whose value is made per start.
    assert "--model-control-mode=explicit" in cmd and "--load-model=*" in cmd
    [http] = [a for a in cmd if a.startswith("--http-restricted-api=")]
    [grpc] = [a for a in cmd if a.startswith("--grpc-restricted-protocol=")]
    assert http.split("=", 1)[1] == grpc.split("=", 1)[1]
    assert http.startswith("--http-restricted-api=model-repository:zimage-admin-key=")
    assert len(http.rsplit("=", 1)[1]) >= 24
    assert server.http_url == "127.0.0.1:18000"
    assert server.grpc_url == "127.0.0.1:18001"
    assert server.metrics_url == "127.0.0.1:18002"


def test_default_log_verbose_is_zero_and_public_address_is_reached_locally(tmp_path: Path) -> None:
    fake = tmp_path / "tritonserver"
    fake.write_text("")
    server = TritonServer(tmp_path, tritonserver=fake, address="0.0.0.0")
    cmd = server.build_command()
    assert "--log-verbose=0" in cmd
    assert "--http-address=0.0.0.0" in cmd and "--grpc-address=0.0.0.0" in cmd
    assert server.http_url == "127.0.0.1:8000"
    assert server.grpc_url == "127.0.0.1:8001"


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = triton_process.free_ports(3)
    assert len(set(ports)) == 3
    assert all(port_is_free(p) for p in ports)
    assert port_is_free(triton_process.free_port())


def test_port_zero_picks_distinct_free_ports(tmp_path: Path) -> None:
    fake = tmp_path / "tritonserver"
    fake.write_text("")
    server = TritonServer(tmp_path, tritonserver=fake, http_port=0, grpc_port=0, metrics_port=0)
    ports = {server.http_port, server.grpc_port, server.metrics_port}
    assert len(ports) == 3 and 0 not in ports


def test_listening_ports_are_this_process_own(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert port not in listening_sockets.listening_ports(os.getpid()), "bound is not listening"
        listener.listen()
        assert port in listening_sockets.listening_ports(os.getpid())
        # Another process sees the same namespace-wide table but does not hold the socket.
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                 close_fds=True)
        try:
            time.sleep(0.2)
            assert port not in listening_sockets.listening_ports(other.pid)
        finally:
            other.kill()
            other.wait()
        assert listening_sockets.listening_ports(other.pid) == set(), "a gone process owns nothing"
    assert port not in listening_sockets.listening_ports(os.getpid())


def test_shm_regions_removed_are_exactly_the_prefixed_ones(tmp_path: Path) -> None:
    prefix = python_backend.new_shm_prefix()
    assert prefix != python_backend.new_shm_prefix()
    ours = [f"{prefix}1f2e", f"{prefix}77aa"]
    others = ["triton_python_backend_shm_region_1f2e", prefix[:-1] + "x_9"]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"\0" * 16)
    assert python_backend.remove_shm_regions(prefix, tmp_path) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
    assert python_backend.remove_shm_regions("", tmp_path) == []


def test_command_sets_a_shm_prefix_unless_the_extra_args_do(tmp_path: Path) -> None:
    fake = tmp_path / "tritonserver"
    fake.write_text("")
    server = TritonServer(tmp_path, tritonserver=fake)
    assert python_backend.shm_prefix_arg(server.shm_prefix) in server.build_command()
    assert TritonServer(tmp_path, tritonserver=fake).shm_prefix != server.shm_prefix
    for extra in (["--backend-config=python,shm-region-prefix-name=mine_"],
                  ["--backend-config", "python,shm-region-prefix-name=mine_"]):
        given = TritonServer(tmp_path, tritonserver=fake, extra_args=extra)
        assert given.shm_prefix == "mine_"
        assert [a for a in given.build_command() if "shm-region-prefix-name" in a] == extra[-1:]


def test_start_refuses_a_port_another_process_holds(tmp_path: Path, echo_repo: Path) -> None:
    fake = tmp_path / "tritonserver"
    fake.write_text("")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = TritonServer(echo_repo, tritonserver=fake, http_port=0, grpc_port=port)
        with pytest.raises(TritonServerError, match=f"gRPC port {port} on 127.0.0.1 is already in use"):
            server.start()
    assert server.process is None


def test_a_proc_that_hides_the_sockets_fails_at_once(
    tmp_path: Path, echo_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hidepid or a stricter ptrace policy: waiting could only end at the ready timeout.
    fake = tmp_path / "tritonserver"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)

    def denied(pid: int) -> set[int]:
        raise PermissionError(13, "Permission denied", f"/proc/{pid}/fd")

    monkeypatch.setattr(triton_process, "listening_ports", denied)
    server = TritonServer(echo_repo, tritonserver=fake, http_port=0, grpc_port=0, metrics_port=0,
                          log_file=tmp_path / "server.log")
    server.start()
    try:
        started = time.monotonic()
        with pytest.raises(TritonServerError, match=r"cannot tell whether tritonserver \(pid "
                                                    r"\d+\) listens on its ports: .*Permission"):
            server.wait_until_ready(timeout_s=60)
        assert time.monotonic() - started < 5
    finally:
        server.stop(timeout_s=5)


# --- errors for missing inputs -------------------------------------------------------------


def test_missing_model_repository_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "tritonserver"
    fake.write_text("")
    server = TritonServer(tmp_path / "no_such_repo", tritonserver=fake)
    with pytest.raises(TritonServerError, match="model repository not found: .*no_such_repo"):
        server.start()
    assert server.process is None


def test_unrunnable_binary_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "tritonserver"
    fake.write_text("")  # not executable
    server = TritonServer(tmp_path, tritonserver=fake, log_file=tmp_path / "server.log")
    with pytest.raises(TritonServerError, match="cannot run"):
        server.start()


def test_cli_rejects_missing_repository_and_config(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        launcher.main(["--config", str(config_file), "--model-repository", str(tmp_path / "missing_repo")])
    assert exc.value.code == 2
    assert "model repository not found" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        launcher.main(["--config", str(tmp_path / "missing.yaml"), "--model-repository", str(tmp_path)])
    assert "config file not found" in capsys.readouterr().err


def test_cli_defaults_are_relative_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        launcher.main([])
    assert str(tmp_path / "config.yaml") in capsys.readouterr().err


def _rename(section: dict, old: str, new: str) -> None:
    section[new] = section.pop(old)


@pytest.mark.parametrize("edit, line", [
    (lambda d: _rename(d["encoding"], "png_threads", "png_thread"),
     "encoding.png_thread: unknown key; the closest known key is png_threads; known keys here: "
     "jpeg_quality, png_compress_level, png_threads, webp_quality"),
    (lambda d: d["optimizations"]["torch_compile"].update(mode="fast"),
     "optimizations.torch_compile.mode: 'fast' is not one of default, reduce-overhead, "
     "max-autotune, max-autotune-no-cudagraphs"),
    (lambda d: d["optimizations"]["warmup"].update(sizes=[[1000, 1024]]),
     "optimizations.warmup.sizes[0]: [1000, 1024] is not allowed; give [height, width], both "
     "positive multiples of 16"),
    (lambda d: d["defaults"].update(height=4096),
     "defaults.height: 4096 is not allowed; must be a multiple of 16 in [64, 2048] (from the "
     "limits section)"),
], ids=["misspelled-key", "compile-mode", "warmup-size", "default-outside-limits"])
def test_cli_rejects_a_bad_config_in_one_line_before_starting_the_server(
    edit, line: str, tmp_path: Path, echo_repo: Path
) -> None:
    data = yaml.safe_load(CONFIG.read_text())
    edit(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    serve = Path(sys.executable).with_name("zimage-serve")
    started = time.monotonic()
    result = subprocess.run([str(serve), "--config", str(bad), "--model-repository", str(echo_repo)],
                            capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].endswith(f"ERROR zimage_backend.launcher: {bad}: {line}")
    # Before tritonserver is spawned (whose model reported this 11-16 s later) and without
    # importing torch; the bound leaves room for a loaded CI machine.
    assert elapsed < 3, f"{elapsed:.2f} s"


# --- the real server ---------------------------------------------------------------------------


@needs_wheel
def test_real_server_serves_echo_model_and_stops(
    echo_repo: Path, config_file: Path, shared_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tritonclient.http as httpclient

    # Readiness polling must go straight to the local server, never through a proxy.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")

    probe = tmp_path / "probe.txt"
    server = TritonServer(
        echo_repo,
        config_path=config_file,
        model="echo",
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        log_file=tmp_path / "server.log",
        cache_dir=shared_cache,
        extra_env={"ECHO_PROBE_FILE": str(probe)},
        ready_timeout_s=45,
    )
    with server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            data = np.array([3, -1, 7], dtype=np.int32)
            inp = httpclient.InferInput("INPUT0", list(data.shape), "INT32")
            inp.set_data_from_numpy(data)
            result = client.infer("echo", [inp]).as_numpy("OUTPUT0")
        finally:
            # An open keep-alive connection makes tritonserver wait out its exit timeout.
            client.close()
        np.testing.assert_array_equal(result, data)
        prefix, zimage_config, _ = probe.read_text().splitlines()
        assert prefix == sys.prefix, "the stub must run in this venv"
        assert zimage_config == str(config_file.resolve())
        process = server.process

    assert process is not None and process.poll() == 0
    assert server.returncode == 0
    assert all(port_is_free(p) for p in (server.http_port, server.grpc_port, server.metrics_port))


@needs_wheel
def test_real_server_failure_reports_the_log_tail(echo_repo: Path, shared_cache: Path, tmp_path: Path) -> None:
    server = TritonServer(
        echo_repo,
        model="echo",
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        log_file=tmp_path / "server.log",
        cache_dir=shared_cache,
        extra_env={"ECHO_FAIL": "1"},
    )
    server.start()
    try:
        with pytest.raises(TritonServerError, match="exited with code") as exc:
            server.wait_until_ready(timeout_s=45)
        assert "echo model refused to start" in str(exc.value)
    finally:
        server.stop()
    assert not server.is_running()


def echo_cli(echo_repo: Path, config_file: Path, shared_cache: Path, log_file: Path,
             extra: Sequence[str] = (), env: dict[str, str] | None = None) -> tuple[ServeCli, list[int]]:
    """`zimage-serve` on the echo model, on free ports."""
    ports = triton_process.free_ports(3)
    args = [
        "--config", str(config_file),
        "--model-repository", str(echo_repo),
        "--model", "echo",
        "--http-port", str(ports[0]),
        "--grpc-port", str(ports[1]),
        "--metrics-port", str(ports[2]),
        "--ready-timeout-s", "45",
        "--log-file", str(log_file),
        "--", *extra,
    ]  # fmt: skip
    return ServeCli(args, dict(env or {}, XDG_CACHE_HOME=str(shared_cache))), ports


@needs_wheel
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_exits_zero_after_signal(
    sig: signal.Signals, echo_repo: Path, config_file: Path, shared_cache: Path, tmp_path: Path
) -> None:
    cli, ports = echo_cli(echo_repo, config_file, shared_cache, tmp_path / "server.log",
                          ["--exit-timeout-secs=10"])
    try:
        # The signal comes the moment the ready line is out: it must not be lost in logging.
        assert cli.wait_for("ready: HTTP"), "no ready line:\n" + cli.output
        assert f"http://127.0.0.1:{ports[0]}" in cli.output
        cli.proc.send_signal(sig)
    finally:
        # TritonServer.stop() may take 30 s of SIGINT, then 5 of SIGTERM and 5 of SIGKILL: the
        # bound must outlast that, or a slow shutdown on a loaded machine fails the test.
        code = cli.wait(timeout=60)
    assert code == 0, cli.output
    assert "stopping tritonserver" in cli.output
    # The server must be gone, not orphaned: its ports are free again.
    deadline = time.monotonic() + 10
    while not all(port_is_free(p) for p in ports):
        assert time.monotonic() < deadline, "tritonserver still holds its ports"
        time.sleep(0.2)


@needs_wheel
def test_cli_reports_a_server_that_dies_after_ready_and_removes_its_shm(
    echo_repo: Path, config_file: Path, shared_cache: Path, tmp_path: Path
) -> None:
    cli, _ = echo_cli(echo_repo, config_file, shared_cache, tmp_path / "server.log")
    try:
        assert cli.wait_for("ready: HTTP"), "no ready line:\n" + cli.output
        prefix = cli.shm_prefix()
        assert any(p.name.startswith(prefix) for p in python_backend.SHM_DIR.iterdir()), \
            "the stub's region should carry the launcher's prefix"
        os.kill(cli.server_pid(), signal.SIGKILL)
    finally:
        code = cli.wait(timeout=30)
    assert code == 128 + signal.SIGKILL, cli.output
    assert "tritonserver exited with code -9 after it was ready" in cli.output
    assert "lines of the server log ---" in cli.output and "Started HTTPService" in cli.output
    assert not [p.name for p in python_backend.SHM_DIR.iterdir() if p.name.startswith(prefix)]


@needs_wheel
def test_cli_returns_the_servers_exit_code_when_the_model_fails(
    echo_repo: Path, config_file: Path, shared_cache: Path, tmp_path: Path
) -> None:
    cli, _ = echo_cli(echo_repo, config_file, shared_cache, tmp_path / "server.log",
                      env={"ECHO_FAIL": "1"})
    assert cli.wait(timeout=60) != 0
    assert "echo model refused to start" in cli.output, "the error must quote the server log"


# --- CPU instances: config.pbtxt's instance_group overridden on a host without GPUs -----------


SHIPPED_PBTXT = Path(__file__).resolve().parents[2] / "model_repository" / "zimage" / "config.pbtxt"


def test_the_cpu_override_is_config_pbtxt_with_only_the_instance_group_changed() -> None:
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    override = cpu_instances.cpu_override(SHIPPED_PBTXT, 2)
    assert override is not None
    served = json_format.Parse(override, model_config_pb2.ModelConfig())
    assert [(g.kind, g.count, list(g.gpus)) for g in served.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 2, [])]
    shipped = text_format.Parse(SHIPPED_PBTXT.read_text(), model_config_pb2.ModelConfig())
    assert shipped.dynamic_batching.default_queue_policy.max_queue_size == 16  # a real config
    del served.instance_group[:], shipped.instance_group[:]
    assert served == shipped


@pytest.mark.parametrize("group, count", [
    ("{ kind: KIND_CPU count: 1 }", 2),  # the operator's choice
    ("{ kind: KIND_GPU count: 1 }", 2),
    ("{ kind: KIND_AUTO count: 1 gpus: [ 0 ] }", 2),
    ("{ kind: KIND_AUTO count: 1 }", 1),  # what KIND_AUTO gives anyway
], ids=["cpu", "gpu", "auto-with-gpus", "one"])
def test_no_override_where_the_config_chose_or_one_is_asked(tmp_path: Path, group: str,
                                                            count: int) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text(f'backend: "python"\ninstance_group [ {group} ]\n')
    assert cpu_instances.cpu_override(tmp_path / "m" / "config.pbtxt", count) is None
    assert cpu_instances.cpu_overrides(tmp_path, count) == {}


def test_instances_share_the_cores_they_may_run_on() -> None:
    cores = len(os.sched_getaffinity(0))
    assert cpu_instances.threads_per_instance(1) == cores
    assert cpu_instances.threads_per_instance(cores) == 1
    assert cpu_instances.threads_per_instance(4 * cores) == 1


def test_cli_rejects_fewer_than_one_cpu_instance(config_file: Path, echo_repo: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        launcher.main(["--config", str(config_file), "--model-repository", str(echo_repo),
                       "--cpu-instances", "0"])
    assert exc.value.code == 2
    assert "--cpu-instances must be at least 1, got 0" in capsys.readouterr().err


@pytest.fixture
def auto_echo_repo(echo_repo: Path) -> Path:
    config = echo_repo / "echo" / "config.pbtxt"
    config.write_text(config.read_text().replace("kind: KIND_CPU", "kind: KIND_AUTO"))
    return echo_repo


def served_config(server: TritonServer, model: str) -> dict:
    import json
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{server.http_url}/v2/models/{model}/config", timeout=10) as answer:
        return json.load(answer)


@needs_wheel
@pytest.mark.skipif(cuda_devices.server_sees_gpus(os.environ), reason="needs a host without GPUs")
@pytest.mark.parametrize("count", [1, 3])
def test_a_gpu_less_server_runs_auto_models_with_cpu_instances_threads_shared(
    count: int, auto_echo_repo: Path, shared_cache: Path, tmp_path: Path
) -> None:
    import tritonclient.http as httpclient

    probe = tmp_path / "probe.txt"
    server = TritonServer(auto_echo_repo, model="echo", http_port=0, grpc_port=0, metrics_port=0,
                          log_file=tmp_path / "server.log", cache_dir=shared_cache,
                          extra_env={"ECHO_PROBE_FILE": str(probe)}, ready_timeout_s=60,
                          cpu_instances=count)
    with server:
        config = served_config(server, "echo")
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            data = np.array([5], dtype=np.int32)
            inp = httpclient.InferInput("INPUT0", list(data.shape), "INT32")
            inp.set_data_from_numpy(data)
            np.testing.assert_array_equal(client.infer("echo", [inp]).as_numpy("OUTPUT0"), data)
        finally:
            client.close()
    assert server.returncode == 0
    assert [(g["kind"], g["count"]) for g in config["instance_group"]] == [("KIND_CPU", count)]
    # Each instance wrote its three lines; one instance keeps torch's own thread count, and
    # an OMP_NUM_THREADS given to the launcher wins.
    shared = str(cpu_instances.threads_per_instance(count)) if count > 1 else ""
    threads = probe.read_text().splitlines()[2::3]
    assert threads == [os.environ.get("OMP_NUM_THREADS", shared)] * count


@needs_wheel
@pytest.mark.skipif(cuda_devices.server_sees_gpus(os.environ), reason="needs a host without GPUs")
def test_a_model_that_fails_its_overridden_load_fails_the_start(
    auto_echo_repo: Path, shared_cache: Path, tmp_path: Path
) -> None:
    server = TritonServer(auto_echo_repo, model="echo", http_port=0, grpc_port=0, metrics_port=0,
                          log_file=tmp_path / "server.log", cache_dir=shared_cache,
                          extra_env={"ECHO_FAIL": "1"})
    server.start()
    try:
        with pytest.raises(TritonServerError, match="model 'echo' failed to load before it was "
                                                    "ready: .*echo model refused to start"):
            server.wait_until_ready(timeout_s=60)
    finally:
        server.stop()
    assert not server.is_running()
