"""Server metrics in the Prometheus text format (version 0.0.4), written by hand: no client library needed."""

from __future__ import annotations

import bisect
import threading
import time
from typing import Callable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Histogram:
    """Cumulative-bucket histogram of one labelled series family."""

    def __init__(self, buckets: tuple):
        self.buckets, self.series = buckets, {}

    def observe(self, labels: tuple, value: float) -> None:
        counts, total = self.series.get(labels, ([0] * (len(self.buckets) + 1), 0.0))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.series[labels] = (counts, total + value)

    def lines(self, name: str, label_names: tuple) -> list[str]:
        out = []
        for labels, (counts, total) in sorted(self.series.items()):
            base = ",".join(f'{k}="{v}"' for k, v in zip(label_names, labels))
            running = 0
            for le, c in zip([*map(_num, self.buckets), "+Inf"], counts):
                running += c
                out.append(f'{name}_bucket{{{base + "," if base else ""}le="{le}"}} {running}')
            out.append(f"{name}_sum{{{base}}} {total:.6f}" if base else f"{name}_sum {total:.6f}")
            out.append(f"{name}_count{{{base}}} {running}" if base else f"{name}_count {running}")
        return out


def _num(v: float) -> str:
    return f"{v:g}"


class Metrics:
    """Requests by route and status, request latency, batch sizes, model time; queue gauges read at scrape time."""

    def __init__(self, queue_depth: Callable[[], int], queued_digits: Callable[[], int]):
        self.lock = threading.Lock()
        self.requests: dict[tuple, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_digits = Histogram(BATCH_BUCKETS)
        self.batch_requests = Histogram(BATCH_BUCKETS)
        self.model_seconds = 0.0
        self.queue_depth, self.queued_digits = queue_depth, queued_digits

    def request(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            key = (route, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.observe((route,), seconds)

    def batch(self, requests: int, digits: int, seconds: float) -> None:
        with self.lock:
            self.batch_digits.observe((), digits)
            self.batch_requests.observe((), requests)
            self.model_seconds += seconds

    def render(self) -> str:
        with self.lock:
            out = ["# HELP latentdiff_requests_total HTTP requests answered, by route and status code.",
                   "# TYPE latentdiff_requests_total counter"]
            out += [f'latentdiff_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())]
            out += ["# HELP latentdiff_request_seconds Time from a request's arrival to its answer.",
                    "# TYPE latentdiff_request_seconds histogram", *self.latency.lines("latentdiff_request_seconds", ("route",)),
                    "# HELP latentdiff_batch_digits Digits per model call of the batcher.",
                    "# TYPE latentdiff_batch_digits histogram", *self.batch_digits.lines("latentdiff_batch_digits", ()),
                    "# HELP latentdiff_batch_requests Requests merged into one model call.",
                    "# TYPE latentdiff_batch_requests histogram", *self.batch_requests.lines("latentdiff_batch_requests", ()),
                    "# HELP latentdiff_model_seconds_total Seconds the worker spent in model calls.",
                    "# TYPE latentdiff_model_seconds_total counter", f"latentdiff_model_seconds_total {self.model_seconds:.6f}"]
        out += ["# HELP latentdiff_queue_depth Requests waiting for the model.", "# TYPE latentdiff_queue_depth gauge",
                f"latentdiff_queue_depth {self.queue_depth()}",
                "# HELP latentdiff_queue_digits Digits those requests ask for.", "# TYPE latentdiff_queue_digits gauge",
                f"latentdiff_queue_digits {self.queued_digits()}"]
        return "\n".join(out) + "\n"


class CountRequests:
    """ASGI middleware: every HTTP answer counted by route and status, with its latency, for /metrics."""

    ROUTES = ("/api/generate", "/api/img2img", "/api/inpaint", "/api/info", "/api/health", "/api/teach", "/metrics", "/")

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        path = scope["path"]
        route = (path if path in self.ROUTES else "/static" if path.startswith("/static/")
                 else "/api/teach/{id}" if path.startswith("/api/teach/") else "other")  # one series, not one per job

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request(route, status[0], time.perf_counter() - start)
