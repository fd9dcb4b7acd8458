"""PyTorch vs ONNX Runtime on the CPU: one process generates ``--digits`` digits in batches of ``--batch``.

Time whole processes from outside (``/usr/bin/time -v``, or a pair of commands in turn), one per backend:

    python bench/onnx_speed.py --model runs/ldm_fast --backend torch --batch 16
    python bench/onnx_speed.py --model runs/ldm_fast --backend onnx --exported exported/ldm_fast --batch 16

Both load their model, make one warm-up batch, then the digits; the line printed is the steady state's own
timing (what docs/onnx.md quotes beside the whole-process ratio). ``--graph unet|decode`` times one network
call instead of whole digits (``--ort-level`` / ``--threads``: the ONNX Runtime settings tried).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the run folder (PyTorch; also the settings of --backend onnx)")
    p.add_argument("--exported", help="its export (python -m latentdiff.export), for --backend onnx")
    p.add_argument("--backend", choices=["torch", "onnx"], required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--digits", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    p.add_argument("--graph", choices=["unet", "decode"], help="time one network call of --batch rows instead")
    p.add_argument("--ort-level", choices=["basic", "extended", "all"], default="all")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    labels = [i % 10 for i in range(args.digits)]
    if args.backend == "torch":
        from latentdiff import LatentDiffusion

        pipe = LatentDiffusion.from_pretrained(args.model)
        pipe.tile_size = min(pipe.tile_size, args.batch)  # a batch of 16 runs as 16 rows, not a padded 64

        def one_call():
            x = torch.randn(args.batch, *pipe.vae.latent_shape)
            if args.graph == "decode":
                return pipe.decode(x)
            t, y = torch.full((args.batch,), 500), torch.zeros(args.batch, dtype=torch.long)
            return pipe.denoiser(x, t, y, *([torch.full((args.batch,), 1.5)] if pipe.unet.config.guidance_input else []))

        def digits(part):
            return pipe.generate(part, seed=0, batch_size=args.batch)
    else:
        from latentdiff.onnx_runner import OnnxDiffusion

        runner = OnnxDiffusion(args.exported, threads=args.threads, optimization=args.ort_level)
        shape = runner.latent_shape

        def one_call():
            x = torch.randn(args.batch, *shape)
            if args.graph == "decode":
                return runner.decode(x)
            feed = {"x": x.numpy(), "t": torch.full((args.batch,), 500).numpy(),
                    "labels": torch.zeros(args.batch, dtype=torch.long).numpy()}
            if runner.student:
                feed["scale"] = torch.full((args.batch,), 1.5).numpy()
            return runner.session("step" if runner.student else "step_cond").run(None, feed)

        def digits(part):
            return runner.generate(part, seed=0, batch_size=args.batch)
    if args.graph:
        one_call()
        reps = max(1, args.digits // args.batch)
        start = time.perf_counter()
        for _ in range(reps):
            one_call()
        per = (time.perf_counter() - start) / reps
        print(f"{args.backend} {args.graph} batch {args.batch}: {per * 1e3:.2f} ms a call, {per / args.batch * 1e6:.0f} us a row")
        return
    digits(labels[:args.batch])  # warm-up
    start = time.perf_counter()
    digits(labels)
    took = time.perf_counter() - start
    print(f"{args.backend} batch {args.batch}: {args.digits} digits in {took:.2f} s, {args.digits / took:.0f} digits/s")


if __name__ == "__main__":
    main()
