"""`medvlm train nih-split`: a wider NIH val split carved out of train by patient (train/nih_labels.py; the labels are read by vlm/datasets.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from eval.tasks import load_task
from train.nih_labels import write_carved_split
from vlm.datasets import label_rows
from vlm.cli import main
from vlm.errors import InputError

COLUMNS = ["image", "findings", "view", "age", "sex", "patient_id", "split"]


def _nih_folder(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A labels.csv of (image, patient_id, split) rows and an images/ folder holding each image."""
    root.mkdir()
    (root / "images").mkdir()
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for image, patient, split in rows:
            writer.writerow([image, "Nodule" if int(patient) % 2 else "No Finding", "PA", 50, "F", patient, split])
            (root / "images" / image).write_bytes(b"")
    return root


def _splits(folder: Path) -> dict[str, str]:
    with (folder / "labels.csv").open(newline="") as f:
        return {r["image"]: r["split"] for r in csv.DictReader(f)}


@pytest.fixture
def nih(tmp_path) -> Path:
    # patient 3 has two train images; 10 and 11 are val and test
    rows = [(f"{p}_000.jpg", str(p), "train") for p in range(1, 9)] + [("3_001.jpg", "3", "train"),
                                                                       ("10_000.jpg", "10", "val"),
                                                                       ("11_000.jpg", "11", "test")]
    return _nih_folder(tmp_path / "nih", rows)


def test_carved_patients_move_from_train_to_val_whole_and_test_is_untouched(nih, tmp_path):
    counts = write_carved_split(nih, tmp_path / "wide", count=3)
    before, after = _splits(nih), _splits(tmp_path / "wide")
    moved = {image for image in before if before[image] != after[image]}
    assert all(before[i] == "train" and after[i] == "val" for i in moved)
    moved_patients = {i.split("_")[0] for i in moved}
    assert len(moved_patients) == 3
    assert ("3_000.jpg" in moved) == ("3_001.jpg" in moved)  # a patient's images move together
    assert after["11_000.jpg"] == "test" and after["10_000.jpg"] == "val"
    assert counts == {"train": 9 - len(moved), "val": 1 + len(moved), "test": 1}
    # the commands that read an NIH folder see the new splits, through the linked images
    assert len(load_task("nih-findings", tmp_path / "wide", "val").items) == counts["val"]
    assert all(p.exists() for p, _ in label_rows(tmp_path / "wide" / "labels.csv", "train"))


def test_the_draw_depends_on_seed_and_patients_not_on_row_order(nih, tmp_path):
    lines = (nih / "labels.csv").read_text().splitlines(keepends=True)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    (shuffled / "labels.csv").write_text(lines[0] + "".join(reversed(lines[1:])))  # header, rows reversed
    (shuffled / "images").symlink_to(nih / "images")
    write_carved_split(nih, tmp_path / "a", count=4)
    write_carved_split(shuffled, tmp_path / "b", count=4)
    assert _splits(tmp_path / "a") == _splits(tmp_path / "b")
    draws = set()
    for seed in range(6):
        write_carved_split(nih, tmp_path / f"seed{seed}", 4, seed)
        draws.add(frozenset(i for i, s in _splits(tmp_path / f"seed{seed}").items() if s == "val"))
    assert len(draws) > 1


def test_bad_requests_are_clear_errors_and_write_nothing(nih, tmp_path, capsys):
    for count in (0, 8):  # 8 train patients: carving all of them would leave no train split
        with pytest.raises(InputError, match="between 1 and 7"):
            write_carved_split(nih, tmp_path / "out", count)
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="not the source folder"):
        write_carved_split(nih, nih, 2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["train", "nih-split", "--nih", str(nih), "--carve-val", "2", "--out", str(tmp_path / "full")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(InputError, match="not an empty folder"):  # a file given as the output folder
        write_carved_split(nih, tmp_path / "full" / "keep.txt", 2)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(InputError, match="cannot write"):  # a file where a folder must go
        write_carved_split(nih, tmp_path / "full" / "keep.txt" / "wide", 2)
    assert _splits(nih)["1_000.jpg"] == "train"


def test_the_command_prints_the_split_sizes(nih, tmp_path, capsys):
    assert main(["train", "nih-split", "--nih", str(nih), "--carve-val", "2", "--out", str(tmp_path / "w")]) == 0
    splits = list(_splits(tmp_path / "w").values())
    expected = ", ".join(f"{s}: {splits.count(s)}" for s in ("train", "val", "test"))
    assert capsys.readouterr().out.startswith(expected + " -> ")
