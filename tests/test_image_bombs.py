"""Memory bombs: small files that used to decode into huge arrays (issue 22).

Each hostile file is built with pydicom, zlib or Pillow, here or in tests/hostile_files.py. The
bound is on memory, measured two ways around the call: tracemalloc's peak (numpy, bytes and
pydicom's objects report to it) and the growth of the process's resident memory, sampled from
/proc in a thread. The bounds are generous but far below what each bomb cost before (noted per
test).
"""

from __future__ import annotations

import io
import struct
import threading
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests.hostile_files import (MB, deflated_bomb, dicom, header, j2k_size_lie, native_excess, palette_bomb,
                                 rle_missing_frames, rss, save, with_many_items)
from vlm.errors import InputError
from vlm.imaging import describe_metadata, load_image

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns about every odd file here


def peak_memory(fn, trace: bool = True) -> tuple[object, int, int]:
    """Run fn(); return (its result or exception, traced peak bytes, peak RSS growth bytes).
    trace=False skips tracemalloc (0 traced), which slows the parsing of many small objects ~10x."""
    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], rss() - start)

    thread = threading.Thread(target=sample, daemon=True)
    if trace:
        tracemalloc.start()
    thread.start()
    try:
        result = fn()
    except Exception as e:  # returned, so the caller asserts on it outside the measurement
        result = e
    finally:
        done.set()
        thread.join()
        traced = tracemalloc.get_traced_memory()[1] if trace else 0
        tracemalloc.stop()
    return result, traced, max(peak[0], rss() - start)


def refused(data: bytes, match: str, bound: int = 300 * MB, trace: bool = True, **kwargs) -> InputError:
    result, traced, grown = peak_memory(lambda: load_image(data, **kwargs), trace)
    assert isinstance(result, InputError), f"expected an InputError, got {result!r}"
    assert match in str(result)
    assert traced < bound and grown < bound, (traced / MB, grown / MB)
    return result


# ----------------------------------------------------------------------------- DICOM bombs


def test_native_pixel_data_longer_than_declared_is_refused():
    # 1 frame declared, 40 present: pydicom returned all 40 ("sufficient to contain 40 frames"),
    # a 40x512x512 array (340 MB traced before the fix).
    refused(native_excess(40), "more image data than the 1 frame(s) of 512x512", bound=120 * MB)
    # and with several frames declared
    refused(native_excess(4, frames=3), "more image data than the 3 frame(s)", bound=120 * MB)


def test_padding_after_native_pixel_data_is_not_an_extra_frame():
    ds = header(3, 3)  # 9 bytes, padded to 10 by the writer; a few stray bytes are tolerated
    ds.PixelData = bytes(range(9)) + b"\0\0\0"
    img = load_image(save(ds), window=(4, 9))
    assert img.pixels.shape == (3, 3) and img.num_frames == 1


def test_deflated_bomb_of_one_megabyte_is_refused():
    # ~1 MB on disk, 1 GB inflated, 1 frame of 512x512 declared: pydicom inflated it all at read
    # time and then returned 4000 frames (the server went out of memory at 21 GB).
    data = deflated_bomb(4000 * 512 * 512)
    assert len(data) < 2 * MB
    refused(data, "expands to more data than its header describes")


def test_deflated_bomb_of_64_kib_is_refused():
    # 64 KiB that inflates to 64 MB: 2.2 GB traced peak before the fix.
    data = deflated_bomb(256 * 512 * 512)
    assert len(data) < 80 * 1024
    refused(data, "expands to more data than its header describes", bound=150 * MB)


def test_deflated_bomb_declaring_its_frames_hits_the_byte_limit():
    # The header admits the size, so the cap is the caller's byte limit.
    data = deflated_bomb(150 * 512 * 512, frames=150)
    refused(data, "expands to more data", bound=150 * MB, max_bytes=16 * MB)


def test_honest_deflated_file_still_decodes():
    ds = header(4, 5, frames=2, syntax=DeflatedExplicitVRLittleEndian)
    ds.PixelData = np.arange(40, dtype=np.uint8).tobytes()
    img = load_image(save(ds), frame=1)
    assert img.num_frames == 2 and img.frame == 1 and img.pixels.shape == (4, 5)


