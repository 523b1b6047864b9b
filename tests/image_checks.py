"""Checks and encoders the image tests share."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vlm.imaging import MedicalImage


def check_image(img: MedicalImage) -> None:
    assert isinstance(img, MedicalImage)
    assert img.pixels.dtype == np.uint8
    assert img.pixels.ndim == 2 or (img.pixels.ndim == 3 and img.pixels.shape[2] == 3)
    assert img.pixels.size > 0 and np.isfinite(img.pixels).all()
    assert 0 <= img.frame < img.num_frames
    pil = img.to_pil()
    assert pil.mode == "RGB" and pil.size == (img.pixels.shape[1], img.pixels.shape[0])


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
