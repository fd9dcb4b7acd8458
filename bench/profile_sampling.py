"""Where does sampling time go? PyTorch profiler over a few CFG sampling steps of a preset's UNet.

    python bench/profile_sampling.py --preset full --device cuda --batch 4096
    python bench/profile_sampling.py --preset quick --device cpu --batch 256

Prints the ops with the most self time, grouped into matmul/conv (compute) and the rest
(normalisation, element-wise, copies: memory-bound work that torch.compile can fuse).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import build_pipeline  # noqa: E402

COMPUTE = ("conv", "mm", "addmm", "bmm", "matmul", "linear", "attention", "gemm")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick")
    p.add_argument("--model", help="a trained LDM folder (default: random init from the preset)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="sampler steps to profile")
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()
    device = torch.device(args.device)
    pipe, _, _ = build_pipeline(args.preset, args.model, device)
    labels = [i % 10 for i in range(args.batch)]
    pipe.generate(labels, steps=args.steps, seed=0, batch_size=args.batch)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        pipe.generate(labels, steps=args.steps, seed=0, batch_size=args.batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    compute = sum(getattr(e, attr) for e in events if any(c in e.key.lower() for c in COMPUTE))
    print(events.table(sort_by=attr, row_limit=args.rows))
    print(f"compute ops (conv/matmul/attention): {100 * compute / total:.1f}% of self time; "
          f"everything else (norms, element-wise, copies): {100 * (1 - compute / total):.1f}%")


if __name__ == "__main__":
    main()
