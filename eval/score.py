"""Metrics over predictions, pure: the same `score` scores our predictions and another system's
answers (`read_answer_file`), with bootstrap intervals, the image-ablation deltas and the
report baselines (majority label set, shuffled reports).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from eval.labeler import CONDITIONS_5, OBSERVATIONS, clinical_efficacy, label_report
from eval.metrics import (bleu, bleu1, bootstrap_ci, bootstrap_ci_fn, closed_lenient, closed_strict, cider,
                          exact_match, meteor, normalize_answer, paired_bootstrap_ci, rouge_l, token_f1,
                          token_recall)
from eval.tasks import DataError, Item, Task

# A multiple-choice answer given as its letter: "B", "B:", "B.", "(B)"; not "A nodule".
_CHOICE_LETTER = re.compile(r"^\s*\(?([a-d])(?:[):.]|\s*$)", re.IGNORECASE)


def score(task: Task, predictions: dict[str, str], bootstrap: int = 1000, blank: dict[str, str] | None = None) -> dict:
    """Metrics of `predictions` (id -> text) on `task`, with percentile bootstrap 95% intervals
    (`bootstrap` resamples, 0 for none). An item without a prediction scores as an empty answer."""
    missing = sum(it.id not in predictions for it in task.items)
    if task.kind == "report":
        results = _score_reports(task.items, predictions, bootstrap)
    else:
        results = _score_vqa(task.items, predictions, bootstrap, blank)
    results["counts"].update(predicted=len(task.items) - missing, missing=missing)
    if task.gold is not None:  # nih-findings scored against other labels than the NIH ones
        results["gold_labels"] = dict(task.gold)
    return {"kind": task.kind, **results,
            "bootstrap": {"resamples": bootstrap, "level": 0.95, "method": "percentile", "seed": 0}}


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _ci(values, n_boot: int) -> list[float] | None:
    return list(bootstrap_ci(values, n=n_boot)) if n_boot and len(values) else None


def _vqa_scores(item: Item, prediction: str) -> dict[str, float]:
    if item.answer_type == "closed":
        if item.question_type == "choice":
            match = _CHOICE_LETTER.match(prediction)
            index = ord(match.group(1).lower()) - ord("a") if match else -1
            prediction = item.options[index] if 0 <= index < len(item.options) else prediction
        return {"strict": float(closed_strict(prediction, item.answer, item.options)),
                "lenient": float(closed_lenient(prediction, item.answer))}
    return {"exact": float(exact_match(prediction, item.answer)), "recall": token_recall(prediction, item.answer),
            "f1": token_f1(prediction, item.answer), "bleu1": bleu1(prediction, item.answer)}


def _score_vqa(items: list[Item], predictions: dict[str, str], n_boot: int, blank: dict[str, str] | None) -> dict:
    preds = [predictions.get(it.id, "") for it in items]
    scores = [_vqa_scores(it, p) for it, p in zip(items, preds)]
    closed = [i for i, it in enumerate(items) if it.answer_type == "closed"]
    opened = [i for i, it in enumerate(items) if it.answer_type == "open"]
    columns = {"closed_strict": (closed, "strict"), "closed_lenient": (closed, "lenient"),
               "open_exact": (opened, "exact"), "open_recall": (opened, "recall"),
               "open_f1": (opened, "f1"), "open_bleu1": (opened, "bleu1")}
    values = {key: [scores[i][field] for i in idx] for key, (idx, field) in columns.items()}
    yes_no = [i for i in closed if normalize_answer(items[i].answer) in ("yes", "no")]
    gold = [normalize_answer(items[i].answer) for i in closed]
    results = {
        "metrics": {key: _mean(v) for key, v in values.items()},
        "ci95": {key: _ci(v, n_boot) for key, v in values.items()},
        "counts": {"questions": len(items), "closed": len(closed), "open": len(opened), "closed_yes_no": len(yes_no),
                   "closed_other": len(closed) - len(yes_no)},
        "by_question_type": _by_group(items, scores, n_boot, key=lambda it: it.question_type),
        "yes_no_confusion": _confusion([items[i] for i in yes_no], [preds[i] for i in yes_no]),
        # What answering the same word to every closed question scores: the floor to beat.
        "baselines": {f"closed_strict_always_{w}": gold.count(w) / len(gold) if gold else None for w in ("yes", "no")},
    }
    if len({it.image_group for it in items} - {""}) > 1:  # a split that mixes buckets (VQA-RAD test)
        results["by_image_group"] = _by_group(items, scores, n_boot, key=lambda it: it.image_group)
    if blank is not None:
        ab = results["ablation"] = _ablation(items, preds, scores, blank, closed, opened, n_boot)
        results["metrics"].update(blank_closed_strict=ab["closed_strict_blank"],
                                  ablation_delta_closed_strict=ab["delta_closed_strict"])
        results["ci95"]["ablation_delta_closed_strict"] = ab["delta_ci95"]
    return results


def _by_group(items: list[Item], scores: list[dict], n_boot: int, key) -> dict:
    """Per answer type and group (`key(item)`: question type, image bucket): n, mean of every score,
    and a CI of the main one (strict accuracy for closed questions, token recall for open ones)."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for it, s in zip(items, scores):
        groups.setdefault(it.answer_type, {}).setdefault(key(it), []).append(s)
    out = {}
    for kind, types in sorted(groups.items()):
        main = "strict" if kind == "closed" else "recall"
        out[kind] = {q: {"n": len(v), **{k: _mean([s[k] for s in v]) for k in v[0]},
                         "ci95": _ci([s[main] for s in v], n_boot)} for q, v in sorted(types.items())}
    return out


