"""Fuzzing the tensor contract through the real server, over gRPC and HTTP, with raw tritonclient.

Hypothesis builds requests our client would never send: wrong dtypes and shapes, missing, extra
and duplicated inputs, empty, 100 KB and non-UTF-8 texts, int32/int64 extremes, NaN and inf,
unknown formats, batches over the limit, and bursts that mix good and bad requests. The strategies
aim at both sides of every rule's edge (sizes that are multiples of 8 but not 16, texts around
the token limit, the wrong image output named). Whether a request must be accepted, and which
fields its rejection may name, is decided afterwards by `verdict`, an oracle that reads only the
request and README's table (not request.py): one predicate per rule. The properties are:

- every request gets exactly one answer, within ANSWER_TIMEOUT_S;
- a request the contract allows gets one image per row, of the asked size and format, with the
  seed it sent;
- any other request gets INVALID_ARG (gRPC INVALID_ARGUMENT, HTTP 400) whose message names one
  of the fields that are wrong;
- afterwards the server is ready and a valid request works.

Valid requests stay cheap (at most 128x128, 1-2 steps); defaults that would cost a 1024 side
are drawn rarely. Sizes of the runs are bounded by `max_examples`.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import math
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.e2e.helpers import (
    ANSWER_TIMEOUT_S,
    INVALID_STATUS,
    MODEL,
    OUTPUT_NAMES,
    Answer,
    image_size,
    infer_inputs,
    metadata_of,
    names_field,
    new_client,
    outcome_label,
    outputs_of,
    send,
)
from zimage_client import ZImageClient

pytestmark = pytest.mark.e2e

INPUTS = ("PROMPT", "NEGATIVE_PROMPT", "HEIGHT", "WIDTH", "NUM_INFERENCE_STEPS", "GUIDANCE_SCALE",
          "SEED", "OUTPUT_FORMAT", "LORA", "IMAGE_INPUT", "STRENGTH", "MASK", "CONTROL_IMAGE",
          "CONTROL_SCALE")
WIRE_DTYPE = {"PROMPT": "BYTES", "NEGATIVE_PROMPT": "BYTES", "HEIGHT": "INT32", "WIDTH": "INT32",
              "NUM_INFERENCE_STEPS": "INT32", "GUIDANCE_SCALE": "FP32", "SEED": "INT64",
              "OUTPUT_FORMAT": "BYTES", "LORA": "BYTES", "IMAGE_INPUT": "BYTES",
              "STRENGTH": "FP32", "MASK": "BYTES", "CONTROL_IMAGE": "BYTES",
              "CONTROL_SCALE": "FP32"}
NUMPY = {"BYTES": np.object_, "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16,
         "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16,
         "UINT32": np.uint32, "UINT64": np.uint64, "FP16": np.float16, "FP32": np.float32,
         "FP64": np.float64}
# The contract as README states it, on the shipped config.yaml.
MAX_BATCH, MIN_SIZE, MAX_SIZE, MAX_PIXELS, MAX_STEPS, MAX_GUIDANCE = 4, 64, 2048, 2048 * 2048, 50, 20.0
DEFAULT_SIZE, MAX_SEED, MAX_PROMPT_TOKENS = 1024, 2**63 - 1, 512
FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP", "raw": None}
# Generic markers for errors that concern the batch as a whole rather than one field.
BATCH_TOO_LARGE = "batch-size must be <="
BATCH_MISMATCH = "batch size does not match"

I32, I64 = np.iinfo(np.int32), np.iinfo(np.int64)
F32_MAX = float(np.finfo(np.float32).max)
MAX_CONTROL_SCALE = 2.0


def _file(size: tuple[int, int], fmt: str, mode: str = "RGB", **params) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 200).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: a decompression bomb's header."""
    data = bytearray(_file((1, 1), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC
    return bytes(data)


_PNG = _file((64, 64), "PNG")
# Image inputs the fuzz sends, labelled by hand with what README's "Image inputs" makes of them:
# the decoded (width, height), or None for a file that must be refused.
IMAGE_FILES = {
    _PNG: (64, 64),
    _file((80, 48), "JPEG"): (80, 48),
    _file((64, 64), "WEBP"): (64, 64),
    _file((64, 64), "PNG", "RGBA"): (64, 64),
    _file((64, 64), "PNG", "L"): (64, 64),
    _file((32, 32), "PNG", "L"): (32, 32),
    _file((64, 64), "GIF"): None,
    _file((64, 64), "BMP"): None,
    _PNG[:len(_PNG) // 2]: None,
    _png_declaring(50_000, 50_000): None,
    b"": None,
    b"not an image": None,
    b"\x89PNG\r\n\x1a\n": None,
}


def image_file_size(b: bytes) -> tuple[int, int] | None:
    return IMAGE_FILES.get(b)  # random bytes are no image


def size_from_input(width: int, height: int) -> tuple[int, int]:
    """README's size rule for inputs within the limits: each side down to a multiple of 16,
    at least the smallest side."""
    return max(MIN_SIZE, height // 16 * 16), max(MIN_SIZE, width // 16 * 16)


@dataclasses.dataclass
class Case:
    """One request as it goes on the wire. What the contract promises for it is `verdict`'s to
    say, from the tensors alone: the strategies below only aim at the rules' edges."""

    tensors: list  # [(name, array, wire dtype)]
    outputs: list[str] | None

    def describe(self) -> str:
        parts = []
        for name, array, dtype in self.tensors:
            flat = np.ravel(array).tolist()
            shown = [f"<{len(v)} bytes>" if isinstance(v, bytes) and len(v) > 40 else v
                     for v in flat[:8]] + (["..."] if len(flat) > 8 else [])
            parts.append(f"{name}:{dtype}{list(array.shape)}={shown}")
        return f"outputs={self.outputs} " + " ".join(parts)


# ---------------------------------------------------------------------- the oracle
# Each rule of README's request contract as its own predicate, on the shipped config.yaml.


def size_ok(v: int) -> bool:
    return v % 16 == 0 and MIN_SIZE <= v <= MAX_SIZE


def steps_ok(v: int) -> bool:
    return 1 <= v <= MAX_STEPS


def guidance_ok(v: float) -> bool:
    v = float(np.float32(v))  # the value as it travels, in FP32
    return math.isfinite(v) and 0.0 <= v <= MAX_GUIDANCE


def seed_ok(v: int) -> bool:
    return 0 <= v <= MAX_SEED


def utf8(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def format_name(text: str) -> str | None:
    name = text.strip().lower()
    return "jpeg" if name == "jpg" else name if name in FORMATS else None


def text_ok(b: bytes, count_tokens, nonblank: bool) -> bool:
    text = utf8(b)
    return text is not None and (bool(text.strip()) or not nonblank) and (
        count_tokens(text) <= MAX_PROMPT_TOKENS)


@dataclasses.dataclass
class Verdict:
    """What the contract promises for one request."""

    bad: set[str]  # fields (or generic markers) the error may name; empty: it must succeed
    sizes: list[tuple[int, int]]  # (height, width) per row, when it succeeds
    formats: list[str]  # normalised output format per row
    seeds: list[int | None]


def verdict(case: Case, count_tokens) -> Verdict:
    """Accept or reject, and which fields a rejection may name, from the request alone."""
    bad: set[str] = set()
    names = [name for name, _, _ in case.tensors]
    bad |= {n for n in names if names.count(n) > 1 or n not in INPUTS}
    if "PROMPT" not in names:
        bad.add("PROMPT")
    batch = {array.shape[0] if array.ndim else None for _, array, _ in case.tensors}
    if len(batch) > 1:
        bad |= {BATCH_MISMATCH, BATCH_TOO_LARGE, *names}
    rows = max((r for r in batch if r is not None), default=1)
    if rows > MAX_BATCH:
        bad.add(BATCH_TOO_LARGE)
    columns = {}
    for name, array, dtype in case.tensors:
        if name in INPUTS and (dtype != WIRE_DTYPE[name] or array.shape != (rows, 1)):
            bad.add(name)
        elif name in INPUTS:
            columns[name] = array[:, 0].tolist()

    def column(name, default):
        return columns.get(name, [default] * rows)

    rules = {"PROMPT": lambda b: text_ok(b, count_tokens, nonblank=True),
             "NEGATIVE_PROMPT": lambda b: text_ok(b, count_tokens, nonblank=False),
             "HEIGHT": size_ok, "WIDTH": size_ok, "NUM_INFERENCE_STEPS": steps_ok,
             "GUIDANCE_SCALE": guidance_ok, "SEED": seed_ok,
             "OUTPUT_FORMAT": lambda b: utf8(b) is not None and format_name(utf8(b)) is not None,
             # The shipped config has no adapters: only an empty LORA names none.
             "LORA": lambda b: utf8(b) is not None and not utf8(b).strip(),
             "IMAGE_INPUT": lambda b: image_file_size(b) is not None,
             "MASK": lambda b: image_file_size(b) is not None,
             "STRENGTH": lambda v: math.isfinite(float(np.float32(v))) and
             0.0 < float(np.float32(v)) <= 1.0,
             # The shipped config has no ControlNet: any CONTROL_IMAGE is refused.
             "CONTROL_IMAGE": lambda b: False,
             "CONTROL_SCALE": lambda v: math.isfinite(float(np.float32(v))) and
             0.0 <= float(np.float32(v)) <= MAX_CONTROL_SCALE}
    bad |= {name for name, values in columns.items() if not all(map(rules[name], values))}
    # Image inputs: which fields need which (README, "Image inputs").
    images = column("IMAGE_INPUT", None)
    if "MASK" in columns and None in images:
        bad.add("MASK")
    if "STRENGTH" in columns and None in images:
        bad.add("STRENGTH")
    for strength, steps in zip(column("STRENGTH", 0.6), column("NUM_INFERENCE_STEPS", 8)):
        # diffusers runs steps - int(steps - steps * strength) steps: at least one is needed.
        if "STRENGTH" in columns and steps_ok(steps) and rules["STRENGTH"](strength) and \
                steps - int(max(steps - steps * float(np.float32(strength)), 0)) < 1:
            bad.add("STRENGTH")
    if "CONTROL_SCALE" in columns and "CONTROL_IMAGE" not in columns:
        bad.add("CONTROL_SCALE")
    for image, mask in zip(images, column("MASK", None)):
        if image is not None and mask is not None and None not in (
                image_file_size(image), image_file_size(mask)) and \
                image_file_size(image) != image_file_size(mask):
            bad.add("MASK")
    sized = [name in columns for name in ("HEIGHT", "WIDTH")]
    has_image = "IMAGE_INPUT" in columns or "CONTROL_IMAGE" in columns
    if has_image and sized[0] != sized[1]:
        bad |= {"HEIGHT", "WIDTH"}  # with an image input (either one): both or neither
    sizes = list(zip(column("HEIGHT", DEFAULT_SIZE), column("WIDTH", DEFAULT_SIZE)))
    if "IMAGE_INPUT" in columns and not any(sized):
        sizes = [size_from_input(*(image_file_size(i) or (DEFAULT_SIZE, DEFAULT_SIZE)))
                 for i in images]
    if any(h * w > MAX_PIXELS for h, w in sizes):
        bad.add("HEIGHT")
    formats = [format_name(utf8(f) or "") or "?" for f in column("OUTPUT_FORMAT", b"png")]
    if "raw" in formats and len(set(formats)) > 1:
        bad.add("OUTPUT_FORMAT")
    if "raw" in formats and len(set(sizes)) > 1:
        bad.add("HEIGHT")
    if case.outputs is not None:
        bad |= {o for o in case.outputs if o not in OUTPUT_NAMES}
        # Named outputs must include the one the format fills, or the whole generation would
        # end in an empty success.
        fills = "PIXELS" if formats[0] == "raw" else "IMAGE"
        if fills not in case.outputs:
            bad.add("OUTPUT_FORMAT")
    return Verdict(bad=bad, sizes=sizes, formats=formats, seeds=column("SEED", None))


# ---------------------------------------------------------------------- the strategies


def _weighted(draw, choices):
    """Draws one strategy from [(weight, strategy)] and returns its value."""
    total = sum(w for w, _ in choices)
    pick = draw(st.integers(0, total - 1))
    for weight, strategy in choices:
        if pick < weight:
            return draw(strategy)
        pick -= weight
    raise AssertionError


NON_UTF8 = st.one_of(st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"a\x80b",
                                      b"\xf4\x90\x80\x80"]),
                     st.binary(min_size=1, max_size=40).filter(lambda b: utf8(b) is None))
# At most 100 characters of at most 4 UTF-8 bytes stay under the 512-token limit with the chat
# template (a byte-level BPE makes at most one token per byte).
SHORT_TEXT = st.text(max_size=100)
HUGE_PROMPT = ("lorem ipsum dolor " * 6000)[:100_000]  # 100 KB
HUGE_TEXT = st.sampled_from([HUGE_PROMPT, "\u732b" * 34_000, "x" * 100_000])
# Around the token limit: the tiny tokenizer makes one token of each "x" (verdict counts them).
NEAR_LIMIT = st.integers(MAX_PROMPT_TOKENS - 40, MAX_PROMPT_TOKENS + 10).map(lambda n: "x" * n)


def text_values(nonblank: bool):
    return [
        (92, (SHORT_TEXT.filter(lambda s: s.strip()) if nonblank else SHORT_TEXT).map(
            str.encode)),
        (2, st.sampled_from(["", " ", "\t\n", "\u3000", "\u2028 \u00a0"]).map(str.encode)),
        (1, HUGE_TEXT.map(str.encode)),
        (2, NEAR_LIMIT.map(str.encode)),
        (3, NON_UTF8),
    ]


def int_values(cheap, edges, lo, hi):
    """Mostly cheap allowed values, then the values around each rule's edges, then any."""
    return [(90, st.sampled_from(cheap)), (7, st.sampled_from(edges)), (3, st.integers(lo, hi))]


# Multiples of 8 that are not of 16 stand next to every allowed size.
SIZE_VALUES = int_values([64, 80, 96, 112, 128],
                         [0, -16, 16, 48, 56, 63, 65, 72, 88, 100, 104, 120, 136, 2049, 2056,
                          2064, 4096, I32.max, I32.min, I32.max - 15, 2048 * 2 + 16],
                         I32.min, I32.max)
STEP_VALUES = int_values([1, 2], [0, -1, 51, 100, 1000, I32.max, I32.min], I32.min, I32.max)
GUIDANCE_VALUES = [
    (94, st.floats(0.0, MAX_GUIDANCE, width=32)),
    (3, st.sampled_from([math.nan, math.inf, -math.inf, -1e-45, -0.5, 20.000002, F32_MAX,
                         -F32_MAX, -0.0, 1e-45])),
    (3, st.floats(width=32)),
]
SEED_VALUES = [(90, st.one_of(st.sampled_from([0, 1, MAX_SEED]), st.integers(0, MAX_SEED))),
               (10, st.one_of(st.sampled_from([-1, I64.min]), st.integers(I64.min, I64.max)))]
FORMAT_VALUES = [
    (92, st.sampled_from(["png", "PNG", " png ", "jpeg", "jpg", "JPG", "webp", "raw", "Raw\n"]).map(
        str.encode)),
    (3, st.sampled_from(["gif", "", "bmp", "pn g", "png;rm -rf /", "../../etc/passwd", "%s%n",
                         "{{7*7}}", "png\x00"]).map(str.encode)),
    (2, st.text(max_size=20).map(str.encode)),
    (3, NON_UTF8),
]
# Every name is refused (a path or a URL included): the shipped config has no adapters.
LORA_VALUES = [
    (90, st.sampled_from(["", " ", "\t"]).map(str.encode)),
    (8, st.sampled_from(["ink", "ink:0.5", "../ink.safetensors", "/etc/passwd", ",",
                         "https://example.com/x.safetensors", "ink:nan", "a,b,c"]).map(
        str.encode)),
    (2, NON_UTF8),
]
IMAGE_VALUES = [(80, st.sampled_from([f for f, size in IMAGE_FILES.items() if size])),
                (15, st.sampled_from([f for f, size in IMAGE_FILES.items() if not size])),
                (5, st.binary(max_size=40))]
UNIT_VALUES = [(85, st.floats(0.0, 1.0, width=32)),
               (10, st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0000001, 2.0,
                                     2.0000002, -1e-45, 1e-45, F32_MAX])),
               (5, st.floats(width=32))]
VALUES = {"PROMPT": text_values(nonblank=True), "NEGATIVE_PROMPT": text_values(nonblank=False),
          "HEIGHT": SIZE_VALUES, "WIDTH": SIZE_VALUES, "NUM_INFERENCE_STEPS": STEP_VALUES,
          "GUIDANCE_SCALE": GUIDANCE_VALUES, "SEED": SEED_VALUES, "OUTPUT_FORMAT": FORMAT_VALUES,
          "LORA": LORA_VALUES, "IMAGE_INPUT": IMAGE_VALUES, "MASK": IMAGE_VALUES,
          "CONTROL_IMAGE": IMAGE_VALUES, "STRENGTH": UNIT_VALUES, "CONTROL_SCALE": UNIT_VALUES}
# How often an input is left out (percent).
ABSENT = {"PROMPT": 3, "NEGATIVE_PROMPT": 70, "NUM_INFERENCE_STEPS": 5, "GUIDANCE_SCALE": 50,
          "SEED": 30, "OUTPUT_FORMAT": 40, "LORA": 80, "IMAGE_INPUT": 75, "STRENGTH": 80,
          "MASK": 85, "CONTROL_IMAGE": 93, "CONTROL_SCALE": 93}


def _affordable(name: str, value) -> bool:
    """Random draws that the contract allows but that cost seconds on a CPU (a large side, many
    steps) are left to the fixed cases below."""
    if name in ("HEIGHT", "WIDTH"):
        return not size_ok(value) or value <= 128
    if name == "NUM_INFERENCE_STEPS":
        return not steps_ok(value) or value <= 2
    return True


def _wrong_dtype_array(datatype: str, rows: int) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([[b"64"]] * rows, dtype=np.object_)
    return np.ones((rows, 1), dtype=NUMPY[datatype])


@st.composite
def cases(draw) -> Case:
    rows = _weighted(draw, [(70, st.just(1)), (27, st.integers(2, MAX_BATCH)),
                            (3, st.integers(MAX_BATCH + 1, MAX_BATCH + 2))])
    tensors = []
    # A 1024 side (the default) costs seconds on the CPU: leave out at most one of HEIGHT and
    # WIDTH.
    size_absent = draw(st.sampled_from([None] * 94 + ["HEIGHT", "WIDTH"] * 3))
    for name in INPUTS:
        if name in ("HEIGHT", "WIDTH"):
            if size_absent == name:
                continue
        elif draw(st.integers(0, 99)) < ABSENT[name]:
            continue
        mutation = _weighted(draw, [(197, st.just(None)), (1, st.just("dtype")),
                                    (1, st.just("shape")), (1, st.just("batch"))])
        expected = WIRE_DTYPE[name]
        if mutation == "dtype":
            datatype = draw(st.sampled_from(sorted(set(NUMPY) - {expected})))
            tensors.append((name, _wrong_dtype_array(datatype, rows), datatype))
            continue
        column = [[_weighted(draw, VALUES[name])] for _ in range(rows)]
        assume(all(_affordable(name, v) for [v] in column))
        array = np.array(column, dtype=NUMPY[expected])
        if mutation == "shape":
            array = draw(st.sampled_from([
                np.repeat(array, 2, axis=1), array.reshape(rows), array.reshape(rows, 1, 1)]))
        elif mutation == "batch":
            array = np.concatenate([array, array[:1]])
        tensors.append((name, array, expected))
    extra = _weighted(draw, [(97, st.just(None)), (3, st.one_of(
        st.sampled_from(["STEPS", "prompt", "IMAGE", "PIXELS", "SEED_", "Height"]),
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)).filter(
            lambda n: n not in INPUTS))])
    if extra is not None:
        tensors.append((extra, np.ones((rows, 1), np.int32), "INT32"))
    if tensors and draw(st.integers(0, 99)) < 1:  # the same input twice
        tensors.append(draw(st.sampled_from(tensors)))
    tensors = draw(st.permutations(tensors))
    # Named outputs: the right image output, the wrong one, both, none, or unknown names.
    outputs = _weighted(draw, [(86, st.just(None)), (4, st.just(["SEED"])),
                               (3, st.sampled_from([["IMAGE", "SEED"], ["PIXELS", "SEED"]])),
                               (2, st.sampled_from([["IMAGE"], ["PIXELS"]])),
                               (2, st.just(["IMAGE", "PIXELS", "SEED"])),
                               (3, st.sampled_from(["NOPE", "image", "SEEDS"]).map(
                                   lambda n: [n]))])
    return Case(tensors=tensors, outputs=outputs)


