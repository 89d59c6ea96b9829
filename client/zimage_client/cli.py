"""``zimage-client``: generate images from the command line.

Files are named ``zimage_<index>_<slug><ext>`` in ``--output-dir``: the zero-padded
prompt index keeps names unique and sorted in prompt order, the slug of the prompt
makes them recognisable.  Encoded formats are written byte-for-byte as the server
sent them; ``--format raw`` fetches uncompressed pixels and writes them as a
lossless PNG, so the file holds exactly the server's pixels.  Existing files with
the same name are overwritten.

Each finished image prints one tab-separated line on stdout,
``<path>\\tseed=<seed>\\tserver_ms=<ms>``, so runs are easy to script and reproduce;
everything else (progress bar, logs, errors) goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import unicodedata
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, TextIO, Tuple

from tqdm import tqdm

from ._endpoint import PROTOCOLS
from ._tensors import IMAGE_ARGUMENT_NAMES, OUTPUT_FORMATS, image_arguments
from .client import ZImageClient
from .errors import InvalidRequestError, ZImageError
from .generated_image import GeneratedImage

__all__ = ["main", "build_parser", "parse_args", "read_prompts", "output_path", "slugify", "result_line"]

_LOGGER = logging.getLogger("zimage_client.cli")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INVALID_REQUEST = 2
EXIT_INTERRUPTED = 130

_SLUG_MAX_CHARS = 40


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zimage-client",
        description="Generate images with Z-Image-Turbo served by Triton Inference Server.",
        epilog=(
            "Output files: <output-dir>/zimage_<index>_<prompt-slug>.<png|jpg|webp>; raw is saved as PNG. "
            "Exit status: 0 success, 2 invalid request or usage, 1 any other error."
        ),
    )
    add = parser.add_argument
    add("prompts", nargs="*", metavar="PROMPT", help="text prompt(s); one image per prompt")
    add("--prompts-file", type=Path, metavar="FILE",
        help="file with one prompt per line (blank lines skipped; '-' for stdin)")
    add("--url", default=None, help="host[:port], grpc://host[:port] or http://host[:port] (default localhost)")
    add("--protocol", choices=PROTOCOLS, default=None, help="default: from --url scheme, else grpc")
    add("--model-name", default="zimage", help="Triton model name (default %(default)s)")
    add("--height", type=int, metavar="PX", help="image height, multiple of 16 (server default if omitted)")
    add("--width", type=int, metavar="PX", help="image width, multiple of 16 (server default if omitted)")
    add("--steps", type=int, dest="num_inference_steps", metavar="N", help="denoising steps (server default 8)")
    add("--guidance-scale", type=float, metavar="SCALE", help="guidance scale (server default 0.0)")
    add("--seed", type=int, metavar="SEED",
        help="base seed: prompt i uses SEED+i (random per image if omitted; printed either way)")
    add("--negative-prompt", help="negative prompt applied to every prompt")
    add("--format", dest="output_format", choices=OUTPUT_FORMATS, default="png",
        help="output format (default %(default)s; raw transfers pixels and saves PNG)")
    add("--output-dir", type=Path, default=Path("."), metavar="DIR", help="where to write images (default .)")
    add("--concurrency", type=int, default=8, metavar="N", help="requests in flight (default %(default)s)")
    add("--wait-s", type=float, default=60.0, metavar="S",
        help="wait up to S seconds for server and model readiness; 0 skips (default %(default)s)")
    add("--timeout-s", type=float, default=120.0, metavar="S", help="per-request deadline (default %(default)s)")
    add("--no-progress", action="store_true", help="never show the progress bar")
    add("-v", "--verbose", action="store_true", help="debug logging on stderr")
    # LoRA (issue 13)
    add("--lora", action="append", type=_lora_arg, default=[], metavar="NAME[:SCALE]",
        help="a LoRA adapter of the server, with its scale (the server's default if omitted); "
             "repeat for several")
    add("--list-adapters", action="store_true", help="print the server's LoRA adapters as JSON and exit")
    # Image inputs (issue 14): files read here and sent with every prompt.
    add("--image", type=Path, metavar="FILE",
        help="PNG, JPEG or WebP file to start from: image-to-image, or inpainting with --mask")
    add("--strength", type=float, metavar="S",
        help="how much of --image is repainted, in (0, 1] (server default if omitted)")
    add("--mask", type=Path, metavar="FILE", help="image, white where to repaint --image: inpainting")
    add("--control-image", type=Path, metavar="FILE",
        help="ControlNet control image (edges, depth, pose, ...); the server needs a configured ControlNet")
    add("--control-scale", type=float, metavar="SCALE",
        help="weight of the control image's guidance (server default if omitted)")
    return parser


def _lora_arg(text: str) -> Tuple[str, Optional[float]]:
    name, sep, scale = text.partition(":")
    if not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME[:SCALE]")
    try:
        return name.strip(), float(scale) if sep else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: scale {scale!r} is not a number") from None


def read_prompts(stream: TextIO) -> List[str]:
    """One prompt per line; blank lines are skipped, other whitespace-only edges trimmed."""
    return [line.strip() for line in stream if line.strip()]


def slugify(prompt: str, max_chars: int = _SLUG_MAX_CHARS) -> str:
    """File-name-safe ASCII slug of a prompt, cut at a word boundary when possible."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(slug) > max_chars:
        cut = slug[: max_chars + 1].rfind("-")
        slug = slug[:cut] if cut > 0 else slug[:max_chars]
    return slug


