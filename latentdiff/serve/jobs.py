"""Teaching from the page: one background job at a time teaches the served pipeline a new class.

A job runs ``latentdiff.teach.teach`` in a thread of its own (tens of seconds on a CPU; the batcher keeps serving
meanwhile, on the pipeline as it was), builds the taught pipeline in memory (``teach.taught_pipeline``), writes
it as an adapter folder if the server has a teach folder, and hands it to ``swap``, which serves it from then on.
The job reports its progress (optimizer step of steps) until it is done (the new class's label) or failed (one
line). The model folder is only read.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .. import teach
from ..errors import LatentDiffError
from ..pipeline import LatentDiffusion
from .schema import RequestError

KEEP_JOBS = 16  # finished jobs a client can still ask about
log = logging.getLogger("latentdiff.serve")


class Cancelled(Exception):
    """The server is shutting down: a running job stops at its next step."""


@dataclass
class TeachJob:
    """One teach request: its progress, then its result (``label``) or its ``error``."""

    name: str
    steps: int
    examples: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    status: str = "running"  # running | done | failed
    step: int = 0  # optimizer steps done; 0 while the base draws its prior digits and the examples are encoded
    label: int | None = None  # the new class's index, once done
    adapter: str | None = None  # where its adapter was saved (a server with a teach folder)
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None  # wall time, once finished

    def view(self) -> dict:
        """The job as the API reports it."""
        out = {"id": self.id, "url": f"/api/teach/{self.id}", "name": self.name, "status": self.status,
               "step": self.step, "steps": self.steps, "examples": self.examples,
               "seconds": round(self.seconds if self.seconds is not None else time.monotonic() - self.started, 2)}
        extra = {"label": self.label, "adapter": self.adapter, "error": self.error}
        return {**out, **{k: v for k, v in extra.items() if v is not None}}


class Teacher:
    """Runs teach jobs one at a time and keeps the last ``KEEP_JOBS``; ``swap(pipe)`` serves a taught pipeline."""

    def __init__(self, config: teach.TeachConfig, swap: Callable[[LatentDiffusion], None],
                 teach_dir: Path | None = None, base_dir: Path | None = None, base_classes: int = 0):
        config.validate()
        self.config, self.swap = config, swap
        # with a teach folder: each job's adapter (every class taught so far on the base LDM) is written there
        self.teach_dir, self.base_dir, self.base_classes = teach_dir, base_dir, base_classes
        self.lock = threading.Lock()
        self.jobs: OrderedDict[str, TeachJob] = OrderedDict()
        self.running: TeachJob | None = None
        self.closed = False

    def info(self) -> dict:
        with self.lock:
            running = self.running.id if self.running else None
        return {"method": self.config.method, "default_steps": self.config.steps, "min_images": teach.MIN_EXAMPLES,
                "saves_to": str(self.teach_dir) if self.teach_dir else None, "running": running}

    def view(self, job_id: str) -> dict | None:
        """The job's report (``TeachJob.view``), read whole while its thread may be finishing it; None if unknown."""
        with self.lock:
            job = self.jobs.get(job_id)
            return job.view() if job else None

    def start(self, prepare: Callable[[], tuple[LatentDiffusion, torch.Tensor, str, int]]) -> dict:
        """Start a job, or a 409 while one runs: ``prepare()`` checks the request and gives (the pipeline served now,
        images (K, 1, 28, 28), name, steps). It runs under the lock that a finishing job swaps under, so the job
        teaches the pipeline its name was checked against. The job's first report."""
        with self.lock:
            if self.closed:
                raise RequestError(503, "the server is shutting down; teach again once it is back")
            if self.running is not None:
                r = self.running
                raise RequestError(409, f"a teach job is already running ({r.name!r}, step {r.step} of {r.steps}); one "
                                        f"runs at a time: wait until GET {r.view()['url']} says done, then teach again")
            pipe, images, name, steps = prepare()
            job = self.running = TeachJob(name, steps, len(images))
            self.jobs[job.id] = job
            while len(self.jobs) > KEEP_JOBS:
                self.jobs.popitem(last=False)
            view = job.view()
        cfg = replace(self.config, steps=steps)
        threading.Thread(target=self._run, args=(job, pipe, images, cfg), name="latentdiff-teach", daemon=True).start()
        return view

    def close(self) -> None:
        """Refuse new jobs; a running one stops at its next step."""
        with self.lock:
            self.closed = True

    # ------------------------------------------------------------------ the job's thread
    def _progress(self, job: TeachJob) -> Callable[[int, int], None]:
        def callback(step: int, steps: int) -> None:
            if self.closed:
                raise Cancelled("the server shut down while teaching; teach again")
            job.step = step
        return callback

    def _run(self, job: TeachJob, pipe: LatentDiffusion, images: torch.Tensor, cfg: teach.TeachConfig) -> None:
        label = adapter = error = None
        try:
            unet = teach.teach(pipe, images, cfg, callback=self._progress(job))
            taught = teach.taught_pipeline(pipe, unet, job.name, cfg)
            if self.teach_dir is not None:
                adapter = str(self._save(job, taught, cfg))
            label = taught.num_classes - 1
        except (Cancelled, ValueError, LatentDiffError, OSError) as e:  # teach's own checks, a diverged loss, a full disk
            error = str(e)
        except Exception as e:  # noqa: BLE001 - the job reports it; the server keeps serving
            log.error("teach job %s (%r) failed", job.id, job.name, exc_info=e)
            error = "internal error while teaching; the server log has the details"
        with self.lock:  # swapped with "done": a client told done finds the class, and the next job teaches it on
            if error is None:
                self.swap(taught)
                log.info("taught %r as class %d from %d examples in %d steps", job.name, label, job.examples, cfg.steps)
            job.label, job.adapter, job.error = label, adapter, error
            job.status = "failed" if error else "done"
            job.seconds = time.monotonic() - job.started
            self.running = None

    def _save(self, job: TeachJob, taught: LatentDiffusion, cfg: teach.TeachConfig) -> Path:
        """The adapter of every class taught on the base so far, in a new folder named after the class and the job."""
        slug = re.sub(r"[^A-Za-z0-9_-]+", "_", job.name).strip("_") or "class"
        names = taught.class_names[self.base_classes:]
        info = {"teach": asdict(cfg), "examples": job.examples, "taught_by": "latentdiff.serve"}
        return teach.save_taught(self.teach_dir / f"{slug}-{job.id}", self.base_dir, taught, names, info)
