"""Every bad input gets INVALID_ARG naming the field, without failing its neighbours."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.helpers import metric, settled_scrape
from zimage_client import InvalidRequestError

pytestmark = pytest.mark.e2e

BAD_THROUGH_CLIENT = [
    (dict(prompt=""), "PROMPT", "empty"),
    (dict(prompt="word " * 600), "PROMPT", "tokens long; at most 512"),
    (dict(prompt="a", negative_prompt="word " * 600, guidance_scale=2.0), "NEGATIVE_PROMPT",
     "at most 512"),
    (dict(prompt="a", height=100), "HEIGHT", "100 is not allowed; must be a multiple of 16 in [64, 2048]"),
    (dict(prompt="a", width=4096), "WIDTH", "4096 is not allowed"),
    (dict(prompt="a", height=32), "HEIGHT", "32"),
    (dict(prompt="a", num_inference_steps=0), "NUM_INFERENCE_STEPS", "0 is outside [1, 50]"),
    (dict(prompt="a", num_inference_steps=500), "NUM_INFERENCE_STEPS", "500 is outside"),
    (dict(prompt="a", guidance_scale=math.nan), "GUIDANCE_SCALE", "nan is outside [0.0, 20.0]"),
    (dict(prompt="a", guidance_scale=math.inf), "GUIDANCE_SCALE", "inf is outside"),
    (dict(prompt="a", guidance_scale=-2.0), "GUIDANCE_SCALE", "-2.0 is outside"),
    (dict(prompt="a", seed=-5), "SEED", "-5 is outside"),
    (dict(prompt="a", output_format="gif"), "OUTPUT_FORMAT", "'gif' is not one of png, jpeg, webp, raw"),
]


@pytest.mark.parametrize("kwargs, field, words", BAD_THROUGH_CLIENT,
                         ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_THROUGH_CLIENT)])
def test_bad_value_names_field_and_range(client, kwargs, field, words):
    kwargs = {"height": 64, "width": 64, **kwargs}
    with pytest.raises(InvalidRequestError) as info:
        client.generate(**kwargs)
    assert info.value.code == "INVALID_ARG"
    assert info.value.message.startswith(f"{field}: ")
    assert words in info.value.message


def _raw_infer(server, protocol, inputs):
    """Sends tensors our client would never build, through tritonclient directly."""
    module = grpcclient if protocol == "grpc" else httpclient
    url = server.grpc_url if protocol == "grpc" else server.http_url
    tensors = []
    for name, array, dtype in inputs:
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    client = module.InferenceServerClient(url)
    try:
        return client.infer("zimage", tensors)
    finally:
        client.close()


PROMPT = ("PROMPT", np.array([[b"a cat"]], dtype=np.object_), "BYTES")
BAD_TENSORS = [
    ([("HEIGHT", np.array([[64]], np.int32), "INT32")], "PROMPT"),
    ([PROMPT, ("HEIGHT", np.array([[64.0]], np.float32), "FP32")], "HEIGHT"),
    ([PROMPT, ("SEED", np.array([[1]], np.int32), "INT32")], "SEED"),
    ([PROMPT, ("WIDTH", np.array([[64, 64]], np.int32), "INT32")], "WIDTH"),
    ([PROMPT, ("STEPS", np.array([[4]], np.int32), "INT32")], "STEPS"),
    ([("PROMPT", np.array([[b"\xff\xfe bad utf-8"]], dtype=np.object_), "BYTES")], "PROMPT"),
]


@pytest.mark.parametrize("inputs, field", BAD_TENSORS, ids=[b[1] for b in BAD_TENSORS])
def test_bad_tensors_are_refused_by_name(server, protocol, inputs, field):
    with pytest.raises(InferenceServerException) as info:
        _raw_infer(server, protocol, inputs)
    assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")
    assert field in info.value.message()


@pytest.mark.parametrize("outputs, message", [
    (["PIXELS"], "OUTPUT_FORMAT: 'png' returns IMAGE, but the request asked only for PIXELS"),
    # Without IMAGE a png request would run a whole generation for an empty success.
    (["SEED", "METADATA"], "OUTPUT_FORMAT: 'png' returns IMAGE, but the request asked only "
                           "for METADATA, SEED"),
])
def test_asking_for_outputs_without_the_one_the_format_fills(server, protocol, outputs, message):
    module = grpcclient if protocol == "grpc" else httpclient
    url = server.grpc_url if protocol == "grpc" else server.http_url
    prompt = module.InferInput("PROMPT", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"a cat"]], dtype=np.object_))
    client = module.InferenceServerClient(url)
    before = metric(settled_scrape(server), "zimage_images_generated_total")
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer("zimage", [prompt], outputs=[module.InferRequestedOutput(o)
                                                      for o in outputs])
    finally:
        client.close()
    assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")
    assert info.value.message().startswith(message)
    # Refused before any generation: no image was made for it.
    assert metric(settled_scrape(server), "zimage_images_generated_total") == before


def test_bad_requests_do_not_fail_their_batch(client, server):
    jobs = [dict(prompt="good", seed=1), dict(prompt="", seed=2), dict(prompt="good", seed=3),
            dict(prompt="bad size", height=65), dict(prompt="good", seed=5)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(client.generate, **{"height": 64, "width": 64, **job})
                   for job in jobs]
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result().seed)
        except InvalidRequestError as exc:
            outcomes.append(exc.message.split(":")[0])
    assert outcomes == [1, "PROMPT", 3, "HEIGHT", 5]
    assert server.is_ready()
    assert client.generate("still fine", height=64, width=64, seed=9).seed == 9