def output_path(output_dir: Path, index: int, prompt: str, extension: str) -> Path:
    slug = slugify(prompt)
    stem = f"zimage_{index:04d}" + (f"_{slug}" if slug else "")
    return Path(output_dir) / f"{stem}{extension}"


def result_line(path: Path, image: GeneratedImage) -> str:
    server_ms = image.server_ms
    ms = f"{server_ms:.1f}" if server_ms is not None else "n/a"
    return f"{path}\tseed={image.seed}\tserver_ms={ms}"


def _collect_prompts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[str]:
    prompts = list(args.prompts)
    if args.prompts_file is not None:
        try:
            if str(args.prompts_file) == "-":
                prompts += read_prompts(sys.stdin)
            else:
                with open(args.prompts_file, encoding="utf-8") as stream:
                    prompts += read_prompts(stream)
        except OSError as exc:
            parser.error(f"cannot read --prompts-file: {exc}")
    if not prompts:
        parser.error("no prompts given (pass PROMPT arguments or --prompts-file)")
    return prompts


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check arguments; exits with status 2 on usage errors (argparse convention)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.prompt_list = [] if args.list_adapters else _collect_prompts(args, parser)
    names = [name for name, _ in args.lora]
    if len(set(names)) != len(names):
        parser.error("--lora: each adapter may be given once")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.wait_s < 0:
        parser.error("--wait-s must not be negative")
    if not args.timeout_s > 0:
        parser.error("--timeout-s must be positive")
    return args


@contextlib.contextmanager
def _logging_to_stderr(verbose: bool) -> Iterator[None]:
    """Send this package's log records to stderr for the duration of one CLI run.

    Errors must reach stderr with the server's message even without ``-v``.  The
    handler goes on the package logger and is removed afterwards, so calling
    ``main()`` in-process (tests, notebooks) leaves the caller's logging untouched.
    """
    package_logger = logging.getLogger("zimage_client")
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("zimage-client: %(levelname)s: %(message)s"))
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)


def _report_failure(exc: ZImageError) -> int:
    errors = exc.errors or {exc.index: exc}
    for index in sorted(errors, key=lambda i: -1 if i is None else i):
        _LOGGER.error("%s", errors[index])
    invalid = any(isinstance(e, InvalidRequestError) for e in errors.values())
    return EXIT_INVALID_REQUEST if invalid else EXIT_ERROR


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 invalid request/usage, 1 other error)."""
    args = parse_args(argv)
    with _logging_to_stderr(args.verbose):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    prompts: List[str] = args.prompt_list
    try:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        client = ZImageClient(args.url, args.protocol, args.model_name, inference_timeout_s=args.timeout_s)
    except (OSError, ValueError) as exc:
        _LOGGER.error("%s", exc)
        return EXIT_INVALID_REQUEST if isinstance(exc, ValueError) else EXIT_ERROR

    show_bar = len(prompts) > 1 and not args.no_progress
    try:
        # Files are read before waiting for the server, so a wrong path fails at once.
        images = image_arguments(**{name: getattr(args, name) for name in IMAGE_ARGUMENT_NAMES})
        # disable=None lets tqdm hide the bar when stderr is not a terminal.
        bar = tqdm(total=len(prompts), unit="img", disable=None if show_bar else True, file=sys.stderr)
        with client, bar:
            if args.wait_s > 0:
                client.wait_for_ready(args.wait_s)
            if args.list_adapters:
                sys.stdout.write(json.dumps(client.adapters(), indent=2, sort_keys=True) + "\n")
                return EXIT_OK

            def on_result(index: int, outcome: object) -> None:
                # Save as each image arrives so a later failure does not lose earlier work.
                bar.update(1)
                if isinstance(outcome, GeneratedImage):
                    path = outcome.save(output_path(args.output_dir, index, prompts[index], outcome.extension))
                    tqdm.write(result_line(path, outcome), file=sys.stdout)

            client.generate_many(
                prompts,
                concurrency=args.concurrency,
                progress=on_result,
                negative_prompt=args.negative_prompt,
                height=args.height,
                width=args.width,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                seed=args.seed,
                output_format=args.output_format,
                loras=dict(args.lora) or None,
                **images,
            )
    except ZImageError as exc:
        return _report_failure(exc)
    except (TypeError, ValueError) as exc:
        _LOGGER.error("%s", exc)
        return EXIT_INVALID_REQUEST
    except OSError as exc:
        _LOGGER.error("cannot write image: %s", exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _LOGGER.error("interrupted")
        return EXIT_INTERRUPTED
    return EXIT_OK
