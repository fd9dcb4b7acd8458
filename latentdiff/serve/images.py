"""Images in and out of the HTTP API: base64 PNG/JPEG -> (1, 1, 28, 28) tensors, tensors -> PNG bytes."""

from __future__ import annotations

import base64
import binascii
import io
import struct

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..drawings import grey, ground_problem
from ..pipeline import make_grid
from .schema import invalid

MODEL_SIDE = 28  # the model's input: 28x28 grayscale, white digit on black, like MNIST
FORMATS = ("PNG", "JPEG")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def declared_png_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (bytes 16..24), read before PIL sees the file; None if not a PNG."""
    if raw[:8] != PNG_SIGNATURE or len(raw) < 24 or raw[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", raw[16:24])


def decode_image(field: str, value: str, max_side: int) -> torch.Tensor:
    """A base64 image (raw or a data: URL) -> (1, 1, 28, 28) float in [0, 1]; see ``decode_image_sized``."""
    return decode_image_sized(field, value, max_side)[0]


def decode_image_sized(field: str, value: str, max_side: int,
                       digit: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
    """A base64 image -> ((1, 1, 28, 28) float in [0, 1], its (width, height) as sent).

    Square images from 28 to ``max_side`` pixels are averaged down to 28x28; transparent pixels count as
    black, so a canvas with an alpha channel reads as drawn on black. A ``digit`` (not a mask) with a light
    ground is refused (drawings.ground_problem). The declared size is checked
    before any pixel is decoded, so a small file declaring a huge image (a decompression bomb) costs nothing.
    """
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise invalid(field, "must be a base64 data: URL like data:image/png;base64,...")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "is not valid base64; send the PNG file's bytes base64-encoded") from None
    too_big = f"must be a square image from {MODEL_SIDE}x{MODEL_SIDE} to {max_side}x{max_side} pixels, got"
    declared = declared_png_size(raw)
    if declared and max(declared) > max_side:  # before Image.open: PIL refuses huge sizes itself, as an exception we would not name
        raise invalid(field, f"{too_big} {declared[0]}x{declared[1]} (declared in its header)")
    try:
        im = Image.open(io.BytesIO(raw))  # reads the header only; pixels load after the size check
    except Image.DecompressionBombError:  # a JPEG declaring over ~179 megapixels
        raise invalid(field, f"{too_big} over {Image.MAX_IMAGE_PIXELS} pixels (declared in its header)") from None
    except (UnidentifiedImageError, OSError):
        raise invalid(field, f"is not an image; send a {' or '.join(FORMATS)} file") from None
    if im.format not in FORMATS:
        raise invalid(field, f"is a {im.format} image; send a {' or '.join(FORMATS)} file")
    w, h = im.size
    if w != h or not MODEL_SIDE <= w <= max_side:
        raise invalid(field, f"{too_big} {w}x{h}")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError):
        raise invalid(field, "is a truncated or corrupt image file") from None
    im = grey(im)  # alpha on black, 16-bit grey scaled
    if im.size != (MODEL_SIDE, MODEL_SIDE):
        im = im.resize((MODEL_SIDE, MODEL_SIDE), Image.BOX)  # box filter: each pixel is the mean of its cell
    arr = np.asarray(im, dtype=np.float32) / 255.0
    problem = ground_problem(arr) if digit else None
    if problem:
        raise invalid(field, problem)
    return torch.from_numpy(arr)[None, None], (w, h)  # (1, 1, 28, 28)


def png_bytes(images: torch.Tensor, nrow: int) -> bytes:
    """(N, 1, 28, 28) in [0, 1] -> a PNG grid, ``nrow`` images per row."""
    buf = io.BytesIO()
    make_grid(images, nrow=nrow).save(buf, format="PNG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
