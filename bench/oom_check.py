"""Out-of-memory recovery on a GPU, through the same Service that model.py drives.

A request too large for the card (limits raised for the test) must get RESOURCE_EXHAUSTED,
the memory must be given back, and the next normal request must succeed.

  python -m bench.oom_check --out results/raw/oom.json
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
    parser.add_argument("--huge", type=int, default=8192, help="side of the oversized request")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    settings = load_settings(config_with({
        "model.load_format": "dummy", "optimizations.torch_compile.enabled": False,
        "optimizations.vae_tiling": False, "limits.max_size": args.huge,
        "limits.max_pixels": args.huge * args.huge}))
    service = Service(Engine(settings, torch.device("cuda", 0)))
    free = lambda: torch.cuda.mem_get_info(0)[0] / 2**30  # noqa: E731
    before = {"allocated_gib": torch.cuda.memory_allocated(0) / 2**30, "free_gib": free()}
    t = time.perf_counter()
    [huge] = service.execute([Incoming(PROMPT="too big", HEIGHT=args.huge, WIDTH=args.huge,
                                       NUM_INFERENCE_STEPS=1, OUTPUT_FORMAT="raw")])
    huge_s = time.perf_counter() - t
    after = {"allocated_gib": torch.cuda.memory_allocated(0) / 2**30, "free_gib": free()}
    [normal] = service.execute([Incoming(PROMPT="fits", HEIGHT=1024, WIDTH=1024, SEED=1)])
    result = {
        "huge_request": f"{args.huge}x{args.huge}, 1 step",
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
