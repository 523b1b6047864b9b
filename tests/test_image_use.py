"""eval/image_use.py: the image-dependence diagnostics the demo model card quotes."""

import math

import torch
from PIL import Image

from eval.image_use import logistic_regression, loss_gap, nearest_mean_accuracy, nih_probe, tower_probe
from tests.conftest import write_json


def test_nearest_mean_accuracy_separates_clusters_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = ["a"] * 20 + ["b"] * 20
    clusters = torch.cat([torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g) + 6])
    assert nearest_mean_accuracy(clusters, labels) == 1.0
    noise = torch.randn(40, 8, generator=g)  # labels unrelated to the features
    assert nearest_mean_accuracy(noise, labels) < 0.8


def _images(folder, colours):
    folder.mkdir()
    names = []
    for i, colour in enumerate(colours):
        names.append(f"img{i}.png")
        Image.new("RGB", (64, 64), colour).save(folder / names[-1])
    return names


def test_loss_gap_scores_real_and_black_images(tiny_model, tmp_path):
    names = _images(tmp_path / "images", ["white", "red", "gray"])
    convs = [{"image": f"images/{n}", "conversations": [
        {"from": "human", "value": "<image>\nIs this a CT?"}, {"from": "gpt", "value": "no"}]} for n in names]
    result = loss_gap(tiny_model.eval(), write_json(tmp_path / "c.json", convs), n=3, batch_size=2)
    assert set(result) == {"real", "black"}
    assert all(math.isfinite(v) for v in result.values())
    assert result["real"] != result["black"]  # the black image really replaced the white/red/gray ones


def test_tower_probe_labels_organ_and_voted_modality(tiny_model, tmp_path):
    names = _images(tmp_path / "images", ["white", "black", "white", "black"])
    qas = [{"image_name": n, "image_organ": organ, "question": q, "answer": a, "question_type": "MODALITY"}
           for n, organ, q, a in zip(names, ["HEAD", "CHEST", "HEAD", "CHEST"],
                                     ["Is this a CT?", "What modality is this?", "Is this an MRI?", "Is this a CT?"],
                                     ["yes", "x-ray", "yes", "no"])]
    write_json(tmp_path / "trainset.json", qas[:2])
    write_json(tmp_path / "testset.json", qas[2:])
    report = tower_probe(tiny_model.eval(), tmp_path)
    assert report["organ"]["classes"] == {"head": 2, "chest": 2}
    # img3's only question denies a CT, so it names no modality and is left out
    assert report["modality"]["classes"] == {"CT": 1, "x-ray": 1, "MRI": 1}
    assert 0.0 <= report["organ"]["accuracy"] <= 1.0


def test_logistic_regression_fits_a_separable_direction_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, 2] > 0).float()
    w = logistic_regression(x, y)
    assert ((x @ w[:-1] + w[-1] > 0).float() == y).float().mean() > 0.95
    assert w[2] > 5 * w[[0, 1, 3, 4, 5]].abs().max()  # it found the one feature that decides
    noise = logistic_regression(x, (torch.rand(200, generator=g) > 0.5).float())
    assert noise[:-1].abs().max() < w[2] / 5


def test_nih_probe_finds_a_finding_the_images_show(tiny_model, tmp_path):
    """Effusion images are white, the rest dark: the probe separates them on both scored splits,
    and scores them the way reports are scored, beside the majority-class baseline."""
    rows, colours = ["image,findings,split"], []
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        for i in range(n):
            effusion = i % 2 == 0
            colours.append("white" if effusion else (20 + i, 20, 20))
            rows.append(f"images/img{len(colours) - 1}.png,{'Effusion' if effusion else 'No Finding'},{split}")
    _images(tmp_path / "images", colours)
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    report = nih_probe(tiny_model.eval(), tmp_path)
    assert set(report["auroc"]) == {"Pleural Effusion"}  # the only observation with 5+ train positives
    for split in ("val", "test"):
        assert report["auroc"]["Pleural Effusion"][split] == 1.0
        assert report[split]["images"] == 8 and report[split]["with_a_finding"] == 4
        assert report[split]["probe_micro_f1"] == 1.0
        # half the images are normal: the majority baseline (a tie, broken by first seen) scores 0.5
        assert report[split]["majority_baseline_micro_f1"] == 0.5


def test_image_use_is_a_medvlm_eval_command(tiny_model, tmp_path, monkeypatch, capsys):
    import json

    from vlm.cli import main
    from vlm.model import MedVLM

    names = _images(tmp_path / "images", ["white", "black"])
    qas = [{"image_name": n, "image_organ": organ, "question": "Is this a CT?", "answer": "yes",
            "question_type": "MODALITY"} for n, organ in zip(names, ["HEAD", "CHEST"])]
    write_json(tmp_path / "trainset.json", qas[:1])
    write_json(tmp_path / "testset.json", qas[1:])
    monkeypatch.setattr(MedVLM, "from_pretrained", classmethod(lambda cls, ref: tiny_model))
    assert main(["eval", "image-use", "probe", "--model", "tiny", "--vqa-rad", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["organ"]["classes"] == {"head": 1, "chest": 1}
