"""The batching server (issue 19): merged model calls give each request its own digits, a bounded queue, timeouts, metrics."""

from __future__ import annotations

import base64
import dataclasses
import re
import threading
import time

import pytest
import torch

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx2", reason="Starlette's test client needs httpx2: pip install -e '.[test]'")
from starlette.testclient import TestClient  # noqa: E402

from latentdiff.serve.app import Batching, Limits, create_app  # noqa: E402
from latentdiff.serve.batcher import Batcher, QueueFull, Work, generate_work  # noqa: E402
from latentdiff.serve.images import png_bytes  # noqa: E402

from conftest import tiny_pipeline  # noqa: E402

SETTINGS = {"guidance_scale": 2.0, "steps": 3, "sampler": "ddpm", "eta": 0.0}  # ddpm: per-step noise from each seed too
REQUESTS = [([3, 3, 1], 10), ([7], 500), ([0, 1, 2, 3, 4], 11), ([9, 9], 12), ([5], 2**40)]


@pytest.mark.exactness
def test_one_merged_call_gives_each_request_what_generate_gives_it():
    pipe = tiny_pipeline()
    batches = []
    total = sum(len(labels) for labels, _ in REQUESTS)
    batcher = Batcher(pipe, max_batch=total, max_wait_ms=5000, on_batch=lambda *a: batches.append(a))
    batcher.last_requests = 99  # as after a big merged call: the batch waits for more until it is full
    try:
        futures = [batcher.submit(generate_work(labels, seed, SETTINGS)) for labels, seed in REQUESTS]
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.close()
    assert [b[:2] for b in batches] == [(5, total)]  # one model call for all five requests (full: no wait)
    for (labels, seed), (images, seconds) in zip(REQUESTS, results):
        alone = pipe.generate(labels, seed=seed, **SETTINGS)
        assert images.shape == alone.shape and seconds > 0
        assert torch.equal(images, alone)  # bit for bit: the pipeline's fixed tiles (docs/scale.md)


@pytest.mark.exactness
def test_only_equal_settings_share_a_call_and_a_big_request_goes_alone():
    pipe = tiny_pipeline()
    batches = []
    batcher = Batcher(pipe, max_batch=4, max_wait_ms=300, on_batch=lambda *a: batches.append(a))
    other = {**SETTINGS, "steps": 2}
    try:
        with batcher.lock:  # the worker waits at its first model call while we queue the rest
            f0 = batcher.submit(generate_work([1], 0, SETTINGS))
            while batcher.depth:
                time.sleep(0.01)
            fs = [batcher.submit(generate_work(labels, seed, s)) for labels, seed, s in
                  [([2, 2], 1, other), ([3], 2, SETTINGS), ([4], 3, other), ([5, 6, 7, 8, 9, 0], 4, SETTINGS)]]
        results = [f.result(timeout=60)[0] for f in [f0, *fs]]
    finally:
        batcher.close()
    # [1] alone; then the oldest waiting settings ("other": 3 digits, waits out max_wait); then [3] + the
    # 6-digit request, which goes alone (over max_batch with [3]).
    assert [b[:2] for b in batches] == [(1, 1), (2, 3), (1, 1), (1, 6)]
    expected = [pipe.generate([1], seed=0, **SETTINGS), pipe.generate([2, 2], seed=1, **other),
                pipe.generate([3], seed=2, **SETTINGS), pipe.generate([4], seed=3, **other),
                pipe.generate([5, 6, 7, 8, 9, 0], seed=4, **SETTINGS)]
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


def test_requests_for_two_pipelines_never_share_a_call():
    """A server that swaps in a taught pipeline queues requests for both: each runs on its own, whatever their settings."""
    old, new = tiny_pipeline(), tiny_pipeline(seed=1)
    batches = []
    batcher = Batcher(old, max_batch=16, max_wait_ms=300, on_batch=lambda *a: batches.append(a))
    try:
        with batcher.lock:
            first = batcher.submit(generate_work([1], 0, SETTINGS, old))
            while batcher.depth:
                time.sleep(0.01)
            works = [generate_work([2], 1, SETTINGS, old), generate_work([2], 1, SETTINGS, new),
                     generate_work([3], 2, SETTINGS, old)]
            futures = [batcher.submit(w) for w in works]
        results = [f.result(timeout=60)[0] for f in [first, *futures]]
    finally:
        batcher.close()
    assert [b[:2] for b in batches] == [(1, 1), (2, 2), (1, 1)]  # the old pipeline's two share a call, the new one's not
    assert torch.equal(results[1], old.generate([2], seed=1, **SETTINGS))
    assert torch.equal(results[2], new.generate([2], seed=1, **SETTINGS)) and not torch.equal(results[1], results[2])


