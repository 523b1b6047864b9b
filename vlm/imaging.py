"""Read PNG, JPEG and DICOM into display-ready 8-bit pixels for the vision tower.

Every problem a user can cause raises InputError with a sentence a clinician can act on. DICOM
metadata is a whitelist, and identifying tags are never even accessed (pydicom converts, and may
warn about, an element only when it is read), so they reach neither the result nor any log.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from vlm.errors import InputError

log = logging.getLogger(__name__)

# CT windows as (center, width) in Hounsfield units.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0), "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0), "brain": (40.0, 80.0),
}

_NOT_AN_IMAGE = "This file is not a PNG, JPEG or DICOM image."
_TRUNCATED = "The DICOM file is truncated or its pixel data is incomplete."
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# The Pixel Data tag (7FE0,0010) as stored little- and big-endian: finding it in a file whose
# parsed dataset lacks pixel data means the file was cut inside that element.
_PIXEL_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
# DICOM without the 128-byte preamble starts with a group 0002 or 0008 tag (either byte order).
_BARE_DICOM_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_AUTO_PERCENTILES = (0.5, 99.5)
_AUTO_SAMPLE = 1_000_000  # percentiles of a strided sample: the same window in a fraction of the time
_CODE_CHARS = re.compile(r"[^A-Z0-9 _]")


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
        return _load_dicom(data, chosen, frame, max_pixels, bare=False)
    raster = _open_raster(data, max_pixels)
    if raster is not None:
        return _load_raster(raster, frame)
    if name.lower().endswith(_DICOM_SUFFIXES) or data[:2] in _BARE_DICOM_STARTS:
        return _load_dicom(data, chosen, frame, max_pixels, bare=True)
    raise InputError(_NOT_AN_IMAGE)


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


def _check_size(width: int, height: int, max_pixels: int, frames: int = 1) -> None:
    if width <= 0 or height <= 0:
        raise InputError("The image has no pixels (its width or height is zero).")
    if width * height * frames > max_pixels:
        extra = f" x {frames} frames" if frames > 1 else ""
        raise InputError(f"The image is {width}x{height} pixels{extra}; the limit is {max_pixels:,} pixels.")


def _open_raster(data: bytes, max_pixels: int) -> Image.Image | None:
    """Open a PNG or JPEG lazily (header only) and check its size; None if it is neither."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        _check_size(*struct.unpack(">II", data[16:24]), max_pixels)  # IHDR: name a bomb's size exactly
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
    _check_size(*img.size, max_pixels)
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
        pixels, _ = _auto_window(np.asarray(img, dtype=np.float64))
        return pixels, 16 if img.mode.startswith("I;16") else 32
    if img.mode in ("1", "L", "LA", "La"):
        return np.array(img.convert("L")), 1 if img.mode == "1" else 8
    rgb = np.array(img.convert("RGB"))  # P, PA, RGBA, CMYK, YCbCr...; alpha is dropped
    if img.mode in ("P", "PA") and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return np.ascontiguousarray(rgb[..., 0]), 8  # a grey palette stays grey
    return rgb, 8


def _load_dicom(data: bytes, chosen, frame: int | None, max_pixels: int, *, bare: bool) -> MedicalImage:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as e:  # pydicom raises many types for damaged files
        raise InputError(_NOT_AN_IMAGE if bare else "The DICOM file is damaged and cannot be read.") from e
    # force=True "reads" almost anything; a DICOM image has these groups. keys(), not iteration:
    # iterating would convert every element, identifying ones included.
    if bare and not any(tag.group in (0x0008, 0x0028, 0x7FE0) for tag in ds.keys()):  # noqa: SIM118
        raise InputError(_NOT_AN_IMAGE)
    rows, cols, frames = _dicom_geometry(ds, data, max_pixels)
    if frame is not None and not (isinstance(frame, (int, np.integer)) and 0 <= frame < frames):
        valid = "0" if frames == 1 else f"0 to {frames - 1}"
        raise InputError(f"Frame {frame} does not exist; this image has {frames} frame(s), numbered {valid}.")
    index = frames // 2 if frame is None else frame
    _check_decodable(ds)
    try:
        arr = pixel_array(ds, index=index if frames > 1 else None)  # one frame; YBR becomes RGB
    except Exception as e:
        log.info("DICOM pixel data could not be decoded (%s)", type(e).__name__)
        raise InputError("The DICOM pixel data is damaged or incomplete and cannot be decoded.") from e
    pixels, used = _dicom_display(arr, ds, index, chosen)
    meta = _dicom_metadata(ds, rows, cols, frames, index) | used
    log.debug("Loaded a DICOM %s image of %dx%d pixels, frame %d of %d, window %s",
              meta["modality"] or "", cols, rows, index + 1, frames, meta["window"])
    return MedicalImage(pixels=pixels, metadata=meta, num_frames=frames, frame=index)


