"""Slices of public volumes (train/volumes.py): orientation, labels, the held-out band, the files
`medvlm train slice-data` writes and how instruct-data, clip-data and eval read them. The volumes
here are tiny ones built in the test, in the real files' formats (an InVesalius .inv3 archive and a
NIfTI file); no Debian package is needed."""

from __future__ import annotations

import io
import json
import plistlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.grounding import grounding_turns
from train.volumes import (HELDOUT_BAND, PLANES, Volume, anatomy_positions, cut, read_invesalius, read_nifti,
                           split_positions, write_slice_data)
from vlm.datasets import DataError

SHAPE = (20, 24, 28)  # InVesalius order: slices (inferior -> superior), rows (posterior -> anterior), columns


def _head_ct() -> np.ndarray:
    """A box of soft tissue (40 HU) in air, with a bone marker (1000 HU) in its anterior-superior corner."""
    zyx = np.full(SHAPE, -1000, dtype=np.int16)
    zyx[2:18, 3:21, 4:24] = 40
    zyx[15:18, 17:21, 12:14] = 1000  # superior (high slice), anterior (high row)
    return zyx


def _inv3(path: Path, zyx: np.ndarray, modality: str = "CT", shape=None) -> Path:
    main = {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(shape or zyx.shape)},
            "modality": modality, "name": "PATIENT NAME", "spacing": [1.0, 1.0, 1.5]}
    with tarfile.open(path, "w:gz") as archive:
        for name, data in (("tmpx/main.plist", plistlib.dumps(main)), ("tmpx/matrix.dat", zyx.astype("<i2").tobytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_invesalius_ct_reads_in_hu_and_displays_anterior_and_superior_up(tmp_path):
    volume = read_invesalius(_inv3(tmp_path / "head.inv3", _head_ct()))
    assert volume.modality == "CT" and volume.data.shape == (28, 24, 20) and volume.spacing == (1.0, 1.0, 1.5)
    axial, size = cut(volume, "axial", 16)
    rows = np.nonzero((axial == 1000).any(axis=1))[0]
    assert rows.max() < axial.shape[0] // 2, "anterior is at the top of an axial slice"
    assert size == (1.0, 1.0)
    for plane in ("coronal", "sagittal"):
        index = 18 if plane == "coronal" else 12
        image, size = cut(volume, plane, index)
        assert size[0] == 1.5
        rows = np.nonzero((image == 1000).any(axis=1))[0]
        assert len(rows) and rows.max() < image.shape[0] // 2, f"superior is at the top of a {plane} slice"
    sagittal, _ = cut(volume, "sagittal", 12)
    columns = np.nonzero((sagittal == 1000).any(axis=0))[0]
    assert columns.max() < sagittal.shape[1] // 2, "anterior is on the left of a sagittal slice"


def test_bad_invesalius_files_fail_in_one_line(tmp_path):
    (tmp_path / "not.inv3").write_bytes(b"plain text, not an archive")
    with pytest.raises(DataError, match="cannot read it as an InVesalius project"):
        read_invesalius(tmp_path / "not.inv3")
    with pytest.raises(DataError, match="holds .* bytes"):
        read_invesalius(_inv3(tmp_path / "short.inv3", _head_ct(), shape=(21, 24, 28)))
    with pytest.raises(DataError, match="not CT"):
        read_invesalius(_inv3(tmp_path / "mr.inv3", _head_ct(), modality="MR"))
    with pytest.raises(DataError, match="cannot read it as an InVesalius project"):
        read_invesalius(tmp_path / "missing.inv3")


def test_nifti_is_reoriented_by_its_affine(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    data = np.zeros((10, 12, 14), dtype=np.float32)
    data[2:8, 2:10, 2:12] = 100
    data[2:8, 8:10, 10:12] = 300  # anterior, superior
    flipped = data[:, ::-1, :].copy()  # stored posterior-first: the affine says so
    affine = np.diag([1.0, -1.0, 1.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(flipped, affine), tmp_path / "t1.nii.gz")
    volume = read_nifti(tmp_path / "t1.nii.gz", "mri-t1")
    assert volume.modality == "MRI" and np.array_equal(volume.data, data)
    (tmp_path / "bad.nii.gz").write_bytes(b"nope")
    with pytest.raises(DataError, match="cannot read it as NIfTI"):
        read_nifti(tmp_path / "bad.nii.gz", "x")


def test_the_heldout_band_is_disjoint_from_training_with_a_gap():
    positions = list(range(100, 300))
    split = split_positions(positions, step=2)
    assert split["val"] and split["train"] and not set(split["val"]) & set(split["train"])
    lo, hi = HELDOUT_BAND
    assert all(lo * 199 <= p - 100 < hi * 199 for p in split["val"])
    nearest = min(abs(t - v) for t in split["train"] for v in split["val"])
    assert nearest > 4, "neighbouring slices are nearly the same image: none may straddle the band"


def test_window_questions_are_balanced_and_name_the_truth():
    import random

    answers = [dict(grounding_turns({"window": "bone"}, random.Random(seed))) for seed in range(200)]
    yes_no = [a for turns in answers for q, a in turns.items() if a in ("yes", "no")]
    assert 0.35 < yes_no.count("yes") / len(yes_no) < 0.65
    either = [(q, a) for turns in answers for q, a in turns.items() if " or " in q]
    assert either and all(a == "bone" and "bone window" in q for q, a in either)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_slice_data_files_feed_instruct_clip_and_eval(tmp_path):
    from eval.tasks import load_task
    from vlm.cli import main

    inv3 = _inv3(tmp_path / "head.inv3", _head_ct())
    out = tmp_path / "slices"
    assert main(["train", "slice-data", "--invesalius", str(inv3), "--out", str(out), "--step", "1",
                 "--augmentations", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())["counts"]
    assert Image.open(out / "contact_sheet.png").size[1] == 160  # one row: the one volume
    conversations = json.loads((out / "train.json").read_text())
    assert manifest["train_images"] == len(conversations) > 0
    assert all(Path(c["image"]).is_file() for c in conversations)
    for c in conversations:  # every answer agrees with the slice's labels (read from its file name)
        plane = next(p for p in PLANES if f"-{p}-" in c["image"])
        pairs = list(zip(c["conversations"][::2], c["conversations"][1::2]))
        assert pairs[0][0]["value"].startswith("<image>")
        assert all(a["value"] != "MRI" for _, a in pairs)
        assert all(a["value"] == plane for q, a in pairs if " or " in q["value"] and "image?" in q["value"])
    task = load_task("vqa-jsonl", out, split="val")
    kinds = {it.question_type for it in task.items}
    assert kinds == {"MODALITY", "ORGAN", "PLANE", "WINDOW"}
    assert all(it.answer_type == "closed" and it.options for it in task.items if it.id.split("-")[-1] != "open")
    assert {it.answer for it in task.items if it.question_type == "WINDOW"} == {"brain", "soft tissue", "bone"}
    val_images = {it.image.name for it in task.items}
    train_positions = {Path(c["image"]).stem.rsplit("-", 1)[0] for c in conversations}
    assert not {n.rsplit("-", 1)[0] for n in val_images} & train_positions, "held-out positions are never trained on"
    assert "PATIENT NAME" not in "".join(p.name for p in (out / "images").iterdir())
    # instruct-data and clip-data take the folder
    nih = tmp_path / "nih"
    (nih / "images").mkdir(parents=True)
    (nih / "labels.csv").write_text("image,findings,split\na.png,No Finding,train\nb.png,Effusion,val\n")
    vqa = tmp_path / "vqa"
    (vqa / "images").mkdir(parents=True)
    (vqa / "trainset.json").write_text("[]")
    assert main(["train", "instruct-data", "--nih", str(nih), "--vqa-rad", str(vqa), "--out", str(tmp_path / "mix"),
                 "--slices", str(out), "--slice-repeats", "2"]) == 0
    mix = json.loads((tmp_path / "mix" / "train.json").read_text())
    assert len([c for c in mix if c["image"].startswith(str(out))]) == 2 * len(conversations)
    assert len({c["id"] for c in mix}) == len(mix)
    assert main(["train", "clip-data", "--nih", str(nih), "--vqa-rad", str(vqa), "--out", str(tmp_path / "clip"),
                 "--slices", str(out)]) == 0
    captions = (tmp_path / "clip" / "train.jsonl").read_text().splitlines()
    assert sum("a CT scan of the head" in line for line in captions) == len(conversations)
    assert main(["train", "slice-data", "--out", str(out)]) != 0  # no volume given
    assert main(["train", "instruct-data", "--nih", str(nih), "--vqa-rad", str(vqa), "--out", str(tmp_path / "m2"),
                 "--slices", str(tmp_path)]) != 0  # not a slice-data folder


def test_anatomy_positions_skip_empty_slices():
    data = np.zeros((8, 8, 8), dtype=np.float32)
    data[:, :, 3:6] = 50.0
    volume = Volume("mri-x", "MRI", data, (1.0, 1.0, 1.0))
    assert anatomy_positions(volume, "axial") == [3, 4, 5]
