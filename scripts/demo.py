"""Starts the real Triton server on this repository, asks it for one image, writes it, stops.

With the shipped config.yaml (model.load_format: tiny) this needs no weights and no GPU; the
image is random noise shaped by random weights, labelled as such in its PNG metadata.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from zimage_backend.triton_process import TritonServer
from zimage_client import ZImageClient

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt", default="a lighthouse on a cliff at sunset, oil painting")
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "demo.png")
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    server = TritonServer(ROOT / "model_repository", config_path=args.config, http_port=0,
                          grpc_port=0, metrics_port=0, log_file=ROOT / "outputs" / "server.log")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with server:
        url = server.grpc_url if args.protocol == "grpc" else server.http_url
        with ZImageClient(url, protocol=args.protocol) as client:
            result = client.generate(args.prompt, height=args.height, width=args.width,
                                     seed=args.seed)
    result.save(args.output)
    log.info("wrote %s (%dx%d, seed %d, weights: %s, server timings ms: %s)", args.output,
             result.image.width, result.image.height, result.seed,
             result.metadata.get("weights"), result.timings_ms)


if __name__ == "__main__":
    main()
