"""`medvlm train nih-tables` (train/nih_tables.py: the ChestX-ray14 tables of the torchxrayvision wheel joined
into an NIH labels.csv) and `medvlm eval nih-findings --labels v2020|expert` (eval/tasks.py NIH_LABELS), on a
fake wheel with the real files' column layout; one test reads the real wheel when MEDVLM_TXV_WHEEL names it."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from eval.run import _RESUME_KEYS, evaluate, score_predictions
from eval.tasks import load_task
from train.nih_tables import write_nih_tables
from vlm.assistant import Assistant
from vlm.cli import main
from vlm.datasets import parse_expert
from vlm.errors import ConfigError, InputError
from vlm.prompts import OURS

COLUMNS = ["image", "findings", "view", "age", "sex", "patient_id", "split"]
# The real header lines (their bracketed names hold commas, so the CSV has more cells than names).
ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
EXPERT_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                 "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],Fracture,Pneumothorax,Airspace opacity,"
                 "Nodule or mass,Set Id")
# image, split, our findings, v2020 findings, expert (Fracture, Pneumothorax, Airspace opacity, Nodule or mass)
# or None, box labels as in BBox_List_2017, and the report the fake model writes for it.
IMAGES = [
    ("00000001_000.jpg", "test", "Pneumothorax", "Pneumothorax", "NO,YES,NO,NO", ["Pneumothorax"],
     "There is a right pneumothorax."),
    ("00000002_000.jpg", "test", "Nodule|Infiltration", "Nodule", "NO,NO,YES,YES", ["Nodule", "Infiltrate"],
     "A nodule in the right upper lobe."),
    ("00000003_000.jpg", "test", "Cardiomegaly", "Cardiomegaly", "NO,NO,YES,NO", [],
     "Cardiomegaly. Small left pneumothorax."),
    ("00000004_000.jpg", "test", "Mass|Effusion", "Effusion|Mass", None, [],
     "Large right pleural effusion and a left pneumothorax."),
    ("00000005_000.jpg", "test", "No Finding", "No Finding", "NO,NO,YES,NO", [],
     "Patchy airspace opacity at the left base. Rib fracture."),
    ("00000006_000.jpg", "train", "No Finding", "No Finding", "YES,NO,NO,NO", [], "No acute findings."),
    ("00000007_000.jpg", "train", "Atelectasis", "Atelectasis", None, [], "Bibasilar atelectasis."),
]
REPORTS = {image: report for image, *_, report in IMAGES}


def _gz(lines: list[str]) -> bytes:
    return gzip.compress(("\n".join(lines) + "\n").encode())


def _fake_wheel(path: Path, skip: str | None = None) -> Path:
    """A zip holding the three tables (all images above plus two that are not ours), `skip` left out."""
    png = lambda image: image.replace(".jpg", ".png")  # noqa: E731 - the tables name PNG files
    entries = [ENTRY_HEADER] + [f"{png(i)},{v2020},0,{int(i[:8])},50,F,PA,2500,2048,0.168,0.168"
                                for i, _, _, v2020, *_ in IMAGES] + ["00009999_000.png,Hernia,0,9999,60,M,PA,1,1,1,1"]
    boxes = [BOX_HEADER] + [f"{png(i)},{label},10.5,20.5,30.0,40.0" for i, *_, labels, _ in IMAGES for label in labels]
    expert = [EXPERT_HEADER] + [f"{png(i)},{nih},0,{int(i[:8])},50,F,PA,2500,2048,0.168,0.168,{e},test"
                                for i, _, nih, _, e, *_ in IMAGES if e] + \
        ["00009998_000.png,No Finding,0,9998,40,M,AP,1,1,1,1,NO,NO,YES,NO,val"]
    tables = {"Data_Entry_2017_v2020.csv.gz": entries, "BBox_List_2017.csv.gz": boxes,
              "google2019_nih-chest-xray-labels.csv.gz": expert}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("torchxrayvision/__init__.py", "")
        for name, lines in tables.items():
            if name != skip:
                z.writestr(f"torchxrayvision/data/{name}", _gz(lines))
    return path


def _nih_folder(root: Path, extra: list[str] = ()) -> Path:
    """labels.csv in the nih_cxr layout and images/ with one small JPEG per row (gray level = row number)."""
    (root / "images").mkdir(parents=True)
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for n, (image, split, nih, *_) in enumerate(IMAGES):
            writer.writerow([image, nih, "PA", 50, "F", int(image[:8]), split])
            Image.new("L", (16, 16), 40 * n).save(root / "images" / image, format="JPEG")
        for image in extra:
            writer.writerow([image, "No Finding", "PA", 50, "F", 1, "test"])
    return root


def _rows(folder: Path) -> dict[str, dict]:
    with (folder / "labels.csv").open(newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


@pytest.fixture
def joined(tmp_path) -> Path:
    write_nih_tables(_fake_wheel(tmp_path / "txv.whl"), _nih_folder(tmp_path / "nih"), tmp_path / "tables")
    return tmp_path / "tables"


def test_the_tables_are_joined_as_new_columns(tmp_path):
    counts = write_nih_tables(_fake_wheel(tmp_path / "txv.whl"), _nih_folder(tmp_path / "nih"), tmp_path / "out")
    rows = _rows(tmp_path / "out")
    assert list(next(iter(rows.values()))) == COLUMNS + ["findings_v2020", "expert", "boxes"]
    first, second, fourth = rows["00000001_000.jpg"], rows["00000002_000.jpg"], rows["00000004_000.jpg"]
    assert {k: first[k] for k in COLUMNS} == {"image": "00000001_000.jpg", "findings": "Pneumothorax", "view": "PA",
                                              "age": "50", "sex": "F", "patient_id": "1", "split": "test"}
    assert second["findings_v2020"] == "Nodule"
    assert first["expert"] == "Fracture=NO|Pneumothorax=YES|Airspace opacity=NO|Nodule or mass=NO"
    assert parse_expert(second["expert"]) == {"Fracture": False, "Pneumothorax": False, "Airspace opacity": True,
                                              "Nodule or mass": True}
    assert fourth["expert"] == "" and parse_expert("") == {}
    assert second["boxes"] == "Nodule|Infiltration" and rows["00000003_000.jpg"]["boxes"] == ""
    # "Mass|Effusion" vs "Effusion|Mass" is the same label set; "Nodule|Infiltration" vs "Nodule" is not
    assert counts["v2020_differ"] == 1 and counts["v2020"] == 7 == counts["images"]
    assert counts["expert"] == {"test": 4, "train": 1}
    assert counts["boxes_images"] == 2 and counts["boxes"] == 3
    assert counts["rows"]["google2019_nih-chest-xray-labels.csv.gz"] == 6
    assert (tmp_path / "out" / "images").resolve() == (tmp_path / "nih" / "images").resolve()


def test_a_nih_split_copy_keeps_its_split_and_the_command_prints_the_counts(tmp_path, capsys):
    nih = _nih_folder(tmp_path / "nih")
    assert main(["train", "nih-split", "--nih", str(nih), "--carve-val", "1", "--out", str(tmp_path / "wide")]) == 0
    wheel = _fake_wheel(tmp_path / "txv.whl")
    capsys.readouterr()
    assert main(["train", "nih-tables", "--wheel", str(wheel), "--nih", str(tmp_path / "wide"),
                 "--out", str(tmp_path / "wide_tables")]) == 0
    out = capsys.readouterr().out
    assert "covers 7; labels differ from `findings` for 1" in out
    assert "covers 5 (" in out and "covers 2 images, 3 boxes" in out
    wide, tables = _rows(tmp_path / "wide"), _rows(tmp_path / "wide_tables")
    assert {i: r["split"] for i, r in tables.items()} == {i: r["split"] for i, r in wide.items()}
    assert "val" in {r["split"] for r in tables.values()}
    assert (tmp_path / "wide_tables" / "images" / "00000001_000.jpg").is_file()


def test_bad_wheels_and_unknown_images_are_one_line_errors(tmp_path, capsys):
    nih = _nih_folder(tmp_path / "nih")
    with pytest.raises(InputError, match="no torchxrayvision wheel at .*pip download --no-deps"):
        write_nih_tables(tmp_path / "absent.whl", nih, tmp_path / "o1")
    (tmp_path / "text.whl").write_text("not a zip")
    with pytest.raises(InputError, match="is not a readable wheel"):
        write_nih_tables(tmp_path / "text.whl", nih, tmp_path / "o2")
    partial = _fake_wheel(tmp_path / "partial.whl", skip="BBox_List_2017.csv.gz")
    with pytest.raises(InputError, match="lacks torchxrayvision/data/BBox_List_2017.csv.gz"):
        write_nih_tables(partial, nih, tmp_path / "o3")
    stranger = _nih_folder(tmp_path / "stranger", extra=["12345678_000.jpg"])
    with pytest.raises(InputError, match=r"1 of 8 images match no row of Data_Entry_2017_v2020.csv.gz "
                                         r"\(e.g. 12345678_000.jpg\)"):
        write_nih_tables(_fake_wheel(tmp_path / "txv.whl"), stranger, tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5)), "nothing written on an error"
    assert main(["train", "nih-tables", "--wheel", str(tmp_path / "text.whl"), "--nih", str(nih),
                 "--out", str(tmp_path / "o5")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a readable wheel" in err


def _answers(path: Path, reports: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prediction": r}) + "\n" for i, r in reports.items()))
    return path


def test_expert_scoring_uses_only_the_covered_images_and_observations(joined, tmp_path):
    task = load_task("nih-findings", joined, "test", labels="expert")
    assert [it.id for it in task.items] == ["00000001_000.jpg", "00000002_000.jpg", "00000003_000.jpg",
                                            "00000005_000.jpg"]  # 00000004 has no expert labels, 00000006 is train
    r = score_predictions("nih-findings", _answers(tmp_path / "a.jsonl", REPORTS), joined, "test", bootstrap=0,
                          labels="expert")
    ce = r["clinical_efficacy"]["ce"]
    assert ce["observations"] == ["Lung Opacity", "Lung Lesion", "Pneumothorax", "Fracture"]
    assert "ce5" not in r["clinical_efficacy"] and "ce5_micro_f1" not in r["metrics"]
    # By hand: TP = pneumothorax (1), lesion (2), opacity (5); FP = pneumothorax (3), fracture (5);
    # FN = opacity (2), opacity (3). Cardiomegaly (3) is not scored, nor image 4's pneumothorax.
    assert r["metrics"]["ce_micro_p"] == pytest.approx(3 / 5)
    assert r["metrics"]["ce_micro_r"] == pytest.approx(3 / 5)
    assert r["metrics"]["ce_micro_f1"] == pytest.approx(0.6)
    # The majority label set of the same 4 images over the same 4 observations is Lung Opacity (images 3, 5):
    # TP 3 (2, 3, 5), FP 1 (1), FN 2 (1's pneumothorax, 2's lesion): P 3/4, R 3/5, F1 2/3.
    assert r["baselines"]["majority_class"] == ["Lung Opacity"]
    assert r["baselines"]["majority_share"] == pytest.approx(0.5)
    assert r["baselines"]["ce_micro_f1"] == pytest.approx(2 / 3)
    assert r["gold_labels"] == {"labels": "expert", "column": "expert", "images": 4, "covered": 4, "split_images": 5}
    assert r["labels"] == "expert" and r["counts"]["reports"] == 4
    # the NIH labels, as before: all 5 test images over the 11 NIH observations
    nih = score_predictions("nih-findings", tmp_path / "a.jsonl", joined, "test", bootstrap=0)
    assert nih["counts"]["reports"] == 5 and len(nih["clinical_efficacy"]["ce"]["observations"]) == 11
    assert "gold_labels" not in nih and "labels" not in nih


def test_v2020_labels_are_the_gold_with_the_nih_mapping(joined):
    v2020 = load_task("nih-findings", joined, "test", labels="v2020")
    nih = load_task("nih-findings", joined, "test")
    assert [it.id for it in v2020.items] == [it.id for it in nih.items]
    second = {it.id: it for it in v2020.items}["00000002_000.jpg"]
    assert second.answer == "Nodule" and second.gold_labels["Lung Lesion"] == 1
    assert second.gold_labels["Lung Opacity"] == 0  # ours say Infiltration; v2020 does not
    assert v2020.gold["covered"] == 5 and nih.gold is None


def test_label_choices_are_refused_where_they_do_not_apply(joined, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--labels picks the gold labels of nih-findings; vqa-jsonl"):
        load_task("vqa-jsonl", tmp_path, labels="expert")
    with pytest.raises(ConfigError, match="unknown; choose one of nih, v2020, expert"):
        load_task("nih-findings", joined, labels="radiologist")
    train_only = joined.parent / "nih"  # the folder without the joined columns
    assert main(["eval", "score", "nih-findings", "--predictions", str(_answers(tmp_path / "a.jsonl", REPORTS)),
                 "--data", str(train_only), "--labels", "expert"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no expert column" in err and "medvlm train nih-tables" in err
    rows = _rows(joined)
    for r in rows.values():
        r["expert"] = r["expert"] if r["split"] == "train" else ""
    with (joined / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(next(iter(rows.values()))))
        writer.writeheader()
        writer.writerows(rows.values())
    assert main(["eval", "vqa-rad", "--model", "demo", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--labels", "expert"]) == 2
    assert "vqa-rad has no such option" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"none of the 5 test images .* has expert labels \(images with them: "
                                         r"train 1, val 0, test 0\)"):
        load_task("nih-findings", joined, "test", labels="expert")


class _ReportWriter(Assistant):
    """Writes the report of IMAGES for the image it is shown (told apart by its gray level)."""
    backend, reference, prompts = "fake", "fake-reports", OURS

    def generate(self, conversations, images, gen=None):
        by_level = {40 * n: image[0] for n, image in enumerate(IMAGES)}
        levels = [imgs[0].convert("L").getpixel((8, 8)) for imgs in images]
        return [REPORTS[by_level[min(by_level, key=lambda v: abs(v - level))]] for level in levels]

    def stream(self, messages, images, gen=None, session=None, cancelled=None):
        raise NotImplementedError

    def describe(self) -> dict:
        return {"backend": "fake"}


def test_an_eval_run_records_its_labels_and_does_not_resume_across_them(joined, tmp_path):
    assert "labels" in _RESUME_KEYS
    task = load_task("nih-findings", joined, "test", labels="expert")
    out = tmp_path / "run"
    results = evaluate(_ReportWriter(), task, out, batch_size=2, bootstrap=0, progress=False)
    assert results["metrics"]["ce_micro_f1"] == pytest.approx(0.6)  # the same reports as scored by hand above
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["labels"] == "expert" and list(settings).index("labels") == list(settings).index("source") + 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["gold_labels"]["images"] == 4 and "expert_gold" in saved["rules"] and "nih_gold" not in saved["rules"]
    md = (out / "results.md").read_text()
    assert "Gold: the Google 2019 expert labels (labels.csv column `expert`), which cover 4 of the split's 5 images" in md
    with pytest.raises(ConfigError, match="different labels"):
        evaluate(_ReportWriter(), load_task("nih-findings", joined, "test"), out, bootstrap=0, progress=False)
    again = evaluate(_ReportWriter(), task, out, bootstrap=0, progress=False)  # the same choice resumes
    assert again["timing"]["generated_this_run"] == 0
    plain = evaluate(_ReportWriter(), load_task("nih-findings", joined, "test"), tmp_path / "nih", bootstrap=0,
                     progress=False)
    assert "labels" not in json.loads((tmp_path / "nih" / "run_settings.json").read_text())
    assert "gold_labels" not in plain and "Gold:" not in (tmp_path / "nih" / "results.md").read_text()


WHEEL = os.environ.get("MEDVLM_TXV_WHEEL")
NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih_cxr"


@pytest.mark.skipif(not WHEEL, reason="set MEDVLM_TXV_WHEEL to torchxrayvision-1.5.7-py3-none-any.whl "
                                      "(pip download --no-deps torchxrayvision==1.5.7) to join the real tables")
def test_the_real_wheel_joins_the_621_demo_images(tmp_path):
    if not (NIH / "labels.csv").is_file():
        pytest.skip(f"NIH chest X-rays not present at {NIH}")
    counts = write_nih_tables(Path(WHEEL), NIH, tmp_path / "tables")
    assert counts["rows"] == {"Data_Entry_2017_v2020.csv.gz": 112120, "BBox_List_2017.csv.gz": 984,
                              "google2019_nih-chest-xray-labels.csv.gz": 4376}
    assert counts["images"] == counts["v2020"] == 621 and counts["v2020_differ"] == 0
    assert counts["expert"] == {"test": 0, "train": 11, "val": 0}
    assert (counts["boxes_images"], counts["boxes"]) == (12, 12)
    task = load_task("nih-findings", tmp_path / "tables", "train", labels="expert")
    assert len(task.items) == 11
    assert all(set(it.gold_labels) - {o for o, v in it.gold_labels.items() if v is None}
               == {"Fracture", "Pneumothorax", "Lung Opacity", "Lung Lesion"} for it in task.items)
