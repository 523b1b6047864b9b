"""vlm.imaging on PNG and JPEG: round trips of every PIL mode the loader maps, and a real JPEG from
../shared/data when that folder exists."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.image_checks import check_image, png_bytes
from vlm.errors import InputError
from vlm.imaging import load_image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_png_round_trips():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (12, 17), dtype=np.uint8)
    img = load_image(png_bytes(Image.fromarray(grey)))
    check_image(img)
    assert np.array_equal(img.pixels, grey) and img.metadata["format"] == "PNG"

    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))  # 12-bit data in a 16-bit PNG
    img16 = Image.fromarray(ramp)
    assert img16.mode.startswith("I;16")
    out = load_image(png_bytes(img16)).pixels
    assert out.shape == ramp.shape and out.dtype == np.uint8
    assert out[0, 0] == 0 and out[0, -1] == 255 and (np.diff(out[0].astype(int)) >= 0).all()

    rgba = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    out = load_image(png_bytes(Image.fromarray(rgba, "RGBA"))).pixels
    assert np.array_equal(out, rgba[..., :3])

    colour = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert("P")
    assert np.array_equal(load_image(png_bytes(colour)).pixels, np.array(colour.convert("RGB")))
    grey_palette = Image.fromarray(grey).convert("P")
    assert load_image(png_bytes(grey_palette)).pixels.ndim == 2

    la = Image.fromarray(grey).convert("LA")
    assert np.array_equal(load_image(png_bytes(la)).pixels, grey)


def test_jpeg_round_trip():
    rng = np.random.default_rng(2)
    smooth = np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95, subsampling=0)
    img = load_image(buf.getvalue())
    check_image(img)
    assert img.metadata["format"] == "JPEG" and img.pixels.shape == smooth.shape
    assert np.abs(img.pixels.astype(int) - smooth).mean() < 6
    buf = io.BytesIO()
    Image.fromarray(smooth[..., 0]).save(buf, format="JPEG")
    assert load_image(buf.getvalue()).pixels.ndim == 2
    with pytest.raises(InputError, match="single frame"):
        load_image(buf.getvalue(), frame=2)


def test_real_jpeg_from_shared_data():
    folder = SHARED_DATA / "vqa_rad" / "images"
    if not folder.is_dir():
        pytest.skip(f"shared data not present at {folder}")
    path = sorted(folder.glob("*.jpg"))[0]
    img = load_image(path)
    check_image(img)
    with Image.open(path) as ref:
        assert img.pixels.shape[:2] == (ref.height, ref.width)
    assert img.metadata["format"] == "JPEG" and img.pixels.std() > 0
