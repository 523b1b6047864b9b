"""What kind of study an image is (modality and body region), and whether a model may draft a
report for it.

A report drafter that only learned chest radiographs writes lung findings for anything it is
shown, a brain MRI included. So before drafting, the study is named, from the DICOM header when
there is one (its coded Modality / BodyPartExamined / ViewPosition, never free text), else from
the model's own answers to two short questions, and findings are drafted only for the study
types the model was trained to report (`MedVLMConfig.report_studies`, e.g. "x-ray chest").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Words in a DICOM code or a model's answer -> our modality names. Order matters: the first
# match wins, so "ct" inside another word cannot steal "x-ray" (matching is by whole word).
_MODALITY_WORDS = (
    ("x-ray", ("cr", "dx", "rg", "df", "x-ray", "xray", "radiograph", "radiography", "film", "plain")),
    ("ct", ("ct", "computed", "tomography", "cta")),
    ("mri", ("mr", "mri", "magnetic", "t1", "t2", "flair", "dwi")),
    ("ultrasound", ("us", "ultrasound", "sonography", "sonogram", "echo", "doppler")),
    ("mammography", ("mg", "mammogram", "mammography")),
    ("nuclear medicine", ("nm", "pt", "pet", "spect", "scintigraphy")),
    ("fluoroscopy", ("rf", "xa", "fluoroscopy", "angiography", "angiogram")),
)
_REGION_WORDS = (
    ("chest", ("chest", "thorax", "thoracic", "lung", "lungs", "heart", "cardiac", "pulmonary", "rib", "ribs",
               "mediastinum", "breast")),
    ("head", ("head", "brain", "skull", "cranium", "cerebral", "cerebellum", "orbit", "sinus", "face", "neck",
              "ventricle", "ventricles")),
    ("abdomen", ("abdomen", "abdominal", "liver", "kidney", "kidneys", "renal", "pancreas", "spleen", "bowel",
                 "colon", "stomach", "gallbladder", "pelvis", "pelvic", "bladder", "abd", "gi")),
    ("spine", ("spine", "spinal", "vertebra", "vertebrae", "cspine", "tspine", "lspine", "sacrum")),
    ("extremity", ("hand", "wrist", "elbow", "arm", "shoulder", "hip", "knee", "leg", "ankle", "foot", "femur",
                   "extremity")),
)
_LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "LLO", "RLO"}
# A sentence that only states something is absent or normal ("No pneumothorax.", "The heart is
# normal in size.") is not a positive finding.
_NEGATIVE = re.compile(r"\b(no|not|without|normal|clear|unremarkable|intact|negative)\b", re.I)


@dataclass(frozen=True)
class Study:
    modality: str | None
    region: str | None
    source: str
    """Where the names come from: "the DICOM header" or "the model's answers"."""
    lateral: bool = False

    def kind(self) -> str:
        """E.g. "x-ray chest" (the form `MedVLMConfig.report_studies` uses)."""
        return f"{self.modality or 'unknown'} {self.region or 'unknown'}"

    def describe(self) -> str:
        """E.g. "MRI of the head (from the DICOM header)"."""
        modality = {"x-ray": "radiograph", "mri": "MRI", "ct": "CT"}.get(self.modality or "", self.modality)
        region = f" of the {self.region}" if self.region else " of an unidentified region"
        view = " (lateral view)" if self.lateral else ""
        return f"{modality or 'an image of unknown modality'}{region}{view} (from {self.source})"


def _first_match(text: str | None, table) -> str | None:
    words = set(re.findall(r"[a-z0-9]+(?:-[a-z]+)?", (text or "").lower()))
    return next((name for name, keys in table if words & set(keys)), None)


def study_from_metadata(metadata: dict) -> Study | None:
    """The study a DICOM header names (its coded fields only); None when it names no modality."""
    modality = _first_match(metadata.get("modality"), _MODALITY_WORDS)
    if metadata.get("format") != "DICOM" or modality is None:
        return None
    region = _first_match((metadata.get("body_part") or "").replace("_", " "), _REGION_WORDS)
    return Study(modality, region, "the DICOM header", lateral=(metadata.get("view") or "") in _LATERAL_VIEWS)


def study_from_answers(modality_answer: str, region_answer: str) -> Study:
    """The study as the model named it, in answer to MODALITY_QUESTION and REGION_QUESTION."""
    return Study(_first_match(modality_answer, _MODALITY_WORDS),
                 _first_match(region_answer, _REGION_WORDS) or _first_match(modality_answer, _REGION_WORDS),
                 "the model's answers")


MODALITY_QUESTION = "What imaging modality is this?"
REGION_QUESTION = "Which organ or body region is shown in this image?"


def reportable(study: Study, report_studies: tuple[str, ...]) -> bool:
    """Whether a model trained to report `report_studies` may draft findings for `study`
    (a lateral view of a study trained on frontal views is not)."""
    return study.kind() in report_studies and not study.lateral


def not_reportable_note(study: Study, report_studies: tuple[str, ...]) -> str:
    trained = ", ".join(s.replace("x-ray ", "") + (" radiographs" if s.startswith("x-ray") else " studies")
                        for s in report_studies) or "no study type"
    described = study.describe()
    article = "an" if described[0] in "aeiouAEIOU" or described.startswith("MRI") else "a"
    return (f"This image is {article} {described}. This model was trained to draft reports for frontal "
            f"{trained} only, so it drafts no findings for this study.")


def impression_from_findings(findings: str) -> str:
    """An impression for a draft whose model wrote none: its positive sentences, or a plain
    statement that it describes no abnormality. Always to be reviewed by the clinician."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", findings.strip()) if s.strip()]
    positive = [s for s in sentences if not _NEGATIVE.search(s)]
    if not sentences:
        return ""
    return " ".join(positive) if positive else "No acute abnormality is described in the draft findings."
