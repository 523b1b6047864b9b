"""Benchmark loaders: every native format on tiny synthetic fixtures, the VQA-RAD splits and the NIH
labels on the real data when it is present."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import pickle
from pathlib import Path

import pytest
from PIL import Image

from eval.tasks import VQA_RAD_SPLITS, DataError, load_task
from vlm.datasets import vqa_rad_image_bucket
from vlm.errors import ConfigError, MedVLMError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


def _image(path: Path, color=(90, 90, 90)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


def test_slake_keeps_english_questions_with_their_types_and_options(tmp_path):
    _image(tmp_path / "imgs" / "xmlab1" / "source.jpg")
    records = [
        {"qid": 1, "img_name": "xmlab1/source.jpg", "question": "Is this an MRI or a CT?", "answer": "CT",
         "q_lang": "en", "answer_type": "CLOSED", "content_type": "Modality"},
        {"qid": 2, "img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?", "answer": "Liver",
         "q_lang": "en", "answer_type": "OPEN", "content_type": "Organ"},
        {"qid": 3, "img_name": "xmlab1/source.jpg", "question": "这是什么?", "answer": "肝", "q_lang": "zh",
         "answer_type": "OPEN", "content_type": "Organ"},
    ]
    (tmp_path / "test.json").write_text(json.dumps(records))
    task = load_task("slake", tmp_path, split="test")
    assert task.kind == "vqa" and [it.id for it in task.items] == ["1", "2"]
    closed, opened = task.items
    assert (closed.answer_type, closed.question_type, closed.options) == ("closed", "Modality", ["mri", "ct"])
    assert (opened.answer_type, opened.answer, opened.options) == ("open", "Liver", [])
    assert closed.image == tmp_path / "imgs" / "xmlab1" / "source.jpg"
    with pytest.raises(DataError, match="validate.json"):
        load_task("slake", tmp_path, split="val")


def _pathvqa_folder(tmp_path: Path, records) -> Path:
    (tmp_path / "qas" / "test").mkdir(parents=True)
    (tmp_path / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps(records))
    for name in {r["image"] for r in records if isinstance(r, dict)}:
        _image(tmp_path / "images" / "test" / f"{name}.jpg")
    return tmp_path


def test_pathvqa_pickles_load_plain_data(tmp_path):
    folder = _pathvqa_folder(tmp_path, [
        {"image": "test_0000", "question": "Is there necrosis?", "answer": "yes"},
        {"image": "test_0001", "question": "What is present?", "answer": "granuloma"},
    ])
    task = load_task("pathvqa", folder, split="test")
    assert [(it.answer_type, it.answer) for it in task.items] == [("closed", "yes"), ("open", "granuloma")]
    assert task.items[1].image == folder / "images" / "test" / "test_0001.jpg"


class _Exploit:
    """Unpickling this would call open(path, "w"), i.e. run code named by the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pathvqa_pickles_that_name_code_are_refused_without_running_it(tmp_path):
    target = tmp_path / "created-by-pickle"
    (tmp_path / "qas" / "test").mkdir(parents=True)
    (tmp_path / "qas" / "test" / "test_qa.pkl").write_bytes(pickle.dumps([_Exploit(target)]))
    with pytest.raises(DataError, match="only plain data"):
        load_task("pathvqa", tmp_path, split="test")
    assert not target.exists()


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow is not installed")
def test_pathvqa_parquet_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buf, format="PNG")
    table = pa.table({"image": [{"bytes": buf.getvalue(), "path": None}] * 2,
                      "question": ["Is this benign?", "What stain is used?"], "answer": ["no", "h&e"]})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet")
    task = load_task("pathvqa", tmp_path, split="test")
    assert [it.answer_type for it in task.items] == ["closed", "open"]
    assert task.items[0].image is None and task.items[0].image_bytes == buf.getvalue()


