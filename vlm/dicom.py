"""Read one frame of a DICOM file, with every decode bounded by what the header declares.

A small upload must not become a large allocation, so before anything is decoded:
- parsing is capped in read calls (about two per element) and in sequence items, because pydicom
  builds Python objects worth ~30x (elements) to ~80x (items) the bytes they take in the file;
- a Deflated dataset is inflated here, to no more than its header declares (pydicom inflates the
  whole stream with no cap: a 1 MB file becomes 1 GB);
- native pixel data must match Rows x Columns x Frames x Samples x Bits/8: shorter is truncated, a
  frame or more longer is refused (pydicom would return the undeclared frames);
- compressed pixel data must hold the declared frames, and the one frame decoded must not claim
  more pixels than the header;
- segmented palette tables must not expand past 65,536 entries.
Identifying tags are never accessed; the metadata is a whitelist of coded, non-identifying values.
"""

from __future__ import annotations

import io
import logging
import math
import zlib
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import get_frame, parse_basic_offsets, parse_fragments
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.utils import _get_jpg_parameters
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes,
                         JPEGTransferSyntaxes)

from vlm.dicom_terms import BODY_PARTS, MODALITIES, PHOTOMETRICS, VIEW_POSITIONS, known_term
from vlm.errors import InputError

log = logging.getLogger(__name__)

MAX_PARSE_READS = 600_000  # file reads while parsing, 1-3 per element: at most ~150 MB of objects
MAX_ITEMS = 100_000  # sequence items plus pixel-data fragments: at most ~70 MB of objects
DEFLATE_HEADER_BYTES = 16 * 2**20  # inflated bytes in which a deflated dataset's header must fit
DEFLATE_SLACK_BYTES = 2**20  # inflated bytes allowed past the declared pixel data (trailing elements)
MAX_PALETTE_ENTRIES = 2**16  # the most a LUT descriptor (US) can declare

