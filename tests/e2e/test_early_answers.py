"""Requests that Triton queues into one execute() but that cannot share a pipeline call are each
answered when their own call ends, not when the last one does.

A slow request keeps the one CPU instance busy while three more queue; Triton hands the three to
the next execute() together, and their three sizes make three pipeline calls, one after another.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from zimage_client import AsyncZImageClient

pytestmark = pytest.mark.e2e

BLOCKER = (1024, 20)  # size, steps: ~2 s of work on the tiny model on a 2-core CPU
QUEUED_SIZES = (768, 832, 896)


async def _timed(client: AsyncZImageClient, size: int, steps: int):
    result = await client.generate("a queued request", height=size, width=size,
                                   num_inference_steps=steps, output_format="raw")
    return time.perf_counter(), result


def test_queued_requests_are_answered_as_their_own_calls_end(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url

    async def scenario():
        async with AsyncZImageClient(url, protocol=protocol, inference_timeout_s=120) as client:
            await client.generate("warm the connection", height=64, width=64,
                                  num_inference_steps=1, output_format="raw")
            blocker = asyncio.ensure_future(_timed(client, *BLOCKER))
            await asyncio.sleep(0.5)
            queued = [asyncio.ensure_future(_timed(client, size, 8)) for size in QUEUED_SIZES]
            await blocker
            return await asyncio.gather(*queued)

    answers = sorted(asyncio.run(scenario()), key=lambda a: a[1].timings_ms["wait"])
    waits = [result.timings_ms["wait"] for _, result in answers]
    work_ms = [result.timings_ms["compute"] for _, result in answers]
    # One execute() ran all three: each call waited for the calls before it.
    assert waits[2] >= work_ms[0] + work_ms[1] - 50, (waits, work_ms)
    arrived = [t for t, _ in answers]
    assert arrived == sorted(arrived)
    # The first answer came back while the other two calls still had their work ahead of them.
    assert arrived[2] - arrived[0] >= 0.5 * (work_ms[1] + work_ms[2]) / 1000, (arrived, work_ms)
