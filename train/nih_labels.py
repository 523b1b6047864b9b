"""The NIH labels CSV (`image,findings,split`, findings joined by "|") as the training stages read it:
captions and zero-shot prompts (train/clip.py, train/captions.py), report conversations
(train/reports.py) and the feature probes of eval/image_use.py."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from vlm.errors import InputError

NO_FINDING = "No Finding"


def label_rows(path: Path, split: str) -> list[tuple[Path, frozenset[str]]]:
    """(image path, its findings without "No Finding") for each row of `split`; a clear error otherwise."""
    rows, columns = _read_labels(path)
    if rows and not {"image", "findings", "split"} <= set(columns):
        raise InputError(f"{path}: needs columns image, findings, split.")
    out = [(_beside(path, r["image"]), frozenset(f for f in r["findings"].split("|") if f and f != NO_FINDING))
           for r in rows if r["split"] == split]
    if not out:
        raise InputError(f"{path}: no rows in split {split!r}.")
    return out


def write_carved_split(source: Path, out: Path, count: int, seed: int = 0) -> dict[str, int]:
    """A copy of the NIH folder `source` in `out` (labels.csv, and images/ as a link to the source's)
    with `count` train patients moved to val, so every command that takes the NIH folder sees the
    wider val split and the smaller train split; test is untouched. Why: 53 val images give a
    micro-F1 interval about 0.17 wide, wider than the gaps between runs it has to judge
    (docs/demo-model-history.md). Patients are drawn by the SHA-1 of `seed:patient_id`, so the draw depends on
    neither row order nor Python's hash; all images of a drawn patient move together. Returns the
    image count per split."""
    labels, images = source / "labels.csv", source / "images"
    rows, columns = _read_labels(labels)
    if not {"image", "split", "patient_id"} <= set(columns):
        raise InputError(f"{labels}: needs columns image, split, patient_id to carve by patient.")
    train_patients = sorted({r["patient_id"] for r in rows if r["split"] == "train"},
                            key=lambda p: hashlib.sha1(f"{seed}:{p}".encode()).hexdigest())
    if not 0 < count < len(train_patients):
        raise InputError(f"--carve-val must be between 1 and {len(train_patients) - 1} "
                         f"(the train patients of {labels}), got {count}.")
    if not images.is_dir():
        raise InputError(f"{images} is not a folder of images.")
    if out.resolve() == source.resolve():
        raise InputError("--out must be a new folder, not the source folder: its labels would be overwritten.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} exists and is not an empty folder; choose a new folder.")
    carved = set(train_patients[:count])
    for r in rows:
        if r["split"] == "train" and r["patient_id"] in carved:
            r["split"] = "val"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "labels.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        (out / "images").symlink_to(images.resolve(), target_is_directory=True)
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror}") from e
    return {split: sum(r["split"] == split for r in rows) for split in ("train", "val", "test")}


def _read_labels(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a labels CSV and its column names; a clear error if it cannot be read."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            return list(reader), list(reader.fieldnames or [])
    except OSError as e:
        raise InputError(f"cannot read labels {path}: {e.strerror}") from e


def _beside(csv_path: Path, name: str) -> Path:
    """An image named in a labels CSV: relative to the CSV, else in images/ beside it (the NIH layout)."""
    direct = csv_path.parent / name
    return direct if direct.exists() else csv_path.parent / "images" / name


def finding_words(label: str) -> str:
    """A label as words in a caption: "Pleural_Thickening" -> "pleural thickening"."""
    return label.replace("_", " ").lower()
