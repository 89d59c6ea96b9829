"""Requests that queue behind a busy instance are answered one by one, each as soon as its own
image is done: Triton hands the instance one request per execute() (config.pbtxt
preferred_batch_size), and an execute() of several requests answers each when its pipeline call
ends (tests/unit/test_service.py covers that path).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.e2e.helpers import url_of
from zimage_client import AsyncZImageClient

pytestmark = pytest.mark.e2e

BLOCKER = (1024, 20)  # size, steps: ~2 s of work on the tiny model on a 2-core CPU
QUEUED = 3


async def _timed(client: AsyncZImageClient, prompt: str, size: int, steps: int):
    result = await client.generate(prompt, height=size, width=size, num_inference_steps=steps,
                                   output_format="raw")
    return time.perf_counter(), result


def test_queued_requests_are_answered_one_by_one_as_each_finishes(server, protocol):
    url = url_of(server, protocol)

    async def scenario():
        async with AsyncZImageClient(url, protocol=protocol, inference_timeout_s=120) as client:
            await client.generate("warm the connection", height=64, width=64,
                                  num_inference_steps=1, output_format="raw")
            blocker = asyncio.ensure_future(_timed(client, "blocker", *BLOCKER))
            await asyncio.sleep(0.5)
            # One size and one prompt length: before, Triton combined these into one call.
            queued = [asyncio.ensure_future(_timed(client, f"queued request {i}", 512, 8))
                      for i in range(QUEUED)]
            await blocker
            return await asyncio.gather(*queued)

    answers = sorted(asyncio.run(scenario()), key=lambda a: a[0])
    assert [result.metadata["batch_size"] for _, result in answers] == [1] * QUEUED
    work_s = [result.timings_ms["compute"] / 1000 for _, result in answers]
    arrived = [t for t, _ in answers]
    # The first answer came back while the other two images still had their work ahead.
    assert arrived[-1] - arrived[0] >= 0.5 * sum(work_s[1:]), (arrived, work_s)
