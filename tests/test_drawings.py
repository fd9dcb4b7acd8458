"""A user's drawing read as the model reads digits (latentdiff.drawings): any PNG mode, white on black or refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from latentdiff.drawings import check_ground, grey


def one(side: int = 28) -> np.ndarray:
    a = np.zeros((side, side), np.uint8)
    a[side // 5: -side // 5, side // 2 - 2: side // 2 + 2] = 255
    return a


def reopened(im: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return Image.open(io.BytesIO(buf.getvalue()))


def test_16_bit_grey_is_scaled_not_clipped():
    ramp = (np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)
    im = reopened(Image.fromarray(ramp.astype(np.uint16) * 257))
    assert im.mode == "I;16" and np.asarray(im.convert("L"))[ramp > 0].min() == 255  # the old reading: all ink white
    assert np.array_equal(np.asarray(grey(im)), ramp)


@pytest.mark.parametrize("ground", [0, 255])
def test_a_transparent_ground_is_black_whatever_its_colour(ground):
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = ground
    rgba[..., 3] = one()  # opaque ink, transparent ground
    rgba[one() > 0, :3] = 255
    assert np.array_equal(np.asarray(grey(reopened(Image.fromarray(rgba, "RGBA")))), one())
    la = np.stack([np.full((28, 28), ground, np.uint8), one()], -1)
    la[one() > 0, 0] = 255
    assert np.array_equal(np.asarray(grey(Image.fromarray(la, "LA"))), one())


def test_rgb_and_palette_read_as_grey():
    rgb = np.repeat(one()[..., None], 3, -1)
    assert np.array_equal(np.asarray(grey(Image.fromarray(rgb, "RGB"))), one())
    assert np.array_equal(np.asarray(grey(Image.fromarray(one(), "L").convert("P"))), one())


def test_dark_ink_on_a_light_ground_is_refused_with_the_fix():
    check_ground(one() / 255.0, "image x.png")  # white on black: read
    with pytest.raises(ValueError, match=r"image x.png looks like dark ink on a light ground .* invert"):
        check_ground(1 - one() / 255.0, "image x.png")
    thick = np.zeros((28, 28))
    thick[:, 10:18] = 1  # a stroke that touches the border is still a white digit on black
    check_ground(thick, "image x.png")
