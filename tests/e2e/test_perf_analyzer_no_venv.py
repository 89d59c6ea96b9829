"""perf/perf_analyzer.sh run from a plain shell: no venv on PATH, no LD_LIBRARY_PATH, another
working directory. It must find perf_analyzer and libcudart in the project's .venv itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="the script looks for the project's .venv, and these tests run elsewhere")
def test_perf_analyzer_script_runs_without_an_activated_venv(server, tmp_path):
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"data": [{"PROMPT": ["a plain shell"], "HEIGHT": [64],
                                            "WIDTH": [64], "NUM_INFERENCE_STEPS": [1]}]}))
    assert subprocess.run(["bash", "-c", "command -v perf_analyzer"], env={"PATH": PLAIN_PATH},
                          capture_output=True).returncode != 0, "perf_analyzer is on the plain PATH"
    run = subprocess.run(
        ["bash", str(ROOT / "perf" / "perf_analyzer.sh"), str(inputs), "-i", "grpc",
         "-u", server.grpc_url, "--concurrency-range", "1",
         # Windows of a fixed count of answers: a busy shared CPU cannot leave one empty.
         "--measurement-mode", "count_windows", "--measurement-request-count", "4",
         "--max-trials", "3", "--stability-percentage", "1000"],
        cwd=tmp_path, env={"PATH": PLAIN_PATH, "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=240)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    throughputs = [float(x) for x in re.findall(r"Throughput: ([\d.]+) infer/sec", output)]
    assert len(throughputs) == 1 and throughputs[0] > 0, output