NOT_AN_IMAGE = "This file is not a PNG, JPEG or DICOM image."
TRUNCATED = "The DICOM file is truncated or its pixel data is incomplete."
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)
# The Pixel Data tag (7FE0,0010) as stored little- and big-endian: finding it in a file whose
# parsed dataset lacks pixel data means the file was cut inside that element.
_PIXEL_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
_ITEM_TAG_BYTES = (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")  # (FFFE,E000) little- and big-endian


@dataclass
class DicomFrame:
    """One decoded frame of stored values (HxW, or HxWx3 for colour) and its dataset."""

    ds: pydicom.Dataset
    values: np.ndarray
    rows: int
    cols: int
    num_frames: int
    index: int


def check_size(width: int, height: int, max_pixels: int, frames: int = 1) -> None:
    """The pixel limit, for any format: checked from the header, before decoding."""
    if width <= 0 or height <= 0:
        raise InputError("The image has no pixels (its width or height is zero).")
    if width * height * frames > max_pixels:
        extra = f" x {frames} frames" if frames > 1 else ""
        raise InputError(f"The image is {width}x{height} pixels{extra}; the limit is {max_pixels:,} pixels.")


def read_dicom(data: bytes, frame: int | None, max_pixels: int, max_bytes: int, *, bare: bool) -> DicomFrame:
    """Parse `data` and decode one frame (default: the middle one); InputError if unusable."""
    ds = _parse(data, max_pixels, max_bytes, bare)
    # force=True "reads" almost anything; a DICOM image has these groups. keys(), not iteration:
    # iterating would convert every element, identifying ones included.
    if bare and not any(tag.group in (0x0008, 0x0028, 0x7FE0) for tag in ds.keys()):  # noqa: SIM118
        raise InputError(NOT_AN_IMAGE)
    rows, cols, frames = _geometry(ds, data, max_pixels)
    if frame is not None and not (isinstance(frame, (int, np.integer)) and 0 <= frame < frames):
        valid = "0" if frames == 1 else f"0 to {frames - 1}"
        raise InputError(f"Frame {frame} does not exist; this image has {frames} frame(s), numbered {valid}.")
    index = frames // 2 if frame is None else int(frame)
    ts = _transfer_syntax(ds)
    if ts.is_encapsulated:
        _check_encapsulated(ds, ts, rows, cols, frames, index)
    else:
        _check_native_length(ds, rows, cols, frames)
    _check_palette(ds)
    try:  # one frame; YBR becomes RGB; never the undeclared frames pydicom would otherwise add
        arr = pixel_array(ds, index=index if frames > 1 else None, allow_excess_frames=False)
    except Exception as e:
        log.info("DICOM pixel data could not be decoded (%s)", type(e).__name__)
        raise InputError("The DICOM pixel data is damaged or incomplete and cannot be decoded.") from e
    if arr.shape not in ((rows, cols), (rows, cols, 3)):
        raise InputError(f"The decoded DICOM image is not the {cols}x{rows} grey or colour image its header "
                         "declares; the file is inconsistent.")
    return DicomFrame(ds, arr, rows, cols, frames, index)


class _BoundedReader(io.BytesIO):
    """A buffer that stops the parser after MAX_PARSE_READS reads. pydicom reads each element's
    header and value separately, nested ones included, so this caps the number of elements."""

    reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads > MAX_PARSE_READS:
            raise InputError("The DICOM file has too many data elements to be read safely.")
        return super().read(size)


def _check_items(data: bytes) -> None:
    if sum(data.count(tag) for tag in _ITEM_TAG_BYTES) > MAX_ITEMS:
        raise InputError(f"The DICOM file has more than {MAX_ITEMS:,} sequence items or image fragments; "
                         "it is too complex to be read safely.")


def _parse(data: bytes, max_pixels: int, max_bytes: int, bare: bool) -> pydicom.Dataset:
    _check_items(data)
    fp = _BoundedReader(data)
    try:  # the same steps as dcmread, so that a deflated dataset is found exactly as pydicom would
        preamble = read_preamble(fp, True)
        meta = _read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            return _read_deflated(fp, preamble, meta, max_pixels, max_bytes)
        fp.seek(0)
        return pydicom.dcmread(fp, force=True)
    except InputError:
        raise
    except Exception as e:  # pydicom and zlib raise many types for damaged files
        raise InputError(NOT_AN_IMAGE if bare else "The DICOM file is damaged and cannot be read.") from e


def _read_deflated(fp, preamble, meta: FileMetaDataset, max_pixels: int, max_bytes: int) -> FileDataset:
    """Inflate a Deflated Explicit VR Little Endian dataset to at most what its header declares."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = inflater.decompress(fp.read(), DEFLATE_HEADER_BYTES)
    header = read_dataset(_BoundedReader(head), False, True, stop_when=lambda tag, vr, length: tag in _PIXEL_TAGS)
    limit = min(max_bytes, DEFLATE_HEADER_BYTES + _declared_pixel_bytes(header, max_pixels) + DEFLATE_SLACK_BYTES)
    room = limit - len(head)  # never 0 below: a max_length of 0 means no limit at all
    rest = inflater.decompress(inflater.unconsumed_tail, room + 1) if room >= 0 and inflater.unconsumed_tail else b""
    if room < 0 or len(head) + len(rest) > limit:
        raise InputError("The compressed DICOM file expands to more data than its header describes, "
                         "so it was not opened.")
    inflated = head + rest
    del head, rest
    _check_items(inflated)
    dataset = read_dataset(_BoundedReader(inflated), False, True)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what the inflated bytes now are
    ds = FileDataset(io.BytesIO(), dataset, preamble, meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def _declared_pixel_bytes(ds, max_pixels: int) -> int:
    """Rows x Columns x Frames x Samples x Bits/8 from a header (0 if it does not say)."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = max(int(ds.get("NumberOfFrames") or 1), 1)
    except (AttributeError, TypeError, ValueError):
        return 0
    check_size(cols, rows, max_pixels, frames)
    return math.ceil(_frame_bytes(ds, rows, cols) * frames)


def _frame_bytes(ds, rows: int, cols: int) -> float:
    """Bytes of one native frame (fractional for 1-bit data; YBR_FULL_422 keeps 2 of 3 samples)."""
    try:
        samples, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.get("BitsAllocated", 8))
    except (TypeError, ValueError):
        samples, bits = 1, 8
    size = rows * cols * samples * bits / 8
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "YBR_FULL_422":
        size = size // 3 * 2
    return size


