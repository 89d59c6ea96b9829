"""Load: a bounded soak over both protocols, and the bounded queue refusing excess load.

The soak runs CLIENTS threads (half gRPC, half HTTP, through our client) against the shared
server for SOAK_S seconds after a warm-up of WARMUP_S with the same load, and checks that every
request is answered exactly once with its own seed, and that the memory of tritonserver and its
Python stub stays flat from the end of the warm-up to the end of the soak.

The queue test starts a second server whose config.pbtxt allows 2 waiting requests and floods
it while a slow request holds the instance: the excess is refused at once with UNAVAILABLE
("Exceeds maximum queue size"), the rest succeed.
"""

from __future__ import annotations

import collections
import itertools
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml

from tests.conftest import CONFIG, ROOT
from tests.e2e.helpers import (
    ANSWER_TIMEOUT_S,
    MODEL,
    UNAVAILABLE_STATUS,
    infer_inputs,
    metric,
    mib,
    new_client,
    scrape,
    send,
    tree_rss,
)
from zimage_backend.triton_process import TritonServer
from zimage_client import InvalidRequestError, ServerUnavailableError, ZImageClient

pytestmark = pytest.mark.e2e

CLIENTS = 16
WARMUP_S, SOAK_S = 6.0, 20.0
FORMATS = ("png", "jpeg", "webp", "raw")
# Growth of the server's resident memory (tritonserver + stub) allowed between the end of the
# warm-up (which sends the same mix, so arenas, free lists and the stub's shared memory have
# grown to their working size) and the end of the soak. Repeated runs grew by about 1 MiB over
# ~1300 requests; a leak of one 64x64 image (12 KiB raw, about as much as PNG) per request
# would grow by 12+ MiB over the ~1000+ requests a soak sends on 2 cores, so 8 MiB catches it.
MAX_RSS_GROWTH = 8 * 2**20


def _load(server, seconds: float, seeds: itertools.count, lock: threading.Lock):
    """Runs the load; returns {seed: [outcomes]} and how many requests each thread sent."""
    outcomes: dict[int, list] = collections.defaultdict(list)
    deadline = time.monotonic() + seconds

    def worker(index: int) -> int:
        protocol = "grpc" if index % 2 == 0 else "http"
        url = server.grpc_url if protocol == "grpc" else server.http_url
        sent = 0
        with ZImageClient(url, protocol=protocol, inference_timeout_s=ANSWER_TIMEOUT_S) as c:
            while time.monotonic() < deadline:
                with lock:
                    seed = next(seeds)
                bad = seed % 10 == 0  # every tenth request breaks the contract
                try:
                    result = c.generate(f"soak {seed}", height=100 if bad else 64, width=64,
                                        num_inference_steps=1 + seed % 2, seed=seed,
                                        output_format=FORMATS[seed % len(FORMATS)])
                    outcome = ("ok", result.seed, (result.height, result.width), bad)
                except InvalidRequestError as exc:
                    outcome = ("INVALID_ARG", exc.message.split(":")[0], None, bad)
                except ServerUnavailableError as exc:
                    outcome = ("UNAVAILABLE", exc.message, None, bad)
                except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
                    outcome = (type(exc).__name__, str(exc), None, bad)
                sent += 1
                with lock:
                    outcomes[seed].append(outcome)
        return sent

    with ThreadPoolExecutor(CLIENTS) as pool:
        sent = list(pool.map(worker, range(CLIENTS)))
    return outcomes, sent


def _rss(server) -> int:
    return sum(tree_rss(server.process.pid).values())