def test_requests_queued_behind_a_call_wait_for_its_clients_to_come_back():
    """Closed-loop clients: after a call of 1 with 2 queued behind it, the next call waits (from when the worker is
    free, not from when they queued) for a third, so calls do not alternate between halves of the clients."""
    batches = []
    batcher = Batcher(tiny_pipeline(), max_wait_ms=1500, on_batch=lambda *a: batches.append(a))
    try:
        with batcher.lock:  # the worker takes the first request and waits at its model call
            first = batcher.submit(generate_work([1], 0, SETTINGS))
            while batcher.taken < 1:
                time.sleep(0.01)
            behind = [batcher.submit(generate_work([2], 1, SETTINGS)), batcher.submit(generate_work([3], 2, SETTINGS))]
            time.sleep(1.6)  # they queue longer than max_wait: a deadline from their arrival would not wait at all
        first.result(timeout=60)
        assert batcher.last_requests == 3  # the call's own request and the two behind it
        time.sleep(0.2)
        back = batcher.submit(generate_work([4], 3, SETTINGS))  # the first client's next request
        for f in [*behind, back]:
            f.result(timeout=60)
    finally:
        batcher.close()
    assert [b[:2] for b in batches] == [(1, 1), (3, 3)]


def test_a_lone_client_never_waits_but_a_loaded_server_waits_for_stragglers():
    # The wait (4 s) dwarfs a model call on any machine, so the bounds hold on a slow or loaded CI box too.
    batcher = Batcher(tiny_pipeline(), max_wait_ms=4000)
    try:
        for _ in range(2):  # no merged call yet: each lone request starts at once
            start = time.monotonic()
            batcher.submit(generate_work([1], 0, SETTINGS)).result(timeout=60)
            assert time.monotonic() - start < 2.0
        for last, waited in ((3, (3.9, 60)), (2, (0.25, 2.0))):
            batcher.last_requests = last  # the previous call merged `last` requests
            start = time.monotonic()
            first = batcher.submit(generate_work([1], 0, SETTINGS))
            time.sleep(0.3)
            second = batcher.submit(generate_work([2], 0, SETTINGS))  # a straggler joins the waiting batch
            first.result(timeout=60)
            # 3 expected: waits out max_wait for a third; 2 expected: starts as soon as the second is in
            assert waited[0] <= time.monotonic() - start < waited[1]
            assert second.result(timeout=60)[1] == first.result()[1]  # one call, one duration
    finally:
        batcher.close()


def test_full_queue_refuses_and_a_cancelled_request_is_not_computed():
    batches = []
    batcher = Batcher(tiny_pipeline(), max_queue=2, on_batch=lambda *a: batches.append(a))
    try:
        with batcher.lock:
            running = batcher.submit(generate_work([1], 0, SETTINGS))
            while batcher.depth:
                time.sleep(0.01)
            cancelled = batcher.submit(generate_work([2], 0, SETTINGS))
            batcher.submit(generate_work([3], 0, SETTINGS))
            with pytest.raises(QueueFull, match="2 requests are queued") as info:
                batcher.submit(generate_work([4], 0, SETTINGS))
            assert info.value.retry_after >= 1
            assert cancelled.cancel()
        running.result(timeout=60)
    finally:
        batcher.close()
    assert [b[1] for b in batches] == [1, 1]  # the cancelled request never reached the model


def test_a_failing_call_fails_its_requests_and_the_worker_goes_on():
    batcher = Batcher(tiny_pipeline())
    try:
        bad = batcher.submit(Work(size=1, key=None, fn=lambda: 1 / 0))
        with pytest.raises(ZeroDivisionError):
            bad.result(timeout=10)
        assert batcher.submit(Work(size=1, key=None, fn=lambda: "ok")).result(timeout=10)[0] == "ok"
    finally:
        batcher.close()


# ------------------------------------------------------------------------------------- over HTTP
@pytest.fixture
def serve(tmp_path):
    """(client, service) for a tiny model with the given batching options."""
    made = []

    def start(**batching):
        pipe = tiny_pipeline()
        app = create_app(pipe, tmp_path, Limits(max_images=12, max_steps=50), Batching(**batching))
        client = TestClient(app, raise_server_exceptions=False).__enter__()
        made.append(client)
        return client, app.state.service

    yield start
    for c in made:
        c.__exit__(None, None, None)


def post_in_thread(client, body, out: dict, key) -> threading.Thread:
    t = threading.Thread(target=lambda: out.update({key: client.post("/api/generate", json=body)}))
    t.start()
    return t


def test_a_request_alone_gets_exactly_the_bytes_of_generate(serve):
    """Unbatched (alone in its call, as with --max-batch 1) the answer is byte-identical to pipe.generate's PNG."""
    client, service = serve(max_batch=1)
    body = {"labels": [4, 2], "per_label": 3, "seed": 77, "steps": 3, "sampler": "ddpm", "format": "png"}
    out: dict = {}
    threads = [post_in_thread(client, {**body, "seed": 77 + i}, out, i) for i in range(3)]
    for t in threads:
        t.join(60)
    for i in range(3):
        alone = service.pipe.generate([4, 4, 4, 2, 2, 2], seed=77 + i, steps=3, sampler="ddpm")
        assert out[i].content == png_bytes(alone, 3)


