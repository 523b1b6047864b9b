"""Report drafting respects the image: it names the study (from the DICOM header, else from the
model), drafts findings only for the study types the model was trained to report, refuses
images too small to read, and always fills the impression."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from serve.engine import Engine
from tests.serve_fixtures import ct_small, png_bytes
from vlm import studies
from vlm.errors import InputError
from vlm.generation import GenerationConfig
from vlm.imaging import load_image

GEN = GenerationConfig(max_new_tokens=40)


class CountingEngine(Engine):
    """Counts the prompts the model is asked (the `_stream` seam)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.prompts: list[str] = []

    def _stream(self, conversation, messages, images, gen, cancelled=None):
        self.prompts.append(messages[-1]["content"])
        return super()._stream(conversation, messages, images, gen, cancelled)


def dicom(**tags) -> bytes:
    """CT_small.dcm (128x128) with its coded tags replaced, as bytes."""
    import pydicom

    ds = pydicom.dcmread(ct_small())
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


@pytest.fixture
def engine(taught_model):
    engine = CountingEngine(taught_model)
    yield engine
    engine.close()


def test_a_png_is_named_by_the_model_and_drafted_when_it_is_a_chest_radiograph(engine):
    report = engine.draft_report(Image.open(io.BytesIO(png_bytes(4, size=80))), GEN)
    assert report == {"study": "radiograph of the chest (from the model's answers)",
                      "findings": "No pleural effusion.", "impression": "No acute disease."}
    assert [p.splitlines()[-2] for p in engine.prompts[:2]] == [studies.MODALITY_QUESTION, studies.REGION_QUESTION]
    assert len(engine.prompts) == 3
    assert not engine._conversations and engine.cache_bytes() == 0, "a draft leaves nothing behind"


def test_a_brain_mri_gets_no_invented_findings(engine):
    from pydicom.data import get_testdata_file

    mri = load_image(get_testdata_file("MR_small.dcm", download=False))
    report = engine.draft_report(mri, GEN)
    assert report["study"] == "MRI of an unidentified region (from the DICOM header)"
    assert report["findings"].startswith("This image is an MRI of an unidentified region")
    assert "trained to draft reports for frontal chest radiographs only" in report["findings"]
    assert "drafts no findings" in report["findings"] and report["impression"].startswith("No draft")
    assert engine.prompts == [], "the header named the study: the model was not asked anything"

    head = load_image(dicom(Modality="MR", BodyPartExamined="HEAD"))
    report = engine.draft_report(head, GEN)
    assert report["study"].startswith("MRI of the head") and "lung" not in report["findings"].lower()


def test_a_chest_radiograph_header_drafts_and_a_lateral_view_does_not(engine):
    frontal = engine.draft_report(load_image(dicom(Modality="CR", BodyPartExamined="CHEST", ViewPosition="PA")), GEN)
    assert frontal["study"] == "radiograph of the chest (from the DICOM header)"
    assert (frontal["findings"], frontal["impression"]) == ("No pleural effusion.", "No acute disease.")
    assert len(engine.prompts) == 1, "only the report prompt: the header named the study"
    lateral = engine.draft_report(load_image(dicom(Modality="DX", BodyPartExamined="CHEST", ViewPosition="LL")), GEN)
    assert "lateral view" in lateral["study"] and "drafts no findings" in lateral["findings"]


def test_a_tiny_image_is_refused(engine):
    with pytest.raises(InputError, match="1x1 pixels: too small to report on"):
        engine.draft_report(Image.new("RGB", (1, 1)), GEN)
    assert engine.prompts == []


def test_an_abdominal_ct_is_not_reported_as_a_chest(engine):
    report = engine.draft_report(load_image(dicom(Modality="CT", BodyPartExamined="ABDOMEN")), GEN)
    assert report["study"] == "CT of the abdomen (from the DICOM header)" and "drafts no findings" in report["findings"]


class FindingsOnly(CountingEngine):
    """A model that writes findings and no impression heading."""

    def _stream(self, conversation, messages, images, gen, cancelled=None):
        text = "The heart size is normal. There is a lung mass. No pleural effusion."
        return _Fixed(text)


class _Fixed:
    prompt_tokens = cached_tokens = 0
    finish_reason = "stop"

    def __init__(self, text):
        self.text, self.num_tokens = text, 1

    def __iter__(self):
        yield self.text


def test_the_impression_is_filled_when_the_model_writes_none(taught_model):
    engine = FindingsOnly(taught_model)
    report = engine.draft_report(load_image(dicom(Modality="CR", BodyPartExamined="CHEST")), GEN)
    assert report["findings"].startswith("The heart size is normal.")
    assert report["impression"] == "There is a lung mass."
    engine.close()


@pytest.mark.parametrize("findings, impression", [
    ("The lungs are clear. The heart size is normal. No pleural effusion or pneumothorax.",
     "No acute abnormality is described in the draft findings."),
    ("The heart is enlarged. No pneumothorax. A pulmonary nodule is seen.",
     "The heart is enlarged. A pulmonary nodule is seen."),
    ("", ""),
])
def test_impression_from_findings(findings, impression):
    assert studies.impression_from_findings(findings) == impression


@pytest.mark.parametrize("modality, region, kind", [
    ("CT", "The abdomen.", "ct abdomen"), ("x-ray", "chest", "x-ray chest"), ("Chest x-ray.", "", "x-ray chest"),
    ("MRI", "Brain", "mri head"), ("ultrasound", "kidney", "ultrasound abdomen"), ("cytology", "", "unknown unknown"),
])
def test_the_model_answers_name_a_study(modality, region, kind):
    assert studies.study_from_answers(modality, region).kind() == kind


def test_a_header_without_a_known_modality_leaves_it_to_the_model():
    assert studies.study_from_metadata({"format": "PNG"}) is None
    assert studies.study_from_metadata({"format": "DICOM", "modality": None}) is None
    assert studies.study_from_metadata({"format": "DICOM", "modality": "CR", "body_part": "CHEST"}).kind() == "x-ray chest"
