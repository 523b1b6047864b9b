"""A robustness corpus sent through the HTTP API: pydicom's odd and broken test files plus hostile
files built here and in tests/hostile_files.py (memory bombs, lying headers, truncated and foreign formats).

For each file, one POST /v1/chat/completions with the image as a data: URL. Every answer is a 200
or a 4xx whose JSON error message is not empty, never a 5xx; afterwards the server still answers
/health and an ordinary request; the process's memory (the server runs in a thread here) grows by
a bounded amount. Only HTTP behaviour is asserted, not how the server gets there.
"""

from __future__ import annotations

import io
import struct
import threading
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from tests.hostile_files import (MB, deflated_bomb, dicom, j2k_size_lie, native_excess, palette_bomb,
                                 rle_missing_frames, rss, with_many_items)
from tests.serve_fixtures import bomb_png, data_url, image_message, local_server, png_bytes, running

TIMEOUT = 60
pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns about every odd file here

# Shipped with pydicom or pydicom-data: deliberately broken, truncated, without file meta, big
# endian, compressed in every supported way, multi-frame, odd lengths, odd colour models.
SHIPPED = [
    "bad_sequence.dcm", "badVR.dcm", "MR_truncated.dcm", "rtplan_truncated.dcm", "no_meta.dcm",
    "no_meta_group_length.dcm", "meta_missing_tsyntax.dcm", "ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm",
    "ExplVR_BigEnd.dcm", "MR_small_bigendian.dcm", "emri_small.dcm", "emri_small_big_endian.dcm",
    "emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm", "emri_small_jpeg_ls_lossless.dcm",
    "liver_nonbyte_aligned.dcm", "liver.dcm", "liver_expb.dcm", "JPEG2000-embedded-sequence-delimiter.dcm",
    "J2K_pixelrep_mismatch.dcm", "JPEG2000.dcm", "JPEG-lossy.dcm", "JPGExtended.dcm", "JPEGLSNearLossless_16.dcm",
    "SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm", "SC_rgb_small_odd_jpeg.dcm",
    "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_rle_32bit_2frame.dcm", "SC_jpeg_no_color_transform.dcm",
    "examples_palette.dcm", "image_dfl.dcm", "explicit_VR-UN.dcm", "UN_sequence.dcm", "rtdose_rle.dcm",
    "empty_charset_LEI.dcm", "reportsi_with_empty_number_tags.dcm", "mlut_18.dcm", "vlut_04.dcm",
    "gdcm-US-ALOKA-16.dcm", "OBXXXX1A_rle_2frame.dcm", "color3d_jpeg_baseline.dcm",
]


def _dicom(**attrs) -> bytes:
    return dicom(4, 4, 4 * 4 * 8, **attrs)


def _image(fmt: str, mode: str = "L", size=(16, 16), **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 3).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(buf, format="PNG")
    return buf.getvalue()


