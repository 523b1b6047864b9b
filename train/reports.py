"""Report-drafting conversations from NIH ChestX-ray14 labels.

Each image's weak labels become a findings paragraph assembled from the project's own sentences
(train/templates/nih_findings.yaml): one sentence per finding, in a fixed clinical order, or the
normal paragraph for "No Finding", always in the same words. The finding sentences' variants are
picked by a seeded RNG keyed by the image name, so a rerun writes the same file.
"""

from __future__ import annotations

import random
from functools import cache
from importlib import resources
from pathlib import Path

from train.captions import keyed_rng
from vlm.datasets import label_rows

TEMPLATES = "templates/nih_findings.yaml"


@cache
def findings_templates() -> dict:
    """{"findings": {label: [sentences]}, "normal": [sentences]} from the repo's YAML."""
    import yaml

    return yaml.safe_load((resources.files("train") / TEMPLATES).read_text(encoding="utf-8"))


def findings_paragraph(findings: set[str] | frozenset[str], rng: random.Random) -> str:
    """A findings paragraph for NIH labels `findings` (empty for "No Finding")."""
    templates = findings_templates()
    unknown = set(findings) - set(templates["findings"])
    if unknown:
        raise ValueError(f"no sentences for NIH label(s) {sorted(unknown)}")
    if not findings:
        return " ".join(templates["normal"])
    return " ".join(rng.choice(sentences) for label, sentences in templates["findings"].items() if label in findings)


def nih_report_conversations(labels_csv: str | Path, split: str, seed: int = 0) -> list[dict]:
    """One report-drafting conversation per image of `split`, as LLaVA records."""
    from vlm.prompts import REPORT_PROMPT

    records = []
    for image, findings in label_rows(Path(labels_csv), split):
        paragraph = findings_paragraph(findings, keyed_rng(f"{seed}:{image.name}"))
        records.append({"id": f"nih-{image.stem}", "image": str(image.resolve()),
                        "conversations": [{"from": "human", "value": REPORT_PROMPT},
                                          {"from": "gpt", "value": paragraph}]})
    return records
