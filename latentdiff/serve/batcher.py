"""Dynamic batching for the server: a bounded queue of requests -> one model call per group of equal settings -> split.

One worker thread owns the model. Generate requests with the same sampler settings are merged, up to
``max_batch`` digits, into one call of the pipeline's building blocks (noise -> sample -> decode) with each
digit's own seed, so a request gets the digits ``pipe.generate(labels, seed=seed, ...)`` gives it, bit for
bit (the pipeline's network calls run on fixed tiles, whatever the merged batch's size). A batch starts when
it is full, ``max_wait_ms`` after the worker is free (or its oldest request arrived, if later), or as soon
as it holds as many requests as the previous call plus those that queued behind it. That wait applies only
under concurrent load (the previous call merged several requests), so a lone client never waits. Other work (the editing functions, whose seeds are one per call) goes through the same
queue and runs alone. A full queue refuses at once (QueueFull) rather than letting waits grow without bound.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already; ``retry_after`` is a guess in seconds."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the server is busy: {depth} requests are queued (the limit); retry in about {retry_after} s")
        self.depth, self.retry_after = depth, retry_after


@dataclass
class Work:
    """One queued request: either digits to generate (labels, seeds, settings) or a function run alone."""

    size: int  # digits it asks for
    key: tuple | None  # equal keys may share a model call; None: runs alone (``fn``)
    labels: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    fn: Callable[[], Any] | None = None
    pipe: Any = None  # the pipeline to generate with (part of the key: no call mixes two); None: the batcher's
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


def generate_work(labels: list[int], seed: int, settings: dict, pipe: Any = None) -> Work:
    """Digit i of the request gets seed + i, as in pipe.generate; settings: ``pipe.settings`` keywords. ``pipe``: the
    pipeline the request was checked against (a server that swaps in a taught one); None: the batcher's."""
    key = (id(pipe), *sorted(settings.items()))  # the Work holds ``pipe``, so its id is not reused while it waits
    return Work(size=len(labels), key=key, labels=list(labels), seeds=[seed + i for i in range(len(labels))],
                settings=dict(settings), pipe=pipe)


class Batcher:
    """The queue and its worker thread; ``submit`` returns a Future of (the request's images or fn's result, model seconds)."""

    def __init__(self, pipe, max_batch: int = 256, max_wait_ms: float = 0.0, max_queue: int = 64,
                 on_batch: Callable[[int, int, float], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch and max_queue must be >= 1 and max_wait_ms >= 0, got {max_batch}, "
                             f"{max_queue} and {max_wait_ms}")
        self.pipe, self.max_batch, self.max_wait, self.max_queue = pipe, max_batch, max_wait_ms / 1000, max_queue
        self.on_batch = on_batch or (lambda requests, digits, seconds: None)
        self.items: deque[Work] = deque()
        self.cond = threading.Condition()
        self.closed = False
        self.lock = threading.Lock()  # held during each model call
        self.seconds_per_digit = 0.01  # running estimate, for Retry-After
        # Requests the next call waits for (up to max_wait): those of the previous call plus those that queued
        # behind it. > 1 means concurrent clients, worth waiting for.
        self.last_requests = 1
        self.taken = 0  # requests the worker has taken off the queue (tests wait on it)
        self.thread = threading.Thread(target=self._loop, name="latentdiff-batcher", daemon=True)
        self.thread.start()

    @property
    def depth(self) -> int:
        return len(self.items)

    def queued_digits(self) -> int:
        with self.cond:
            return sum(w.size for w in self.items)

    def submit(self, work: Work) -> Future:
        with self.cond:
            if self.closed:
                raise RuntimeError("the batcher is closed")
            if len(self.items) >= self.max_queue:
                wait = (sum(w.size for w in self.items) + work.size) * self.seconds_per_digit
                raise QueueFull(len(self.items), max(1, round(wait + 0.5)))
            self.items.append(work)
            self.cond.notify()
        return work.future

    def close(self) -> None:
        """Stop the worker after the batch in progress; queued requests fail with RuntimeError."""
        with self.cond:
            self.closed = True
            left, self.items = list(self.items), deque()
            self.cond.notify_all()
        for w in left:
            if w.future.set_running_or_notify_cancel():
                w.future.set_exception(RuntimeError("the server is shutting down"))
        self.thread.join(timeout=30)

    # ------------------------------------------------------------------ worker thread
    def _take(self) -> list[Work] | None:
        """Wait for work; return the next batch (FIFO by its oldest request), or None once closed."""
        with self.cond:
            while not self.items and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
            first = self.items[0]
            if first.key is None:
                self.taken += 1
                return [self.items.popleft()]
            # Closed-loop clients answered by one call send their next requests a few ms apart: waiting a
            # little gathers them into one call instead of alternating a call of one and a call of the rest.
            # The wait counts from when the worker is free: requests that queued behind a call are not late.
            deadline = max(first.enqueued, time.monotonic()) + (self.max_wait if self.last_requests > 1 else 0.0)
            while not self.closed:
                same = [w for w in self.items if w.key == first.key]
                now = time.monotonic()
                if sum(w.size for w in same) >= self.max_batch or len(same) >= self.last_requests or now >= deadline:
                    break
                self.cond.wait(deadline - now)
            if self.closed:  # close() already failed the queued requests
                return None
            batch, total = [], 0
            for w in same:  # the oldest always goes; others while they fit
                if batch and total + w.size > self.max_batch:
                    break
                batch.append(w)
                total += w.size
            for w in batch:
                self.items.remove(w)
            self.taken += len(batch)
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            live = [w for w in batch if w.future.set_running_or_notify_cancel()]  # timed-out requests are skipped
            if not live:
                continue
            try:
                with self.lock:
                    start = time.perf_counter()
                    results = [live[0].fn()] if live[0].key is None else self._generate(live)
                    seconds = time.perf_counter() - start
            except BaseException as e:  # the requests get the error; the worker keeps serving
                for w in live:
                    w.future.set_exception(e)
                continue
            digits = sum(w.size for w in live)
            if digits:
                self.seconds_per_digit = 0.8 * self.seconds_per_digit + 0.2 * seconds / digits
            # Closed-loop clients answered by this call come back in a few ms, while those queued behind it are
            # already here: wait for both, or calls alternate between two halves of the clients forever.
            with self.cond:
                self.last_requests = len(live) + sum(w.key == live[0].key for w in self.items)
            self.on_batch(len(live), digits, seconds)
            for w, r in zip(live, results):
                w.future.set_result((r, seconds))

    def _generate(self, batch: list[Work]) -> list[torch.Tensor]:
        """One model call for the batch, split per request.

        Chunks of the pipeline's own default batch size (memory); every request gets exactly generate's bits,
        merged or alone, since the network runs on the pipeline's fixed tiles.
        """
        pipe = self.pipe if batch[0].pipe is None else batch[0].pipe  # one pipeline per batch: it is in the key
        settings = pipe.settings(**batch[0].settings)
        y = torch.tensor([c for w in batch for c in w.labels], dtype=torch.long)
        seeds = torch.tensor([s for w in batch for s in w.seeds], dtype=torch.int64)
        chunk = pipe.check_batch_size(None)
        out = []
        for a in range(0, len(y), chunk):  # what pipe.generate does per batch, with each digit's own seed
            sl = slice(a, a + chunk)
            out.append(pipe.decode(pipe.sample(pipe.noise(seeds[sl]), y[sl], seeds[sl], settings)))
        return list(torch.cat(out).split([w.size for w in batch]))