def test_soak_every_request_answered_once_memory_flat(server, tally):
    seeds, lock = itertools.count(10_000), threading.Lock()
    processes = tree_rss(server.process.pid)
    assert len(processes) >= 2, f"tritonserver and its Python stub: {processes}"
    rss_start = sum(processes.values())
    _load(server, WARMUP_S, seeds, lock)
    rss_warm = _rss(server)
    first_seed = next(seeds)
    outcomes, sent = _load(server, SOAK_S, seeds, lock)
    rss_end = _rss(server)
    last_seed = next(seeds)

    counts = collections.Counter()
    for seed in range(first_seed + 1, last_seed):
        answers = outcomes.get(seed, [])
        assert len(answers) == 1, f"seed {seed} answered {len(answers)} times: {answers}"
        kind, detail, size, bad = answers[0]
        counts[kind] += 1
        if kind == "ok":
            assert not bad and detail == seed and size == (64, 64), answers[0]
        elif kind == "INVALID_ARG":
            assert bad and detail == "HEIGHT", answers[0]
        else:  # the only other answer allowed: a refusal by the bounded queue
            assert kind == "UNAVAILABLE" and "queue" in detail, answers[0]
    total = sum(sent)
    assert total == last_seed - first_seed - 1 == sum(counts.values())
    assert counts["ok"] > 0.5 * total, counts
    growth = rss_end - rss_warm
    for kind, n in counts.items():
        tally.count("soak", kind, sent=n, answered=n)
    tally.note("soak", f"{CLIENTS} clients for {SOAK_S:.0f} s ({total / SOAK_S:.1f} requests/s); "
                       f"RSS {mib(rss_start)} at start, {mib(rss_warm)} after warm-up, "
                       f"{mib(rss_end)} after the soak ({growth / 2**20:+.1f} MiB; bound "
                       f"{mib(MAX_RSS_GROWTH)}, i.e. no leak of "
                       f"{MAX_RSS_GROWTH / total / 2**10:.1f} KiB or more per request)")
    assert growth < MAX_RSS_GROWTH, f"memory grew by {mib(growth)} over {total} requests"
    assert server.is_ready()


# ---------------------------------------------------------------------- bounded queue

SMALL_QUEUE = 2
FLOOD = 8


@pytest.fixture(scope="module")
def small_queue_server(tmp_path_factory):
    """A second server from a copy of our model repository whose queue holds 2 requests."""
    root = tmp_path_factory.mktemp("small-queue")
    model_dir = root / "repository" / MODEL
    (model_dir / "1").mkdir(parents=True)
    shutil.copy(ROOT / "model_repository" / MODEL / "1" / "model.py", model_dir / "1")
    config = (ROOT / "model_repository" / MODEL / "config.pbtxt").read_text()
    config, n = re.subn(r"max_queue_size: \d+", f"max_queue_size: {SMALL_QUEUE}", config)
    assert n == 1, "config.pbtxt has no max_queue_size to shrink"
    (model_dir / "config.pbtxt").write_text(config)
    settings = yaml.safe_load(CONFIG.read_text())
    settings["optimizations"]["warmup"]["sizes"] = [[64, 64]]  # start faster; same model
    (root / "config.yaml").write_text(yaml.safe_dump(settings))
    # One instance, for the slow request below to hold.
    triton = TritonServer(root / "repository", config_path=root / "config.yaml", http_port=0,
                          grpc_port=0, metrics_port=0, log_file=root / "server.log",
                          cpu_instances=1)
    with triton:
        yield triton
    assert triton.returncode == 0, triton.log_tail()


def _slow_request(client, done: threading.Event):
    """Holds the instance: 1536x1536, 50 steps (~15 s on 2 cores); cancelled when done."""
    tensors = [("PROMPT", np.array([[b"hold the instance"]], dtype=np.object_), "BYTES"),
               ("HEIGHT", np.array([[1536]], np.int32), "INT32"),
               ("WIDTH", np.array([[1536]], np.int32), "INT32"),
               ("NUM_INFERENCE_STEPS", np.array([[50]], np.int32), "INT32")]
    return client.async_infer(MODEL, infer_inputs("grpc", tensors),
                              lambda result, error: done.set(), client_timeout=ANSWER_TIMEOUT_S)