def _confusion(items: list[Item], preds: list[str]) -> dict:
    matrix = [[0, 0, 0], [0, 0, 0]]
    for it, pred in zip(items, preds):
        said = {w for w in normalize_answer(pred).split() if w in ("yes", "no")}
        column = 0 if said == {"yes"} else 1 if said == {"no"} else 2
        matrix[0 if normalize_answer(it.answer) == "yes" else 1][column] += 1
    return {"gold": ["yes", "no"], "predicted": ["yes", "no", "neither or both"], "matrix": matrix}


def _ablation(items, preds, scores, blank, closed, opened, n_boot) -> dict:
    """With-image minus blank-image scores on the same questions; the paired bootstrap resamples
    questions jointly, so question difficulty cancels out of the interval."""
    blank_scores = [_vqa_scores(it, blank.get(it.id, "")) for it in items]
    with_image = [scores[i]["strict"] for i in closed]
    without = [blank_scores[i]["strict"] for i in closed]
    changed = [normalize_answer(p) != normalize_answer(blank.get(it.id, "")) for it, p in zip(items, preds)]
    return {"closed_strict_with_image": _mean(with_image), "closed_strict_blank": _mean(without),
            "delta_closed_strict": _mean(with_image) - _mean(without) if closed else None,
            "delta_ci95": list(paired_bootstrap_ci(with_image, without, n=n_boot)) if n_boot and closed else None,
            "open_recall_blank": _mean([blank_scores[i]["recall"] for i in opened]),
            "answers_changed": _mean(changed)}