def _geometry(ds, data: bytes, max_pixels: int) -> tuple[int, int, int]:
    """Check that the header describes an image of acceptable size, before any decoding."""
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if any(tag in data for tag in _PIXEL_TAG_BYTES):
            raise InputError(TRUNCATED)
        raise InputError("This DICOM file has no image (pixel data) in it.")
    try:
        rows, cols, raw_frames = int(ds.Rows), int(ds.Columns), ds.get("NumberOfFrames")
        frames = max(int(raw_frames), 1) if raw_frames not in (None, "") else 1
        samples, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as e:
        raise InputError("The DICOM image description is incomplete or invalid (rows, columns, frames or "
                         "bits).") from e
    check_size(cols, rows, max_pixels, frames)
    if samples not in (1, 3):
        raise InputError(f"The DICOM image has {samples} samples per pixel; only grey (1) or colour (3) "
                         "images can be shown.")
    if not (bits == 1 or (bits % 8 == 0 and 8 <= bits <= 64)):
        raise InputError(f"The DICOM image declares {bits} bits allocated per sample, which is not a valid "
                         "value (1, or a multiple of 8 up to 64).")
    return rows, cols, frames


def _transfer_syntax(ds) -> UID:
    """The transfer syntax, if it can be decoded here; fail early and readably otherwise."""
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
    return ts


def _check_native_length(ds, rows: int, cols: int, frames: int) -> None:
    """Native pixel data must hold exactly the declared frames (plus at most padding)."""
    value = next(ds[k].value for k in _PIXEL_KEYWORDS if k in ds) or b""
    per_frame = _frame_bytes(ds, rows, cols)
    expected, actual = math.ceil(per_frame * frames), len(value)
    if actual < expected:
        raise InputError(TRUNCATED)
    if actual - expected >= max(per_frame, 2):
        raise InputError(f"The DICOM pixel data holds more image data than the {frames} frame(s) of {cols}x{rows} "
                         "its header declares; the file is inconsistent, so it was not opened.")


