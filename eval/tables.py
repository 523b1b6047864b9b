"""results.md in words and tables: the metric rules (also stored in results.json), the results
table with its breakdowns, and the side-by-side table of two runs. Pure text: nothing here scores.
"""

from __future__ import annotations

from eval.tasks import VQA_RAD_BUCKET_NOTE

# The numbers that lead results.md and `compare`, in this order (those a run has).
HEADLINE = ["closed_strict", "closed_lenient", "open_exact", "open_recall", "open_f1", "open_bleu1",
            "blank_closed_strict", "ablation_delta_closed_strict",
            "bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor", "cider",
            "ce_micro_f1", "ce_macro_f1", "ce5_micro_f1", "ce5_macro_f1",
            "ce_micro_f1_upos", "ce_macro_f1_upos", "ce5_micro_f1_upos", "ce5_macro_f1_upos"]

_COMMON = {
    "decoding": "Greedy decoding (temperature 0), one fixed prompt, a fixed max_new_tokens; predictions are "
                "saved one JSON line per question, so a run resumes where it stopped.",
    "missing": "A question without a prediction counts as an empty (wrong) answer.",
    "bootstrap": "95% intervals: percentile bootstrap over questions (or reports), 1000 resamples unless "
                 "stated, seed 0; the image-ablation delta uses a paired bootstrap (questions resampled jointly).",
}
RULES = {
    "vqa": {
        "normalization": "Answers and predictions are normalized as the official VQAv2 evaluation: lowercase, "
                         "punctuation removed, number words to digits, articles dropped, contractions fixed.",
        "closed_strict": "Closed questions, strict (MedEvalKit rule). Yes/no gold: the prediction contains exactly "
                         "one of the whole words yes/no and it is the gold one ('yes and no' is wrong). Gold that "
                         "is an option of an 'X or Y' question (or a listed choice): the prediction names the gold "
                         "option and no other option. Multiple choice: a bare letter (B, B:, (B)) means that choice.",
        "closed_lenient": "Closed questions, lenient (LLaVA-Med rule): the normalized gold answer is a substring "
                          "of the normalized prediction ('no' is found in 'nodule').",
        "open_exact": "Open questions: normalized prediction equals the normalized gold answer.",
        "open_recall": "Open questions, LLaVA-Med recall: share of the distinct gold tokens present in the prediction.",
        "open_f1": "Open questions: SQuAD-style token F1 (multiset overlap).",
        "open_bleu1": "Open questions: sentence BLEU-1 (clipped unigram precision x brevity penalty), averaged.",
        "ablation": "Image ablation: the same questions with a black image of the same size; delta = closed strict "
                    "accuracy with the image minus with the blank image.",
        **_COMMON,
    },
    "report": {
        "bleu": "Corpus BLEU-1..4 as pycocoevalcap: clipped n-gram counts summed over the corpus, "
                "closest-reference brevity penalty, lowercase word tokens without punctuation.",
        "rouge_l": "ROUGE-L F-measure (beta 1.2) per report, averaged, as pycocoevalcap.",
        "meteor": "METEOR as NLTK's meteor_score (exact and Porter-stem matches, no WordNet synonyms), averaged; "
                  "not comparable with the Java METEOR 1.5 of pycocoevalcap.",
        "cider": "CIDEr-D as pycocoevalcap (document frequencies from the evaluated references, x10); no interval, "
                 "because its weights depend on the whole reference set.",
        "clinical_efficacy": "The rule-based CheXpert-style labeler (eval/labeler.py) labels each generated report "
                             "(and each text reference). Positive vs not positive; the _upos variants count "
                             "uncertain as positive. Micro pools TP/FP/FN over the observations, macro averages the "
                             "per-observation precision/recall/F1. ce = the 14 CheXpert observations (with label "
                             "gold, those the gold annotates); ce5 = Atelectasis, Cardiomegaly, Consolidation, "
                             "Edema, Pleural Effusion.",
        "nih_gold": "nih-findings: the gold is the NIH ChestX-ray14 labels mapped to CheXpert (Effusion -> Pleural "
                    "Effusion, Infiltration -> Lung Opacity, Mass and Nodule -> Lung Lesion, Pleural_Thickening -> "
                    "Pleural Other; Emphysema, Fibrosis and Hernia have no CheXpert counterpart and are dropped); a "
                    "mapped observation that is not listed is negative. Text metrics need text references and are "
                    "not computed.",
        "shuffled_reports": "With label gold: the same reports dealt to the images in random order (as many "
                            "permutations as bootstrap resamples, seed 0) keep how often each finding is written "
                            "and lose any link to the image; the share of permutations scoring at least the "
                            "reports' own micro-F1 is a one-sided permutation p-value.",
        **_COMMON,
    },
}

