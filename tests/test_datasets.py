"""vlm.datasets, the readers training and evaluation share: VQA-RAD records and buckets, NIH labels."""

from __future__ import annotations

import json

import pytest

from vlm.datasets import DataError, label_rows, vqa_rad_image_bucket, vqa_rad_records
from vlm.errors import InputError


def test_vqa_rad_records_are_read_or_refused_in_one_line(tmp_path):
    good = tmp_path / "trainset.json"
    good.write_text(json.dumps([{"qid": 1, "image_name": "a.jpg", "question": "q", "answer": "yes"}]))
    assert vqa_rad_records(good)[0]["image_name"] == "a.jpg"
    cases = {"missing.json": (None, "is missing"), "bad.json": ("[{", "not valid JSON"),
             "dict.json": ('{"image_name": "a.jpg"}', "list of question records"),
             "noname.json": ('[{"qid": 1}]', "list of question records")}
    for name, (text, message) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message) as info:
            vqa_rad_records(tmp_path / name)
        assert isinstance(info.value, InputError) and "\n" not in str(info.value)


def test_buckets_are_stable_and_cover_the_three_names():
    names = [f"synpic{i}.jpg" for i in range(400)]
    buckets = [vqa_rad_image_bucket(n) for n in names]
    assert set(buckets) == {"heldout", "val", "train"}
    assert buckets == [vqa_rad_image_bucket(n) for n in names]  # a hash of the name, not of the process
    assert 0.1 < buckets.count("heldout") / len(names) < 0.2


def test_nih_labels_drop_no_finding_and_find_images_beside_the_csv(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "b.jpg").write_bytes(b"")
    csv = tmp_path / "labels.csv"
    csv.write_text("image,findings,split\nb.jpg,No Finding,train\nc.jpg,Mass|Nodule,train\nd.jpg,Mass,test\n")
    rows = label_rows(csv, "train")
    assert rows == [(tmp_path / "images" / "b.jpg", frozenset()), (tmp_path / "images" / "c.jpg",
                                                                    frozenset({"Mass", "Nodule"}))]
    with pytest.raises(InputError, match="no rows in split 'val'"):
        label_rows(csv, "val")