def _score_reports(items: list[Item], predictions: dict[str, str], n_boot: int) -> dict:
    hyps = [predictions.get(it.id, "") for it in items]
    metrics, ci = {}, {}
    text_refs = all(it.gold_labels is None for it in items)
    if text_refs:
        refs = [it.answer for it in items]
        for n in range(1, 5):
            metrics[f"bleu{n}"] = bleu(refs, hyps, n)
        metrics.update(rouge_l=rouge_l(refs, hyps), meteor=meteor(refs, hyps), cider=cider(refs, hyps))
        if n_boot:
            for n in (1, 4):
                ci[f"bleu{n}"] = list(bootstrap_ci_fn(
                    lambda idx, n=n: bleu([refs[i] for i in idx], [hyps[i] for i in idx], n), len(items), n=n_boot))
            ci["rouge_l"] = _ci([rouge_l([r], [h]) for r, h in zip(refs, hyps)], n_boot)
            ci["meteor"] = _ci([meteor([r], [h]) for r, h in zip(refs, hyps)], n_boot)
    pred_labels = [label_report(h) for h in hyps]
    gold = [it.gold_labels if it.gold_labels is not None else label_report(it.answer) for it in items]
    # Label gold (NIH) says nothing about some observations; they are left out rather than scored as absent.
    observed = OBSERVATIONS if text_refs else [o for o in OBSERVATIONS if any(g.get(o) is not None for g in gold)]
    # The same for the 5 conditions: all five for text and NIH gold, none for the expert labels (no ce5 then).
    conditions = [o for o in CONDITIONS_5 if o in observed]
    efficacy = {}
    for name, obs in (("ce", observed), ("ce5", conditions)):
        if not obs:
            continue
        for suffix, upos in (("", False), ("_upos", True)):
            block = clinical_efficacy(pred_labels, gold, obs, uncertain_as_positive=upos)
            efficacy[name + suffix] = {"observations": list(obs), "uncertain_as_positive": upos, **block}
            for avg in ("micro", "macro"):
                for stat, short in (("precision", "p"), ("recall", "r"), ("f1", "f1")):
                    metrics[f"{name}_{avg}_{short}{suffix}"] = block[f"{avg}_{stat}"]
                if n_boot:
                    ci[f"{name}_{avg}_f1{suffix}"] = list(bootstrap_ci_fn(
                        lambda idx, obs=obs, upos=upos, avg=avg: clinical_efficacy(
                            [pred_labels[i] for i in idx], [gold[i] for i in idx], obs, upos)[f"{avg}_f1"],
                        len(items), n=n_boot))
    results = {"metrics": metrics, "ci95": ci, "clinical_efficacy": efficacy,
               "counts": {"reports": len(items), "text_references": text_refs}}
    if not text_refs:
        results["baselines"] = majority_report_baseline(gold, observed)
        if n_boot:
            results["baselines"]["shuffled_reports"] = shuffled_reports_control(pred_labels, gold, observed, n_boot)
    return results


def majority_report_baseline(gold: list[dict], observed: list[str]) -> dict:
    """The floor to beat: every image given the most frequent gold label set of the evaluated split
    (for NIH, "No Finding"), scored by the same clinical-efficacy code. Taking the majority from the
    evaluated split itself can only make this baseline stronger than a training-split majority."""
    from collections import Counter

    def positives(labels: dict) -> tuple:
        return tuple(o for o in observed if labels.get(o) == 1)

    majority, count = Counter(positives(g) for g in gold).most_common(1)[0]
    constant = [{o: int(o in majority) for o in observed}] * len(gold)
    block = clinical_efficacy(constant, gold, observed, uncertain_as_positive=False)
    return {"majority_class": list(majority), "majority_share": count / len(gold),
            "ce_micro_f1": block["micro_f1"], "ce_macro_f1": block["macro_f1"]}


def shuffled_reports_control(pred_labels: list[dict], gold: list[dict], observed: list[str], n: int = 1000,
                             seed: int = 0) -> dict:
    """Do the reports fit their own images? The same reports dealt to the images in random order keep
    how often each finding is written but lose any link to the image; micro-F1 over `n` such
    permutations, and the share of them that score at least as well as the reports in order (a
    one-sided permutation p-value; 1.0 for a model that writes the same report for every image)."""
    def micro_f1(labels: list[dict]) -> float:
        return clinical_efficacy(labels, gold, observed, uncertain_as_positive=False)["micro_f1"]

    rng = np.random.default_rng(seed)
    in_order = micro_f1(pred_labels)
    shuffled = np.array([micro_f1([pred_labels[i] for i in rng.permutation(len(pred_labels))]) for _ in range(n)])
    return {"permutations": n, "seed": seed, "ce_micro_f1_mean": float(shuffled.mean()),
            "ce_micro_f1_p95": float(np.percentile(shuffled, 95)),
            "share_at_least_model": float((shuffled >= in_order - 1e-12).mean())}


def read_answer_file(path: str | Path) -> dict[str, str]:
    """Predictions by id from JSONL (or a JSON list) of {"id", "prediction"} records or LLaVA-Med
    answer files ({"question_id", "text", ...})."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no predictions file at {path}.")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is neither JSONL nor a JSON list ({e.msg}).") from None
    answers = {}
    for n, r in enumerate(records, 1):
        id_ = r.get("id", r.get("question_id")) if isinstance(r, dict) else None
        pred = r.get("prediction", r.get("text")) if isinstance(r, dict) else None
        if id_ is None or pred is None:
            raise DataError(f"{path}: record {n} needs id (or question_id) and prediction (or text).")
        answers[str(id_)] = str(pred)
    return answers