# nih-findings --labels other than nih: what the gold is (results.md's line) and its rule, in place of nih_gold.
GOLD_NAMES = {"v2020": "Data_Entry_2017_v2020 labels", "expert": "Google 2019 expert labels"}
GOLD_RULES = {
    "v2020": ("v2020_gold", "nih-findings --labels v2020: the gold is the Data_Entry_2017_v2020 ChestX-ray14 labels "
                            "(labels.csv column findings_v2020, from the torchxrayvision 1.5.7 wheel) "
                            + RULES["report"]["nih_gold"].split("ChestX-ray14 labels ", 1)[1]),
    "expert": ("expert_gold", "nih-findings --labels expert: the gold is the Google 2019 expert-adjudicated labels "
                              "(labels.csv column expert), on the images the experts read only, over the observations "
                              "they cover only: Pneumothorax, Nodule or mass -> Lung Lesion, Airspace opacity -> Lung "
                              "Opacity, Fracture; the other observations (No Finding included) are left out, so ce is "
                              "over 4 observations and ce5 (none of whose conditions they cover) is not computed. The "
                              "majority-class baseline and the shuffled-reports control are computed on the same "
                              "images and observations. Text metrics are not computed."),
}


def rules_for(results: dict) -> dict:
    """The rules of a results dict: RULES of its kind, with nih_gold replaced by the rule of other gold labels."""
    rules = RULES[results["kind"]]
    gold = results.get("gold_labels")
    if not gold or gold["labels"] not in GOLD_RULES:
        return rules
    key, text = GOLD_RULES[gold["labels"]]
    return {(key if k == "nih_gold" else k): (text if k == "nih_gold" else v) for k, v in rules.items()}


def fmt(value, interval=None) -> str:
    if value is None:
        return "-"
    text = f"{value:.3f}"
    return f"{text} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else text


def _n_for(key: str, counts: dict):
    if key.startswith(("closed", "blank_closed", "ablation")):
        return counts.get("closed")
    if key.startswith("open"):
        return counts.get("open")
    return counts.get("reports")


def markdown(results: dict) -> str:
    counts, metrics, ci = results["counts"], results["metrics"], results.get("ci95", {})
    lines = [f"# {results['task']} ({results['split']}): {results.get('model', '')}", ""]
    if results["kind"] == "vqa":
        lines.append(f"{counts['questions']} questions: {counts['closed']} closed ({counts['closed_yes_no']} yes/no, "
                     f"{counts['closed_other']} with named options) and {counts['open']} open.")
    else:
        lines.append(f"{counts['reports']} reports.")
    gold = results.get("gold_labels")
    if gold:
        lines.append(f"Gold: the {GOLD_NAMES.get(gold['labels'], gold['labels'])} (labels.csv column `{gold['column']}`), "
                     f"which cover {gold['covered']} of the split's {gold['split_images']} images; {gold['images']} "
                     "scored.")
    lines.append(f"Predicted {counts['predicted']}, missing {counts['missing']}"
                 + (f", unknown ids {counts['unknown_ids']}" if "unknown_ids" in counts else "") + ".")
    if "decoding" in results:
        d = results["decoding"]
        lines.append(f"Greedy decoding, max_new_tokens {d['max_new_tokens']}, batch size {d['batch_size']}; "
                     f"prompt `{results['prompt_template']!r}`.")
    lines += ["", "| metric | value [95% CI] | n |", "|---|---|---|"]
    lines += [f"| {k} | {fmt(metrics[k], ci.get(k))} | {_n_for(k, counts) or ''} |" for k in HEADLINE if k in metrics]
    for word in ("yes", "no"):
        if results.get("baselines", {}).get(f"closed_strict_always_{word}") is not None:
            lines.append(f"| baseline: always '{word}' (closed strict) | "
                         f"{results['baselines'][f'closed_strict_always_{word}']:.3f} | {counts['closed']} |")
    majority = results.get("baselines", {}).get("majority_class")
    if majority is not None:
        b = results["baselines"]
        lines.append(f"| baseline: every report '{', '.join(majority) or 'nothing'}' (the majority label set, "
                     f"{b['majority_share']:.0%} of reports), ce_micro_f1 / ce_macro_f1 | "
                     f"{b['ce_micro_f1']:.3f} / {b['ce_macro_f1']:.3f} | {counts['reports']} |")
    shuffled = results.get("baselines", {}).get("shuffled_reports")
    if shuffled is not None:
        lines.append(f"| control: these reports dealt to the images in random order ({shuffled['permutations']} "
                     f"permutations), ce_micro_f1 mean / 95th percentile; share scoring at least the model's | "
                     f"{shuffled['ce_micro_f1_mean']:.3f} / {shuffled['ce_micro_f1_p95']:.3f}; "
                     f"{shuffled['share_at_least_model']:.3f} | {counts['reports']} |")
    lines += _breakdown_tables(results) + _confusion_table(results) + _ablation_lines(results) + _timing_lines(results)
    lines += ["", "## Rules", ""] + [f"- **{k}**: {v}" for k, v in (results.get("rules") or rules_for(results)).items()]
    return "\n".join(lines) + "\n"


