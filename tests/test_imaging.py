"""vlm.imaging on DICOM: every shipped file, windowing, de-identified metadata, and bad inputs of
every format (PNG and JPEG round trips are in test_raster_images.py).

Real DICOM comes from pydicom's own test files and the pydicom-data package (both installed, never
downloaded).
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage

from tests.hostile_files import new_dataset
from tests.image_checks import check_image, png_bytes
from vlm.errors import InputError
from vlm.imaging import WINDOW_PRESETS, describe_metadata, load_image

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
METADATA_KEYS = {"format", "modality", "body_part", "view", "photometric", "rows", "columns", "size",
                 "num_frames", "frame", "pixel_spacing", "bits_stored", "window", "window_center", "window_width"}


def shipped(name: str) -> Path:
    """A file shipped with pydicom or pydicom-data; download=False so a missing one never fetches."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (it ships with pydicom-data)")
    return Path(path)


def pydicom_data_dir() -> Path | None:
    """The folder of the pydicom-data package, found through the entry point pydicom itself uses."""
    for ep in entry_points(group="pydicom.data.external_sources"):
        if ep.name == "pydicom-data":
            return Path(ep.load()().data_path)
    return None


def expected_shape(path: Path) -> tuple[int, ...] | None:
    """Rows x columns (x3 for colour) from the header, or None if the header cannot say."""
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        rows, cols = int(ds.Rows), int(ds.Columns)
        colour = int(ds.get("SamplesPerPixel", 1)) == 3 or ds.get("PhotometricInterpretation") == "PALETTE COLOR"
    except Exception:
        return None
    return (rows, cols, 3) if colour else (rows, cols)


def has_pixel_data(path: Path) -> bool:
    try:
        if any(k in pydicom.dcmread(path, force=True) for k in PIXEL_KEYWORDS):
            return True
    except Exception:
        pass
    # A file cut inside its pixel data parses without it; the tag bytes still show it was there.
    raw = path.read_bytes()
    looks_dicom = raw[128:132] == b"DICM" or path.suffix.lower() == ".dcm"
    return looks_dicom and (b"\xe0\x7f\x10\x00" in raw or b"\x7f\xe0\x00\x10" in raw)


def make_ct(path: Path, stored: np.ndarray, **attrs) -> Path:
    """Write a small synthetic CT with the given stored values (int16) and attributes."""
    ds = new_dataset(CTImageStorage, "CT")
    ds.set_pixel_data(stored.astype(np.int16), "MONOCHROME2", 16)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------- every shipped DICOM


@pytest.mark.filterwarnings("ignore")  # pydicom warns about the many deliberately odd test files
def test_every_shipped_dicom_decodes_or_raises_input_error():
    data_dir = pydicom_data_dir()
    if data_dir is None:
        pytest.skip("pydicom-data is not installed (pip install pydicom-data); it holds most real test DICOMs")
    roots = [Path(pydicom.data.__file__).parent / "test_files", data_dir]
    files = sorted(p for root in roots for p in root.rglob("*") if p.is_file())
    n_ok, failures, skipped = 0, [], 0
    for path in files:
        if not has_pixel_data(path):
            skipped += 1
            continue
        try:
            img = load_image(path)
        except InputError as e:
            assert str(e).strip(), f"{path.name}: InputError without a message"
            assert "Traceback" not in str(e) and "object has no attribute" not in str(e)
            failures.append(f"{path.name}: {e}")
            continue
        check_image(img)
        shape = expected_shape(path)
        if shape is not None:
            assert img.pixels.shape == shape, path.name
        n_ok += 1
    n_err = len(failures)
    print(f"\ndecoded {n_ok}, InputError {n_err} (skipped {skipped} files without pixel data)")
    print("\n".join(f"  InputError  {line}" for line in failures))
    assert n_ok > 100
    assert n_ok >= 0.9 * (n_ok + n_err)


# ----------------------------------------------------------------------------- real DICOM behaviour


