"""Readers of the public datasets that both training and evaluation use, and the one definition
of their splits: VQA-RAD's question records and image buckets (a stable hash of the image name),
SLAKE, PathVQA and PMC-VQA questions as `VQARecord`s, and the NIH chest X-ray labels CSV (`image,findings,split`, findings joined by "|"). No model, no metrics: the
benchmark loaders (eval/tasks.py) and the training data builders (train/) are built on these.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from vlm.errors import ConfigError, InputError


class DataError(InputError):
    """A benchmark file or image that is missing or cannot be read."""

# VQA-RAD image buckets by a stable hash of the image name: the single definition of its splits.
# The standard test set shares every image with the training set, so results are also reported on
# test questions about held-out images, and model selection uses val images; neither is trained on.
VQA_RAD_BUCKETS = (("heldout", 0.15), ("val", 0.25), ("train", 1.0))

NO_FINDING = "No Finding"

# The NIH labels.csv columns that `medvlm train nih-tables` adds (train/nih_tables.py), read by eval's
# `nih-findings --labels`: findings_v2020 (Data_Entry_2017_v2020, same format as findings), expert (the
# Google 2019 expert labels, below) and boxes (one BBox_List_2017 label per box, '|'-separated).
EXPERT_LABELS = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")
"""The four findings the Google 2019 experts adjudicated, in their file's column order."""


def format_expert(values: dict[str, bool]) -> str:
    """The expert column of one image: every adjudicated finding as NAME=YES or NAME=NO, '|'-separated
    in EXPERT_LABELS order ("Fracture=NO|Pneumothorax=YES|Airspace opacity=NO|Nodule or mass=NO"), so an
    image the experts read and found none of the four in is told apart from one they never read ("")."""
    return "|".join(f"{name}={'YES' if values[name] else 'NO'}" for name in EXPERT_LABELS)


def parse_expert(text: str) -> dict[str, bool]:
    """The inverse of format_expert: {finding: positive}, {} for an image without expert labels;
    ValueError for anything else."""
    if not text.strip():
        return {}
    values = {}
    for part in text.split("|"):
        name, _, value = part.partition("=")
        if name not in EXPERT_LABELS or value not in ("YES", "NO") or name in values:
            raise ValueError(f"not an expert label entry: {part!r} (want e.g. 'Pneumothorax=YES')")
        values[name] = value == "YES"
    return values


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


# ---- SLAKE, PathVQA, PMC-VQA ---------------------------------------------------------------

@dataclass(frozen=True)
class VQARecord:
    """One question of a VQA dataset, as its files state it (no scoring decisions here)."""

    id: str
    image: Path | None
    question: str
    answer: str
    answer_type: str | None = None
    """"closed"/"open" when the dataset says so (any case), else None."""
    question_type: str | None = None
    choices: tuple[str, ...] = ()
    """Multiple-choice options, in order (PMC-VQA)."""
    image_bytes: bytes | None = field(default=None, repr=False)
    """The image itself, for formats that embed it (PathVQA's parquet)."""


def slake_records(data: Path, split: str) -> list[VQARecord]:
    """SLAKE's English questions (train.json, validate.json, test.json; images in imgs/)."""
    files = {"test": "test.json", "train": "train.json", "val": "validate.json", "validate": "validate.json"}
    check_split("slake", split, tuple(files))
    folder = data if data.is_dir() else data.parent
    records = read_json(data if data.is_file() else folder / files[split], "slake")
    return [VQARecord(str(r.get("qid", i)), folder / "imgs" / r["img_name"], r["question"], r["answer"],
                      r.get("answer_type"), r.get("content_type"))
            for i, r in enumerate(records) if r.get("q_lang", "en") == "en"]


class _DataOnlyUnpickler(pickle.Unpickler):
    """Security: PathVQA ships its questions as pickles, and unpickling can run arbitrary code
    through the classes a pickle names. Refusing every class lookup leaves only the built-in
    containers and scalars (dict, list, str, numbers), so a hostile file fails instead of running."""

    def find_class(self, module, name):
        raise DataError(f"pathvqa: the pickle names {module}.{name}; only plain data (dict, list, str) is accepted.")