def test_absurd_number_of_frames_is_refused():
    ds = header(1, 1, frames=2**31)
    ds.PixelData = b"\0\0"
    refused(save(ds), "frames; the limit")
    ds = header(1, 1, frames=40_000_000)  # within the pixel limit, but the data is not there
    ds.PixelData = b"\0\0"
    refused(save(ds), "truncated")


def test_compressed_data_with_more_fragments_declared_than_present():
    refused(rle_missing_frames(1000), "does not hold the 1000 frame(s)")  # one compressed frame


def test_compressed_frame_larger_than_its_header_is_refused():
    # A JPEG 2000 frame whose codestream says 30000x30000 in a file that declares 64x64: openjpeg
    # would size its buffers from the codestream before anything compared them.
    refused(j2k_size_lie(30000), "30000x30000 pixels, more than the 64x64")


def test_segmented_palette_bomb_is_refused():
    # 2,000 linear segments of 65,535 entries each, 12 KB per colour: pydicom expanded them into
    # Python lists of 131 million entries before checking the table length.
    refused(palette_bomb(2000), "colour table", bound=100 * MB)


def test_sequence_with_too_many_items_is_refused():
    # 200,000 empty items in 1.6 MB: ~660 bytes of Python objects each once parsed.
    refused(with_many_items(dicom(2, 2, 4), 200_000), "sequence items", bound=100 * MB)


def test_file_with_too_many_elements_is_refused():
    # 700,000 empty private elements in 5.6 MB: ~240 bytes of Python objects each once parsed, so
    # a 64 MB upload of them cost ~2 GB. Parsing stops at MAX_PARSE_READS.
    raw = dicom(2, 2, 4)
    elements = b"".join(struct.pack("<HH", group, element) + b"LO\0\0"
                        for group in range(0x0009, 0x0029, 2) for element in range(0x1000, 0x10000))
    at = raw.index(b"\x28\x00\x02\x00")  # private groups 0009-0027 go before group 0028
    refused(raw[:at] + elements[: 8 * 700_000] + raw[at:], "too many data elements", bound=300 * MB, trace=False)


@pytest.mark.parametrize("attrs, match", [
    ({"SamplesPerPixel": 4}, "4 samples per pixel"),
    ({"SamplesPerPixel": 2}, "2 samples per pixel"),
    ({"BitsAllocated": 7, "BitsStored": 7, "HighBit": 6}, "7 bits allocated"),
    ({"BitsAllocated": 128}, "128 bits allocated"),
    ({"Rows": 0}, "no pixels"),
])
def test_impossible_shapes_are_refused(attrs, match):
    refused(dicom(4, 4, 4 * 4 * 16, **attrs), match)


# ----------------------------------------------------------------------------- PNG memory


def test_16_bit_png_of_7000x7000_decodes_in_bounded_memory():
    # 49 megapixels of 12-bit data: 1.5 GB traced before the fix (float64 copies of the image).
    ramp = (np.add.outer(np.arange(7000, dtype=np.uint32), np.arange(7000, dtype=np.uint32)) % 4096)
    buf = io.BytesIO()
    Image.fromarray(ramp.astype(np.uint16)).save(buf, format="PNG", compress_level=1)
    del ramp
    img, traced, _ = peak_memory(lambda: load_image(buf.getvalue()))
    assert not isinstance(img, Exception), img
    assert img.pixels.shape == (7000, 7000) and img.pixels.dtype == np.uint8
    assert img.pixels[0, 0] == 0 and img.pixels[0, 4095] == 255 and img.pixels.std() > 0
    assert traced < 600 * MB, traced / MB


# ----------------------------------------------------------------------------- free text in codes


def test_free_text_in_coded_fields_is_never_shown():
    ds = header(4, 4)
    ds.PixelData = bytes(16)
    ds.BodyPartExamined, ds.ViewPosition, ds.Modality = "DOE JANE MRN12345", "JANE", "CT"
    meta = load_image(save(ds)).metadata
    summary = describe_metadata(meta)
    assert meta["body_part"] is None and meta["view"] is None and meta["modality"] == "CT"
    for secret in ("DOE", "JANE", "MRN", "12345"):
        assert secret not in repr(meta) and secret not in summary
    ds.BodyPartExamined, ds.ViewPosition, ds.Modality = "CHEST", "PA", "DOE"
    meta = load_image(save(ds)).metadata
    assert meta["body_part"] == "CHEST" and meta["view"] == "PA" and meta["modality"] is None
    assert "CHEST" in describe_metadata(meta) and "DOE" not in describe_metadata(meta)
