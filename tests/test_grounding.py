"""Image-grounding conversations (train/grounding.py): the labels they read from VQA-RAD's own
questions, the balance of their answers, and that only the buckets asked for are used."""

from __future__ import annotations

import json
import random
from collections import Counter

from eval.metrics import closed_options, closed_strict
from vlm.datasets import vqa_rad_image_bucket
from train.grounding import (
    MODALITIES, OPEN, ORGANS, PLANES, grounding_conversations, grounding_turns, image_attributes, plane_votes,
)


def _qa(name, question, answer, kind, organ="HEAD"):
    return {"image_name": name, "question": question, "answer": answer, "question_type": kind, "image_organ": organ}


def _names_in(bucket: str, count: int) -> list[str]:
    names = (f"img{k}.jpg" for k in range(10_000))
    return [n for n in names if vqa_rad_image_bucket(n) == bucket][:count]


def test_plane_votes_count_open_answers_and_yeses_but_not_denials_or_two_planes():
    votes = plane_votes([
        _qa("a", "In what plane is this image?", "Axial", "PLANE"),
        _qa("a", "Is this a transverse section?", "yes", "PLANE"),
        _qa("a", "Is this a coronal image?", "no", "PLANE"),  # a denial: says nothing of what it is
        _qa("a", "Is this axial or coronal?", "yes", "PLANE"),  # names two planes
        _qa("b", "Was this chest x ray taken in PA format?", "yes", "PLANE"),
        _qa("c", "Is there a mass?", "yes", "PRES"),
    ])
    assert votes == {"a": Counter({"axial": 2}), "b": Counter({"PA": 1})}


def test_image_attributes_keep_only_what_the_questions_settle():
    attributes = image_attributes([
        _qa("ct.jpg", "What kind of scan is this?", "CT", "MODALITY", organ="ABD"),
        _qa("ct.jpg", "Which plane is the image taken?", "axial", "PLANE", organ="ABD"),
        _qa("us.jpg", "What imaging is this?", "ultrasound", "MODALITY", organ="ABD"),  # not a choice here
        _qa("bare.jpg", "Is there a mass?", "no", "PRES", organ="CHEST"),
        _qa("odd.jpg", "Is there a fracture?", "yes", "PRES", organ="LIMB"),
    ])
    assert attributes == {"ct.jpg": {"organ": "abdomen", "modality": "CT", "plane": "axial"},
                          "us.jpg": {"organ": "abdomen"}, "bare.jpg": {"organ": "chest"}, "odd.jpg": {}}


def test_every_answer_is_right_by_the_evaluation_rules_and_half_the_yes_no_answers_are_yes():
    truth = {"modality": "MRI", "organ": "head", "plane": "coronal"}
    rng, answers = random.Random(0), Counter()
    for _ in range(300):
        turns = grounding_turns(truth, rng)
        assert len(turns) == 5  # a yes/no question per attribute, an either-or for modality and plane
        for question, answer in turns:
            options = closed_options(question)
            if answer in ("yes", "no"):
                answers[answer] += 1
                asked_true = any(word in question for word in ("MRI", "head", "brain", "coronal"))
                assert (answer == "yes") == asked_true, question
            else:
                assert answer in truth.values() and len(options) == 2, question
            assert closed_strict(answer, answer, options)
    assert 0.4 < answers["yes"] / sum(answers.values()) < 0.6


def test_open_questions_add_one_turn_per_attribute_answered_by_its_value():
    truth = {"modality": "CT", "organ": "abdomen", "plane": "axial"}
    for seed in range(50):
        closed = grounding_turns(truth, random.Random(seed))
        turns = grounding_turns(truth, random.Random(seed), open_questions=True)
        open_turns = [(q, a) for q, a in turns if not closed_options(q) and a not in ("yes", "no")]
        assert len(turns) == len(closed) + 3 and len(open_turns) == 3
        assert {a for _, a in open_turns} == set(truth.values())
        assert all(q in OPEN[key] for (q, a) in open_turns for key, value in truth.items() if a == value)