def check_success(case: Case, promised: Verdict, protocol: str, answer: Answer) -> None:
    """One image per row, of the asked size and format, with the seed that was sent."""
    where = f"{protocol}: {case.describe()}\nanswer: {answer}"
    assert answer.ok, f"a valid request failed\n{where}"
    outputs, wanted = answer.outputs, case.outputs
    rows = len(promised.sizes)
    if wanted is None or "SEED" in wanted:
        seeds = outputs["SEED"][:, 0].tolist()
        assert len(seeds) == rows, where
        for sent, got in zip(promised.seeds, seeds):
            assert got == sent if sent is not None else 0 <= got <= MAX_SEED, where
    if wanted is not None and not {"IMAGE", "PIXELS"} & set(wanted):
        assert not {"IMAGE", "PIXELS"} & set(outputs), where
        return
    if promised.formats[0] == "raw":
        pixels = outputs["PIXELS"]
        assert pixels.dtype == np.uint8 and pixels.shape == (rows, *promised.sizes[0], 3), where
    else:
        assert outputs["IMAGE"].shape == (rows, 1), where
        for (height, width), fmt, data in zip(promised.sizes, promised.formats,
                                              outputs["IMAGE"][:, 0]):
            assert image_size(data) == (FORMATS[fmt], (width, height)), where
    if wanted is None:
        for meta, (height, width) in zip(metadata_of(outputs), promised.sizes):
            assert (meta["height"], meta["width"]) == (height, width), where