def test_http_queue_full_is_503_with_retry_after(serve):
    client, service = serve(max_queue=1)
    out: dict = {}
    with service.lock:
        a = post_in_thread(client, {"labels": [1], "seed": 0}, out, "a")
        deadline = time.monotonic() + 30
        while service.batcher.taken < 1 and time.monotonic() < deadline:  # a is taken by the worker (blocked on the lock)
            time.sleep(0.01)
        b = post_in_thread(client, {"labels": [2], "seed": 0}, out, "b")
        while service.batcher.depth < 1 and time.monotonic() < deadline:  # b waits in the queue
            time.sleep(0.01)
        r = client.post("/api/generate", json={"labels": [3], "seed": 0})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert "busy" in r.json()["error"] and "retry" in r.json()["error"]
    a.join(60)
    b.join(60)
    assert out["a"].status_code == 200 and out["b"].status_code == 200


def test_http_request_timeout_is_503_and_the_server_recovers(serve):
    client, service = serve(request_timeout_s=0.3)
    with service.lock:
        start = time.monotonic()
        r = client.post("/api/generate", json={"labels": [1], "seed": 0})
        assert r.status_code == 503 and "0.3 s request timeout" in r.json()["error"] and "retry-after" in r.headers
        assert time.monotonic() - start < 10
    service.batching = dataclasses.replace(service.batching, request_timeout_s=60)  # a loaded CI box: not 0.3 s again
    assert client.post("/api/generate", json={"labels": [1], "seed": 0}).status_code == 200


def parse_prometheus(text: str) -> dict[str, float]:
    """A strict reader of the text format: every sample line is name{labels} value; returns {name{labels}: value}."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? (\S+)', line)
        assert m, f"not a Prometheus sample line: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def test_concurrent_clients_share_batches_get_their_own_pixels_and_metrics_count_it(serve):
    client, service = serve(max_wait_ms=150)
    pipe = service.pipe
    bodies = [{"labels": [i % 10, (i + 3) % 10], "per_label": 2, "seed": 1000 + 7 * i, "steps": 3, "sampler": "ddpm",
               "format": "png"} for i in range(8)]
    out: dict = {}
    barrier = threading.Barrier(len(bodies))

    def client_thread(i):
        barrier.wait()
        out[i] = [client.post("/api/generate", json=bodies[i]) for _ in range(2)]

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, body in enumerate(bodies):
        labels = [c for c in body["labels"] for _ in range(2)]
        alone = png_bytes(pipe.generate(labels, seed=body["seed"], steps=3, sampler="ddpm"), 2)
        assert [r.status_code for r in out[i]] == [200, 200]
        for r in out[i]:  # merged with other requests, each gets the PNG of its solo generate, byte for byte
            assert r.content == alone

    m = parse_prometheus(client.get("/metrics").text)
    assert m['latentdiff_requests_total{route="/api/generate",status="200"}'] == 16
    assert m['latentdiff_request_seconds_count{route="/api/generate"}'] == 16
    assert m["latentdiff_batch_requests_sum"] == 16 and m["latentdiff_batch_requests_count"] < 16  # merged
    assert m["latentdiff_batch_digits_sum"] == 64 and m['latentdiff_batch_digits_bucket{le="+Inf"}'] == m["latentdiff_batch_digits_count"]
    assert m["latentdiff_queue_depth"] == 0 and m["latentdiff_model_seconds_total"] > 0
    buckets = [v for k, v in m.items() if k.startswith('latentdiff_request_seconds_bucket{route="/api/generate"')]
    assert buckets == sorted(buckets) and buckets[-1] == 16
    client.post("/api/generate", json={"labels": [99]})
    again = parse_prometheus(client.get("/metrics").text)
    assert again['latentdiff_requests_total{route="/api/generate",status="422"}'] == 1
    assert again['latentdiff_requests_total{route="/metrics",status="200"}'] == 1


def test_edits_go_through_the_same_queue(serve):
    client, service = serve()
    digit = torch.zeros(1, 1, 28, 28)
    digit[..., 5:23, 12:16] = 1
    body = {"image": base64.b64encode(png_bytes(digit, 1)).decode(), "label": 7, "count": 2, "seed": 3, "steps": 3}
    out: dict = {}
    with service.lock:  # the model is busy: the edit waits in the queue like a generate request
        t = threading.Thread(target=lambda: out.update(r=client.post("/api/img2img", json=body)))
        t.start()
        time.sleep(0.3)
        assert "r" not in out
    t.join(60)
    assert out["r"].status_code == 200, out["r"].text
