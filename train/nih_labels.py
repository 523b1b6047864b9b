"""`medvlm train nih-split`: a copy of the NIH labels with a wider val split carved out of train.
The labels CSV itself is read by vlm/datasets.py (one reader for training and evaluation)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from vlm.datasets import read_labels
from vlm.errors import InputError


def write_carved_split(source: Path, out: Path, count: int, seed: int = 0) -> dict[str, int]:
    """A copy of the NIH folder `source` in `out` (labels.csv, and images/ as a link to the source's)
    with `count` train patients moved to val, so every command that takes the NIH folder sees the
    wider val split and the smaller train split; test is untouched. Why: 53 val images give a
    micro-F1 interval about 0.17 wide, wider than the gaps between runs it has to judge
    (docs/demo-model-history.md). Patients are drawn by the SHA-1 of `seed:patient_id`, so the draw depends on
    neither row order nor Python's hash; all images of a drawn patient move together. Returns the
    image count per split."""
    labels = source / "labels.csv"
    rows, columns = read_labels(labels)
    if not {"image", "split", "patient_id"} <= set(columns):
        raise InputError(f"{labels}: needs columns image, split, patient_id to carve by patient.")
    train_patients = sorted({r["patient_id"] for r in rows if r["split"] == "train"},
                            key=lambda p: hashlib.sha1(f"{seed}:{p}".encode()).hexdigest())
    if not 0 < count < len(train_patients):
        raise InputError(f"--carve-val must be between 1 and {len(train_patients) - 1} "
                         f"(the train patients of {labels}), got {count}.")
    carved = set(train_patients[:count])
    for r in rows:
        if r["split"] == "train" and r["patient_id"] in carved:
            r["split"] = "val"
    write_labels_copy(source, out, rows, columns)
    return {split: sum(r["split"] == split for r in rows) for split in ("train", "val", "test")}


def check_copy_target(source: Path, out: Path) -> None:
    """Refuse an `out` that would not be a new copy of the NIH folder `source` (one line each)."""
    images = source / "images"
    if not images.is_dir():
        raise InputError(f"{images} is not a folder of images.")
    if out.resolve() == source.resolve():
        raise InputError("--out must be a new folder, not the source folder: its labels would be overwritten.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder; choose a new folder.")


def write_labels_copy(source: Path, out: Path, rows: list[dict], columns: list[str]) -> None:
    """`out`/labels.csv with `rows` (those `columns`, in order) and `out`/images linked to the source's
    images (a link that is itself a link resolves to the real folder). Checks `out` first."""
    check_copy_target(source, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "labels.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        (out / "images").symlink_to((source / "images").resolve(), target_is_directory=True)
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror}") from e


