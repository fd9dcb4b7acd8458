"""How smoothly a distilled student's output follows its guidance-scale input w, next to its teacher's CFG.

    python bench/w_smoothness.py --student runs/ldm_fast --teacher runs/ldm

For fixed noisy latents (seed 0, one label per row, t = 999 by default) the student's UNet output is taken
at w = lo, lo + dw, ..., hi. The teacher's CFG output, uncond + w (cond - uncond), is linear in w: it moves by
the same amount at every step. Printed: the student's step sizes (min / median / max), its net slope per step
(end-to-end change / steps), the teacher's constant step, and the ratio of the student's path length to the
straight line between its ends (1.0 = as smooth as CFG). docs/distillation.md discusses what it found.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from latentdiff import LatentDiffusion  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="a distilled student's run folder")
    p.add_argument("--teacher", required=True, help="its teacher's run folder")
    p.add_argument("--lo", type=float, default=1.4)
    p.add_argument("--hi", type=float, default=1.6)
    p.add_argument("--dw", type=float, default=0.0025)
    p.add_argument("--t", type=int, default=999, help="timestep of the noisy latents")
    p.add_argument("--n", type=int, default=64, help="latents (labels cycle 0..9)")
    a = p.parse_args()
    student, teacher = LatentDiffusion.from_pretrained(a.student).unet, LatentDiffusion.from_pretrained(a.teacher).unet
    if not student.config.guidance_input or teacher.config.guidance_input:
        sys.exit("error: --student must be a distilled student and --teacher a plain LDM")
    torch.manual_seed(0)
    x = torch.randn(a.n, *teacher_shape(teacher))
    y, t = torch.arange(a.n) % teacher.config.num_classes, torch.full((a.n,), a.t)
    ws = torch.arange(a.lo, a.hi + a.dw / 2, a.dw)
    with torch.no_grad():
        outs = torch.stack([student(x, t, y, torch.full((a.n,), float(w))) for w in ws])  # (W, n, C, h, w)
        cond, uncond = teacher(x, t, y), teacher(x, t, torch.full_like(y, teacher.config.num_classes))
    steps = (outs[1:] - outs[:-1]).flatten(1).norm(dim=1)
    chord = (outs[-1] - outs[0]).flatten().norm()
    print(f"student step over dw = {a.dw:g} in [{a.lo:g}, {a.hi:g}], t = {a.t}: min {steps.min():.3f} / median "
          f"{steps.median():.3f} / max {steps.max():.3f}; net slope {chord / (len(ws) - 1):.3f} per step")
    print(f"teacher CFG step: {(a.dw * (cond - uncond)).flatten().norm():.3f} (constant)")
    print(f"path length / straight line: {steps.sum() / chord:.2f}  (1.00 = as smooth as CFG)")


def teacher_shape(unet) -> tuple[int, int, int]:
    c = unet.config
    return (c.in_channels, c.sample_size, c.sample_size)


if __name__ == "__main__":
    main()