def pathvqa_records(data: Path, split: str) -> list[VQARecord]:
    """PathVQA: its question pickles (read as plain data only) or its Hugging Face parquet files."""
    check_split("pathvqa", split, ("test", "val", "train"))
    if (data / "data").is_dir():
        return _pathvqa_parquet(data / "data", split)
    pkl = need(data / "qas" / split / f"{split}_qa.pkl", "pathvqa")
    try:
        records = _DataOnlyUnpickler(io.BytesIO(pkl.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"pathvqa: {pkl} is not a readable question pickle ({e}).") from None
    return [VQARecord(f"{split}-{i}", data / "images" / split / f"{r['image']}.jpg", r["question"], r["answer"])
            for i, r in enumerate(records)]


def _pathvqa_parquet(folder: Path, split: str) -> list[VQARecord]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("pathvqa: reading the parquet layout needs pyarrow; run `pip install pyarrow`.") from None
    files = sorted(folder.glob(f"{split}-*.parquet"))
    if not files:
        raise DataError(f"pathvqa: no {split}-*.parquet files in {folder}.")
    items = []
    for file in files:
        for row in pq.read_table(file, columns=["image", "question", "answer"]).to_pylist():
            image = row["image"]
            image_bytes = image.get("bytes") if isinstance(image, dict) else image
            if not image_bytes:
                raise DataError(f"pathvqa: row {len(items)} of {file} has no image bytes.")
            items.append(VQARecord(f"{split}-{len(items)}", None, row["question"], row["answer"],
                                   image_bytes=image_bytes))
    return items


def pmc_vqa_records(data: Path, split: str) -> list[VQARecord]:
    """PMC-VQA's multiple-choice questions (a CSV per split); the question lists its lettered choices."""
    path = need(pick_file(data, split, ".csv"), "pmc-vqa")
    base = path.parent
    items = []
    with path.open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            choices = [_strip_letter(row.get(f"Choice {c}", "")) for c in "ABCD"]
            choices = [c for c in choices if c]
            listed = "\n".join(f"{chr(65 + k)}: {c}" for k, c in enumerate(choices))
            question = f"{row['Question'].strip()}\n{listed}"
            letter = (row.get("Answer_label") or "").strip().upper()
            # The letter is the key; the Answer text can differ from its choice in spacing.
            answer = choices[ord(letter) - 65] if len(letter) == 1 and 0 <= ord(letter) - 65 < len(choices) \
                else _strip_letter(row.get("Answer", ""))
            items.append(VQARecord(str(row.get("index") or i), image_path(base, row["Figure_path"], "images", "figures"),
                                   question, answer, "closed", "choice", tuple(choices)))
    return items


def _strip_letter(text: str) -> str:
    """'B:CT scan ' -> 'CT scan' (PMC-VQA prefixes each choice with its letter)."""
    text = (text or "").strip()
    return text[2:].strip() if len(text) > 1 and text[0] in "ABCD" and text[1] in ":.)" else text


# ---- file helpers the readers share (and eval/tasks.py's generic formats) --------------------

def need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what}: {path} is missing.")
    return path


def read_json(path: Path, what: str):
    try:
        return json.loads(need(path, what).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{what}: {path} is not valid JSON ({e.msg}, line {e.lineno}).") from None


def read_jsonl(path: Path, what: str) -> list[dict]:
    records = []
    for n, line in enumerate(need(path, what).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{what}: line {n} of {path} is not valid JSON.") from None
    return records


def pick_file(data: Path, split: str, suffix: str) -> Path:
    """`data` itself when it is a file, else `{split}{suffix}` inside the folder."""
    return data if data.is_file() else data / f"{split}{suffix}"


def image_path(base: Path, name: str, *subdirs: str) -> Path:
    """`name` relative to `base` (or to one of its subfolders, first existing wins)."""
    path = Path(name)
    if path.is_absolute():
        return path
    candidates = [base / path] + [base / sub / path for sub in subdirs]
    return next((c for c in candidates if c.exists()), candidates[0])


def check_split(name: str, split: str, known: tuple[str, ...]) -> None:
    if split not in known:
        raise ConfigError(f"{name}: unknown split {split!r}; choose one of {', '.join(known)}.")
