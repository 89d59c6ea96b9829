"""``zimage-gateway``: parse the settings, then serve the app with uvicorn."""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

import uvicorn

from .app import create_app
from .settings import parse_args


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = parse_args(argv)
    except (ValueError, OSError) as exc:
        logging.getLogger("zimage_gateway").error("%s", exc)
        sys.exit(2)
    # One process, one event loop: the per-key limits and the servers' in-flight counts are its
    # state; scale out with more gateway replicas, each with its share of the limits.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_keep_alive=settings.keep_alive_s, timeout_graceful_shutdown=30)