def test_ct_window_presets_change_pixels():
    path = shipped("CT_small.dcm")
    lung, bone = load_image(path, window="lung"), load_image(path, window="bone")
    check_image(lung)
    assert lung.metadata["window"] == "lung"
    assert (lung.metadata["window_center"], lung.metadata["window_width"]) == WINDOW_PRESETS["lung"]
    assert not np.array_equal(lung.pixels, bone.pixels)
    assert np.array_equal(load_image(path, window="soft tissue").pixels, load_image(path, window="mediastinum").pixels)
    custom = load_image(path, window=(40, 400))
    assert custom.metadata["window"] == "custom"
    assert np.array_equal(custom.pixels, load_image(path, window="mediastinum").pixels)
    assert load_image(path).metadata["window"] in ("from file", "automatic", "VOI LUT from file")


def test_modality_rescale_then_window_in_hounsfield_units(tmp_path):
    # Stored 0, 1024, 2048 with intercept -1024 are -1024, 0, +1024 HU.
    path = make_ct(tmp_path / "ct.dcm", np.array([[0, 1024, 2048]]), RescaleIntercept=-1024, RescaleSlope=1)
    pixels = load_image(path, window=(0, 2048)).pixels
    assert pixels.shape == (1, 3)
    assert pixels[0, 0] == 0 and pixels[0, 2] == 255 and abs(int(pixels[0, 1]) - 128) <= 1
    # The file's own window is used when none is asked for.
    path = make_ct(tmp_path / "w.dcm", np.array([[0, 1024, 2048]]), RescaleIntercept=-1024, RescaleSlope=1,
                   WindowCenter=0, WindowWidth=2)
    img = load_image(path)
    assert img.metadata["window"] == "from file" and img.pixels.tolist() == [[0, 255, 255]]


def test_monochrome1_is_inverted(tmp_path):
    name = "RG3_UNCR.dcm" if get_testdata_file("RG3_UNCR.dcm", download=False) else None
    path = shipped(name) if name else Path(pydicom.data.__file__).parent / "test_files/dicomdirtests/77654033/CR1/6154"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.save_as(tmp_path / "m2.dcm")
    m1, m2 = load_image(path), load_image(tmp_path / "m2.dcm")
    assert m1.metadata["photometric"] == "MONOCHROME1"
    assert np.array_equal(m1.pixels.astype(int), 255 - m2.pixels.astype(int))


