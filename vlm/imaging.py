"""Read PNG, JPEG and DICOM into display-ready 8-bit pixels for the vision tower.

Every problem a user can cause raises InputError with a sentence a clinician can act on. DICOM
reading, its memory bounds and its metadata whitelist live in vlm.dicom; this module turns decoded
values into display pixels (modality LUT, VOI LUT or window, MONOCHROME1). Identifying tags are
never even accessed (pydicom converts, and may warn about, an element only when it is read), so
they reach neither the result nor any log.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from vlm.dicom import NOT_AN_IMAGE, check_size, dicom_metadata, frame_attr, frame_number, read_dicom
from vlm.dicom_terms import PHOTOMETRICS, known_term
from vlm.errors import InputError

log = logging.getLogger(__name__)

# CT windows as (center, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0), "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0), "brain": (40.0, 80.0),
}

# DICOM without the 128-byte preamble starts with a group 0002 or 0008 tag (either byte order).
_BARE_DICOM_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_AUTO_PERCENTILES = (0.5, 99.5)
_AUTO_SAMPLE = 1_000_000  # percentiles of a strided sample: the same window in a fraction of the time
_CHUNK = 2**20  # values mapped to uint8 at a time: float temporaries stay a few MB whatever the image


@dataclass
class MedicalImage:
    """Display-ready pixels (uint8, HxW grey or HxWx3 RGB) and a de-identified summary."""

    pixels: np.ndarray
    metadata: dict = field(default_factory=dict)
    num_frames: int = 1
    frame: int = 0

    def to_pil(self) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.pixels)).convert("RGB")


def load_image(source: str | os.PathLike | bytes | BinaryIO, *, window: str | tuple[float, float] | None = None,
               frame: int | None = None, max_pixels: int = 50_000_000, max_bytes: int = 512 * 2**20) -> MedicalImage:
    """Read a PNG, JPEG or DICOM image from a path, bytes or a binary file object.

    The format is recognised from the content, not the name. `window` (a WINDOW_PRESETS name or
    a (center, width) pair) applies to greyscale DICOM; without it the file's own VOI LUT or
    window is used, else an automatic one. `frame` picks a frame of multi-frame DICOM (default:
    the middle one). Raises InputError for anything unusable.
    """
    chosen = _resolve_window(window) if window is not None else None
    data, name = _read_source(source, max_bytes)
    if data[128:132] == b"DICM":
        return _load_dicom(data, chosen, frame, max_pixels, max_bytes, bare=False)
    raster = _open_raster(data, max_pixels)
    if raster is not None:
        return _load_raster(raster, frame)
    if name.lower().endswith(_DICOM_SUFFIXES) or data[:2] in _BARE_DICOM_STARTS:
        return _load_dicom(data, chosen, frame, max_pixels, max_bytes, bare=True)
    raise InputError(NOT_AN_IMAGE)


def describe_metadata(meta: dict) -> str:
    """One line for the UI, e.g. 'DICOM CT, CHEST, 512x512, frame 2 of 10, window lung (C -600, W 1500)'."""
    m = meta
    parts = [" ".join(str(m[k]) for k in ("format", "modality") if m.get(k)) or "Image",
             m.get("body_part"), m.get("view") and f"view {m['view']}",
             m.get("columns") and m.get("rows") and f"{m['columns']}x{m['rows']}",
             (m.get("num_frames") or 1) > 1 and f"frame {m.get('frame', 0) + 1} of {m['num_frames']}",
             m.get("pixel_spacing") and "{:g}x{:g} mm pixels".format(*m["pixel_spacing"]),
             m.get("bits_stored") and f"{m['bits_stored']}-bit"]
    parts = [str(p) for p in parts if p]
    if meta.get("window"):
        c, w = meta.get("window_center"), meta.get("window_width")
        parts.append(f"window {meta['window']}" + (f" (C {c:g}, W {w:g})" if c is not None and w is not None else ""))
    return ", ".join(parts)


def _resolve_window(window) -> tuple[str, tuple[float, float]]:
    if isinstance(window, str):
        key = window.strip().lower().replace(" ", "_").replace("-", "_")
        if key not in WINDOW_PRESETS:
            raise InputError(f"Unknown window '{window}'. Choose one of {', '.join(WINDOW_PRESETS)}, "
                             "or give a center and width.")
        return key, WINDOW_PRESETS[key]
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError) as e:
        raise InputError("A window must be a preset name or a pair of numbers (center, width).") from e
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        raise InputError("The window center must be a number and the window width a positive number.")
    return "custom", (center, width)


def _read_source(source, max_bytes: int) -> tuple[bytes, str]:
    """Return the file's bytes and its name (the name only helps to recognise bare DICOM)."""
    name = ""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError("No image file was found at the given path (it is missing or a folder).")
        _check_bytes(path.stat().st_size, max_bytes)  # before reading a huge file into memory
        try:
            data, name = path.read_bytes(), path.name
        except OSError as e:
            raise InputError("The file could not be read (no permission, or a disk error).") from e
    elif hasattr(source, "read"):
        # One byte more than allowed tells us it is too big; bytes() rejects a text-mode file.
        data, name = bytes(source.read(max_bytes + 1)), str(getattr(source, "name", "") or "")
    else:
        raise TypeError(f"load_image takes a path, bytes or a binary file object, not {type(source).__name__}")
    _check_bytes(len(data), max_bytes)
    if not data:
        raise InputError("The file is empty.")
    return data, name


