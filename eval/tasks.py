"""Benchmark loaders: every task becomes a list of `Item`s with resolved image paths.

Native formats of VQA-RAD, SLAKE, PathVQA (pickles or Hugging Face parquet) and PMC-VQA, a
generic VQA JSONL, report JSONL and the NIH chest X-ray labels (see docs/evaluation.md). Paths in
data files are relative to the data file (or folder) unless absolute. A missing file or image is
a MedVLMError with one readable line; nothing here needs a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eval.labeler import expert_to_chexpert, nih_to_chexpert
from eval.metrics import closed_options, normalize_answer
from vlm.datasets import (DataError, VQARecord, check_split, image_path, need, parse_expert, pathvqa_records,
                          pick_file, pmc_vqa_records, read_jsonl, read_labels, slake_records, vqa_rad_image_bucket,
                          vqa_rad_records)
from vlm.errors import ConfigError
from vlm.prompts import REPORT_PROMPT

TASKS = ("vqa-rad", "slake", "pathvqa", "pmc-vqa", "vqa-jsonl", "report-jsonl", "nih-findings")

# The same, for readers of results.md (written under its "By image bucket" table).
VQA_RAD_BUCKET_NOTE = ("Image bucket (VQA-RAD, by a hash of the image name): `train` images are the ones `medvlm train "
                       "instruct-data` trains on, `val` images select models, `heldout` images are never trained on "
                       "(the test-disjoint split). On the standard test split every image also has training "
                       "questions, so `train` rows measure questions about images a recipe model has seen.")
VQA_RAD_SPLITS = ("test", "test-disjoint", "val", "train", "train-all")
# nih-findings --labels: which labels.csv column is the gold, and how it becomes CheXpert labels. nih and v2020
# cover every image; expert only the images the Google 2019 experts read (`medvlm train nih-tables` writes
# findings_v2020 and expert). The default, nih, is the only one that leaves results files as before.
NIH_LABELS = {"nih": ("findings", nih_to_chexpert),
              "v2020": ("findings_v2020", nih_to_chexpert),
              "expert": ("expert", lambda text: expert_to_chexpert(parse_expert(text)))}


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
    gold: dict | None = None
    """nih-findings with --labels other than nih: {"labels", "column", "images" (scored), "covered" (images
    of the split with these labels), "split_images"}, written into results."""


def load_task(name: str, data: str | Path, split: str = "test", limit: int | None = None,
              labels: str | None = None) -> Task:
    """Load benchmark `name` from `data` (a folder or file, as the format needs). `labels` picks the gold
    of nih-findings (NIH_LABELS; None is "nih") and is refused for every other task."""
    loaders = {"vqa-rad": _vqa_rad, "slake": _slake, "pathvqa": _pathvqa, "pmc-vqa": _pmc_vqa,
               "vqa-jsonl": _vqa_jsonl, "report-jsonl": _report_jsonl, "nih-findings": _nih_findings}
    if name not in loaders:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}.")
    if labels is not None and name != "nih-findings":
        raise ConfigError(f"--labels picks the gold labels of nih-findings; {name} has no such option.")
    if labels is not None and labels not in NIH_LABELS:
        raise ConfigError(f"--labels {labels}: unknown; choose one of {', '.join(NIH_LABELS)}.")
    data = Path(data).expanduser()
    if not data.exists():
        raise DataError(f"{name}: no data at {data} (give the dataset's folder or file with --data).")
    gold = None
    if name == "nih-findings":
        items, gold = _nih_findings(data, split, labels or "nih")
    else:
        items = loaders[name](data, split)
    if limit is not None:
        items = items[:limit]
    if gold is not None:
        gold["images"] = len(items)
    _check_images(name, items)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise DataError(f"{name}: question ids are not unique in {data}.")
    kind = "report" if name in ("report-jsonl", "nih-findings") else "vqa"
    return Task(name=name, kind=kind, split=split, items=items, source=str(data.resolve()), gold=gold)


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


def _nih_findings(data: Path, split: str, labels: str = "nih") -> tuple[list[Item], dict | None]:
    """The split's images with the `labels` gold (NIH_LABELS), and what that gold covers (None for nih)."""
    check_split("nih-findings", split, ("test", "val", "train"))
    path = need(data / "labels.csv" if data.is_dir() else data, "nih-findings")
    column, to_chexpert = NIH_LABELS[labels]
    table, columns = read_labels(path)
    if labels != "nih" and column not in columns:
        raise DataError(f"nih-findings --labels {labels}: {path} has no {column} column; write a copy that has it "
                        f"with `medvlm train nih-tables --wheel WHEEL --nih {data} --out NEW_FOLDER`.")
    rows = [r for r in table if r.get("split") == split]
    covered = [r for r in rows if labels != "expert" or r[column].strip()]
    if rows and not covered:  # only expert labels leave images out
        by_split = {s: sum(bool(r[column].strip()) for r in table if r.get("split") == s)
                    for s in ("train", "val", "test")}
        raise DataError(f"nih-findings --labels {labels}: none of the {len(rows)} {split} images of {path} has "
                        f"{column} labels (images with them: " + ", ".join(f"{s} {n}" for s, n in by_split.items()) + ").")
    try:
        items = [Item(r["image"], path.parent / "images" / r["image"], REPORT_PROMPT, r[column], "report",
                      r.get("view") or "report", gold_labels=to_chexpert(r[column])) for r in covered]
    except (KeyError, ValueError) as e:
        raise DataError(f"nih-findings: {path} has an unexpected row ({e}).") from None
    gold = None if labels == "nih" else {"labels": labels, "column": column, "images": len(items),
                                         "covered": len(covered), "split_images": len(rows)}
    return items, gold