@pytest.mark.skipif(HAS_PYARROW, reason="pyarrow is installed")
def test_pathvqa_parquet_without_pyarrow_says_how_to_get_it(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(MedVLMError, match="pip install pyarrow"):
        load_task("pathvqa", tmp_path, split="test")


def test_pmc_vqa_multiple_choice(tmp_path):
    _image(tmp_path / "images" / "PMC1_Fig1.jpg")
    with (tmp_path / "test.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C",
                         "Choice D", "Answer_label"])
        writer.writerow([7, "PMC1_Fig1.jpg", "What imaging modality was used?", "CT scan ", "A:MRI ", "B:CT scan ",
                         "C:PET ", "D:X-ray ", "B"])
    task = load_task("pmc-vqa", tmp_path / "test.csv")
    item = task.items[0]
    assert (item.id, item.answer, item.answer_type, item.question_type) == ("7", "CT scan", "closed", "choice")
    assert item.options == ["MRI", "CT scan", "PET", "X-ray"]
    assert "B: CT scan" in item.question and item.image == tmp_path / "images" / "PMC1_Fig1.jpg"
    assert load_task("pmc-vqa", tmp_path, split="test").items[0].id == "7"  # a folder with {split}.csv


def test_pmc_vqa_predictions_are_scored_by_letter_or_text(tmp_path):
    from eval.score import score

    test_pmc_vqa_multiple_choice(tmp_path)
    task = load_task("pmc-vqa", tmp_path / "test.csv")
    for prediction, right in [("B", 1), ("(B) CT scan", 1), ("B: CT scan", 1), ("CT scan", 1), ("A", 0),
                              ("MRI", 0), ("A nodule", 0)]:
        assert score(task, {"7": prediction}, bootstrap=0)["metrics"]["closed_strict"] == right, prediction


def test_vqa_jsonl_paths_types_and_ids(tmp_path):
    _image(tmp_path / "img" / "a.png")
    lines = [{"image": "img/a.png", "question": "Is there a mass?", "answer": "No"},
             {"id": "x", "image": str(tmp_path / "img" / "a.png"), "question": "Where?", "answer": "left",
              "answer_type": "open", "question_type": "POS"}]
    path = tmp_path / "vqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    task = load_task("vqa-jsonl", path)
    assert [(it.id, it.answer_type, it.question_type) for it in task.items] == [("0", "closed", "closed"),
                                                                                ("x", "open", "POS")]
    assert task.items[0].image == tmp_path / "img" / "a.png"
    assert len(load_task("vqa-jsonl", path, limit=1).items) == 1


def test_report_jsonl_whole_reports_or_findings(tmp_path):
    _image(tmp_path / "cxr.png")
    path = tmp_path / "reports.jsonl"
    path.write_text(json.dumps({"image": "cxr.png", "report": "No effusion."}) + "\n"
                    + json.dumps({"image": "cxr.png", "findings": "Heart is enlarged.", "impression": "CHF."}) + "\n")
    task = load_task("report-jsonl", path)
    assert task.kind == "report"
    assert [(it.answer, it.answer_type) for it in task.items] == [("No effusion.", "report"),
                                                                  ("Heart is enlarged.", "report")]


@pytest.mark.parametrize("name, make, message", [
    ("vqa-jsonl", lambda d: d / "none.jsonl", "no data at"),
    ("vqa-jsonl", lambda d: (d / "v.jsonl").write_text('{"image": "gone.png", "question": "q", "answer": "a"}\n')
     and d / "v.jsonl", "1 of 1 images are missing"),
    ("vqa-jsonl", lambda d: (d / "v.jsonl").write_text("{not json\n") and d / "v.jsonl", "line 1"),
    ("vqa-rad", lambda d: d, "testset.json is missing"),
    ("pathvqa", lambda d: d, "test_qa.pkl is missing"),
])
def test_missing_or_broken_files_are_one_line_errors(tmp_path, name, make, message):
    with pytest.raises(DataError, match=message) as info:
        load_task(name, make(tmp_path))
    assert "\n" not in str(info.value)


def test_unknown_task_or_split():
    with pytest.raises(ConfigError, match="known tasks"):
        load_task("no-such-task", ".")
    with pytest.raises(ConfigError, match="test-disjoint"):
        load_task("vqa-rad", ".", split="dev")


