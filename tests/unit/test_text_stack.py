"""The text encoder as one module (text_stack.TextStack): diffusers' embeddings exactly, from 35
of 36 layers, and one compiled graph where the encoder's own forward made three per layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zimage_backend import optimizations
from zimage_backend.random_models import build_tiny_pipeline
from zimage_backend.text_stack import TextStack


@pytest.fixture()
def encoder():
    return build_tiny_pipeline(seed=2).text_encoder.eval()


def _hidden(encoder, ids, mask):
    return encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                   use_cache=False).hidden_states[-2]


IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
MASK = torch.tensor([[True] * 6 + [False] * 2, [True] * 8])


@torch.inference_mode()
def test_the_stack_gives_diffusers_embeddings(encoder):
    stack = TextStack(encoder)
    assert len(stack.layers) == len(encoder.layers) - 1
    want, got = _hidden(encoder, IDS, MASK), stack(IDS, MASK)
    assert torch.equal(got[0, :6], want[0, :6]) and torch.equal(got[1], want[1])
    assert torch.equal(stack(IDS[1:], None), _hidden(encoder, IDS[1:], MASK[1:]))


@torch.inference_mode()
def test_without_the_collecting_hooks_it_is_one_graph(encoder):
    stack = TextStack(encoder)
    _hidden(encoder, IDS, MASK)  # transformers installs its hooks on a first forward
    before = torch._dynamo.explain(stack)(IDS, MASK)
    assert before.graph_break_count > 0  # the hooks' ContextVar
    reference = stack(IDS, MASK)
    assert stack.drop_capturing_hooks(encoder) > 0
    after = torch._dynamo.explain(stack)(IDS, MASK)
    assert (after.graph_count, after.graph_break_count) == (1, 0)
    assert torch.equal(stack(IDS, MASK), reference)


def _engine(settings, **changes):
    from zimage_backend.engine import Engine

    settings = dataclasses.replace(settings, optimizations=dataclasses.replace(
        settings.optimizations, **changes))
    return Engine(settings, torch.device("cpu"))


def test_the_engine_encodes_through_the_stack_with_the_same_image(tiny_settings):
    plain = _engine(tiny_settings)
    stacked = _engine(tiny_settings, text_encoder_stack=True)
    outcome = stacked.report.as_dict()["text_encoder_stack"]
    assert outcome["status"] == "applied" and "layers in one module" in outcome["detail"]
    assert stacked.text_stack is not None and plain.text_stack is None
    requests = [dataclasses.replace(plain._request(p, 64, 2), seed=4)
                for p in ("a cat", "a much longer prompt about a dog on a beach at dusk")]
    for a, b in zip(plain.encode_prompts([r.prompt for r in requests]),
                    stacked.encode_prompts([r.prompt for r in requests])):
        assert torch.equal(a, b)
    assert all((a == b).all() for a, b in zip(plain.run(requests).pixels,
                                              stacked.run(requests).pixels))


def test_a_stack_that_differs_is_not_served(tiny_settings, monkeypatch):
    forward = TextStack.forward
    monkeypatch.setattr(TextStack, "forward", lambda self, *a: forward(self, *a) * 1.01)
    engine = _engine(tiny_settings, text_encoder_stack=True)
    outcome = engine.report.as_dict()["text_encoder_stack"]
    assert outcome["status"] == "fallback" and "differs from the encoder's" in outcome["detail"]
    assert engine.text_stack is None
    assert engine.encode_prompts(["a cat"])[0].shape[0] > 0  # the encoder's forward serves


def test_streaming_modes_keep_the_encoders_forward(tiny_settings):
    ctx = optimizations.Context(pipe=None, settings=dataclasses.replace(
        tiny_settings, optimizations=dataclasses.replace(
            tiny_settings.optimizations, memory_mode="balanced")),
        device=torch.device("cpu"), report=optimizations.Report(), run_once=None)
    assert optimizations._text_stack_requirement(ctx) == \
        "memory_mode balanced streams the text encoder"
