"""Out-of-memory recovery on a GPU, through the same Service that model.py drives.

A request too large for the card (limits raised for the test) must get RESOURCE_EXHAUSTED,
the memory must be given back, and the next normal request must succeed. The process gets a
memory budget (torch's per-process fraction) so that an 80 GB and a 141 GB card fail alike,
in seconds: a real CUDA out-of-memory from the caching allocator, on a smaller "card".

  python -m bench.oom_check --budget-gib 26 --out results/raw/oom.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import config_with, stamp, write_json
from zimage_backend.engine import Engine
from zimage_backend.service import Service
from zimage_backend.settings import load_settings


class Incoming:
    requested_outputs: set[str] = set()

    def __init__(self, **values):
        dtypes = {"HEIGHT": np.int32, "WIDTH": np.int32, "NUM_INFERENCE_STEPS": np.int32,
                  "SEED": np.int64}
        self.tensors = {k: (np.array([[v]], dtype=dtypes[k]) if k in dtypes
                            else np.array([[v.encode()]], dtype=np.object_))
                        for k, v in values.items()}

    def is_cancelled(self):
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--huge", type=int, default=2048, help="side of the oversized request")
    parser.add_argument("--budget-gib", type=float, default=26.0)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * 2**30 / total),
                                                   device)
    settings = load_settings(config_with({
        "model.load_format": args.load_format, "optimizations.torch_compile.enabled": False,
        "optimizations.vae_tiling": False, "limits.max_size": max(2048, args.huge),
        "limits.max_pixels": max(2048, args.huge) ** 2}))
    service = Service(Engine(settings, device))

    def memory() -> dict[str, float]:
        if not cuda:
            return {}
        return {"allocated_gib": round(torch.cuda.memory_allocated(device) / 2**30, 2),
                "reserved_gib": round(torch.cuda.memory_reserved(device) / 2**30, 2)}

    before = memory()
    t = time.perf_counter()
    [huge] = service.execute([Incoming(PROMPT="too big", HEIGHT=args.huge, WIDTH=args.huge,
                                       NUM_INFERENCE_STEPS=1, OUTPUT_FORMAT="raw")])
    huge_s = time.perf_counter() - t
    after = memory()
    [normal] = service.execute([Incoming(PROMPT="fits", HEIGHT=1024, WIDTH=1024, SEED=1)])
    result = {
        "huge_request": f"{args.huge}x{args.huge}, 1 step",
        "memory_budget_gib": args.budget_gib if cuda else None,
        "huge_error_code": huge.error.code if huge.error else None,
        "huge_error_message": huge.error.message if huge.error else None,
        "huge_answer_s": round(huge_s, 2),
        "memory_before": before, "memory_after_oom": after,
        "next_request_ok": normal.error is None,
        "next_request_metadata": normal.outputs["METADATA"][0, 0].decode() if normal.outputs
        else None,
        **stamp()}
    print(result)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
