"""A user's drawing, as the model reads digits: grey levels in [0, 1], white ink on a black ground.

One reading for every door a picture comes in by (edit.py's --image, teach.py's --images, the server's uploads):

* any PNG mode becomes grey: 16-bit grey (Pillow's ``I;16``) is scaled, not clipped to white as ``convert("L")``
  would; a transparent ground (RGBA, LA, a palette with transparency) is laid on black, as the web page draws;
* a picture whose border is mostly light is dark ink on a light ground (a scan, a drawing app's default): it is
  refused with the fix, not read as a light blot; MNIST digits, and so the model, have a black border.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# The border ring this many pixels wide, after scaling to 28x28; MNIST's is black (mean ~0) in every test digit.
BORDER = 2
LIGHT_GROUND = 0.5  # a ring brighter than this on average is a light ground


def grey(im: Image.Image) -> Image.Image:
    """``im`` in Pillow's 8-bit grey mode ``L``: alpha composited on black, 16-bit grey scaled to 8 bits."""
    if im.mode in SIXTEEN_BIT or im.mode == "I":  # a 16-bit grey PNG: 0..65535
        arr = np.asarray(im, dtype=np.float64) / 65535.0
        return Image.fromarray((arr.clip(0, 1) * 255).round().astype(np.uint8))  # 2-D uint8: mode L
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im.convert("RGBA"))
    return im.convert("L")


def ground_problem(digit: np.ndarray) -> str | None:
    """What is wrong with the ground of ``digit`` ((28, 28) in [0, 1]): dark ink on a light ground, or None."""
    ring = np.concatenate([digit[:BORDER].ravel(), digit[-BORDER:].ravel(),
                           digit[BORDER:-BORDER, :BORDER].ravel(), digit[BORDER:-BORDER, -BORDER:].ravel()])
    if ring.mean() <= LIGHT_GROUND:
        return None
    return (f"looks like dark ink on a light ground (its border averages {ring.mean():.2f} of white); the model reads "
            "white digits on black: invert the picture (e.g. PIL.ImageOps.invert)")


def check_ground(digit: np.ndarray, what: str) -> None:
    """Refuse dark ink on a light ground (ground_problem): ValueError starting with ``what``, which names the picture."""
    problem = ground_problem(digit)
    if problem:
        raise ValueError(f"{what} {problem}")