def test_multiframe_selection():
    path = shipped("emri_small.dcm") if get_testdata_file("emri_small.dcm", download=False) else shipped("rtdose.dcm")
    frames = int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames)
    default = load_image(path)
    assert default.num_frames == frames and default.frame == frames // 2
    assert np.array_equal(default.pixels, load_image(path, frame=frames // 2).pixels)
    first = load_image(path, frame=0)
    assert first.frame == 0 and first.metadata["frame"] == 0
    assert not np.array_equal(first.pixels, default.pixels)
    for bad in (frames, -1):
        with pytest.raises(InputError, match=f"0 to {frames - 1}"):
            load_image(path, frame=bad)


@pytest.mark.parametrize("name", [
    "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",  # lossless: == native
])
def test_lossless_compressed_dicom_equals_uncompressed(name):
    assert np.array_equal(load_image(shipped(name)).pixels, load_image(shipped("MR_small.dcm")).pixels)


@pytest.mark.parametrize("name, shape", [
    ("SC_rgb_rle.dcm", (100, 100, 3)),              # RLE colour
    ("SC_rgb_jpeg_dcmtk.dcm", (100, 100, 3)),       # JPEG baseline, YBR_FULL -> RGB
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", (100, 100, 3)),  # JPEG baseline, YBR_FULL_422
    ("SC_rgb_jpeg_gdcm.dcm", (100, 100, 3)),        # JPEG lossless
    ("JPGExtended.dcm", (1024, 256)),               # 12-bit JPEG extended
    ("JPEG2000.dcm", (1024, 256)),                  # JPEG 2000, signed 16-bit
    ("JPEGLSNearLossless_16.dcm", (50, 10)),        # JPEG-LS near-lossless 16-bit
    ("SC_rgb_jls_lossy_sample.dcm", (100, 100, 3)),
    ("examples_palette.dcm", (350, 800, 3)),        # PALETTE COLOR
    ("image_dfl.dcm", (512, 512)),                  # deflated
])
def test_compressed_and_colour_dicom_decode(name, shape):
    img = load_image(shipped(name))
    check_image(img)
    assert img.pixels.shape == shape and img.metadata["format"] == "DICOM"
    assert img.pixels.std() > 0  # not a blank image


def test_rgb_dicom_matches_pydicom(tmp_path):
    path = shipped("SC_rgb.dcm")
    assert np.array_equal(load_image(path).pixels, pydicom.dcmread(path).pixel_array)


def test_dicom_sources_and_bare_dicom(tmp_path):
    path = shipped("CT_small.dcm")
    raw = path.read_bytes()
    reference = load_image(path).pixels
    assert np.array_equal(load_image(raw).pixels, reference)
    with open(path, "rb") as f:
        assert np.array_equal(load_image(f).pixels, reference)
    assert np.array_equal(load_image(str(path)).pixels, reference)
    bare = tmp_path / "bare.dcm"  # no 128-byte preamble and no 'DICM'
    bare.write_bytes(raw[132:])
    assert np.array_equal(load_image(bare).pixels, reference)
    ds = pydicom.dcmread(path)  # no preamble and no file meta at all: the syntax must be inferred
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)
    assert np.array_equal(load_image(buf.getvalue()).pixels, reference)
    renamed = tmp_path / "image.png"  # the content decides, not the name
    renamed.write_bytes(raw)
    assert load_image(renamed).metadata["format"] == "DICOM"


# ----------------------------------------------------------------------------- de-identification


def test_metadata_and_logs_never_carry_identifiers(tmp_path, caplog):
    ds = pydicom.dcmread(shipped("CT_small.dcm"))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN12345", "19700101"
    ds.InstitutionName, ds.AccessionNumber = "St Example Hospital", "ACC98765"
    ds.StudyDescription, ds.BodyPartExamined, ds.ViewPosition = "Jane chest pain", "CHEST", "AP"
    secrets = ["Doe", "Jane", "JANE", "MRN12345", "19700101", "St Example", "ACC98765", str(ds.SOPInstanceUID),
               str(ds.StudyDate)]
    # An invalid UID: pydicom logs its value whenever the element is accessed, so this also proves
    # that the loader never touches identifying elements at all.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.StudyInstanceUID = "1.2.JANE.DOE"
        path = tmp_path / "patient.dcm"
        ds.save_as(path)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        img = load_image(path, window="lung")
    meta = img.metadata
    assert set(meta) <= METADATA_KEYS
    assert meta["modality"] == "CT" and meta["body_part"] == "CHEST" and meta["view"] == "AP"
    assert meta["rows"] == 128 and meta["columns"] == 128 and meta["format"] == "DICOM"
    assert meta["pixel_spacing"] and meta["bits_stored"] == 16
    summary = describe_metadata(meta)
    assert "CT" in summary and "CHEST" in summary and "lung" in summary
    logs = caplog.text + " ".join(r.getMessage() for r in caplog.records)
    assert any(r.name == "vlm.imaging" for r in caplog.records)
    for secret in secrets:
        for text in (repr(meta), summary, logs):
            assert secret not in text


def test_describe_metadata_for_plain_images():
    img = load_image(png_bytes(Image.new("L", (20, 10), 7)))
    assert describe_metadata(img.metadata).startswith("PNG")
    assert "20x10" in describe_metadata(img.metadata)
    assert describe_metadata({}) == "Image"


# ----------------------------------------------------------------------------- bad inputs


def huge_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims another size (CRC fixed): a decompression bomb in 70 bytes."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def bad_inputs(tmp_path: Path) -> dict[str, tuple[object, str]]:
    ct = shipped("CT_small.dcm").read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "half.dcm").write_bytes(ct[: len(ct) // 2])
    (tmp_path / "notes.dcm").write_text("Patient was seen today. Findings: none.\n" * 20)
    (tmp_path / "bomb.png").write_bytes(huge_png(30000, 30000))
    (tmp_path / "half.png").write_bytes(png_bytes(Image.new("L", (300, 300), 5))[:200])
    rng = np.random.default_rng(0)
    return {
        "empty file": (tmp_path / "empty.png", "empty"),
        "truncated DICOM": (tmp_path / "half.dcm", "truncated"),
        "text named .dcm": (tmp_path / "notes.dcm", "not a PNG, JPEG or DICOM"),
        "30000x30000 PNG": (tmp_path / "bomb.png", "30000x30000 pixels; the limit is 50,000,000"),
        "truncated PNG": (tmp_path / "half.png", ""),
        "empty bytes": (b"", "empty"),
        "random bytes": (rng.bytes(4096), "not a PNG, JPEG or DICOM"),
        "missing file": (tmp_path / "nope.dcm", "No image file"),
        "folder": (tmp_path, "No image file"),
        "DICOM without pixels": (shipped("rtplan.dcm"), "no image"),
        "DICOM over the pixel limit": (shipped("emri_small.dcm") if get_testdata_file("emri_small.dcm", download=False)
                                       else shipped("rtdose.dcm"), "frames; the limit"),
    }


BAD_NAMES = ["empty file", "truncated DICOM", "text named .dcm", "30000x30000 PNG", "truncated PNG",
             "empty bytes", "random bytes", "missing file", "folder", "DICOM without pixels"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_raises_input_error(tmp_path, name):
    source, fragment = bad_inputs(tmp_path)[name]
    with pytest.raises(InputError) as info:
        load_image(source)
    assert str(info.value).strip() and fragment in str(info.value)


def test_limits(tmp_path):
    path = shipped("CT_small.dcm")
    with pytest.raises(InputError, match="128x128 pixels; the limit is 1,000 pixels"):
        load_image(path, max_pixels=1000)
    with pytest.raises(InputError, match="frames; the limit"):
        load_image(shipped("rtdose.dcm"), max_pixels=10 * 10 * 14)
    with pytest.raises(InputError, match="MB; the limit"):
        load_image(path, max_bytes=1000)
    with pytest.raises(InputError, match="MB; the limit"):
        load_image(io.BytesIO(path.read_bytes()), max_bytes=1000)
    with pytest.raises(InputError, match="pixels; the limit"):
        load_image(png_bytes(Image.new("L", (200, 200))), max_pixels=100)


def test_zero_size_dicom_and_bad_windows(tmp_path):
    path = make_ct(tmp_path / "ct.dcm", np.zeros((2, 2)))
    ds = pydicom.dcmread(path)
    ds.Rows = 0
    ds.save_as(tmp_path / "zero.dcm")
    with pytest.raises(InputError, match="no pixels"):
        load_image(tmp_path / "zero.dcm")
    for window in ("liver", (40, 0), (40, float("nan")), ("a", "b"), 5):
        with pytest.raises(InputError):
            load_image(path, window=window)
    with pytest.raises(InputError, match="frame"):
        load_image(path, frame=1)


def test_unsupported_transfer_syntax_is_named(tmp_path):
    ds = pydicom.dcmread(shipped("CT_small.dcm"))
    ds.PixelData = encapsulate([ds.PixelData])  # stands in for an MPEG2 stream: no decoder here
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.save_as(tmp_path / "mpeg.dcm")
    with pytest.raises(InputError, match=r"1\.2\.840\.10008\.1\.2\.4\.100 \(MPEG2"):
        load_image(tmp_path / "mpeg.dcm")
