"""Hostile files that the imaging and serving tests share: small DICOM files built here with
pydicom and zlib (memory bombs, lying headers), and the process's resident memory for bounding what
decoding them costs. A plain module, not a test file: tests/test_image_bombs.py and
tests/test_hostile_corpus.py import from it."""

from __future__ import annotations

import io
import os
import struct
import zlib

from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless,
                         SecondaryCaptureImageStorage, generate_uid)

MB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """The resident memory of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def new_dataset(sop_class=SecondaryCaptureImageStorage, modality: str = "OT", syntax=ExplicitVRLittleEndian) -> Dataset:
    """An empty image dataset with its file meta, SOP class and instance UIDs, and modality."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    return ds


def header(rows: int = 512, cols: int = 512, frames: int | None = None, bits: int = 8, samples: int = 1,
           photometric: str = "MONOCHROME2", syntax=ExplicitVRLittleEndian) -> Dataset:
    ds = new_dataset(syntax=syntax)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, samples, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    return ds


def save(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom(rows: int, cols: int, pixel_bytes: int, **attrs) -> bytes:
    """A file of header(rows, cols) holding `pixel_bytes` zero bytes of pixel data, with `attrs`
    then set on it (possibly contradicting the header)."""
    ds = header(rows, cols)
    ds.PixelData = bytes(pixel_bytes)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return save(ds)


def deflated_bomb(pixel_bytes: int, rows: int = 512, cols: int = 512, frames: int = 1) -> bytes:
    """A Deflated Explicit VR Little Endian file whose pixel data inflates to `pixel_bytes` zeros,
    declaring `frames` frames of rows x cols: compressed in a stream, never held whole here."""
    ds = header(rows, cols, frames if frames != 1 else None, syntax=DeflatedExplicitVRLittleEndian)
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    plain = DicomBytesIO()
    plain.is_little_endian, plain.is_implicit_VR = True, False
    del ds.file_meta
    write_dataset(plain, ds)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.write(compressor.compress(plain.getvalue()))
    out.write(compressor.compress(b"\xe0\x7f\x10\x00OB\0\0" + struct.pack("<I", pixel_bytes)))
    chunk = bytes(MB)
    for _ in range(pixel_bytes // MB):
        out.write(compressor.compress(chunk))
    out.write(compressor.compress(bytes(pixel_bytes % MB)) + compressor.flush())
    return out.getvalue()


def native_excess(frames_present: int, frames: int | None = None) -> bytes:
    """Native 512x512 pixel data holding `frames_present` frames in a file declaring `frames`
    (None: no NumberOfFrames, i.e. 1)."""
    ds = header(frames=frames)
    ds.PixelData = bytes(512 * 512 * frames_present)
    return save(ds)


def rle_missing_frames(declared: int) -> bytes:
    """One RLE-compressed 8x8 frame in a file declaring `declared` frames."""
    ds = header(8, 8)
    ds.PixelData = bytes(64)
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.NumberOfFrames = declared
    return save(ds)


def j2k_size_lie(claimed: int) -> bytes:
    """A 64x64 file whose one JPEG 2000 frame's codestream (SIZ marker) says claimed x claimed."""
    buf = io.BytesIO()
    Image.new("L", (64, 64), 9).save(buf, format="JPEG2000", irreversible=False)
    stream = bytearray(buf.getvalue())
    siz = stream.index(b"\xff\x4f\xff\x51")
    stream[siz + 8:siz + 16] = struct.pack(">II", claimed, claimed)
    ds = header(64, 64, syntax=JPEG2000Lossless)
    ds.PixelData = encapsulate([bytes(stream)])
    return save(ds)


def palette_bomb(segments: int) -> bytes:
    """A 4x4 PALETTE COLOR file whose segmented colour tables are `segments` linear segments of
    65,535 entries each (6 bytes a segment, per colour)."""
    ds = header(4, 4, photometric="PALETTE COLOR")
    ds.PixelData = bytes(16)
    data = struct.pack("<HHH", 0, 1, 0) + struct.pack("<HHH", 1, 65535, 7) * segments
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"Segmented{colour}PaletteColorLookupTableData", data)
    return save(ds)


def with_many_items(raw: bytes, count: int) -> bytes:
    """The DICOM file `raw` with a sequence of `count` empty items (8 bytes each) inserted."""
    items = b"\xfe\xff\x00\xe0\0\0\0\0" * count
    seq = b"\x08\x00\x15\x11SQ\0\0" + struct.pack("<I", len(items)) + items
    at = raw.index(b"\x08\x00\x60\x00")  # before Modality, keeping the tags in order
    return raw[:at] + seq + raw[at:]
