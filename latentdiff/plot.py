"""Tiny line plots drawn with PIL (no matplotlib dependency): loss curves and sweep plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, title: str = "",
              xlabel: str = "", ylabel: str = "", logy: bool = False, size: tuple[int, int] = (640, 400)) -> None:
    """Plot named (xs, ys) series to a PNG; non-finite points are skipped."""
    w, h = size
    left, right, top, bottom = 70, 20, 30, 45
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    fy = (lambda v: math.log10(v)) if logy else (lambda v: v)
    pts = {k: [(x, fy(y)) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not logy)] for k, (xs, ys) in series.items()}
    allp = [p for v in pts.values() for p in v]
    if not allp:
        allp = [(0.0, 0.0), (1.0, 1.0)]
    x0, x1 = min(p[0] for p in allp), max(p[0] for p in allp)
    y0, y1 = min(p[1] for p in allp), max(p[1] for p in allp)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):  # axis ticks
        yv = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, yv)
        d.text((4, py - 6), f"{10 ** yv:.3g}" if logy else f"{yv:.3g}", fill="black")
        xv = x0 + (x1 - x0) * i / 4
        px, _ = to_px(xv, y0)
        d.text((px - 12, h - bottom + 6), f"{xv:.4g}", fill="black")
    for i, (name, p) in enumerate(pts.items()):
        color = COLORS[i % len(COLORS)]
        if len(p) > 1:
            d.line([to_px(*q) for q in p], fill=color, width=2)
        for q in p if len(p) <= 20 else []:
            px, py = to_px(*q)
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        d.text((left + 10, top + 8 + 14 * i), name, fill=color)
    d.text((left, 8), title, fill="black")
    d.text((w // 2 - 20, h - 18), xlabel, fill="black")
    d.text((4, top - 22), ylabel, fill="black")
    img.save(path)