def test_a_full_queue_refuses_at_once(small_queue_server, tally):
    server = small_queue_server
    holder, held = new_client(server, "grpc"), threading.Event()
    call = _slow_request(holder, held)
    time.sleep(1.0)  # executing now; the queue is empty
    rejected_before = metric(scrape(server), "nv_inference_request_failure", reason="REJECTED")

    def one(index: int):
        protocol = "grpc" if index % 2 == 0 else "http"
        url = server.grpc_url if protocol == "grpc" else server.http_url
        started = time.perf_counter()
        with ZImageClient(url, protocol=protocol, inference_timeout_s=ANSWER_TIMEOUT_S) as c:
            try:
                result = c.generate("flood", height=64, width=64, num_inference_steps=1,
                                    seed=index)
                return protocol, "ok", result.seed, time.perf_counter() - started
            except ServerUnavailableError as exc:
                return protocol, "UNAVAILABLE", (exc.status, exc.message), \
                    time.perf_counter() - started

    with ThreadPoolExecutor(FLOOD) as pool:
        futures = [pool.submit(one, i) for i in range(FLOOD)]
        # The refusals come while the slow request still runs; then it is let go (cancelled),
        # and the queued requests run.
        deadline = time.monotonic() + 30
        while sum(f.done() for f in futures) < FLOOD - SMALL_QUEUE and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything else answered now would have skipped the queue
        answered_while_held = sum(f.done() for f in futures)
        assert not held.is_set(), "the slow request ended before the flood was refused"
        call.cancel()
        results = [f.result(timeout=ANSWER_TIMEOUT_S) for f in futures]
    assert held.wait(10)
    holder.close()
    assert answered_while_held == FLOOD - SMALL_QUEUE, results
    refused = [r for r in results if r[1] == "UNAVAILABLE"]
    succeeded = [r for r in results if r[1] == "ok"]
    assert len(refused) + len(succeeded) == FLOOD, results
    assert len(succeeded) == SMALL_QUEUE and len(refused) == FLOOD - SMALL_QUEUE, results
    assert sorted(r[2] for r in succeeded) == sorted(
        set(range(FLOOD)) - {i for i, r in enumerate(results) if r[1] != "ok"})
    for protocol, _, (status, message), _ in refused:
        assert (status, message) == (UNAVAILABLE_STATUS[protocol],
                                     "[request id: <id_unknown>] Exceeds maximum queue size")
    latencies = sorted(r[3] for r in refused)
    assert latencies[-1] < 1.0, latencies
    for protocol, kind, _, _ in results:
        tally.count("bounded queue (max_queue_size 2), flood", f"{protocol} {kind}")
    tally.note("bounded queue (max_queue_size 2), flood",
               f"refused in {latencies[0] * 1000:.0f}-{latencies[-1] * 1000:.0f} ms")
    # Queue-full refusals never enter the queue, so Triton's REJECTED counter (queue timeouts)
    # does not count them.
    assert metric(scrape(server), "nv_inference_request_failure",
                  reason="REJECTED") == rejected_before


def test_a_request_waiting_past_its_timeout_is_refused(small_queue_server, tally):
    """allow_timeout_override: a client may ask for a shorter queue timeout (microseconds)."""
    server = small_queue_server
    holder, held = new_client(server, "grpc"), threading.Event()
    call = _slow_request(holder, held)
    time.sleep(1.0)
    rejected_before = metric(scrape(server), "nv_inference_request_failure", reason="REJECTED")
    tensors = [("PROMPT", np.array([[b"impatient"]], dtype=np.object_), "BYTES"),
               ("HEIGHT", np.array([[64]], np.int32), "INT32"),
               ("WIDTH", np.array([[64]], np.int32), "INT32")]

    def impatient(protocol):
        client = new_client(server, protocol)
        try:
            return protocol, send(client, protocol, tensors, timeout=500_000)
        finally:
            client.close()

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(impatient, ["grpc", "http"]))
    assert not held.is_set(), "the slow request ended before the queue timeout"
    call.cancel()
    assert held.wait(10)
    holder.close()
    for protocol, answer in answers:
        assert (answer.status, answer.message) == (UNAVAILABLE_STATUS[protocol],
                                                   "Request timeout expired"), answer
        # Triton looks at the queue's deadlines lazily: within a second or so of them.
        assert 0.5 <= answer.seconds < 5.0, answer
        tally.count("bounded queue, 0.5 s queue timeout", f"{protocol} UNAVAILABLE")
    tally.note("bounded queue, 0.5 s queue timeout", "refused after " + ", ".join(
        f"{answer.seconds:.2f} s" for _, answer in answers))
    assert metric(scrape(server), "nv_inference_request_failure",
                  reason="REJECTED") == rejected_before + 2
