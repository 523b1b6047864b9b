"""Evaluation runs with the tiny offline model: output files, crash-and-resume, scoring other
systems' answers by hand-computed numbers, the image ablation, comparisons and the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from eval.tables import markdown
from eval.predict import read_predictions
from eval.run import evaluate, score_predictions
from eval.score import shuffled_reports_control
from eval.tasks import DataError, load_task
from vlm.cli import main
from vlm.errors import ConfigError

PROJECT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    ("Is there a pleural effusion?", "no", "closed", "PRES"),
    ("Is the heart enlarged?", "yes", "closed", "SIZE"),
    ("Is this an MRI or a CT?", "ct", "closed", "MODALITY"),
    ("Is there a pneumothorax on the left side?", "no", "closed", "PRES"),
    ("Which organ is shown?", "chest", "open", "ORGAN"),
    ("What imaging modality is this?", "x-ray", "open", "MODALITY"),
    ("Where is the lesion?", "left lung", "open", "POS"),
    ("Is the lung clear?", "yes", "closed", "PRES"),
    ("What is abnormal in the image?", "mass", "open", "ABN"),
    ("Is the mediastinum widened?", "no", "closed", "SIZE"),
    ("Is this image taken in the axial plane?", "yes", "closed", "PLANE"),
    ("How many nodules are there?", "two", "open", "COUNT"),
]


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory) -> Path:
    """A 12-question vqa-jsonl task; images differ in size and colour."""
    folder = tmp_path_factory.mktemp("vqa")
    with (folder / "test.jsonl").open("w") as f:
        for i, (question, answer, kind, qtype) in enumerate(QUESTIONS):
            Image.new("RGB", (24 + 4 * i, 32), (20 * i, 255 - 20 * i, 128)).save(folder / f"img{i}.png")
            f.write(json.dumps({"id": f"q{i}", "image": f"img{i}.png", "question": question, "answer": answer,
                                "answer_type": kind, "question_type": qtype}) + "\n")
    return folder / "test.jsonl"


@pytest.fixture(scope="module")
def checkpoint(tiny_config, tmp_path_factory) -> Path:
    import torch

    from vlm.model import MedVLM

    torch.manual_seed(0)
    return MedVLM.build(tiny_config).save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def model(checkpoint):
    from vlm.model import MedVLM

    return MedVLM.from_pretrained(str(checkpoint)).eval()


@pytest.fixture(scope="module")
def reference_run(model, vqa_data, tmp_path_factory):
    """One uninterrupted run with the blank-image control; other tests compare against it."""
    out = tmp_path_factory.mktemp("reference")
    task = load_task("vqa-jsonl", vqa_data)
    results = evaluate(model, task, out, batch_size=2, max_new_tokens=6, ablate_image=True, bootstrap=200,
                       model_ref="tiny", progress=False)
    return out, results


def _predictions(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert len(ids) == len(set(ids)), "no duplicate ids"
    return {json.loads(line)["id"]: json.loads(line)["prediction"] for line in lines}


def test_results_files_and_keys(reference_run):
    out, results = reference_run
    assert {p.name for p in out.iterdir()} >= {"predictions.jsonl", "predictions_blank.jsonl", "results.json",
                                               "results.md", "question_types.png", "yes_no_confusion.png"}
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in ("model", "task", "split", "prompt_template", "decoding", "rules", "counts", "metrics", "ci95",
                "by_question_type", "yes_no_confusion", "timing", "versions", "ablation"):
        assert key in saved, key
    assert saved["counts"] == {"questions": 12, "closed": 7, "open": 5, "closed_yes_no": 6, "closed_other": 1,
                               "predicted": 12, "missing": 0}
    assert saved["decoding"]["greedy"] and saved["decoding"]["max_new_tokens"] == 6
    assert set(saved["versions"]) == {"torch", "transformers", "open_clip_torch", "medvlm"}
    assert saved["timing"]["generated"] == 12 and saved["timing"]["seconds_per_question"] > 0
    for key in ("closed_strict", "closed_lenient", "open_exact", "open_recall", "open_f1", "open_bleu1"):
        assert 0 <= saved["metrics"][key] <= 1
        low, high = saved["ci95"][key]
        assert low <= saved["metrics"][key] <= high
    assert set(saved["by_question_type"]["closed"]) == {"PRES", "SIZE", "MODALITY", "PLANE"}
    assert sum(map(sum, saved["yes_no_confusion"]["matrix"])) == 6
    md = (out / "results.md").read_text()
    assert "closed_strict" in md and "MedEvalKit" in md and "LLaVA-Med" in md and "| PRES |" in md


def test_image_ablation_writes_both_files_and_a_paired_delta(reference_run):
    out, results = reference_run
    assert len(_predictions(out / "predictions_blank.jsonl")) == 12
    ab = results["ablation"]
    assert ab["delta_closed_strict"] == pytest.approx(ab["closed_strict_with_image"] - ab["closed_strict_blank"])
    assert results["metrics"]["ablation_delta_closed_strict"] == ab["delta_closed_strict"]
    assert len(ab["delta_ci95"]) == 2 and 0 <= ab["answers_changed"] <= 1
    assert "Image ablation" in (out / "results.md").read_text()


def test_a_killed_run_resumes_to_the_same_predictions(reference_run, model, checkpoint, vqa_data, tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(PROJECT)!r})
        from eval.run import evaluate
        from eval.tasks import load_task
        from vlm.model import MedVLM

        def on_batch(done, total):
            print("batch", done, flush=True)
            if done == 4:
                time.sleep(120)  # the test kills us here, after the second batch

        model = MedVLM.from_pretrained({str(checkpoint)!r}).eval()
        evaluate(model, load_task("vqa-jsonl", {str(vqa_data)!r}), {str(out)!r}, batch_size=2, max_new_tokens=6,
                 bootstrap=0, model_ref="tiny", progress=False, on_batch=on_batch)
        print("finished", flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    seen = []
    try:
        for line in child.stdout:
            seen.append(line.strip())
            if len(seen) == 2:
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=60)
    assert seen == ["batch 2", "batch 4"], "killed after the second batch, before the end"
    assert len(read_predictions(out / "predictions.jsonl")) == 4
    with (out / "predictions.jsonl").open("a") as f:  # a write cut short by a crash
        f.write('{"id": "q11", "question": "How many nod')

    results = evaluate(model, load_task("vqa-jsonl", vqa_data), out, batch_size=2, max_new_tokens=6, bootstrap=0,
                       model_ref="tiny", progress=False)
    assert results["timing"]["generated_this_run"] == 8
    assert _predictions(out / "predictions.jsonl") == _predictions(reference_run[0] / "predictions.jsonl")
    # A finished run does no more work, and never duplicates a line.
    again = evaluate(model, load_task("vqa-jsonl", vqa_data), out, batch_size=2, max_new_tokens=6, bootstrap=0,
                     model_ref="tiny", progress=False)
    assert again["timing"]["generated_this_run"] == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 12


def test_predictions_of_another_run_are_not_mixed_in(model, vqa_data, tmp_path):
    task = load_task("vqa-jsonl", vqa_data, limit=2)
    evaluate(model, task, tmp_path, batch_size=2, max_new_tokens=3, bootstrap=0, model_ref="a", progress=False)
    with pytest.raises(ConfigError, match="different model"):
        evaluate(model, task, tmp_path, batch_size=2, max_new_tokens=3, bootstrap=0, model_ref="b", progress=False)


def test_damage_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a", "prediction": "x"}\n{broken\n{"id": "b", "prediction": "y"}\n')
    with pytest.raises(DataError, match="line 2"):
        read_predictions(path)


@pytest.fixture
def llava_answers(tmp_path) -> Path:
    """LLaVA-Med style answers for 4 of the 12 questions, plus one id the task does not have."""
    answers = [("q0", "Yes and no."), ("q1", "Yes, it is."), ("q2", "It is an MRI."), ("q6", "The left."),
               ("q99", "yes")]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "prompt": "...", "text": t, "answer_id": "x",
                                        "model_id": "llava-med", "metadata": {}}) + "\n" for i, t in answers))
    return path


def test_score_another_systems_answers_by_hand(vqa_data, llava_answers):
    r = score_predictions("vqa-jsonl", llava_answers, vqa_data, bootstrap=0)
    m = r["metrics"]
    # Closed (7): q0 gold no, "yes and no" names both -> strict wrong, but "no" is a substring -> lenient right;
    # q1 right both ways; q2 names the wrong option; four closed questions have no answer.
    assert m["closed_strict"] == pytest.approx(1 / 7)
    assert m["closed_lenient"] == pytest.approx(2 / 7)
    # Open (5): only q6 answered: "the left" vs "left lung" -> recall 1/2, F1 2/3, BLEU-1 exp(1 - 2/1).
    assert m["open_recall"] == pytest.approx(0.5 / 5)
    assert m["open_f1"] == pytest.approx((2 / 3) / 5)
    assert m["open_bleu1"] == pytest.approx(math.exp(-1) / 5)
    assert m["open_exact"] == 0
    assert (r["counts"]["predicted"], r["counts"]["missing"], r["counts"]["unknown_ids"]) == (4, 8, 1)


def test_score_and_compare_commands(vqa_data, llava_answers, reference_run, tmp_path, capsys):
    rc = main(["eval", "score", "vqa-jsonl", "--predictions", str(llava_answers), "--data", str(vqa_data),
               "--out", str(tmp_path / "llava"), "--bootstrap", "50"])
    assert rc == 0
    assert "| closed_strict | 0.143" in capsys.readouterr().out
    assert (tmp_path / "llava" / "results.json").is_file()
    assert main(["eval", "compare", str(reference_run[0]), str(tmp_path / "llava")]) == 0
    table = capsys.readouterr().out
    assert str(reference_run[0]) in table and str(tmp_path / "llava") in table
    row = next(line for line in table.splitlines() if line.startswith("| closed_strict |"))
    assert "0.143" in row and f"{reference_run[1]['metrics']['closed_strict']:.3f}" in row


def test_eval_command_prints_the_table(checkpoint, vqa_data, tmp_path, capsys):
    rc = main(["eval", "vqa-jsonl", "--model", str(checkpoint), "--data", str(vqa_data), "--out", str(tmp_path),
               "--limit", "4", "--batch-size", "4", "--max-new-tokens", "3", "--bootstrap", "20", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| closed_strict |" in out and "4 questions" in out
    assert len(read_predictions(tmp_path / "predictions.jsonl")) == 4


def test_eval_command_errors_are_one_line(checkpoint, tmp_path, capsys):
    rc = main(["eval", "vqa-rad", "--model", str(checkpoint), "--data", str(tmp_path / "nowhere"), "--out",
               str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no data at" in err


def test_report_task_scores_text_and_clinical_efficacy(model, tmp_path):
    for i in range(3):
        Image.new("L", (32, 32), 40 * i).save(tmp_path / f"cxr{i}.png")
    reports = ["No pleural effusion. Heart size is normal.", "Cardiomegaly. Small left effusion.",
               "Right lower lobe consolidation, likely pneumonia."]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"image": f"cxr{i}.png", "report": r}) + "\n"
                                              for i, r in enumerate(reports)))
    results = evaluate(model, load_task("report-jsonl", tmp_path / "r.jsonl"), tmp_path / "out", batch_size=3,
                       max_new_tokens=8, bootstrap=20, progress=False)
    m = results["metrics"]
    assert {"bleu1", "bleu4", "rouge_l", "meteor", "cider", "ce_micro_f1", "ce5_macro_f1_upos"} <= set(m)
    assert results["clinical_efficacy"]["ce"]["observations"][0] == "No Finding"
    assert len(results["clinical_efficacy"]["ce"]["observations"]) == 14
    assert (tmp_path / "out" / "clinical_efficacy.png").is_file()


def test_nih_findings_scores_reports_against_mapped_labels(tmp_path):
    folder = PROJECT.parent / "shared" / "data" / "nih_cxr"
    if not (folder / "labels.csv").is_file():
        pytest.skip(f"NIH chest X-rays not present at {folder}")
    task = load_task("nih-findings", folder, split="test")
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"id": it.id, "prediction": "Cardiomegaly."}) + "\n" for it in task.items))
    r = score_predictions("nih-findings", path, folder, split="test", bootstrap=20)
    assert "bleu1" not in r["metrics"], "no text references"
    assert len(r["clinical_efficacy"]["ce"]["observations"]) == 11  # NIH annotates 11 of the 14
    # Every report says cardiomegaly and nothing else: over the 5 conditions, TP = the cardiomegaly cases,
    # FP = the rest, FN = the positives of the other four conditions.
    cardio = sum(it.gold_labels["Cardiomegaly"] == 1 for it in task.items)
    others = sum(it.gold_labels[c] == 1 for it in task.items
                 for c in ("Atelectasis", "Consolidation", "Edema", "Pleural Effusion"))
    p, rec = cardio / len(task.items), cardio / (cardio + others)
    assert r["metrics"]["ce5_micro_p"] == pytest.approx(p)
    assert r["metrics"]["ce5_micro_r"] == pytest.approx(rec)
    assert r["metrics"]["ce5_micro_f1"] == pytest.approx(2 * p * rec / (p + rec))
    # The majority-class floor: every report "No Finding", scored over the same 11 observations.
    base = r["baselines"]
    assert base["majority_class"] == ["No Finding"]
    normal = sum(it.gold_labels["No Finding"] == 1 for it in task.items)
    assert base["majority_share"] == pytest.approx(normal / len(task.items))
    observed = r["clinical_efficacy"]["ce"]["observations"]
    missed = sum(it.gold_labels[o] == 1 for it in task.items for o in observed if o != "No Finding")
    fp = len(task.items) - normal
    assert base["ce_micro_f1"] == pytest.approx(2 * normal / (2 * normal + fp + missed))
    # The same report for every image: shuffling changes nothing, so it is no evidence of reading the image.
    shuffled = base["shuffled_reports"]
    assert shuffled["permutations"] == 20 and shuffled["share_at_least_model"] == 1.0
    assert shuffled["ce_micro_f1_mean"] == pytest.approx(r["metrics"]["ce_micro_f1"])
    assert "| control: these reports dealt to the images in random order (20 permutations)" in markdown(r)


def test_shuffled_reports_control_separates_fitting_reports_from_a_constant_one():
    observed = ["No Finding", "Cardiomegaly", "Pleural Effusion"]
    gold = [{"No Finding": 1, "Cardiomegaly": 0, "Pleural Effusion": 0},
            {"No Finding": 0, "Cardiomegaly": 1, "Pleural Effusion": 0},
            {"No Finding": 0, "Cardiomegaly": 0, "Pleural Effusion": 1}] * 10
    # Reports that say exactly each image's findings: in order F1 1.0, dealt at random ~1/3.
    fitting = shuffled_reports_control(gold, gold, observed, n=200)
    assert fitting["share_at_least_model"] < 0.01
    assert 0.2 < fitting["ce_micro_f1_mean"] < 0.5 and fitting["ce_micro_f1_p95"] < 1.0
    # One report for every image: every permutation is the same set of reports, so no evidence of fit.
    constant = shuffled_reports_control([gold[1]] * len(gold), gold, observed, n=200)
    assert constant["share_at_least_model"] == 1.0
    assert constant["ce_micro_f1_mean"] == pytest.approx(1 / 3)