def _check_bytes(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise InputError(f"The file is {size / 2**20:,.1f} MB; the limit is {max_bytes / 2**20:,.1f} MB.")


def _open_raster(data: bytes, max_pixels: int) -> Image.Image | None:
    """Open a PNG or JPEG lazily (header only) and check its size; None if it is neither."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        check_size(*struct.unpack(">II", data[16:24]), max_pixels)  # IHDR: name a bomb's size exactly
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
    except UnidentifiedImageError:
        return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"The image is too large to decode safely; the limit is {max_pixels:,} pixels.") from e
    except Exception as e:  # Pillow raises many types for a damaged header
        raise InputError("The PNG or JPEG file is damaged and cannot be read.") from e
    check_size(*img.size, max_pixels)
    return img


def _load_raster(img: Image.Image, frame: int | None) -> MedicalImage:
    if frame not in (None, 0):
        raise InputError(f"Frame {frame} does not exist; a PNG or JPEG image has a single frame (0).")
    fmt = "JPEG" if img.format in ("JPEG", "MPO") else "PNG"
    try:
        img.load()
        if fmt == "JPEG":
            img = ImageOps.exif_transpose(img)  # photos of films are often stored rotated
        pixels, bits = _raster_pixels(img)
    except Exception as e:  # truncated data, broken EXIF, corrupt stream
        raise InputError(f"The {fmt} file is truncated or damaged and cannot be decoded.") from e
    height, width = pixels.shape[:2]
    meta = {"format": fmt, "rows": height, "columns": width, "size": [width, height], "num_frames": 1, "frame": 0,
            "photometric": "RGB" if pixels.ndim == 3 else "MONOCHROME2", "bits_stored": bits}
    log.debug("Loaded a %s image of %dx%d pixels", fmt, width, height)
    return MedicalImage(pixels=pixels, metadata=meta, num_frames=1, frame=0)


def _raster_pixels(img: Image.Image) -> tuple[np.ndarray, int]:
    """Map any PIL mode to uint8 grey or RGB; return the pixels and the source bit depth."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit medical PNGs often hold 10-12 bit data: stretch the actual range, not 0..65535.
        pixels, _ = _auto_window(np.asarray(img))  # in its own dtype: no full-size float copy
        return pixels, 16 if img.mode.startswith("I;16") else 32
    if img.mode in ("1", "L", "LA", "La"):
        return np.array(img.convert("L")), 1 if img.mode == "1" else 8
    rgb = np.array(img.convert("RGB"))  # P, PA, RGBA, CMYK, YCbCr...; alpha is dropped
    if img.mode in ("P", "PA") and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return np.ascontiguousarray(rgb[..., 0]), 8  # a grey palette stays grey
    return rgb, 8


def _load_dicom(data: bytes, chosen, frame: int | None, max_pixels: int, max_bytes: int, *,
                bare: bool) -> MedicalImage:
    f = read_dicom(data, frame, max_pixels, max_bytes, bare=bare)
    pixels, used = _dicom_display(f.values, f.ds, f.index, chosen)
    if pixels.shape not in ((f.rows, f.cols), (f.rows, f.cols, 3)):  # e.g. a palette table of odd shape
        raise InputError("The DICOM image could not be shown as a grey or colour image of the size its header "
                         "declares.")
    meta = dicom_metadata(f.ds, f.rows, f.cols, f.num_frames, f.index) | used
    log.debug("Loaded a DICOM %s image of %dx%d pixels, frame %d of %d, window %s",
              meta["modality"] or "", f.cols, f.rows, f.index + 1, f.num_frames, meta["window"])
    return MedicalImage(pixels=pixels, metadata=meta, num_frames=f.num_frames, frame=f.index)


def _dicom_display(arr: np.ndarray, ds, index: int, chosen) -> tuple[np.ndarray, dict]:
    """Decoded stored values -> uint8 display pixels, and the window used (for the metadata)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(arr, ds)
            return _to_uint8(rgb, 0.0, 65535.0 if rgb.dtype.itemsize > 1 and rgb.max() > 255 else 255.0), {}
        if arr.ndim == 3:  # RGB, or YBR that pydicom already converted to RGB
            return _to_uint8(arr, 0.0, float(2 ** int(ds.get("BitsStored", arr.dtype.itemsize * 8)) - 1)), {}
    except Exception as e:
        raise InputError("The colour data of this DICOM image is invalid.") from e
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        name = known_term(photometric, PHOTOMETRICS)  # never echo free text from the file
        raise InputError(f"The DICOM colour model {name or '(not a DICOM term)'} is not supported.")
    pixels, used = _grey_window(_modality(arr, ds, index), ds, index, chosen)
    if photometric == "MONOCHROME1":  # low values are white in MONOCHROME1
        pixels = 255 - pixels
    return pixels, used


def _modality(arr: np.ndarray, ds, index: int) -> np.ndarray:
    """Stored values -> modality units (Hounsfield units for CT)."""
    if ds.get("ModalityLUTSequence") or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        try:
            return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        except Exception:
            log.info("Ignoring an invalid modality LUT or rescale")
            return arr.astype(np.float64)
    # Enhanced multi-frame objects keep the rescale in their functional groups.
    slope, intercept = (frame_number(ds, index, "PixelValueTransformationSequence", k)
                        for k in ("RescaleSlope", "RescaleIntercept"))
    return arr.astype(np.float64) * (1.0 if slope is None else slope) + (intercept or 0.0)


def _grey_window(values: np.ndarray, ds, index: int, chosen) -> tuple[np.ndarray, dict]:
    """The requested window, else the file's VOI LUT, else the file's window, else automatic."""
    if chosen is not None:
        name, (center, width) = chosen
        return _linear(values, center, width), {"window": name, "window_center": center, "window_width": width}
    if ds.get("VOILUTSequence"):
        try:
            first, entries = int(ds.VOILUTSequence[0].LUTDescriptor[1]), int(ds.VOILUTSequence[0].LUTDescriptor[0])
            out = apply_voi_lut(np.rint(values).astype(np.int64), ds, prefer_lut=True)
            # Scale by the table's actual range: descriptors often claim 16 bits for 12-bit data.
            table = apply_voi_lut(np.arange(first, first + (entries or 2**16)), ds, prefer_lut=True)
            return _to_uint8(out, float(table.min()), float(table.max())), {"window": "VOI LUT from file"}
        except Exception:
            log.info("Ignoring an invalid VOI LUT")
    center, width = (frame_number(ds, index, "FrameVOILUTSequence", k) for k in ("WindowCenter", "WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(frame_attr(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").upper()
        used = {"window": "from file", "window_center": center, "window_width": width}
        return _linear(values, center, width, function), used
    pixels, (center, width) = _auto_window(values)
    return pixels, {"window": "automatic", "window_center": center, "window_width": width}


def _linear(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing, straight to 0..255."""
    if function == "SIGMOID":
        with np.errstate(over="ignore"):
            return _to_uint8(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)), 0.0, 1.0)
    if function == "LINEAR_EXACT":
        low, high = center - width / 2, center + width / 2
    else:
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    if high <= low:  # a width of 1 is a threshold
        return np.where(values > low, 255, 0).astype(np.uint8)
    return _to_uint8(values, low, high)


def _auto_window(values: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Stretch the 0.5-99.5 percentile range, so outliers (e.g. CT padding) do not flatten it."""
    flat = values.ravel()
    sample = flat[:: max(1, flat.size // _AUTO_SAMPLE)].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return np.zeros(values.shape, dtype=np.uint8), (0.0, 0.0)
    low, high = (float(v) for v in np.percentile(sample, _AUTO_PERCENTILES))
    if high <= low:  # mostly one value (e.g. a sparse mask): use the full range
        low, high = float(sample.min()), float(sample.max())
    return _to_uint8(values, low, high), ((low + high) / 2, high - low)


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to 0..255; NaN becomes 0, everything else is clipped. Done in
    chunks, so the float64 arithmetic costs a few MB instead of several copies of the image."""
    values = np.ascontiguousarray(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    if high <= low:
        return out
    flat, dest, factor = values.reshape(-1), out.reshape(-1), 255.0 / (high - low)
    for start in range(0, flat.size, _CHUNK):
        scaled = (flat[start:start + _CHUNK].astype(np.float64) - low) * factor
        dest[start:start + _CHUNK] = np.rint(np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 255.0))
    return out
