"""The ASGI app: JSON API over one LatentDiffusion pipeline, plus the static page.

Routes: GET /api/health, GET /api/info, POST /api/generate, POST /api/img2img, POST /api/inpaint,
POST /api/every_class, POST /api/teach + GET /api/teach/<id>, GET / (the page), /favicon.ico, /static/* and
GET /metrics (Prometheus text format). Model calls run in the batcher's one worker thread (the event loop keeps
answering): generate requests with equal settings share a model call, edits run alone (see batcher.py). A full
queue answers 503 with Retry-After; so does a request that waited longer than the request timeout.

Teaching (jobs.py) replaces the served pipeline with a taught one while the server runs. Each request is
checked against, and runs on, the pipeline served when it arrived (``Served``, swapped whole): requests
already queued finish on the old one, later ones see the new class, and no model call mixes the two.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import edit, teach
from ..config import SampleConfig
from ..pipeline import LatentDiffusion
from . import schema
from .batcher import Batcher, QueueFull, Work, generate_work
from .images import data_url, decode_image, decode_image_sized, png_bytes
from .jobs import Teacher
from .metrics import CountRequests, Metrics
from .schema import Field, RequestError

STATIC_DIR = Path(__file__).resolve().parent / "static"
EDITS = ("img2img", "inpaint", "every_class")
# img2img: on the quick model a drawn 1 turns into a 7 in most variants from about 0.7, and keeps its
# stroke layout up to about 0.8 (tried at guidance 1.5 and 3, strengths 0.6-0.9)
DEFAULT_STRENGTH = 0.75
log = logging.getLogger("latentdiff.serve")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; protects a shared server from one huge request."""

    max_images: int = 100  # digits per request (classes x per_label, or edit variants)
    max_steps: int = 200  # sampler steps (also capped by the model's num_timesteps)
    max_scale: float = 100.0  # guidance_scale and autoguidance_scale (SampleConfig's own range has no top)
    max_eta: float = 1.0  # DDIM's eta (1 = DDPM's ancestral noise)
    max_image_side: int = 512  # uploaded images: square, 28..this many pixels a side
    max_body_bytes: int = 4 * 1024 * 1024  # request body (two 512x512 RGBA PNGs in base64 fit)
    max_teach_images: int = 50  # drawings per teach request (K = 5, 10, 50 measured: docs/teaching.md)
    max_teach_steps: int = 2000  # teaching steps per request (the default 600 take about a minute on a CPU)


@dataclass(frozen=True)
class Batching:
    """How the batcher merges requests, and how long a request may wait (defaults measured: docs/scale.md)."""

    max_batch: int = 256  # digits per model call: CPU throughput is flat from here (pipeline's default batch)
    # Under concurrent load (the last call merged requests), a batch waits up to this long after its oldest
    # request for as many requests as the last call held; a lone client never waits (latency as unbatched).
    max_wait_ms: float = 50.0
    max_queue: int = 64  # requests waiting; more are answered 503 with Retry-After
    request_timeout_s: float = 60.0  # a request not answered by then gets a 503 (and is dropped if not started)


@dataclass(frozen=True)
class Served:
    """The pipeline that answers new requests and the request specs that depend on its classes. Teaching replaces
    both in one assignment; a request takes the ``Served`` of its arrival and is checked against and run on it."""

    pipe: LatentDiffusion
    specs: dict[str, dict[str, Field]]


