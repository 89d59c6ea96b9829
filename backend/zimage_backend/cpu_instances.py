"""How many instances a model gets on a host without GPUs, and how many threads each: the
instance_group override that the launcher loads it with.

One CPU instance per model is what KIND_AUTO gives on such a host, and Triton 2.51's dynamic
batcher then loses wakeups: about one sequential request in ten slept 500 ms in its queue
(bench/results/2026-12-01-cpu-stall/NOTES.md). A second instance keeps a slot free. GPUs keep
config.pbtxt's one instance per device, so no GPU memory is doubled.
"""

from __future__ import annotations

import os
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

# Two instances removed the stalls (0 of 80 sequential requests over 300 ms, NOTES.md above).
DEFAULT_CPU_INSTANCES = 2


def threads_per_instance(count: int) -> int:
    """torch threads for each of `count` instances (OMP_NUM_THREADS): their share of this
    host's cores. Two instances of two threads on two cores, with anything else running, took
    1.8-2.5 s per 64x64 request instead of 0.14 s (NOTES.md above): a thread that has lost its
    core holds up its partner at every barrier."""
    return max(1, len(os.sched_getaffinity(0)) // count)


def cpu_override(config_pbtxt: Path, count: int) -> str | None:
    """The model config (JSON, for the repository API's load `config` parameter) that is
    `config_pbtxt` with `count` CPU instances; None when its instance_group names a kind or GPUs
    of its own (the operator's choice stands) or `count` is what KIND_AUTO gives anyway (1)."""
    config = text_format.Parse(config_pbtxt.read_text(), model_config_pb2.ModelConfig())
    groups = config.instance_group
    auto = model_config_pb2.ModelInstanceGroup.KIND_AUTO
    if count == 1 or any(g.kind != auto or g.gpus for g in groups):
        return None
    del groups[:]
    groups.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=count)
    return json_format.MessageToJson(config, preserving_proto_field_name=True, indent=None)


def cpu_overrides(model_repository: Path, count: int) -> dict[str, str]:
    """Model name -> override, for the models in `model_repository` that cpu_override changes."""
    overrides = {}
    for config_pbtxt in sorted(model_repository.glob("*/config.pbtxt")):
        override = cpu_override(config_pbtxt, count)
        if override is not None:
            overrides[config_pbtxt.parent.name] = override
    return overrides