def test_listed_questions_name_every_option_in_varied_orders_and_parse_as_the_val_set_does():
    from train.volumes import VAL_QUESTIONS

    truth = {"modality": "CT", "organ": "head", "plane": "sagittal", "window": "soft tissue"}
    orders = Counter()
    for seed in range(60):
        plain = grounding_turns(truth, random.Random(seed))
        turns = grounding_turns(truth, random.Random(seed), listed_questions=True)
        listed = [(q, a) for q, a in turns if len(closed_options(q)) == 3]
        assert len(turns) == len(plain) + 4 and len(listed) == 4
        for question, answer in listed:
            assert answer in truth.values() and closed_strict(answer, answer, closed_options(question))
            orders[question] += 1
    # the val set's questions, whose options eval reads the same way, are among the shuffled orders
    assert all(sorted(closed_options(q)) in [sorted(closed_options(o)) for o in orders] for q in VAL_QUESTIONS.values())
    assert len(orders) > 12
    # a plane outside the three cross-sectional ones (a PA chest film) gets no listed plane question
    pa = grounding_turns({"plane": "PA"}, random.Random(0), listed_questions=True)
    assert not any(len(closed_options(q)) == 3 for q, _ in pa)


def test_false_values_come_from_the_attributes_own_choices():
    seen = Counter()
    rng = random.Random(1)
    for _ in range(200):
        for question, _ in grounding_turns({"modality": "CT"}, rng):
            seen.update(name for name in MODALITIES if f" {name}" in question)
    assert set(seen) == set(MODALITIES)
    assert set(ORGANS) == {"head", "chest", "abdomen"} and {"axial", "PA"} <= set(PLANES)


def test_conversations_use_only_the_buckets_asked_for_and_are_reproducible(tmp_path):
    train, val = _names_in("train", 2), _names_in("val", 1)
    qas = [_qa(n, "What kind of scan is this?", "MRI", "MODALITY") for n in train + val]
    qas.append(_qa(_names_in("train", 3)[2], "Is there a mass?", "no", "PRES", organ="LIMB"))  # no attribute
    (tmp_path / "trainset.json").write_text(json.dumps(qas))
    records = grounding_conversations(tmp_path / "trainset.json", buckets=("train",), repeats=2)
    assert sorted(r["id"] for r in records) == sorted(f"{n}-grounding{k}" for n in train for k in (0, 1))
    assert records == grounding_conversations(tmp_path / "trainset.json", buckets=("train",), repeats=2)
    for record in records:
        humans = [t["value"] for t in record["conversations"] if t["from"] == "human"]
        assert humans[0].startswith("<image>\n") and not any("<image>" in h for h in humans[1:])
        assert record["image"] == str((tmp_path / "images" / record["id"].split("-grounding")[0]).resolve())
    first = {r["id"]: r["conversations"] for r in records}
    assert any(first[f"{n}-grounding0"] != first[f"{n}-grounding1"] for n in train), "repeats draw anew"
    assert grounding_conversations(tmp_path / "trainset.json", buckets=("val",))[0]["id"] == f"{val[0]}-grounding0"


def test_drop_brief_suffix_strips_about_the_share_asked_and_nothing_else():
    from train.captions import drop_brief_suffix, question_answer_turns

    pairs = [(f"Is there a mass {k}?", "yes" if k % 2 else "no") for k in range(6)]
    records = [{"id": f"img{i}-copy{c}" if c else f"img{i}", "image": "x.png", "conversations": question_answer_turns(pairs)}
               for i in range(100) for c in range(2)]
    assert drop_brief_suffix(records, 0.0) == records
    half = drop_brief_suffix(records, 0.5)
    bare = [t["value"] for r in half for t in r["conversations"] if t["from"] == "human"
            and not t["value"].endswith("\nAnswer briefly.")]
    assert 0.4 < len(bare) / (len(records) * 6) < 0.6
    for new, old in zip(half, records):
        assert [t["value"] for t in new["conversations"] if t["from"] == "gpt"] == \
            [t["value"] for t in old["conversations"] if t["from"] == "gpt"]
        assert new["conversations"][0]["value"].startswith("<image>\n") and "<image>" not in "".join(
            t["value"] for t in new["conversations"][1:])
        assert all(t["value"].split("\n")[-1].startswith("Is there a mass") or t["value"].endswith("Answer briefly.")
                   for t in new["conversations"] if t["from"] == "human")
    assert half[0]["conversations"] != half[1]["conversations"], "a repeated copy draws its own turns"
    assert half == drop_brief_suffix(records, 0.5)
    assert not any(t["value"].endswith("Answer briefly.") for r in drop_brief_suffix(records, 1.0)
                   for t in r["conversations"])
    assert records[0]["conversations"][0]["value"].endswith("Answer briefly."), "the input is not changed"