def test_vqa_rad_bucket_is_a_stable_hash():
    # Fixed values: a change here would silently move images between training and evaluation.
    assert [vqa_rad_image_bucket(n) for n in ("synpic42202.jpg", "synpic29265.jpg", "synpic28602.jpg")] == \
        ["train", "heldout", "val"]


@pytest.fixture(scope="module")
def vqa_rad() -> Path:
    folder = SHARED_DATA / "vqa_rad"
    if not (folder / "testset.json").is_file():
        pytest.skip(f"VQA-RAD not present at {folder}")
    return folder


def test_vqa_rad_splits_sizes_and_image_disjointness(vqa_rad):
    tasks = {s: load_task("vqa-rad", vqa_rad, split=s) for s in VQA_RAD_SPLITS}
    test = tasks["test"].items
    assert len(test) == 451
    assert sum(it.answer_type == "closed" for it in test) == 272
    assert sum(bool(it.options) for it in test if it.answer_type == "closed") > 0
    assert len(tasks["train-all"].items) == 3064
    images = {s: {it.image.name for it in t.items} for s, t in tasks.items()}
    assert images["test-disjoint"] and images["val"] and images["train"]
    assert not images["test-disjoint"] & images["train"]
    assert not images["val"] & images["train"]
    assert not images["val"] & images["test-disjoint"]
    assert {vqa_rad_image_bucket(n) for n in images["test-disjoint"]} == {"heldout"}
    assert images["test-disjoint"] <= images["test"]
    # Train-bucket questions are exactly the trainset questions not about heldout or val images.
    heldout_train = [it for it in tasks["train-all"].items if vqa_rad_image_bucket(it.image.name) == "heldout"]
    assert len(tasks["train"].items) + len(tasks["val"].items) + len(heldout_train) == 3064
    all_images = images["train-all"] | images["test"]
    shares = {b: sum(vqa_rad_image_bucket(n) == b for n in all_images) / len(all_images) for b in ("heldout", "val")}
    assert 0.10 < shares["heldout"] < 0.20 and 0.06 < shares["val"] < 0.15


def test_vqa_rad_standard_test_is_scored_by_image_bucket(vqa_rad):
    from eval.tables import markdown
    from eval.score import score

    task = load_task("vqa-rad", vqa_rad, split="test")
    assert all(it.image_group == vqa_rad_image_bucket(it.image.name) for it in task.items)
    # Answering "yes" to everything scores, per bucket, the share of closed questions whose gold is "yes".
    results = score(task, {it.id: "yes" for it in task.items}, bootstrap=0)
    groups = results["by_image_group"]["closed"]
    for bucket in ("train", "val", "heldout"):
        closed = [it for it in task.items if it.image_group == bucket and it.answer_type == "closed"]
        assert groups[bucket]["n"] == len(closed) > 0
        assert groups[bucket]["strict"] == pytest.approx(sum(it.answer.lower() == "yes" for it in closed) / len(closed))
    assert sum(g["n"] for g in results["by_image_group"]["open"].values()) == results["counts"]["open"]
    results.update(task="vqa-rad", split="test")
    assert "## By image bucket" in markdown(results) and "| heldout |" in markdown(results)
    # A split of one bucket has nothing to break down.
    assert "by_image_group" not in score(load_task("vqa-rad", vqa_rad, split="test-disjoint"), {}, bootstrap=0)


def test_nih_findings_gold_is_mapped_nih_labels():
    folder = SHARED_DATA / "nih_cxr"
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"NIH chest X-rays not present at {folder}")
    task = load_task("nih-findings", folder, split="test")
    assert task.kind == "report" and len(task.items) == 101
    item = next(it for it in task.items if "Effusion" in it.answer.split("|"))
    assert item.gold_labels["Pleural Effusion"] == 1 and item.gold_labels["Fracture"] is None
    assert all(it.image.is_file() for it in task.items)
    assert {len(load_task("nih-findings", folder, split=s).items) for s in ("train", "val")} == {467, 53}