def _names_a_bad_field(bad: set[str], message: str) -> bool:
    return any(names_field(message, f) if f in INPUTS or f.isidentifier() else f in message
               for f in bad)


def check(case: Case, protocol: str, answer: Answer, count_tokens) -> None:
    promised = verdict(case, count_tokens)
    where = f"{protocol}: {case.describe()}\npromised: bad={sorted(promised.bad)}\n" \
            f"answer: {answer}"
    if promised.bad:
        assert not answer.ok, f"a bad request succeeded\n{where}"
        assert answer.status == INVALID_STATUS[protocol], f"wrong error code\n{where}"
        assert _names_a_bad_field(promised.bad, answer.message), \
            f"the message names no bad field\n{where}"
    else:
        check_success(case, promised, protocol, answer)


class Clients:
    """One raw client per protocol and thread, reused across examples."""

    def __init__(self, server):
        self.server, self.local, self.made = server, threading.local(), []

    def get(self, protocol):
        clients = self.local.__dict__.setdefault("clients", {})
        if protocol not in clients:
            clients[protocol] = new_client(self.server, protocol)
            self.made.append(clients[protocol])
        return clients[protocol]

    def close(self):
        for client in self.made:
            client.close()


@pytest.fixture(scope="module")
def count_tokens(server, settings):
    """Tokens of a text as the contract counts them: the served tokenizer, chat template
    included (server: the tiny pipeline is on disk once it is up)."""
    tokenizer = AutoTokenizer.from_pretrained(
        Path(settings.model.demo_dir).expanduser() / "tokenizer")

    def count(text: str) -> int:
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True,
            enable_thinking=True)
        return len(tokenizer(templated, add_special_tokens=False).input_ids)

    return count


