"""A short perf_analyzer run against the real server with the documented script."""

from __future__ import annotations

import re

import pytest

from tests.e2e.helpers import perf_analyzer

pytestmark = pytest.mark.e2e


def test_perf_analyzer_runs_without_errors(server, tmp_path):
    output = perf_analyzer(server, tmp_path, 2, [
        "--concurrency-range", "1:2", "--measurement-interval", "2000",
        # On a shared 2-core CI machine windows vary a lot; this test is about errors and
        # throughput, not about stable latency, so any variation is accepted.
        "--max-trials", "3", "--stability-percentage", "1000"], timeout_s=240)
    throughputs = [float(x) for x in re.findall(r"Throughput: ([\d.]+) infer/sec", output)]
    assert len(throughputs) == 2 and min(throughputs) > 0, output
    assert "error" not in output.lower(), output