def _dicom_geometry(ds, data: bytes, max_pixels: int) -> tuple[int, int, int]:
    """Check that the header describes an image of acceptable size, before any decoding."""
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if any(tag in data for tag in _PIXEL_TAG_BYTES):
            raise InputError(_TRUNCATED)
        raise InputError("This DICOM file has no image (pixel data) in it.")
    try:
        rows, cols, raw_frames = int(ds.Rows), int(ds.Columns), ds.get("NumberOfFrames")
        frames = max(int(raw_frames), 1) if raw_frames not in (None, "") else 1
    except (AttributeError, TypeError, ValueError) as e:
        raise InputError("The DICOM image description is incomplete or invalid (rows, columns or frames).") from e
    _check_size(cols, rows, max_pixels, frames)
    return rows, cols, frames


def _check_decodable(ds) -> None:
    """Fail early, and readably, on a compression we cannot decode or a short native file."""
    meta = ds.file_meta if hasattr(ds, "file_meta") else FileMetaDataset()
    if meta.get("TransferSyntaxUID") is None:  # no file meta: use the byte order pydicom detected
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else (
            ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta = meta
    ts = UID(str(meta.TransferSyntaxUID))
    try:
        available = get_decoder(ts).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise InputError(f"The DICOM transfer syntax {ts} ({ts.name}) cannot be decoded here.")
    if ts.is_encapsulated or "PixelData" not in ds:
        return
    try:
        short = len(ds.PixelData) < get_expected_length(ds)
    except Exception as e:  # inconsistent group 0028 values
        raise InputError("The DICOM image description is incomplete or invalid.") from e
    if short:
        raise InputError(_TRUNCATED)


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
        raise InputError(f"The DICOM colour model {_code(photometric)} is not supported.")
    pixels, used = _grey_window(_modality(arr, ds, index), ds, index, chosen)
    if photometric == "MONOCHROME1":  # low values are white in MONOCHROME1
        pixels = 255 - pixels
    return pixels, used


def _frame_attr(ds, index: int, sequence: str, keyword: str):
    """An attribute of this frame: per-frame functional group, shared group, then top level."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        try:
            value = ds[groups][i][sequence][0].get(keyword)
        except (KeyError, IndexError, TypeError):
            continue
        if value is not None:
            return value
    return ds.get(keyword)


def _frame_number(ds, index: int, sequence: str, keyword: str) -> float | None:
    """The (first) numeric value of a frame attribute; None if absent or not a finite number."""
    value = _frame_attr(ds, index, sequence, keyword)
    try:
        number = float(value[0] if isinstance(value, (list, tuple, MultiValue)) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) else None


def _modality(arr: np.ndarray, ds, index: int) -> np.ndarray:
    """Stored values -> modality units (Hounsfield units for CT)."""
    if ds.get("ModalityLUTSequence") or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        try:
            return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        except Exception:
            log.info("Ignoring an invalid modality LUT or rescale")
            return arr.astype(np.float64)
    # Enhanced multi-frame objects keep the rescale in their functional groups.
    slope, intercept = (_frame_number(ds, index, "PixelValueTransformationSequence", k)
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
    center, width = (_frame_number(ds, index, "FrameVOILUTSequence", k) for k in ("WindowCenter", "WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(_frame_attr(ds, index, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").upper()
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
    sample = flat[:: max(1, flat.size // _AUTO_SAMPLE)]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return np.zeros(values.shape, dtype=np.uint8), (0.0, 0.0)
    low, high = (float(v) for v in np.percentile(sample, _AUTO_PERCENTILES))
    if high <= low:  # mostly one value (e.g. a sparse mask): use the full range
        low, high = float(sample.min()), float(sample.max())
    return _to_uint8(values, low, high), ((low + high) / 2, high - low)


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to 0..255; NaN becomes 0, everything else is clipped."""
    values = np.asarray(values, dtype=np.float64)
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    return np.rint(np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 255.0)).astype(np.uint8)


def _code(value) -> str | None:
    """A DICOM code string reduced to its legal characters, so no free text can slip through."""
    text = _CODE_CHARS.sub("", str(value).upper()).strip()[:16] if value is not None else ""
    return text or None


def _dicom_metadata(ds, rows: int, cols: int, frames: int, index: int) -> dict:
    """A whitelist of non-identifying attributes; nothing else in the file is ever read."""
    spacing = None
    for value in (_frame_attr(ds, index, "PixelMeasuresSequence", "PixelSpacing"), ds.get("ImagerPixelSpacing")):
        try:
            spacing = [round(float(v), 4) for v in value]
        except (TypeError, ValueError):
            continue
        if len(spacing) == 2 and min(spacing) > 0 and math.isfinite(sum(spacing)):
            break
        spacing = None
    bits = ds.get("BitsStored")
    return {
        "format": "DICOM", "modality": _code(ds.get("Modality")), "body_part": _code(ds.get("BodyPartExamined")),
        "view": _code(ds.get("ViewPosition")), "photometric": _code(ds.get("PhotometricInterpretation")),
        "rows": rows, "columns": cols, "size": [cols, rows], "num_frames": frames, "frame": index,
        "pixel_spacing": spacing, "bits_stored": bits if isinstance(bits, int) else None, "window": None,
    }
