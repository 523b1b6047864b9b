"""Benchmark loaders: every task becomes a list of `Item`s with resolved image paths.

Native formats of VQA-RAD, SLAKE, PathVQA (pickles or Hugging Face parquet) and PMC-VQA, a
generic VQA JSONL, report JSONL and the NIH chest X-ray labels (see docs/evaluation.md). Paths in
data files are relative to the data file (or folder) unless absolute. A missing file or image is
a MedVLMError with one readable line; nothing here needs a model.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from eval.labeler import nih_to_chexpert
from eval.metrics import closed_options, normalize_answer
from vlm.datasets import DataError, read_labels, vqa_rad_image_bucket, vqa_rad_records
from vlm.errors import ConfigError
from vlm.prompts import REPORT_PROMPT

TASKS = ("vqa-rad", "slake", "pathvqa", "pmc-vqa", "vqa-jsonl", "report-jsonl", "nih-findings")

# The same, for readers of results.md (written under its "By image bucket" table).
VQA_RAD_BUCKET_NOTE = ("Image bucket (VQA-RAD, by a hash of the image name): `train` images are the ones `medvlm train "
                       "instruct-data` trains on, `val` images select models, `heldout` images are never trained on "
                       "(the test-disjoint split). On the standard test split every image also has training "
                       "questions, so `train` rows measure questions about images a recipe model has seen.")
VQA_RAD_SPLITS = ("test", "test-disjoint", "val", "train", "train-all")


@dataclass
class Item:
    id: str
    image: Path | None
    question: str
    answer: str
    answer_type: str  # "closed" | "open" | "report"
    question_type: str
    options: list[str] = field(default_factory=list)
    gold_labels: dict | None = None
    """CheXpert labels of the gold when it is labels, not text (nih-findings)."""
    image_bytes: bytes | None = field(default=None, repr=False)
    """The image itself, for formats that embed it (parquet)."""
    image_group: str = ""
    """VQA-RAD: the image's bucket ('train', 'val', 'heldout'), so that scores on the standard test
    split, which shares its images with training, can be read apart by whether the image was trained on."""


@dataclass
class Task:
    name: str
    kind: str  # "vqa" | "report"
    split: str
    items: list[Item]
    source: str = ""


def load_task(name: str, data: str | Path, split: str = "test", limit: int | None = None) -> Task:
    """Load benchmark `name` from `data` (a folder or file, as the format needs)."""
    loaders = {"vqa-rad": _vqa_rad, "slake": _slake, "pathvqa": _pathvqa, "pmc-vqa": _pmc_vqa,
               "vqa-jsonl": _vqa_jsonl, "report-jsonl": _report_jsonl, "nih-findings": _nih_findings}
    if name not in loaders:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}.")
    data = Path(data).expanduser()
    if not data.exists():
        raise DataError(f"{name}: no data at {data} (give the dataset's folder or file with --data).")
    items = loaders[name](data, split)
    if limit is not None:
        items = items[:limit]
    _check_images(name, items)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise DataError(f"{name}: question ids are not unique in {data}.")
    kind = "report" if name in ("report-jsonl", "nih-findings") else "vqa"
    return Task(name=name, kind=kind, split=split, items=items, source=str(data.resolve()))


# ---- helpers ------------------------------------------------------------------------------------

def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what}: {path} is missing.")
    return path


def _read_json(path: Path, what: str):
    try:
        return json.loads(_need(path, what).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{what}: {path} is not valid JSON ({e.msg}, line {e.lineno}).") from None


def _read_jsonl(path: Path, what: str) -> list[dict]:
    records = []
    for n, line in enumerate(_need(path, what).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{what}: line {n} of {path} is not valid JSON.") from None
    return records


def _pick_file(data: Path, split: str, suffix: str) -> Path:
    """`data` itself when it is a file, else `{split}{suffix}` inside the folder."""
    return data if data.is_file() else data / f"{split}{suffix}"


def _image_path(base: Path, name: str, *subdirs: str) -> Path:
    """`name` relative to `base` (or to one of its subfolders, first existing wins)."""
    path = Path(name)
    if path.is_absolute():
        return path
    candidates = [base / path] + [base / sub / path for sub in subdirs]
    return next((c for c in candidates if c.exists()), candidates[0])


def _check_images(name: str, items: list[Item]) -> None:
    missing = [it.image for it in items if it.image is not None and not it.image.is_file()]
    if missing:
        raise DataError(f"{name}: {len(missing)} of {len(items)} images are missing, e.g. {missing[0]}.")


def _closed_or_open(answer_type: str | None, answer: str) -> str:
    kind = str(answer_type or "").strip().lower()
    if kind in ("closed", "open"):
        return kind
    return "closed" if normalize_answer(answer) in ("yes", "no") else "open"


def _vqa_item(id_, image, question, answer, answer_type, question_type, image_group: str = "") -> Item:
    answer = str(answer).strip()
    kind = _closed_or_open(answer_type, answer)
    options = closed_options(question) if kind == "closed" else []
    return Item(str(id_), image, str(question).strip(), answer, kind, str(question_type or kind), options,
                image_group=image_group)


def _check_split(name: str, split: str, known: tuple[str, ...]) -> None:
    if split not in known:
        raise ConfigError(f"{name}: unknown split {split!r}; choose one of {', '.join(known)}.")


# ---- native formats -----------------------------------------------------------------------------

def _vqa_rad(data: Path, split: str) -> list[Item]:
    _check_split("vqa-rad", split, VQA_RAD_SPLITS)
    folder = data if data.is_dir() else data.parent
    source = "testset.json" if split in ("test", "test-disjoint") else "trainset.json"
    records = vqa_rad_records(folder / source)
    wanted = {"test-disjoint": "heldout", "val": "val", "train": "train"}.get(split)
    buckets = [vqa_rad_image_bucket(r["image_name"]) for r in records]
    # A few questions list two types ("PRES, POS"); the first one is the primary type.
    return [_vqa_item(r["qid"], folder / "images" / r["image_name"], r["question"], r["answer"],
                      r["answer_type"], str(r.get("question_type", "")).split(",")[0].strip(), image_group=bucket)
            for r, bucket in zip(records, buckets) if wanted in (None, bucket)]


def _slake(data: Path, split: str) -> list[Item]:
    files = {"test": "test.json", "train": "train.json", "val": "validate.json", "validate": "validate.json"}
    _check_split("slake", split, tuple(files))
    folder = data if data.is_dir() else data.parent
    records = _read_json(data if data.is_file() else folder / files[split], "slake")
    return [_vqa_item(r.get("qid", i), folder / "imgs" / r["img_name"], r["question"], r["answer"],
                      r.get("answer_type"), r.get("content_type"))
            for i, r in enumerate(records) if r.get("q_lang", "en") == "en"]


class _DataOnlyUnpickler(pickle.Unpickler):
    """Security: PathVQA ships its questions as pickles, and unpickling can run arbitrary code
    through the classes a pickle names. Refusing every class lookup leaves only the built-in
    containers and scalars (dict, list, str, numbers), so a hostile file fails instead of running."""

    def find_class(self, module, name):
        raise DataError(f"pathvqa: the pickle names {module}.{name}; only plain data (dict, list, str) is accepted.")


def _pathvqa(data: Path, split: str) -> list[Item]:
    _check_split("pathvqa", split, ("test", "val", "train"))
    if (data / "data").is_dir():
        return _pathvqa_parquet(data / "data", split)
    pkl = _need(data / "qas" / split / f"{split}_qa.pkl", "pathvqa")
    try:
        records = _DataOnlyUnpickler(io.BytesIO(pkl.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"pathvqa: {pkl} is not a readable question pickle ({e}).") from None
    return [_vqa_item(f"{split}-{i}", data / "images" / split / f"{r['image']}.jpg", r["question"], r["answer"],
                      None, None) for i, r in enumerate(records)]


def _pathvqa_parquet(folder: Path, split: str) -> list[Item]:
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
            item = _vqa_item(f"{split}-{len(items)}", None, row["question"], row["answer"], None, None)
            item.image_bytes = image.get("bytes") if isinstance(image, dict) else image
            if not item.image_bytes:
                raise DataError(f"pathvqa: row {len(items)} of {file} has no image bytes.")
            items.append(item)
    return items


def _pmc_vqa(data: Path, split: str) -> list[Item]:
    path = _need(_pick_file(data, split, ".csv"), "pmc-vqa")
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
            items.append(Item(str(row.get("index") or i), _image_path(base, row["Figure_path"], "images", "figures"),
                              question, answer, "closed", "choice", choices))
    return items


def _strip_letter(text: str) -> str:
    """'B:CT scan ' -> 'CT scan' (PMC-VQA prefixes each choice with its letter)."""
    text = (text or "").strip()
    return text[2:].strip() if len(text) > 1 and text[0] in "ABCD" and text[1] in ":.)" else text


# ---- generic and report formats ------------------------------------------------------------------

def _vqa_jsonl(data: Path, split: str) -> list[Item]:
    path = _pick_file(data, split, ".jsonl")
    items = []
    for i, r in enumerate(_read_jsonl(path, "vqa-jsonl")):
        if not {"image", "question", "answer"} <= r.keys():
            raise DataError(f"vqa-jsonl: record {i + 1} of {path} needs image, question and answer.")
        item = _vqa_item(r.get("id", i), _image_path(path.parent, r["image"]), r["question"], r["answer"],
                         r.get("answer_type"), r.get("question_type"))
        item.options = [str(o) for o in r.get("options", item.options)]
        items.append(item)
    return items


def _report_jsonl(data: Path, split: str) -> list[Item]:
    path = _pick_file(data, split, ".jsonl")
    items = []
    for i, r in enumerate(_read_jsonl(path, "report-jsonl")):
        # The model drafts a findings section, so the findings are the reference when sectioned.
        reference = r.get("report") or r.get("findings") or r.get("impression")
        if "image" not in r or not reference:
            raise DataError(f"report-jsonl: record {i + 1} of {path} needs image and report (or findings).")
        items.append(Item(str(r.get("id", i)), _image_path(path.parent, r["image"]), REPORT_PROMPT,
                          str(reference).strip(), "report", "report"))
    return items


def _nih_findings(data: Path, split: str) -> list[Item]:
    _check_split("nih-findings", split, ("test", "val", "train"))
    path = _need(data / "labels.csv" if data.is_dir() else data, "nih-findings")
    rows = [r for r in read_labels(path)[0] if r.get("split") == split]
    try:
        return [Item(r["image"], path.parent / "images" / r["image"], REPORT_PROMPT, r["findings"], "report",
                     r.get("view") or "report", gold_labels=nih_to_chexpert(r["findings"])) for r in rows]
    except (KeyError, ValueError) as e:
        raise DataError(f"nih-findings: {path} has an unexpected row ({e}).") from None
