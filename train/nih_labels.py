"""The NIH labels CSV (`image,findings,split`, findings joined by "|") as the training stages read it:
captions and zero-shot prompts (train/clip.py, train/captions.py), report conversations
(train/reports.py) and the feature probes of eval/image_use.py."""

from __future__ import annotations

import csv
from pathlib import Path

from vlm.errors import InputError

NO_FINDING = "No Finding"


def label_rows(path: Path, split: str) -> list[tuple[Path, frozenset[str]]]:
    """(image path, its findings without "No Finding") for each row of `split`; a clear error otherwise."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise InputError(f"cannot read labels {path}: {e.strerror}") from e
    if rows and not {"image", "findings", "split"} <= set(rows[0]):
        raise InputError(f"{path}: needs columns image, findings, split.")
    out = [(_beside(path, r["image"]), frozenset(f for f in r["findings"].split("|") if f and f != NO_FINDING))
           for r in rows if r["split"] == split]
    if not out:
        raise InputError(f"{path}: no rows in split {split!r}.")
    return out


def _beside(csv_path: Path, name: str) -> Path:
    """An image named in a labels CSV: relative to the CSV, else in images/ beside it (the NIH layout)."""
    direct = csv_path.parent / name
    return direct if direct.exists() else csv_path.parent / "images" / name


def finding_words(label: str) -> str:
    """A label as words in a caption: "Pleural_Thickening" -> "pleural thickening"."""
    return label.replace("_", " ").lower()
