"""python -m latentdiff.serve --model runs/ldm [--host 127.0.0.1] [--port 8000]: the page and the HTTP API.

The page can teach the served model a new class from a few drawings (POST /api/teach; docs/teaching.md):
in memory only unless --teach-dir names a folder for the adapters; --no-teach turns it off."""

from __future__ import annotations

import argparse

import torch

from ..cli import run_main
from . import require_serve_extra


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m latentdiff.serve", description=__doc__)
    p.add_argument("--model", required=True, help="LDM run folder written by train_ldm.py (only read, never written)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available")
    p.add_argument("--max-images", type=int, default=100, help="digits per request (default 100)")
    p.add_argument("--max-steps", type=int, default=200, help="sampler steps per request (default 200)")
    t = p.add_argument_group("teaching a new class from the page (docs/teaching.md)")
    t.add_argument("--no-teach", action="store_true", help="turn teaching off (POST /api/teach answers 403)")
    t.add_argument("--teach-dir", help="save each class taught from the page there, as an adapter folder that "
                                       "LatentDiffusion.from_pretrained loads (default: nothing is written)")
    t.add_argument("--max-teach-steps", type=int, default=2000, help="teaching steps per request (default 2000; "
                                                                    "the default request teaches 600)")
    b = p.add_argument_group("batching (docs/scale.md)")
    b.add_argument("--max-batch", type=int, default=256, help="digits per model call; generate requests with equal "
                                                                "settings share one (default 256)")
    b.add_argument("--max-wait-ms", type=float, default=50.0, help="under concurrent load, a batch waits up to this "
                   "long after its oldest request for as many requests as the last call held (default 50; a lone "
                   "client never waits)")
    b.add_argument("--max-queue", type=int, default=64, help="requests waiting for the model; more get 503 + Retry-After "
                                                             "(default 64)")
    b.add_argument("--request-timeout", type=float, default=60.0, help="seconds a request may wait and run before a 503 "
                                                                      "(default 60)")
    args = p.parse_args(argv)
    require_serve_extra()
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_images < 1 or args.max_steps < 1 or args.max_teach_steps < 1:
        raise ValueError("--max-images, --max-steps and --max-teach-steps must be >= 1, got "
                         f"{args.max_images}, {args.max_steps} and {args.max_teach_steps}")
    if args.no_teach and args.teach_dir:
        raise ValueError("--teach-dir saves what the page teaches, and --no-teach turns teaching off; pass one")
    if args.max_batch < 1 or args.max_queue < 1 or args.max_wait_ms < 0 or not args.request_timeout > 0:
        raise ValueError("--max-batch and --max-queue must be >= 1, --max-wait-ms >= 0 and --request-timeout > 0; got "
                         f"{args.max_batch}, {args.max_queue}, {args.max_wait_ms} and {args.request_timeout}")

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but this machine has no CUDA GPU; use --device cpu")

    import uvicorn

    from ..pipeline import LatentDiffusion
    from ..teach import TeachConfig
    from .app import Batching, Limits, create_app

    pipe = LatentDiffusion.from_pretrained(args.model, device=device)
    app = create_app(pipe, args.model, Limits(max_images=args.max_images, max_steps=args.max_steps,
                                              max_teach_steps=args.max_teach_steps),
                     Batching(args.max_batch, args.max_wait_ms, args.max_queue, args.request_timeout),
                     None if args.no_teach else TeachConfig(), args.teach_dir)
    print(f"serving {args.model} on {pipe.device}: open http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    run_main(main)
