"""Benchmark loaders: every task becomes a list of `Item`s with resolved image paths.

Native formats of VQA-RAD, SLAKE, PathVQA (pickles or Hugging Face parquet) and PMC-VQA, a
generic VQA JSONL, report JSONL and the NIH chest X-ray labels (see docs/evaluation.md). Paths in
data files are relative to the data file (or folder) unless absolute. A missing file or image is
a MedVLMError with one readable line; nothing here needs a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eval.labeler import nih_to_chexpert
from eval.metrics import closed_options, normalize_answer
from vlm.datasets import (DataError, VQARecord, check_split, image_path, need, pathvqa_records, pick_file,
                          pmc_vqa_records, read_jsonl, read_labels, slake_records, vqa_rad_image_bucket, vqa_rad_records)
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


# ---- native formats -----------------------------------------------------------------------------

def _vqa_rad(data: Path, split: str) -> list[Item]:
    check_split("vqa-rad", split, VQA_RAD_SPLITS)
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
    return [_record_item(r) for r in slake_records(data, split)]


def _pathvqa(data: Path, split: str) -> list[Item]:
    return [_record_item(r) for r in pathvqa_records(data, split)]


def _pmc_vqa(data: Path, split: str) -> list[Item]:
    return [Item(r.id, r.image, r.question, r.answer, "closed", "choice", list(r.choices))
            for r in pmc_vqa_records(data, split)]


def _record_item(record: VQARecord) -> Item:
    item = _vqa_item(record.id, record.image, record.question, record.answer, record.answer_type,
                     record.question_type)
    item.image_bytes = record.image_bytes
    return item


# ---- generic and report formats ------------------------------------------------------------------

def _vqa_jsonl(data: Path, split: str) -> list[Item]:
    path = pick_file(data, split, ".jsonl")
    items = []
    for i, r in enumerate(read_jsonl(path, "vqa-jsonl")):
        if not {"image", "question", "answer"} <= r.keys():
            raise DataError(f"vqa-jsonl: record {i + 1} of {path} needs image, question and answer.")
        item = _vqa_item(r.get("id", i), image_path(path.parent, r["image"]), r["question"], r["answer"],
                         r.get("answer_type"), r.get("question_type"))
        item.options = [str(o) for o in r.get("options", item.options)]
        items.append(item)
    return items


def _report_jsonl(data: Path, split: str) -> list[Item]:
    path = pick_file(data, split, ".jsonl")
    items = []
    for i, r in enumerate(read_jsonl(path, "report-jsonl")):
        # The model drafts a findings section, so the findings are the reference when sectioned.
        reference = r.get("report") or r.get("findings") or r.get("impression")
        if "image" not in r or not reference:
            raise DataError(f"report-jsonl: record {i + 1} of {path} needs image and report (or findings).")
        items.append(Item(str(r.get("id", i)), image_path(path.parent, r["image"]), REPORT_PROMPT,
                          str(reference).strip(), "report", "report"))
    return items


def _nih_findings(data: Path, split: str) -> list[Item]:
    check_split("nih-findings", split, ("test", "val", "train"))
    path = need(data / "labels.csv" if data.is_dir() else data, "nih-findings")
    rows = [r for r in read_labels(path)[0] if r.get("split") == split]
    try:
        return [Item(r["image"], path.parent / "images" / r["image"], REPORT_PROMPT, r["findings"], "report",
                     r.get("view") or "report", gold_labels=nih_to_chexpert(r["findings"])) for r in rows]
    except (KeyError, ValueError) as e:
        raise DataError(f"nih-findings: {path} has an unexpected row ({e}).") from None
