"""Report-drafting conversations from NIH ChestX-ray14 labels.

Each image's weak labels become a findings paragraph assembled from the project's own sentences
(train/templates/nih_findings.yaml), region by region in a fixed order (lungs, heart, pleura,
other): a region's normal sentence when the image has none of its findings, else one sentence per
finding. "No Finding" is the normal sentences, always in the same words. The finding sentences'
variants are picked by a seeded RNG keyed by the image name, so a rerun writes the same file.
"""

from __future__ import annotations

import random
from functools import cache
from importlib import resources
from pathlib import Path

from train.captions import keyed_rng
from train.clip import _label_rows

TEMPLATES = "templates/nih_findings.yaml"


@cache
def findings_templates() -> dict:
    """{"regions": {region: {"normal": sentence or None, "findings": {label: [sentences]}}}} from
    the repo's YAML."""
    import yaml

    return yaml.safe_load((resources.files("train") / TEMPLATES).read_text(encoding="utf-8"))


def finding_sentences() -> dict[str, list[str]]:
    """{NIH label: its sentences}, over all regions."""
    return {label: sentences for region in findings_templates()["regions"].values()
            for label, sentences in region["findings"].items()}


def findings_paragraph(findings: set[str] | frozenset[str], rng: random.Random) -> str:
    """A findings paragraph for NIH labels `findings` (empty for "No Finding")."""
    unknown = set(findings) - set(finding_sentences())
    if unknown:
        raise ValueError(f"no sentences for NIH label(s) {sorted(unknown)}")
    sentences = []
    for region in findings_templates()["regions"].values():
        present = [label for label in region["findings"] if label in findings]
        if present:
            sentences += [rng.choice(region["findings"][label]) for label in present]
        elif region["normal"]:
            sentences.append(region["normal"])
    return " ".join(sentences)


def nih_report_conversations(labels_csv: str | Path, split: str, seed: int = 0) -> list[dict]:
    """One report-drafting conversation per image of `split`, as LLaVA records."""
    from vlm.prompts import REPORT_PROMPT

    records = []
    for image, findings in _label_rows(Path(labels_csv), split):
        paragraph = findings_paragraph(findings, keyed_rng(f"{seed}:{image.name}"))
        records.append({"id": f"nih-{image.stem}", "image": str(image.resolve()),
                        "conversations": [{"from": "human", "value": REPORT_PROMPT},
                                          {"from": "gpt", "value": paragraph}]})
    return records