@pytest.fixture(scope="module")
def clients(server):
    made = Clients(server)
    yield made
    made.close()


def assert_still_serving(server):
    assert server.is_ready()
    with ZImageClient(server.grpc_url, protocol="grpc", inference_timeout_s=60) as c:
        assert c.generate("still fine", height=64, width=64, num_inference_steps=1,
                          seed=7).seed == 7


FUZZ = settings(max_examples=300, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@FUZZ
@given(case=cases(), protocol=st.sampled_from(["grpc", "http"]))
def test_every_request_gets_the_promised_answer(server, clients, tally, count_tokens, case,
                                                protocol):
    answer = send(clients.get(protocol), protocol, case.tensors, case.outputs)
    tally.count("fuzz, one request at a time", outcome_label(protocol, answer))
    check(case, protocol, answer, count_tokens)


@settings(FUZZ, max_examples=15)
@given(burst=st.lists(st.tuples(cases(), st.sampled_from(["grpc", "http"])), min_size=4,
                      max_size=8))
def test_bursts_mixing_good_and_bad_requests(server, tally, count_tokens, burst):
    """All at once, so good and bad requests share an execute(); each is answered once."""
    answers: dict[int, list[Answer]] = {i: [] for i in range(len(burst))}
    lock, done = threading.Lock(), threading.Semaphore(0)
    grpc_client = new_client(server, "grpc")
    started = time.perf_counter()

    def record(index, answer):
        with lock:
            answers[index].append(answer)
        done.release()

    def over_grpc(index, case):
        def callback(result, error):
            seconds = time.perf_counter() - started
            if error is not None:
                record(index, Answer(status=str(error.status()), message=error.message(),
                                     seconds=seconds))
            else:
                record(index, Answer(outputs=outputs_of(result, OUTPUT_NAMES), seconds=seconds))
        requested = None if case.outputs is None else [
            grpcclient.InferRequestedOutput(o) for o in case.outputs]
        grpc_client.async_infer(MODEL, infer_inputs("grpc", case.tensors), callback,
                                outputs=requested, client_timeout=ANSWER_TIMEOUT_S)

    def over_http(index, case):
        client = new_client(server, "http")
        try:
            record(index, send(client, "http", case.tensors, case.outputs))
        finally:
            client.close()

    with ThreadPoolExecutor(len(burst)) as pool:
        for index, (case, protocol) in enumerate(burst):
            if protocol == "grpc":
                over_grpc(index, case)
            else:
                pool.submit(over_http, index, case)
        for _ in burst:
            assert done.acquire(timeout=ANSWER_TIMEOUT_S + 10), f"lost answers: {answers}"
    time.sleep(0.2)  # a second answer to any request would arrive meanwhile
    grpc_client.close()
    for index, (case, protocol) in enumerate(burst):
        assert len(answers[index]) == 1, f"request {index} answered {len(answers[index])} times"
        tally.count("fuzz, concurrent bursts", outcome_label(protocol, answers[index][0]))
        check(case, protocol, answers[index][0], count_tokens)


def classic(overrides: dict, outputs: list[str] | None = None) -> Case:
    """A one-row request: cheap valid values, with `overrides` in place."""
    values = {"PROMPT": b"classic", "HEIGHT": 64, "WIDTH": 64, "NUM_INFERENCE_STEPS": 1,
              "SEED": 123, **overrides}
    tensors = [(name, np.array([[value]], dtype=NUMPY[WIRE_DTYPE[name]]), WIRE_DTYPE[name])
               for name, value in values.items() if value is not None]  # None: left out
    return Case(tensors=tensors, outputs=outputs)


# The hostile values the random search may or may not meet in one run, every run.
CLASSICS = {
    "100 KB prompt": ({"PROMPT": HUGE_PROMPT.encode()}, {"PROMPT"}),
    "100 KB negative prompt": ({"NEGATIVE_PROMPT": b"word " * 20_000}, {"NEGATIVE_PROMPT"}),
    "empty prompt": ({"PROMPT": b""}, {"PROMPT"}),
    "blank prompt": ({"PROMPT": " \t\u3000".encode()}, {"PROMPT"}),
    "non-UTF-8 prompt": ({"PROMPT": b"\xff\xfe bad"}, {"PROMPT"}),
    "UTF-16 surrogate in UTF-8": ({"PROMPT": b"\xed\xa0\x80"}, {"PROMPT"}),
    "non-UTF-8 negative prompt": ({"NEGATIVE_PROMPT": b"\xc3\x28"}, {"NEGATIVE_PROMPT"}),
    "non-UTF-8 format": ({"OUTPUT_FORMAT": b"\xc3\x28"}, {"OUTPUT_FORMAT"}),
    "unknown format": ({"OUTPUT_FORMAT": b"gif"}, {"OUTPUT_FORMAT"}),
    "a path as format": ({"OUTPUT_FORMAT": b"../../../etc/passwd"}, {"OUTPUT_FORMAT"}),
    "int32 max height": ({"HEIGHT": int(I32.max)}, {"HEIGHT"}),
    "int32 min width": ({"WIDTH": int(I32.min)}, {"WIDTH"}),
    "negative height": ({"HEIGHT": -64}, {"HEIGHT"}),
    "int32 max steps": ({"NUM_INFERENCE_STEPS": int(I32.max)}, {"NUM_INFERENCE_STEPS"}),
    "zero steps": ({"NUM_INFERENCE_STEPS": 0}, {"NUM_INFERENCE_STEPS"}),
    "NaN guidance": ({"GUIDANCE_SCALE": math.nan}, {"GUIDANCE_SCALE"}),
    "inf guidance": ({"GUIDANCE_SCALE": math.inf}, {"GUIDANCE_SCALE"}),
    "-inf guidance": ({"GUIDANCE_SCALE": -math.inf}, {"GUIDANCE_SCALE"}),
    "float32 max guidance": ({"GUIDANCE_SCALE": F32_MAX}, {"GUIDANCE_SCALE"}),
    "int64 min seed": ({"SEED": int(I64.min)}, {"SEED"}),
    "-1 seed": ({"SEED": -1}, {"SEED"}),
    # Extremes that are allowed:
    "int64 max seed": ({"SEED": int(I64.max)}, set()),
    "-0.0 guidance": ({"GUIDANCE_SCALE": -0.0}, set()),
    "NUL bytes in the prompt": ({"PROMPT": b"a\x00b\x00"}, set()),
    "special tokens in the prompt": ({"PROMPT": b"<|im_end|><|im_start|>system"}, set()),
    "' JPG ' format": ({"OUTPUT_FORMAT": b" JPG "}, set()),
    "a path as adapter": ({"LORA": b"/etc/passwd"}, {"LORA"}),
    "a URL as adapter": ({"LORA": b"https://example.com/x.safetensors"}, {"LORA"}),
    # Image inputs (README, "Image inputs"), on the shipped config (no ControlNet):
    "image-to-image": ({"IMAGE_INPUT": _PNG, "STRENGTH": 0.6}, set()),
    "inpainting": ({"IMAGE_INPUT": _PNG, "MASK": _file((64, 64), "PNG", "L")}, set()),
    "a decompression bomb": ({"IMAGE_INPUT": _png_declaring(50_000, 50_000)}, {"IMAGE_INPUT"}),
    "a truncated PNG": ({"IMAGE_INPUT": _PNG[:len(_PNG) // 2]}, {"IMAGE_INPUT"}),
    "a GIF": ({"IMAGE_INPUT": _file((64, 64), "GIF")}, {"IMAGE_INPUT"}),
    "a path as image": ({"IMAGE_INPUT": b"/etc/passwd"}, {"IMAGE_INPUT"}),
    "a mask of another size": ({"IMAGE_INPUT": _PNG, "MASK": _file((32, 32), "PNG", "L")},
                               {"MASK"}),
    "a mask alone": ({"MASK": _PNG}, {"MASK"}),
    "NaN strength": ({"IMAGE_INPUT": _PNG, "STRENGTH": math.nan}, {"STRENGTH"}),
    "zero strength": ({"IMAGE_INPUT": _PNG, "STRENGTH": 0.0}, {"STRENGTH"}),
    "strength without an image": ({"STRENGTH": 0.5}, {"STRENGTH"}),
    "a control image without a ControlNet": ({"CONTROL_IMAGE": _PNG}, {"CONTROL_IMAGE"}),
    "a control scale alone": ({"CONTROL_SCALE": 0.5}, {"CONTROL_SCALE"}),
}
# Each side of every rule's edge. The rules are the model's, not the protocol's: sent over
# gRPC only, since the allowed edges (2048 high, 50 steps) cost seconds on a CPU.
EDGES = {
    "height a multiple of 8, not 16": ({"HEIGHT": 72}, {"HEIGHT"}),
    "width a multiple of 8, not 16": ({"WIDTH": 88}, {"WIDTH"}),
    "width a multiple of 16, not 32": ({"WIDTH": 80}, set()),
    "height below the smallest": ({"HEIGHT": 48}, {"HEIGHT"}),
    "the largest height": ({"HEIGHT": 2048}, set()),
    "width past the largest": ({"WIDTH": 2064}, {"WIDTH"}),
    "the most steps": ({"NUM_INFERENCE_STEPS": 50}, set()),
    "one step too many": ({"NUM_INFERENCE_STEPS": 51}, {"NUM_INFERENCE_STEPS"}),
    "the largest guidance": ({"GUIDANCE_SCALE": 20.0}, set()),
    "guidance just past the largest": ({"GUIDANCE_SCALE": 20.000002}, {"GUIDANCE_SCALE"}),
    "smallest negative guidance": ({"GUIDANCE_SCALE": -1e-45}, {"GUIDANCE_SCALE"}),
    "guidance with a negative prompt": ({"GUIDANCE_SCALE": 3.0, "NEGATIVE_PROMPT": b"blurry"},
                                        set()),
    "seed 0": ({"SEED": 0}, set()),
    "raw, naming IMAGE": ({"OUTPUT_FORMAT": b"raw"}, {"OUTPUT_FORMAT"}, ["IMAGE"]),
    "png, naming PIXELS": ({}, {"OUTPUT_FORMAT"}, ["PIXELS", "SEED"]),
    "raw, naming PIXELS": ({"OUTPUT_FORMAT": b"raw"}, set(), ["PIXELS"]),
    "png, naming both image outputs": ({}, set(), ["IMAGE", "PIXELS"]),
    "png, naming SEED and METADATA only": ({}, {"OUTPUT_FORMAT"}, ["SEED", "METADATA"]),
    "the largest strength": ({"IMAGE_INPUT": _PNG, "STRENGTH": 1.0}, set()),
    "strength just past 1": ({"IMAGE_INPUT": _PNG, "STRENGTH": 1.0000001}, {"STRENGTH"}),
    "a strength that runs no step": ({"IMAGE_INPUT": _PNG, "STRENGTH": 1e-45}, {"STRENGTH"}),
    "a small strength that still runs a step": ({"IMAGE_INPUT": _PNG, "STRENGTH": 1e-7}, set()),
    "an image with one side given": ({"IMAGE_INPUT": _PNG, "HEIGHT": None},
                                     {"HEIGHT", "WIDTH"}),
    "an image without HEIGHT and WIDTH": ({"IMAGE_INPUT": _file((80, 48), "JPEG"),
                                           "HEIGHT": None, "WIDTH": None}, set()),
}


@pytest.mark.parametrize("name, protocol", [(n, p) for n in CLASSICS for p in ("grpc", "http")]
                         + [(n, "grpc") for n in EDGES])
def test_hostile_classics(server, clients, tally, count_tokens, name, protocol):
    overrides, bad, *outputs = {**CLASSICS, **EDGES}[name]
    case = classic(overrides, *outputs)
    # The labels here are written by hand: they check the oracle, which then checks the server.
    assert verdict(case, count_tokens).bad == bad
    answer = send(clients.get(protocol), protocol, case.tensors, case.outputs)
    tally.count("fuzz, hostile classics", outcome_label(protocol, answer))
    check(case, protocol, answer, count_tokens)


def _longest_allowed(count_tokens) -> int:
    """The most "x"s a text may have: the largest n with count_tokens("x" * n) <= the limit."""
    low, high = 0, 1
    while count_tokens("x" * high) <= MAX_PROMPT_TOKENS:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if count_tokens("x" * middle) <= MAX_PROMPT_TOKENS else (
            low, middle)
    return low


@pytest.mark.parametrize("field", ["PROMPT", "NEGATIVE_PROMPT"])
def test_the_token_limit_is_exact(server, clients, count_tokens, field):
    """A text of exactly the limit passes and one token more is refused, naming the field."""
    n = _longest_allowed(count_tokens)
    for text, bad in (("x" * n, set()), ("x" * (n + 1), {field})):
        overrides = {field: text.encode()}
        if field == "NEGATIVE_PROMPT":
            overrides["GUIDANCE_SCALE"] = 2.0  # so the negative prompt is used
        case = classic(overrides)
        assert verdict(case, count_tokens).bad == bad
        check(case, "grpc", send(clients.get("grpc"), "grpc", case.tensors), count_tokens)


# ---------------------------------------------------------------------- below tritonclient

_PROMPT = struct.pack("<I", 5) + b"a cat"
_I32_64 = struct.pack("<i", 64)
_SIZE = [("HEIGHT", "INT32", [1, 1], _I32_64), ("WIDTH", "INT32", [1, 1], _I32_64),
         ("NUM_INFERENCE_STEPS", "INT32", [1, 1], struct.pack("<i", 1))]
# Raw gRPC requests: tensors whose bytes disagree with their declared shape and type.
RAW_GRPC = [
    ("no inputs", [], "PROMPT"),
    ("zero rows", [("PROMPT", "BYTES", [0, 1], b"")] + _SIZE, None),
    ("string length past the end", [("PROMPT", "BYTES", [1, 1], struct.pack("<I", 1000) + b"a")]
     + _SIZE, "PROMPT"),
    ("string length 2^32-1", [("PROMPT", "BYTES", [1, 1], struct.pack("<I", 2**32 - 1) + b"ab")]
     + _SIZE, "PROMPT"),
    ("truncated length prefix", [("PROMPT", "BYTES", [1, 1], b"\x05\x00")] + _SIZE, "PROMPT"),
    ("two strings for one element", [("PROMPT", "BYTES", [1, 1], _PROMPT * 2)] + _SIZE, "PROMPT"),
    ("no bytes for a string", [("PROMPT", "BYTES", [1, 1], b"")] + _SIZE, "PROMPT"),
    ("3 bytes for an INT32", [("PROMPT", "BYTES", [1, 1], _PROMPT),
                              ("HEIGHT", "INT32", [1, 1], b"\x40\x00\x00")], "HEIGHT"),
    ("8 bytes for an INT32", [("PROMPT", "BYTES", [1, 1], _PROMPT),
                              ("HEIGHT", "INT32", [1, 1], _I32_64 * 2)], "HEIGHT"),
    ("negative batch", [("PROMPT", "BYTES", [-1, 1], _PROMPT)] + _SIZE, None),
    ("2^62 rows", [("PROMPT", "BYTES", [2**62, 1], _PROMPT)] + _SIZE, None),
    ("unknown datatype", [("PROMPT", "FOO", [1, 1], _PROMPT)] + _SIZE, "PROMPT"),
]


@pytest.mark.parametrize("inputs, field", [c[1:] for c in RAW_GRPC], ids=[c[0] for c in RAW_GRPC])
def test_malformed_grpc_tensors(server, tally, inputs, field):
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    for name, datatype, shape, raw in inputs:
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = name, datatype
        tensor.shape.extend(shape)
        request.raw_input_contents.append(raw)
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=ANSWER_TIMEOUT_S)
    tally.count("fuzz, malformed tensors below tritonclient", f"grpc {info.value.code().name}")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    if field is not None:
        assert names_field(info.value.details(), field), info.value.details()


_HEADER = json.dumps({"inputs": [
    {"name": "PROMPT", "datatype": "BYTES", "shape": [1, 1],
     "parameters": {"binary_data_size": len(_PROMPT)}},
    {"name": "HEIGHT", "datatype": "INT32", "shape": [1, 1], "data": [64]},
    {"name": "WIDTH", "datatype": "INT32", "shape": [1, 1], "data": [64]},
    {"name": "NUM_INFERENCE_STEPS", "datatype": "INT32", "shape": [1, 1], "data": [1]}],
    # IMAGE too: a request that names outputs without the one its format fills is refused.
    "outputs": [{"name": "SEED"}, {"name": "IMAGE", "parameters": {"binary_data": True}}]}).encode()


def _json(*inputs):
    return json.dumps({"inputs": [{"name": n, "datatype": d, "shape": [1, 1], "data": [v]}
                                  for n, d, v in inputs]}).encode()


_P = ("PROMPT", "BYTES", "a")
_BIG_HEADER = _HEADER.replace(b'"binary_data_size": 9', b'"binary_data_size": 100000')
assert _BIG_HEADER != _HEADER
# Raw HTTP bodies. Triton answers JSON it cannot parse with 500 ("failed to parse the request
# JSON buffer", "Unable to parse 'data'") before our model sees anything: that is its code, not
# ours, so those cases accept 400 or 500; the ones that reach the model must get 400.
RAW_HTTP = [
    ("valid binary request", _HEADER + _PROMPT, len(_HEADER), 200, None),
    ("JSON with NaN", _json(_P).replace(b"]}]}", b']}, {"name": "GUIDANCE_SCALE", '
                                                 b'"datatype": "FP32", "shape": [1, 1], '
                                                 b'"data": [NaN]}]}'), None, 400, "GUIDANCE_SCALE"),
    ("JSON empty prompt", _json(("PROMPT", "BYTES", "")), None, 400, "PROMPT"),
    ("JSON height not a multiple of 16", _json(_P, ("HEIGHT", "INT32", 100)), None, 400, "HEIGHT"),
    ("broken JSON", b"{not json", None, (400, 500), None),
    ("empty body", b"", None, (400, 500), None),
    ("a string where an INT32 goes", _json(_P, ("HEIGHT", "INT32", "64")), None, (400, 500), None),
    ("an int beyond int64", _json(_P).replace(b"]}]}", b']}, {"name": "SEED", "datatype": "INT64",'
                                              b' "shape": [1, 1], "data": [99999999999999999999]}]}'),
     None, (400, 500), None),
    ("a number where a string goes", _json(("PROMPT", "BYTES", 5)), None, (400, 500), None),
    ("header length past the body", _HEADER + _PROMPT, len(_HEADER) + 1000, 400, None),
    ("negative header length", _HEADER + _PROMPT, -5, 400, None),
    ("binary string length past the end", _HEADER + struct.pack("<I", 1000) + b"a cat",
     len(_HEADER), 400, "PROMPT"),
    ("binary size larger than the body", _BIG_HEADER + _PROMPT, len(_BIG_HEADER), 400, None),
]


@pytest.mark.parametrize("body, header_length, status, field", [c[1:] for c in RAW_HTTP],
                         ids=[c[0] for c in RAW_HTTP])
def test_malformed_http_bodies(server, tally, body, header_length, status, field):
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    connection = http.client.HTTPConnection(server.http_url, timeout=ANSWER_TIMEOUT_S)
    try:
        connection.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    tally.count("fuzz, malformed HTTP bodies", f"http {response.status}")
    assert response.status in (status if isinstance(status, tuple) else (status,)), payload
    if response.status != 200:
        message = json.loads(payload)["error"]
        if field is not None:
            assert names_field(message, field), message


def test_server_is_still_serving_after_the_fuzz(server):
    assert_still_serving(server)
