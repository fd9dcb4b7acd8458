"""Sampling speed of a distilled student next to its teacher, each at its default (or given) settings.

    python bench/distill_speed.py --teacher runs/ldm --student runs/ldm_fast --student-steps 1 2 4 --out speed.json
    python bench/distill_speed.py --teacher runs/ldm --student runs/ldm_fast --batch-size 4096 --compile   # a GPU

End to end per batch (noise -> sampler -> VAE decode -> [0,1] images), at one batch size. Teacher and
student batches alternate (teacher, student 1, student 2, ..., teacher, ...) so a drift in the shared
machine's speed hits every setting alike; the figure is the median over repeats, after one warm-up each.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from latentdiff import LatentDiffusion  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="the teacher's LDM folder")
    p.add_argument("--student", required=True, help="the student's LDM folder (distill_ldm.py)")
    p.add_argument("--student-steps", type=int, nargs="+", default=[None], help="student steps to time (default: its own)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="pipe.compile() both (each batch shape compiles once, "
                   "in the warm-up round)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher = LatentDiffusion.from_pretrained(args.teacher, device)
    student = LatentDiffusion.from_pretrained(args.student, device)
    if args.compile:
        teacher.compile(), student.compile()
    labels = [i % 10 for i in range(args.batch_size)]
    runs = {"teacher": lambda: teacher.generate(labels, seed=0, batch_size=args.batch_size)}
    for s in args.student_steps:
        steps = s or student.config.sample.steps
        runs[f"student {steps} steps"] = lambda steps=steps: student.generate(labels, seed=0, steps=steps,
                                                                               batch_size=args.batch_size)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.repeats + 1):  # round 0 is the warm-up
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times[name].append(time.perf_counter() - t)
    base = args.batch_size / statistics.median(times["teacher"])
    out = {"device": str(device), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "batch_size": args.batch_size, "repeats": args.repeats, "compile": args.compile,
           "teacher_settings": teacher.settings().to_kwargs(), "student_settings": student.settings().to_kwargs(),
           "digits_per_s": {}}
    print(f"batch {args.batch_size}, {torch.get_num_threads()} threads, median of {args.repeats}")
    for name, ts in times.items():
        rate = args.batch_size / statistics.median(ts)
        out["digits_per_s"][name] = rate
        print(f"{name:20s} {rate:8.1f} digits/s  ({rate / base:.2f}x teacher)  min {args.batch_size / max(ts):.1f} "
              f"max {args.batch_size / min(ts):.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