def _check_encapsulated(ds, ts: UID, rows: int, cols: int, frames: int, index: int) -> None:
    """Compressed data must hold the declared frames, and the chosen frame must not claim more
    pixels than the header (decoders allocate what the codestream says, before any check)."""
    value = ds.PixelData
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        buffer = io.BytesIO(value)
        offsets = parse_basic_offsets(buffer)
        fragments, _ = parse_fragments(buffer)
    except Exception as e:
        raise InputError("The compressed DICOM pixel data is damaged or incomplete and cannot be decoded.") from e
    tables = [len(offsets)] + ([len(extended[0]) // 8] if extended else [])
    if fragments < frames or any(n not in (0, frames) for n in tables):
        raise InputError(f"The compressed DICOM pixel data does not hold the {frames} frame(s) its header "
                         "declares; the file is inconsistent or incomplete.")
    try:
        source = get_frame(value, index, number_of_frames=frames, extended_offsets=extended)
    except Exception as e:
        raise InputError("The compressed DICOM pixel data is damaged or incomplete and cannot be decoded.") from e
    if ts in JPEG2000TransferSyntaxes:
        size = _j2k_size(source)
    elif ts in JPEGTransferSyntaxes or ts in JPEGLSTransferSyntaxes:
        info = _get_jpg_parameters(source)
        size = (info["height"], info["width"], info["components"]) if "width" in info else None
    else:  # RLE: the decoder sizes its output from the header
        return
    if size is None or not all(size):
        raise InputError("The compressed image in this DICOM file has no readable size, so it cannot be "
                         "decoded safely.")
    height, width, components = size
    if height * width * components > rows * cols * int(ds.get("SamplesPerPixel", 1)):
        raise InputError(f"The compressed image in this DICOM file is {width}x{height} pixels, more than the "
                         f"{cols}x{rows} its header declares; the file is inconsistent.")


def _j2k_size(codestream: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG 2000 SIZ marker (ISO 15444-1 A.5.1), in a raw
    codestream or a JP2 file (found as pydicom's get_j2k_parameters finds it)."""
    start = 0
    if codestream.startswith(b"\x00\x00\x00\x0c\x6a\x50\x20\x20"):  # JP2: walk the boxes to 'jp2c'
        start = 12
        while start + 8 <= len(codestream) and codestream[start + 4:start + 8] != b"jp2c":
            length = int.from_bytes(codestream[start:start + 4], "big")
            if length < 8:  # 0 (to the end) or 1 (a 64-bit length): not a header box
                return None
            start += length
        start += 8
    if codestream[start:start + 4] != b"\xff\x4f\xff\x51" or len(codestream) < start + 42:
        return None
    x, y, x0, y0 = (int.from_bytes(codestream[start + i:start + i + 4], "big") for i in (8, 12, 16, 20))
    components = int.from_bytes(codestream[start + 40:start + 42], "big")
    return max(y - y0, 0), max(x - x0, 0), components


def _check_palette(ds) -> None:
    """A segmented palette table expands in a Python list: bound it before pydicom expands it."""
    if "SegmentedRedPaletteColorLookupTableData" not in ds:
        return
    try:
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
        little = ds.file_meta._tsyntax_encoding[1]
    except Exception as e:
        raise InputError("The colour table of this DICOM image is invalid.") from e
    dtype = np.dtype(np.uint8) if depth == 8 else np.dtype("<u2" if little else ">u2")
    for colour in ("Red", "Green", "Blue", "Alpha"):
        data = ds.get(f"Segmented{colour}PaletteColorLookupTableData") or b""
        words = np.frombuffer(data[: len(data) // dtype.itemsize * dtype.itemsize], dtype=dtype)
        if _segmented_entries(words) > MAX_PALETTE_ENTRIES:
            raise InputError("The colour table of this DICOM image is invalid (it expands past 65,536 entries).")


def _segmented_entries(words: np.ndarray) -> int:
    """The entries a segmented table expands to (PS3.3 C.7.9.2), counted without expanding it;
    more than MAX_PALETTE_ENTRIES as soon as that is certain."""
    total = segments = i = 0
    while i + 1 < len(words) and total <= MAX_PALETTE_ENTRIES:
        opcode, length = int(words[i]), int(words[i + 1])
        if opcode == 2 or segments > MAX_PALETTE_ENTRIES:  # indirect segments can nest: refuse them
            return MAX_PALETTE_ENTRIES + 1
        total, segments, i = total + length, segments + 1, i + 2 + (length if opcode == 0 else 1)
    return total


def frame_attr(ds, index: int, sequence: str, keyword: str):
    """An attribute of this frame: per-frame functional group, shared group, then top level."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        try:
            value = ds[groups][i][sequence][0].get(keyword)
        except (KeyError, IndexError, TypeError):
            continue
        if value is not None:
            return value
    return ds.get(keyword)


def frame_number(ds, index: int, sequence: str, keyword: str) -> float | None:
    """The (first) numeric value of a frame attribute; None if absent or not a finite number."""
    value = frame_attr(ds, index, sequence, keyword)
    try:
        number = float(value[0] if isinstance(value, (list, tuple, MultiValue)) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return number if math.isfinite(number) else None


def dicom_metadata(ds, rows: int, cols: int, frames: int, index: int) -> dict:
    """A whitelist of non-identifying attributes; nothing else in the file is ever read. Coded
    attributes are kept only when they are DICOM defined terms: free text in them is dropped."""
    spacing = None
    for value in (frame_attr(ds, index, "PixelMeasuresSequence", "PixelSpacing"), ds.get("ImagerPixelSpacing")):
        try:
            spacing = [round(float(v), 4) for v in value]
        except (TypeError, ValueError):
            continue
        if len(spacing) == 2 and min(spacing) > 0 and math.isfinite(sum(spacing)):
            break
        spacing = None
    bits = ds.get("BitsStored")
    return {
        "format": "DICOM", "modality": known_term(ds.get("Modality"), MODALITIES),
        "body_part": known_term(ds.get("BodyPartExamined"), BODY_PARTS),
        "view": known_term(ds.get("ViewPosition"), VIEW_POSITIONS),
        "photometric": known_term(ds.get("PhotometricInterpretation"), PHOTOMETRICS),
        "rows": rows, "columns": cols, "size": [cols, rows], "num_frames": frames, "frame": index,
        "pixel_spacing": spacing, "bits_stored": bits if isinstance(bits, int) else None, "window": None,
    }
