"""Readers of the public datasets that both training and evaluation use, and the one definition
of their splits: VQA-RAD's question records and image buckets (a stable hash of the image name)
and the NIH chest X-ray labels CSV (`image,findings,split`, findings joined by "|"). No model, no metrics: the
benchmark loaders (eval/tasks.py) and the training data builders (train/) are built on these.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from vlm.errors import InputError


class DataError(InputError):
    """A benchmark file or image that is missing or cannot be read."""

# VQA-RAD image buckets by a stable hash of the image name: the single definition of its splits.
# The standard test set shares every image with the training set, so results are also reported on
# test questions about held-out images, and model selection uses val images; neither is trained on.
VQA_RAD_BUCKETS = (("heldout", 0.15), ("val", 0.25), ("train", 1.0))

NO_FINDING = "No Finding"


def vqa_rad_image_bucket(image_name: str) -> str:
    """'heldout', 'val' or 'train': where a VQA-RAD image belongs, from the SHA-1 of its name
    (not Python's hash(), which changes between processes)."""
    fraction = int(hashlib.sha1(image_name.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return next(bucket for bucket, upper in VQA_RAD_BUCKETS if fraction < upper)


def vqa_rad_records(path: str | Path) -> list[dict]:
    """The question records of a VQA-RAD file (trainset.json or testset.json: qid, image_name,
    question, answer, answer_type, question_type, ...); a readable DataError for a missing file,
    bad JSON, or records without an image name."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"vqa-rad: {path} is missing.")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"vqa-rad: {path} is not valid JSON ({e.msg}, line {e.lineno}).") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"vqa-rad: {path} cannot be read ({type(e).__name__}).") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "image_name" in r for r in records):
        raise DataError(f"vqa-rad: {path} is not a list of question records with an image_name each.")
    return records


def label_rows(path: Path, split: str) -> list[tuple[Path, frozenset[str]]]:
    """(image path, its findings without "No Finding") for each row of `split`; a clear error otherwise."""
    rows, columns = read_labels(path)
    if rows and not {"image", "findings", "split"} <= set(columns):
        raise InputError(f"{path}: needs columns image, findings, split.")
    out = [(image_beside(path, r["image"]), frozenset(f for f in r["findings"].split("|") if f and f != NO_FINDING))
           for r in rows if r["split"] == split]
    if not out:
        raise InputError(f"{path}: no rows in split {split!r}.")
    return out


def read_labels(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a labels CSV and its column names; a clear error if it cannot be read."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            return list(reader), list(reader.fieldnames or [])
    except OSError as e:
        raise InputError(f"cannot read labels {path}: {e.strerror}") from e


def image_beside(csv_path: Path, name: str) -> Path:
    """An image named in a labels CSV: relative to the CSV, else in images/ beside it (the NIH layout)."""
    direct = csv_path.parent / name
    return direct if direct.exists() else csv_path.parent / "images" / name


def finding_words(label: str) -> str:
    """A label as words in a caption: "Pleural_Thickening" -> "pleural thickening"."""
    return label.replace("_", " ").lower()
