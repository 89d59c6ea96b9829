"""The Docker files cannot be built on CI (no Docker engine); keep them consistent with what
the tests run: the same Triton release as the client pin, and a launcher command it accepts."""

from __future__ import annotations

import json
import re

import yaml

from tests.conftest import ROOT
from zimage_backend import launcher, triton_process

DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _entrypoint() -> list[str]:
    match = re.search(r"ENTRYPOINT (\[.*?\])", DOCKERFILE, re.S)
    return json.loads(match.group(1).replace("\\\n", ""))


def test_triton_release_matches_the_client_pin():
    # NGC 24.10 ships tritonserver 2.51; the client and perf_analyzer are pinned to 2.51.0.
    assert "nvcr.io/nvidia/tritonserver:24.10-py3" in DOCKERFILE
    assert "tritonclient[grpc,http]==2.51.0" in PYPROJECT


def test_entrypoint_is_the_launcher_with_options_it_accepts(tmp_path):
    command = _entrypoint()
    assert command[0] == "zimage-serve"
    # The launcher's own parser must accept the command (paths moved into tmp_path).
    (tmp_path / "config.yaml").write_text("")
    (tmp_path / "repo").mkdir()
    argv = [str(tmp_path / "config.yaml") if a == "/opt/zimage/config.yaml" else
            str(tmp_path / "repo") if a == "/opt/zimage/model_repository" else a
            for a in command[1:]]
    args, extra = launcher._parse_args(argv)
    assert args.address == "0.0.0.0"
    assert extra == ["--exit-timeout-secs=8"]


def test_image_copies_what_the_entrypoint_reads():
    command = _entrypoint()
    config = command[command.index("--config") + 1]
    repository = command[command.index("--model-repository") + 1]
    assert f"COPY config.yaml {config.rsplit('/', 1)[1]}" in DOCKERFILE
    assert "COPY model_repository model_repository" in DOCKERFILE
    assert "WORKDIR /opt/zimage" in DOCKERFILE
    assert repository == "/opt/zimage/model_repository"


def test_compose_gives_every_gpu_and_mounts_the_config():
    service = COMPOSE["services"]["zimage"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "../config.yaml:/opt/zimage/config.yaml:ro" in service["volumes"]
    assert sorted(p.split(":")[0] for p in service["ports"]) == ["8000", "8001", "8002"]
    assert re.search(r"EXPOSE 8000 8001 8002", DOCKERFILE)


def test_numpy_stays_below_2_for_the_stub():
    assert '"numpy>=1.24,<2"' in PYPROJECT


def _healthcheck_option(name: str) -> str:
    match = re.search(rf"HEALTHCHECK .*?--{name}=(\S+)", DOCKERFILE, re.S)
    assert match, f"HEALTHCHECK has no --{name}"
    return match.group(1)


def test_healthcheck_start_period_is_the_launchers_ready_timeout(tmp_path):
    # A first start downloads the weights and compiles; a shorter wait killed it (issue 12).
    (tmp_path / "config.yaml").write_text("")
    (tmp_path / "repo").mkdir()
    argv = [str(tmp_path / "config.yaml") if a == "/opt/zimage/config.yaml" else
            str(tmp_path / "repo") if a == "/opt/zimage/model_repository" else a
            for a in _entrypoint()[1:]]
    args, _ = launcher._parse_args(argv)
    start_period = _healthcheck_option("start-period")
    assert start_period.endswith("s")
    assert float(start_period[:-1]) == args.ready_timeout_s == triton_process.DEFAULT_READY_TIMEOUT_S
    assert args.ready_timeout_s >= 1800
    # compose runs the image as built: no other timeout, entrypoint or health check of its own.
    service = COMPOSE["services"]["zimage"]
    assert not {"healthcheck", "entrypoint", "command"} & set(service)


def test_image_torch_is_the_gpu_tested_build():
    # bench/results record the torch every GPU figure was measured with.
    recorded = {json.loads(p.read_text())["card"]["torch"]
                for p in (ROOT / "bench" / "results").glob("*/results.json")}
    spec = re.search(r'ARG TORCH_SPEC="torch==([^"]+)"', DOCKERFILE).group(1)
    index = re.search(r"ARG TORCH_INDEX=\S+/whl/(\w+)", DOCKERFILE).group(1)
    assert f"{spec}+{index}" in recorded, recorded