class ModelService:
    """The served pipeline, the batcher and its lock, the teacher, and the request specs of the model and limits."""

    def __init__(self, pipe: LatentDiffusion, model_dir: str | Path, limits: Limits, batching: Batching,
                 teach_config: teach.TeachConfig | None = None, teach_dir: str | Path | None = None):
        self.model_dir, self.limits, self.batching = str(model_dir), limits, batching
        self.batcher = Batcher(pipe, batching.max_batch, batching.max_wait_ms, batching.max_queue,
                               on_batch=lambda *a: self.metrics.batch(*a))
        self.metrics = Metrics(lambda: self.batcher.depth, self.batcher.queued_digits)
        self.lock = self.batcher.lock  # held during each model call
        self.edits = list(EDITS)
        self.max_steps = min(limits.max_steps, pipe.config.diffusion.num_timesteps)
        self.teacher, self.teach_off = None, None
        if teach_config is None:
            self.teach_off = "the server was started with --no-teach"
        elif pipe.unet.config.guidance_input:
            self.teach_off = "its model is a distilled student; serve the LDM folder (the teacher) to teach"
        else:
            self.teacher = self._teacher(pipe, teach_config, teach_dir)
        self.served = self.serving(pipe)

    @property
    def pipe(self) -> LatentDiffusion:
        """The pipeline answering new requests."""
        return self.served.pipe

    def _teacher(self, pipe: LatentDiffusion, config: teach.TeachConfig, teach_dir: str | Path | None) -> Teacher:
        if config.steps > self.limits.max_teach_steps:
            config = replace(config, steps=self.limits.max_teach_steps)
        if teach_dir is None:
            return Teacher(config, self.swap)
        teach_dir = Path(teach_dir).resolve()
        base_dir, taught, _ = teach.base_of(self.model_dir)
        for folder in {Path(self.model_dir).resolve(), base_dir}:
            if teach_dir == folder or folder in teach_dir.parents:
                raise ValueError(f"--teach-dir {teach_dir} is inside the model folder {folder}, which the server never "
                                 "writes; pick a folder outside it")
        if teach_dir.exists() and not teach_dir.is_dir():
            raise ValueError(f"--teach-dir {teach_dir} is a file; pass a folder (created if missing)")
        return Teacher(config, self.swap, teach_dir, base_dir, pipe.num_classes - len(taught))

    def serving(self, pipe: LatentDiffusion) -> Served:
        """``pipe`` and the request specs for its classes, capped by the server's limits."""
        names, lim = pipe.class_names, self.limits
        # The sampling fields: their ranges and choices are SampleConfig's (capped by the server's limits); absent or
        # null means the model's default (``settings``), and ``pipe.settings`` checks the whole once more.
        caps = {"guidance_scale": lim.max_scale, "autoguidance_scale": lim.max_scale, "eta": lim.max_eta}
        low = SampleConfig.NUMBERS
        sampling = {
            **{k: Field(schema.number(low[k][0], caps[k])) for k in ("guidance_scale", "autoguidance_scale")},
            "steps": Field(schema.integer(1, self.max_steps)),
            "sampler": Field(schema.choice(SampleConfig.choices("sampler"))),
            "spacing": Field(schema.choice(SampleConfig.choices("spacing"))),
            "seed": Field(schema.integer(0, schema.MAX_SEED)),
            "format": Field(schema.choice(["json", "png"]), default="json"),
        }
        image = Field(schema.text(lim.max_body_bytes), required=True)
        label = schema.one_class(names)
        edit_fields = {"label": Field(label, required=True), "count": Field(schema.integer(1, lim.max_images), default=1),
                       "image": image, **sampling}
        specs = {
            "generate": {"labels": Field(schema.classes(names, lim.max_images), required=True),
                         "per_label": Field(schema.integer(1, lim.max_images), default=1),
                         "eta": Field(schema.number(low["eta"][0], caps["eta"])), **sampling},
            "img2img": {"strength": Field(schema.number(0, 1), default=DEFAULT_STRENGTH), **edit_fields},
            "inpaint": {"mask": image, **edit_fields},
            # the drawn digit in every class by DDIM inversion (edit.every_class): deterministic, so no seed or
            # sampler; label is the drawn digit's own class (absent: inverted without a label)
            "every_class": {"image": image, "label": Field(label),
                            "strength": Field(schema.number(0, 1), default=edit.SWAP_STRENGTH), "format": sampling["format"],
                            "guidance_scale": Field(sampling["guidance_scale"].check, default=edit.SWAP_GUIDANCE),
                            **{k: sampling[k] for k in ("steps", "spacing")}},
        }
        if self.teacher is not None:  # the new class's name must be new to this pipeline (teach.check_name)
            specs["teach"] = {"name": Field(lambda f, v: field_error(f, teach.check_name, pipe, v), required=True),
                              "images": Field(schema.text_list(teach.MIN_EXAMPLES, lim.max_teach_images,
                                                               lim.max_body_bytes), required=True),
                              "steps": Field(schema.integer(1, lim.max_teach_steps), default=self.teacher.config.steps)}
        return Served(pipe, specs)

    def swap(self, pipe: LatentDiffusion) -> None:
        """Serve ``pipe`` (a taught pipeline) from the next request on; queued requests keep the one they came with."""
        self.served = self.serving(pipe)
        self.batcher.pipe = pipe

    def info(self) -> dict:
        pipe = self.pipe
        sc = pipe.config.sample
        return {
            "model": self.model_dir, "device": str(pipe.device), "classes": list(range(pipe.num_classes)),
            "class_names": list(pipe.class_names),
            "samplers": SampleConfig.choices("sampler"), "spacings": SampleConfig.choices("spacing"), "edits": self.edits,
            "defaults": {**sc.to_kwargs(), "has_guide": pipe.guide is not None,
                         "per_label": 1, "strength": DEFAULT_STRENGTH, "count": 1},
            "limits": {**asdict(self.limits), "max_steps": self.max_steps, "max_seed": schema.MAX_SEED},
            "batching": asdict(self.batching),
            "teach": {"enabled": False, "reason": self.teach_off} if self.teacher is None else
                     {"enabled": True, **self.teacher.info()},
        }

    def settings(self, pipe: LatentDiffusion, req: dict[str, Any]) -> dict[str, Any]:
        """The request with ``pipe``'s defaults and a drawn seed filled in: sending it back reproduces the result.
        The sampling fields become one checked ``SampleConfig`` (``pipe.settings``): a bad combination, e.g.
        autoguidance without a guide model, is a 422 here."""
        out = {k: v for k, v in req.items() if k not in ("image", "mask", "format")}
        given = {k: out[k] for k in SampleConfig.CALL_KEYS if k in out}
        resolved = pipe.settings(**given).to_kwargs()
        out.update({k: resolved[k] for k in given})
        if out.get("seed", 0) is None:
            out["seed"] = random.SystemRandom().randrange(2**31)
        return out

    async def run(self, work: Work) -> tuple[torch.Tensor, float]:
        """Queue ``work`` and wait for it: (images, seconds of its model call, not the wait)."""
        try:
            future = self.batcher.submit(work)
        except QueueFull as e:
            raise RequestError(503, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        timeout = self.batching.request_timeout_s
        try:  # a timeout cancels the future: a request still queued is dropped, not computed for nobody
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            raise RequestError(503, f"no answer within the {timeout:g} s request timeout: the server is overloaded "
                                    f"({self.batcher.depth} requests queued); retry later",
                               headers={"Retry-After": str(max(1, round(timeout)))}) from None

    # ------------------------------------------------------------------ the model calls
    def generate_work(self, pipe: LatentDiffusion, s: dict) -> tuple[Work, int]:
        if len(s["labels"]) * s["per_label"] > self.limits.max_images:
            raise RequestError(422, f"labels x per_label is {len(s['labels'])} x {s['per_label']} = "
                                    f"{len(s['labels']) * s['per_label']} digits; the limit is {self.limits.max_images}",
                               "per_label")
        labels = [c for c in s["labels"] for _ in range(s["per_label"])]  # one grid row per class
        settings = {k: s[k] for k in SampleConfig.CALL_KEYS if k in s}
        return generate_work(labels, s["seed"], settings, pipe), s["per_label"]

    def edit_work(self, pipe: LatentDiffusion, name: str, s: dict, image: torch.Tensor,
                  mask: torch.Tensor | None) -> tuple[Work, int]:
        """Edits run alone through the same queue: the editing functions take one seed per call, not one per digit."""
        if name == "every_class":
            kwargs = {k: s[k] for k in ("guidance_scale", "steps", "spacing")}
            fn = lambda: edit.every_class(pipe, image, s["label"], strength=s["strength"], **kwargs)  # noqa: E731
            return Work(size=pipe.num_classes, key=None, fn=fn), pipe.num_classes
        n = s["count"]
        kwargs = {**{k: s[k] for k in SampleConfig.CALL_KEYS if k in s}, "seed": s["seed"]}
        images, labels = image.expand(n, -1, -1, -1), [s["label"]] * n  # variants i use seed + i
        if name == "img2img":
            fn = lambda: edit.img2img(pipe, images, labels, s["strength"], **kwargs)  # noqa: E731
        else:
            fn = lambda: edit.inpaint(pipe, images, mask, labels, **kwargs)  # noqa: E731
        return Work(size=n, key=None, fn=fn), n

    def start_teaching(self, body: Any) -> dict:
        """Check a teach request against the pipeline served now and start its job (jobs.Teacher): its first report."""
        if self.teacher is None:
            raise RequestError(403, f"this server does not teach new classes: {self.teach_off}")

        def prepare() -> tuple[LatentDiffusion, torch.Tensor, str, int]:
            served = self.served  # no job runs, so none swaps in another pipeline until this one starts
            req = schema.parse(body, served.specs["teach"])
            side = self.limits.max_image_side
            images = torch.cat([decode_image(f"images[{i}]", v, side) for i, v in enumerate(req["images"])])  # (K, 1, 28, 28)
            return served.pipe, images, req["name"], req["steps"]
        return self.teacher.start(prepare)


def field_error(field: str, check, *args) -> Any:
    """``check(*args)``, its ValueError answered as a 422 naming ``field``."""
    try:
        return check(*args)
    except ValueError as e:
        raise RequestError(422, str(e), field) from None


async def read_body(request: Request, limit: int) -> Any:
    """The JSON body, refusing wrong content types and bodies over ``limit`` bytes before reading them whole."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise RequestError(415, f"send the body as JSON with Content-Type: application/json (got {ctype or 'none'!r})")
    length = request.headers.get("content-length")
    too_big = RequestError(413, f"the body is over the {limit}-byte limit; send smaller images")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_big
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise too_big
    return schema.decode_json(bytes(raw))


def respond(images: torch.Tensor, nrow: int, seconds: float, settings: dict, fmt: str, extra: dict | None = None) -> Response:
    png = png_bytes(images, nrow)
    if fmt == "png":  # raw PNG; the settings travel in a header so the result stays reproducible
        return Response(png, media_type="image/png", headers={"X-Settings": json.dumps(settings),
                                                               "X-Seconds": f"{seconds:.4f}"})
    return JSONResponse({"image": data_url(png), "settings": settings, "seconds": round(seconds, 4),
                         "count": len(images), "columns": nrow, **(extra or {})})


def create_app(pipe: LatentDiffusion, model_dir: str | Path, limits: Limits | None = None,
               batching: Batching | None = None, teach_config: teach.TeachConfig | None = teach.TeachConfig(),
               teach_dir: str | Path | None = None) -> Starlette:
    """The Starlette app serving ``pipe`` (loaded from ``model_dir``, which the server only reads).

    ``teach_config``: how POST /api/teach teaches a new class (its steps the default a request may change within
    ``limits``); None turns teaching off. ``teach_dir``: a folder to save each taught class's adapter in
    (``teach.save_adapter``); None writes nothing."""
    service = ModelService(pipe, model_dir, limits or Limits(), batching or Batching(), teach_config, teach_dir)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def info(request: Request) -> Response:
        return JSONResponse(service.info())

    async def generate(request: Request) -> Response:
        body = await read_body(request, service.limits.max_body_bytes)
        served = service.served  # checked against and run on the pipeline served now
        req = schema.parse(body, served.specs["generate"])
        settings = service.settings(served.pipe, req)
        work, nrow = service.generate_work(served.pipe, settings)
        images, seconds = await service.run(work)
        return await run_in_threadpool(respond, images, nrow, seconds, settings, req["format"])

    def edit_route(name: str):
        async def handler(request: Request) -> Response:
            body = await read_body(request, service.limits.max_body_bytes)
            served = service.served
            req = schema.parse(body, served.specs[name])
            side = service.limits.max_image_side
            image, size = decode_image_sized("image", req["image"], side)
            mask = None
            if name == "inpaint":
                mask, mask_size = decode_image_sized("mask", req["mask"], side, digit=False)
                if mask_size != size:  # both are scaled to 28x28, but a mask drawn for another image is a client bug
                    raise schema.invalid("mask", f"is {mask_size[0]}x{mask_size[1]} but image is {size[0]}x{size[1]}; "
                                                 "send a mask of the same size as the image")
                mask = (mask >= 0.5).float()  # 1 = keep
            settings = service.settings(served.pipe, req)
            work, nrow = service.edit_work(served.pipe, name, settings, image, mask)
            images, seconds = await service.run(work)
            return respond(images, nrow, seconds, settings, req["format"], {"input": data_url(png_bytes(image, 1))})
        return handler

    async def teach_start(request: Request) -> Response:
        job = service.start_teaching(await read_body(request, service.limits.max_body_bytes))
        return JSONResponse(job, status_code=202, headers={"Location": job["url"]})

    async def teach_status(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        job = service.teacher.view(job_id) if service.teacher else None
        if job is None:
            raise RequestError(404, f"no teach job {job_id!r} on this server (it keeps the last few until it "
                                    "restarts); POST /api/teach starts one")
        return JSONResponse(job)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html")

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def favicon(request: Request) -> Response:  # browsers ask for it whatever the page links
        return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon")

    routes = [Route("/", page), Route("/favicon.ico", favicon), Route("/api/health", health), Route("/api/info", info), Route("/metrics", metrics),
              Route("/api/generate", generate, methods=["POST"]),
              *[Route(f"/api/{name}", edit_route(name), methods=["POST"]) for name in EDITS],
              Route("/api/teach", teach_start, methods=["POST"]), Route("/api/teach/{job_id}", teach_status),
              Mount("/static", StaticFiles(directory=STATIC_DIR), name="static")]
    @asynccontextmanager
    async def lifespan(app):
        yield
        if service.teacher is not None:
            service.teacher.close()  # a running teach job stops at its next step
        await run_in_threadpool(service.batcher.close)  # finish the model call in progress, refuse the queue

    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(CountRequests, metrics=service.metrics)],
                    exception_handlers={RequestError: request_error, ValueError: value_error, HTTPException: http_error,
                                        Exception: server_error})
    app.state.service = service
    return app


async def request_error(request: Request, exc: RequestError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def value_error(request: Request, exc: ValueError) -> Response:
    """The pipeline's and the editing functions' own checks: their messages name the argument and the range."""
    return JSONResponse({"error": str(exc)}, status_code=422)


async def http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"no such endpoint {request.url.path}; see GET /api/info",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


async def server_error(request: Request, exc: Exception) -> Response:
    """Anything unexpected: logged here with its trace, answered without one."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal server error; the server log has the details"}, status_code=500)