def _breakdown_tables(results: dict) -> list[str]:
    lines = _group_table(results.get("by_question_type"), "By question type", "type")
    if results.get("by_image_group"):
        lines += _group_table(results["by_image_group"], "By image bucket", "bucket") + ["", VQA_RAD_BUCKET_NOTE]
    return lines


def _group_table(types: dict | None, title: str, label: str) -> list[str]:
    if not types:
        return []
    lines = ["", f"## {title}", "", f"| {label} | closed n | strict [95% CI] | lenient | open n | recall [95% CI] "
             "| exact |", "|---|---|---|---|---|---|---|"]
    closed, opened = types.get("closed", {}), types.get("open", {})
    for q in sorted(set(closed) | set(opened)):
        c, o = closed.get(q), opened.get(q)
        lines.append(f"| {q} | {c['n'] if c else 0} | {fmt(c['strict'], c['ci95']) if c else '-'} | "
                     f"{fmt(c['lenient']) if c else '-'} | {o['n'] if o else 0} | "
                     f"{fmt(o['recall'], o['ci95']) if o else '-'} | {fmt(o['exact']) if o else '-'} |")
    return lines


def _confusion_table(results: dict) -> list[str]:
    conf = results.get("yes_no_confusion")
    if not conf:
        return []
    lines = ["", "## Yes/no questions (rows: gold, columns: prediction)", "",
             "| gold \\ predicted | " + " | ".join(conf["predicted"]) + " |", "|---|---|---|---|"]
    return lines + [f"| {g} | " + " | ".join(str(v) for v in row) + " |" for g, row in zip(conf["gold"], conf["matrix"])]


def _ablation_lines(results: dict) -> list[str]:
    ab = results.get("ablation")
    if not ab:
        return []
    return ["", "## Image ablation (blank image)", "",
            f"Closed strict with the image {fmt(ab['closed_strict_with_image'])}, with a blank image "
            f"{fmt(ab['closed_strict_blank'])}: delta {fmt(ab['delta_closed_strict'], ab['delta_ci95'])}. "
            f"Open recall with a blank image {fmt(ab['open_recall_blank'])}. "
            f"Answers that changed: {fmt(ab['answers_changed'])}."]


def _timing_lines(results: dict) -> list[str]:
    t = results.get("timing")
    if not t:
        return []
    rate = (f"{t['seconds_per_question']:.3f} s per question ({t['questions_per_second']:.2f} questions/s)"
            if t.get("seconds_per_question") else "no timing")
    return ["", "## Timing", "", f"{t['generated']} predictions generated in {t['generation_seconds']:.1f} s "
            f"over {t['runs']} run(s) (image loading included): {rate}. This run generated "
            f"{t['generated_this_run']} and took {t['seconds_this_run']:.1f} s with scoring."]


def compare_table(a: dict, b: dict, name_a: str, name_b: str) -> str:
    """Markdown table of two runs' headline numbers, with their 95% intervals and B - A."""
    lines = [f"A: `{name_a}` ({a.get('model')}, {a.get('task')}/{a.get('split')})",
             f"B: `{name_b}` ({b.get('model')}, {b.get('task')}/{b.get('split')})", ""]
    if (a.get("task"), a.get("split")) != (b.get("task"), b.get("split")):
        lines += ["**Warning: the runs are on different tasks or splits.**", ""]
    lines += ["| metric | A | B | B - A |", "|---|---|---|---|"]
    for n in ("questions", "closed", "open", "reports"):
        if n in a.get("counts", {}) or n in b.get("counts", {}):
            lines.append(f"| n {n} | {a.get('counts', {}).get(n, '-')} | {b.get('counts', {}).get(n, '-')} | |")
    ma, mb = a.get("metrics", {}), b.get("metrics", {})
    for key in [k for k in HEADLINE if k in ma or k in mb]:
        va, vb = ma.get(key), mb.get(key)
        delta = f"{vb - va:+.3f}" if va is not None and vb is not None else "-"
        lines.append(f"| {key} | {fmt(va, a.get('ci95', {}).get(key))} | {fmt(vb, b.get('ci95', {}).get(key))} "
                     f"| {delta} |")
    return "\n".join(lines) + "\n"