GENERATED = {  # name -> (bytes builder, MIME type sent)
    "deflated bomb, 1 MB to 1 GB": (lambda: deflated_bomb(4000 * 512 * 512), "application/dicom"),
    "deflated bomb, 64 KiB to 64 MB": (lambda: deflated_bomb(256 * 512 * 512), "application/dicom"),
    "native data with 8 frames, 1 declared": (lambda: native_excess(8), "application/dicom"),
    "RLE with 500 frames declared, 1 present": (lambda: rle_missing_frames(500), "application/dicom"),
    "JPEG 2000 claiming 40000x40000": (lambda: j2k_size_lie(40000), "application/dicom"),
    "segmented palette bomb": (lambda: palette_bomb(3000), "application/dicom"),
    "150,000 sequence items": (lambda: with_many_items(_dicom(), 150_000), "application/dicom"),
    "Rows=0": (lambda: _dicom(Rows=0), "application/dicom"),
    "BitsAllocated=7": (lambda: _dicom(BitsAllocated=7, BitsStored=7, HighBit=6), "application/dicom"),
    "SamplesPerPixel=4": (lambda: _dicom(SamplesPerPixel=4), "application/dicom"),
    "NumberOfFrames=2**31": (lambda: _dicom(NumberOfFrames=2**31), "application/dicom"),
    "NumberOfFrames=-3": (lambda: _dicom(NumberOfFrames=-3), "application/dicom"),
    "free text in BodyPartExamined": (lambda: _dicom(BodyPartExamined="DOE JANE MRN12345"), "application/dicom"),
    "DICOM cut in half": (lambda: native_excess(8)[:1000], "application/dicom"),
    "PNG bomb header": (bomb_png, "image/png"),
    "PNG 100000x1 bomb header": (lambda: bomb_png(100000, 1000), "image/png"),
    "truncated PNG": (lambda: png_bytes(1, 200)[:300], "image/png"),
    "truncated JPEG": (lambda: _image("JPEG", size=(300, 300))[:400], "image/jpeg"),
    "PNG with a bad CRC": (lambda: png_bytes(2)[:29] + b"\0\0\0\0" + png_bytes(2)[33:], "image/png"),
    "zero bytes": (lambda: b"", "image/png"),
    "random bytes": (lambda: np.random.default_rng(0).bytes(5000), "image/png"),
    "text file": (lambda: b"Findings: none. Impression: normal.\n" * 50, "image/png"),
    "DICOM prefix then garbage": (lambda: b"\0" * 128 + b"DICM" + b"\xff" * 500, "application/dicom"),
    "GIF": (lambda: _image("GIF"), "image/gif"),
    "TIFF": (lambda: _image("TIFF"), "image/tiff"),
    "1x1 PNG": (lambda: _image("PNG", size=(1, 1)), "image/png"),
    "16-bit PNG": (_png16, "image/png"),
    "CMYK JPEG": (lambda: _image("JPEG", mode="CMYK"), "image/jpeg"),
    "zlib bomb inside a PNG": (lambda: _png_idat_bomb(), "image/png"),
}


def _png_idat_bomb() -> bytes:
    """A 6000x6000 PNG (within the pixel limit) whose IDAT inflates to far more than it needs."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 6000, 6000, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes(200 * MB), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def corpus() -> list[tuple[str, bytes, str]]:
    files = []
    for name in SHIPPED:
        path = get_testdata_file(name, download=False)  # never downloads
        if path is not None:
            with open(path, "rb") as f:
                files.append((name, f.read(), "application/dicom"))
    files += [(name, build(), mime) for name, (build, mime) in GENERATED.items()]
    return files


def test_hostile_corpus_through_the_api(taught_model):
    from serve.api import create_api
    from serve.engine import Engine

    files = corpus()
    assert len(files) >= 30
    headers = {"Content-Type": "application/json"}
    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss() - start)

    sampler = threading.Thread(target=sample, daemon=True)
    problems, statuses = [], {}
    with running(local_server(create_api(Engine(taught_model, name="demo")))) as server, \
            httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        sampler.start()
        try:
            for name, data, mime in files:
                body = {"model": "demo", "max_tokens": 4,
                        "messages": [image_message("What is this?", data_url(data, mime))]}
                r = client.post("/v1/chat/completions", json=body, headers=headers)
                statuses[name] = r.status_code
                if r.status_code == 200:
                    continue
                try:
                    message = r.json()["error"]["message"]
                except Exception:
                    message = ""
                if not (400 <= r.status_code < 500 and isinstance(message, str) and message.strip()):
                    problems.append(f"{name}: {r.status_code} {r.text[:200]}")
                assert "MRN12345" not in r.text and "JANE" not in r.text
        finally:
            done.set()
            sampler.join()
        assert client.get("/health").status_code == 200
        ordinary = {"model": "demo", "max_tokens": 4,
                    "messages": [image_message("What is this?", data_url(png_bytes(7)))]}
        assert client.post("/v1/chat/completions", json=ordinary, headers=headers).status_code == 200
    print(f"\n{sum(s == 200 for s in statuses.values())} answered, "
          f"{sum(400 <= s < 500 for s in statuses.values())} refused, peak RSS growth {peak[0] / MB:.0f} MB")
    assert not problems, "\n".join(problems)
    assert peak[0] < 1536 * MB, peak[0] / MB
    # The bombs must be refused, not answered.
    for name in GENERATED:
        if "bomb" in name and "PNG" not in name:
            assert 400 <= statuses[name] < 500, (name, statuses[name])
