"""Caption files for contrastive pretraining from the real data: NIH ChestX-ray14 finding labels and
VQA-RAD organ/modality. Paths in the written JSONL are absolute."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

from vlm.datasets import DataError, finding_words, label_rows, vqa_rad_image_bucket, vqa_rad_records

ORGANS = {"HEAD": "head", "CHEST": "chest", "ABD": "abdomen"}
MODALITY_WORDS = [  # (regex over a lowercased question or answer, modality); MRI first: "mr flair"
    (r"\b(mri?|flair|t1|t2|dwi|adc|diffusion)\b", "MRI"), (r"\bct\b", "CT"),
    (r"\b(x-?\s?ray|xray|cxr|radiograph|film)\b", "x-ray"), (r"\b(ultrasound|sonogra\w*)\b", "ultrasound")]
MODALITY_PHRASE = {"MRI": "an MRI scan", "CT": "a CT scan", "x-ray": "an x-ray", "ultrasound": "an ultrasound"}


def write_label_captions(labels_csv: str | Path, split: str, out_jsonl: str | Path,
                         template: str = "a chest x-ray showing {finding}.",
                         normal: str = "a normal chest x-ray with no finding.") -> int:
    """NIH ChestX-ray14 labels of one split -> caption pairs; returns how many were written."""
    rows = label_rows(Path(labels_csv), split)
    lines = []
    for image, findings in rows:
        names = [finding_words(f) for f in sorted(findings)]
        joined = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)
        text = template.format(finding=joined) if names else normal
        lines.append(json.dumps({"image": str(image.resolve()), "text": text}))
    return write_lines(Path(out_jsonl), lines)


def write_vqa_rad_captions(trainset_json: str | Path, out_jsonl: str | Path, images_dir: str | Path | None = None,
                           exclude: tuple[str, ...] = ()) -> int:
    """One organ/modality caption per VQA-RAD image ("a CT scan of the abdomen."), the modality voted
    by its questions (see _modality; "a radiology image" when none names one); returns the count.
    `exclude`: image names to leave out (e.g. the test images, for an image-disjoint evaluation)."""
    path = Path(trainset_json)
    images = Path(images_dir) if images_dir else path.parent / "images"
    organs, votes = organs_and_modality_votes(vqa_rad_records(path))
    lines = []
    for name in sorted(set(organs) - set(exclude)):
        modality = top_vote(votes[name])
        phrase = MODALITY_PHRASE[modality] if modality else "a radiology image"
        lines.append(json.dumps({"image": str((images / name).resolve()), "text": f"{phrase} of the {organs[name]}."}))
    return write_lines(Path(out_jsonl), lines)


def organs_and_modality_votes(qas: list[dict]) -> tuple[dict[str, str], dict[str, Counter]]:
    """Per VQA-RAD image name: its organ word, and how many of its questions assert each modality."""
    organs, votes = {}, {}
    for qa in qas:
        name = qa["image_name"]
        organs.setdefault(name, ORGANS.get(str(qa.get("image_organ")).upper(), "body"))
        votes.setdefault(name, Counter())
        modality = _modality(str(qa.get("question", "")), str(qa.get("answer", "")), qa.get("question_type"))
        if modality:
            votes[name][modality] += 1
    return organs, votes


def top_vote(votes: Counter | None) -> str | None:
    """The value with the most votes (the first counted among ties), or None when there are none."""
    top = votes.most_common(1) if votes else []
    return top[0][0] if top else None


def _modality(question: str, answer: str, kind: str | None = "MODALITY") -> str | None:
    """The modality a question-answer pair asserts: a MODALITY question's open answer or a yes to
    "is this a CT?"; any other question presupposes what it names ("is the liver enlarged on this CT?")."""
    q, a = question.lower(), answer.lower().strip()
    if kind != "MODALITY":
        text = q
    elif a in ("no", "none") or " not " in f" {q} ":
        return None  # a denial or "what does this NOT represent" names the wrong modality
    else:
        text = q if a == "yes" else a
    return next((m for pattern, m in MODALITY_WORDS if re.search(pattern, text)), None)



def write_clip_data(nih: str | Path, vqa_rad: str | Path, out: str | Path, slices: str | Path | None = None
                    ) -> dict[str, int]:
    """The contrastive pretraining set: NIH train-split finding captions plus VQA-RAD images of the
    `train` bucket (never the val or held-out images, so image-disjoint evaluation stays honest)
    and, with `slices` (a `train slice-data` folder), its training slices' captions
    -> OUT/train.jsonl; NIH val-split captions -> OUT/val.jsonl. Returns the counts."""

    nih, vqa_rad, out = Path(nih), Path(vqa_rad), Path(out)
    counts = {"nih_train": write_label_captions(nih / "labels.csv", "train", out / "nih_train.jsonl"),
              "nih_val": write_label_captions(nih / "labels.csv", "val", out / "val.jsonl")}
    trainset = vqa_rad / "trainset.json"
    names = {qa["image_name"] for qa in vqa_rad_records(trainset)}
    exclude = tuple(n for n in names if vqa_rad_image_bucket(n) != "train")
    counts["vqa_rad_train"] = write_vqa_rad_captions(trainset, out / "vqa_rad_train.jsonl", exclude=exclude)
    lines = (out / "nih_train.jsonl").read_text() + (out / "vqa_rad_train.jsonl").read_text()
    if slices:
        extra = Path(slices) / "clip_train.jsonl"
        if not extra.is_file():
            raise DataError(f"--slices {slices}: no clip_train.jsonl (write it with `medvlm train slice-data`).")
        text = extra.read_text()
        counts["slices_train"] = len(text.splitlines())
        lines += text
    (out / "train.jsonl").write_text(lines)
    counts["train"] = len(lines.splitlines())
    return counts


def write_vqa_rad_conversations(trainset_json: str | Path, out_json: str | Path, buckets: tuple[str, ...] = ("train",),
                                questions_per_conversation: int = 6) -> int:
    """vqa_rad_conversations() -> a JSON list file; returns the count."""
    return write_json_list(Path(out_json), vqa_rad_conversations(trainset_json, buckets, questions_per_conversation))


def vqa_rad_conversations(trainset_json: str | Path, buckets: tuple[str, ...] = ("train",),
                          questions_per_conversation: int = 6) -> list[dict]:
    """VQA-RAD question-answer pairs -> LLaVA conversations, several turns per image, the image
    marker in the first turn; only images in `buckets` (see vlm.datasets)."""

    path = Path(trainset_json)
    by_image: dict[str, list[dict]] = {}
    for qa in vqa_rad_records(path):
        if vqa_rad_image_bucket(qa["image_name"]) in buckets:
            by_image.setdefault(qa["image_name"], []).append(qa)
    records = []
    for name, qas in sorted(by_image.items()):
        for start in range(0, len(qas), questions_per_conversation):
            pairs = [(str(qa["question"]).strip(), str(qa["answer"]).strip())
                     for qa in qas[start:start + questions_per_conversation]]
            records.append({"id": f"{name}-{start}", "image": str((path.parent / "images" / name).resolve()),
                            "conversations": question_answer_turns(pairs)})
    return records


def question_answer_turns(pairs: list[tuple[str, str]]) -> list[dict]:
    """(question, answer) pairs -> LLaVA turns with the VQA prompt; the image is shown once, in the first turn."""
    from vlm.prompts import VQA_FOLLOWUP, VQA_PROMPT

    turns = []
    for k, (question, answer) in enumerate(pairs):
        prompt = (VQA_FOLLOWUP if k else VQA_PROMPT).format(question=question)
        turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    return turns


def drop_brief_suffix(records: list[dict], share: float, seed: int = 0) -> list[dict]:
    """Copies of question-answer conversations where a `share` of the questions lose the "Answer
    briefly." that question_answer_turns appends (drawn per turn from an RNG keyed by the record id,
    so repeated copies, which have distinct ids, differ). `medvlm chat` sends a question as typed; a
    model that only ever saw the suffix answered the chat example wrong and the same question with
    the suffix right (docs/demo-model-history.md, the mixed instruct run)."""
    from vlm.prompts import VQA_FOLLOWUP

    suffix = VQA_FOLLOWUP.format(question="")
    out = []
    for record in records:
        rng = keyed_rng(f"{seed}:{record['id']}")
        turns = [dict(t, value=t["value"][:-len(suffix)])
                 if t["from"] == "human" and t["value"].endswith(suffix) and rng.random() < share else t
                 for t in record["conversations"]]
        out.append(dict(record, conversations=turns))
    return out


def keyed_rng(key: str) -> random.Random:
    """A random generator seeded by the SHA-1 of `key` (not Python's hash(), which changes between
    processes), so generated training text depends only on the key (e.g. seed and image name)."""
    return random.Random(int(hashlib.sha1(key.encode()).hexdigest()[:16], 16))


def write_json_list(path: Path, records: list[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return len(records)


def write_lines(path: Path, lines: list[str]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return len(lines)
