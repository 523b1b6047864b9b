"""Rule-based CheXpert-style labeler for chest X-ray reports, and clinical-efficacy scores.

`label_report` maps a free-text report to the 14 CheXpert observations, each 1 (positive),
0 (negative), -1 (uncertain) or None (not mentioned), in the spirit of the CheXpert labeler:
find mentions, classify each by negation and uncertainty cues, aggregate over the report.
It is a regex approximation (no dependency parse): cue scope is the clause, cut short by verbs
and clause breaks, which covers the telegraphic style of reports well but not every sentence.

Generated and reference reports are labeled by the same rules, so their errors partly cancel
in the precision/recall/F1 comparison of `clinical_efficacy`.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Sequence

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1

OBSERVATIONS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices"]
CONDITIONS_5 = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]

# NIH ChestX-ray14 label -> CheXpert observation; None where CheXpert has no counterpart
# (Emphysema, Fibrosis and Hernia are not among the 14 CheXpert observations).
NIH_TO_CHEXPERT: dict[str, str | None] = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
    "Infiltration": "Lung Opacity", "Mass": "Lung Lesion", "Nodule": "Lung Lesion", "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema", "Emphysema": None,
    "Fibrosis": None, "Pleural_Thickening": "Pleural Other", "Hernia": None, "No Finding": "No Finding",
}


def _rx(*alternatives: str) -> re.Pattern:
    return re.compile("|".join(rf"\b(?:{a})\b" for a in alternatives))


# Phrases that name a finding by themselves (the text is lowercased, hyphens become spaces).
_MENTIONS = {
    "Enlarged Cardiomediastinum": _rx(r"widened mediastinum", r"mediastinal widening", r"enlarged cardiomediastinum"),
    "Cardiomegaly": _rx(r"cardiomegaly", r"cardiac enlargement", r"enlarged heart"),
    "Lung Opacity": _rx(r"opaci\w*", r"infiltrat\w*", r"(?<!bone )(?<!bony )densit(?:y|ies)",
                        r"air ?space (?:disease|process)", r"haz(?:e|y|iness)", r"ground glass", r"reticula\w*"),
    "Lung Lesion": _rx(r"nodul\w*", r"mass(?:es)?", r"lesions?", r"tumou?rs?", r"neoplas\w*", r"carcinoma",
                       r"malignan\w*", r"metasta\w*", r"granulomas?"),
    "Edema": _rx(r"o?edema", r"(?:pulmonary|vascular) congestion", r"kerley", r"congestive (?:heart )?failure", r"chf",
                 r"fluid overload"),
    "Consolidation": _rx(r"consolidat\w*"),
    "Pneumonia": _rx(r"(?:broncho)?pneumoni\w*", r"infection", r"infectious"),
    "Atelectasis": _rx(r"atelecta\w*", r"collapsed?"),
    "Pneumothorax": _rx(r"(?:hydro)?pneumothora\w*", r"ptx"),
    "Pleural Effusion": _rx(r"(?<!pericardial )effusions?", r"pleural fluid", r"hydro(?:pneumo)?thora\w*"),
    "Pleural Other": _rx(r"pleural (?:thickening|plaques?|scarring|calcifications?)", r"thickening of the pleura",
                         r"pleural parenchymal (?:scarring|thickening)", r"fibrothorax", r"apical (?:pleural )?cap"),
    "Fracture": _rx(r"fractur\w*", r"broken (?:rib|bone)s?"),
    "Support Devices": _rx(r"tubes?", r"catheters?", r"picc", r"(?:central|venous|jugular|subclavian|ij|arterial|"
                           r"swan ganz|dialysis|midline) lines?", r"pacemakers?", r"pacer", r"icd", r"defibrillators?",
                           r"leads", r"wires", r"sternotomy", r"clips?", r"stents?", r"port(?: a cath)?", r"portacath",
                           r"drains?", r"hardware", r"prosthe\w+", r"valve replacement", r"impella", r"iabp",
                           r"balloon pump", r"lvad", r"coils?", r"(?:support )?devices?"),
}

# Anatomy described by a qualifier: "heart size is normal" (0), "the mediastinum is widened" (1),
# "heart size at the upper limits of normal" (-1). Each: structure, then qualifiers by label.
_UNSURE_SIZE = r"borderline|top normal|upper (?:limits? of )?normal|high normal"
_STRUCTURES = {
    "Cardiomegaly": (_rx(r"heart(?: size)?", r"cardiac(?: silhouette| size| contours?| shadow)?"),
                     {-1: _UNSURE_SIZE, 1: r"enlarge\w*|large|increased|prominent",
                      0: r"normal|unremarkable"}),
    "Enlarged Cardiomediastinum": (_rx(r"cardiomediastinal(?: silhouette| contours?)?",
                                       r"mediastin(?:um|al)(?: silhouette| contours?| width)?"),
                                   {-1: _UNSURE_SIZE, 1: r"enlarge\w*|widen\w*|wide|prominen\w*|increased",
                                    0: r"normal|unremarkable"}),
    "Lung Opacity": (_rx(r"lungs?", r"lung fields"), {0: r"clear"}),
    "Pleural Effusion": (_rx(r"costophrenic (?:angles?|sulc[iu]s?|recess(?:es)?)"),
                         {1: r"blunt\w*", 0: r"sharp\w*|clear|preserved|normal"}),
}
_QUALIFIERS = {obs: [(label, _rx(q)) for label, q in quals.items()] for obs, (_, quals) in _STRUCTURES.items()}
_ANY_STRUCTURE = re.compile("|".join(s.pattern for s, _ in _STRUCTURES.values()))
# Words allowed between a qualifier and the structure after it ("enlargement of the cardiac silhouette").
_LEFT_GAP = frozenset("of the a and left right bilateral both size".split())
_VERB = _rx(r"is|are|was|were|has|have|had|appears?|seems?|remains?|persists?|there|which|that")

# Negation and uncertainty cues. "pre" cues govern what follows them, "post" cues what precedes;
# the post uncertainty cues work both ways ("atelectasis is likely", "is likely atelectasis").
# Cues that contain a negation word ("cannot be excluded") are found and blanked out first.
# Pseudo cues are blanked without effect: "no change in X" keeps X positive, and in "no consolidation
# to suggest pneumonia" the negation carries on to the pneumonia.
_PSEUDO = _rx(r"no (?:interval |significant )?change", r"without (?:interval )?change", r"no (?:increase|decrease)",
              r"not significantly changed", r"to suggest")
_POST_UNCERTAIN = _rx(r"(?:cannot|can not|could not|may not) be (?:entirely )?(?:excluded|ruled out)",
                      r"(?:(?:is|are|was|were) )?not (?:be )?(?:excluded|ruled out)",
                      r"(?:is|are) (?:also )?(?:possible|likely|suspected|questioned|favou?red|a consideration)")
_PRE_UNCERTAIN = _rx(r"cannot (?:exclude|rule out)", r"can not (?:exclude|rule out)", r"not excluding", r"rule out",
                     r"(?:evaluat\w*|assess\w*) for",
                     r"may", r"might", r"could", r"possibl[ey]", r"probabl[ey]", r"likely", r"suggest(?:s|ed|ing)?",
                     r"suggestive of", r"concern(?:ing)? for", r"worrisome for", r"suspicious for",
                     r"suspect(?:ed)?", r"suspicion (?:of|for)", r"question(?:able)?(?: of)?", r"presum\w*",
                     r"borderline", r"equivocal", r"indeterminate", r"differential(?: diagnosis)?(?: includes)?",
                     r"versus", r"vs", r"raising the possibility of", r"potential(?:ly)?", r"perhaps")
_POST_NEGATIVE = _rx(r"(?:(?:is|are|was|were) )?(?:not|no longer) (?:seen|identified|present|visuali[sz]ed|"
                     r"appreciated|demonstrated|noted|evident|visible)", r"(?:(?:is|are|was|were|has|have) )?"
                     r"(?:been )?(?:absent|resolved|cleared|removed|excluded|ruled out)", r"(?:is|are) unlikely")
_PRE_NEGATIVE = _rx(r"no evidence of", r"no longer", r"negative for", r"free of", r"clear of", r"absence of",
                    r"resolution of", r"removal of", r"without", r"no", r"not", r"unlikely", r"never", r"nor")
# A scope also ends at a verb or at a comma that starts a new finding ("no effusion, mild cardiomegaly").
_SCOPE_END = re.compile(_VERB.pattern + r"|,\s*(?:and\s+)?(?:mild|mildly|moderate|severe|small|large|trace|minimal|"
                        r"stable|unchanged|persistent|increased|decreased|new)\b")
_CLAUSE_BREAK = _rx(r"but", r"however", r"although", r"though", r"except", r"whereas", r"yet")
_SENTENCE_BREAK = re.compile(r"(?<!\d)\.(?!\d)|[\n;:?!]")
_ALTERNATIVE = _rx(r"or", r"versus", r"vs", r"and/or")


def _blank(text: str, m: re.Match) -> str:
    return text[: m.start()] + " " * (m.end() - m.start()) + text[m.end():]


def _cues(sentence: str) -> tuple[list[tuple[int, int, int, str]], str]:
    """Cues as (start, end, label, direction), and the sentence with cue words blanked out
    (so the verb in "is not seen" does not also end a scope)."""
    work, cues = sentence, []
    for m in _PSEUDO.finditer(work):
        work = _blank(work, m)
    for rx, label, direction in ((_POST_UNCERTAIN, UNCERTAIN, "both"), (_PRE_UNCERTAIN, UNCERTAIN, "pre"),
                                 (_POST_NEGATIVE, NEGATIVE, "post"), (_PRE_NEGATIVE, NEGATIVE, "pre")):
        for m in list(rx.finditer(work)):
            cues.append((m.start(), m.end(), label, direction))
            work = _blank(work, m)
    return sorted(cues), work


def _in_scope(gap: str) -> bool:
    return _SCOPE_END.search(gap) is None


def _cue_label(start: int, anchor: int, end: int, cues, work: str, clauses: list[int]) -> int | None:
    """Label from the nearest cue whose scope reaches the mention: a pre cue before `anchor`
    (the mention's deciding word) or a post cue after `end`, in the same clause. A post cue
    ("is not seen") only reaches subjects: no verb may come before the mention in its clause
    or conjunct, so in "there is atelectasis and effusion is not seen" it reaches the effusion only."""
    def clause_of(pos: int) -> int:
        return bisect.bisect_right(clauses, pos)

    lead = work[([0] + clauses)[clause_of(start)]:start]
    subject = _VERB.search(re.split(r"\band\b|,", lead)[-1]) is None
    best = None
    for c_start, c_end, label, direction in cues:
        if direction != "post" and c_end <= anchor and clause_of(c_end) == clause_of(anchor):
            dist = anchor - c_end
            ok = _in_scope(work[c_end:anchor])
        elif direction != "pre" and c_start >= end and clause_of(c_start) == clause_of(end):
            dist = c_start - end
            ok = subject and _in_scope(work[end:c_start])
        else:
            continue
        if ok and (best is None or dist < best[0]):
            best = (dist, label)
    return None if best is None else best[1]


def _is_alternative(sentence: str, start: int, end: int) -> bool:
    """"atelectasis or pneumonia", "thickening versus effusion": a finding offered as one option."""
    for m in _ALTERNATIVE.finditer(sentence):
        if m.start() >= end:
            gap = sentence[end:m.start()]
        elif m.end() <= start:
            gap = sentence[m.end():start]
        else:
            continue
        if "," not in gap and len(gap.split()) <= 2:  # only a few modifiers between finding and "or"
            return True
    return False


def _qualifier(obs: str, sentence: str, s: re.Match) -> tuple[int, re.Match] | None:
    """The qualifier describing structure match `s`: one right before it ("normal heart size"),
    else the first one after it in the same statement ("heart size and mediastinal contours are
    normal", but not across a verb into another structure), else one before it joined only by
    small words or other structures ("enlargement of the cardiac silhouette")."""
    found = [(m.start(), label, m) for label, rx in _QUALIFIERS[obs] for m in rx.finditer(sentence)]
    before = sorted(((m.end(), label, m) for _, label, m in found if m.end() <= s.start()), key=lambda x: x[0])
    after = sorted(((st, label, m) for st, label, m in found if st >= s.end()), key=lambda x: x[0])
    if before and not sentence[before[-1][0]:s.start()].strip():
        return before[-1][1], before[-1][2]
    if after:
        gap = sentence[s.end():after[0][0]]
        verb = _VERB.search(gap)
        tail = gap[verb.end():] if verb else ""
        if len(gap.split()) <= 8 and not _ANY_STRUCTURE.search(tail):
            return after[0][1], after[0][2]
    if before:
        gap = _ANY_STRUCTURE.sub(" ", sentence[before[-1][0]:s.start()]).replace(",", " ")
        if set(gap.split()) <= _LEFT_GAP:
            return before[-1][1], before[-1][2]
    return None


def _mentions(sentence: str):
    """(observation, base label, start, anchor, end, direct) for every mention in a sentence."""
    out = []
    for obs, rx in _MENTIONS.items():
        out += [(obs, POSITIVE, m.start(), m.start(), m.end(), True) for m in rx.finditer(sentence)]
    for obs, (rx, _) in _STRUCTURES.items():
        for s in rx.finditer(sentence):
            q = _qualifier(obs, sentence, s)
            if q:
                label, m = q
                out.append((obs, label, min(s.start(), m.start()), max(s.start(), m.start()),
                            max(s.end(), m.end()), False))
    return out


def _label_sentence(sentence: str) -> list[tuple[str, int]]:
    cues, work = _cues(sentence)
    clauses = [m.start() for m in _CLAUSE_BREAK.finditer(sentence)]  # where clauses 2, 3, ... start
    labels = []
    for obs, base, start, anchor, end, direct in _mentions(sentence):
        if base == NEGATIVE:  # "heart size is normal": already a negative statement, cues aside
            labels.append((obs, NEGATIVE))
            continue
        label = _cue_label(start, anchor, end, cues, work, clauses)
        if label is None and direct and _is_alternative(sentence, start, end):
            label = UNCERTAIN
        labels.append((obs, base if label is None else label))
    return labels


def label_report(report: str) -> dict[str, int | None]:
    """CheXpert-style labels for one report: {observation: 1 / 0 / -1 / None}.

    Over all mentions of an observation, positive beats uncertain beats negative (CheXpert's
    aggregation). "No Finding" is 1 when no observation other than Support Devices is positive
    or uncertain, else None.
    """
    text = re.sub(r"\bvs\.", "vs", report.lower()).replace("-", " ")
    found: dict[str, set[int]] = {}
    for sentence in _SENTENCE_BREAK.split(text):
        for obs, label in _label_sentence(" " + " ".join(sentence.split()) + " "):
            found.setdefault(obs, set()).add(label)
    labels: dict[str, int | None] = {}
    for obs in OBSERVATIONS[1:]:
        seen = found.get(obs, set())
        labels[obs] = next((lab for lab in (POSITIVE, UNCERTAIN, NEGATIVE) if lab in seen), None)
    findings = [labels[o] for o in OBSERVATIONS[1:] if o != "Support Devices"]
    return {"No Finding": None if POSITIVE in findings or UNCERTAIN in findings else POSITIVE, **labels}


def nih_to_chexpert(finding_labels: str | Iterable[str]) -> dict[str, int | None]:
    """CheXpert-style labels from an NIH ChestX-ray14 "Finding Labels" entry ("Effusion|Mass").

    NIH labels are exhaustive for the findings they cover, so a mapped observation that is not
    listed is 0; observations NIH does not annotate (Fracture, Support Devices, Enlarged
    Cardiomediastinum) are None. "No Finding" follows the CheXpert aggregation that `label_report`
    applies to text: 1 when no mapped observation is positive. An image labeled only Emphysema,
    Fibrosis or Hernia (no CheXpert counterpart) is therefore "No Finding" on both sides.
    """
    names = finding_labels.split("|") if isinstance(finding_labels, str) else list(finding_labels)
    unknown = [n for n in names if n not in NIH_TO_CHEXPERT]
    if unknown:
        raise ValueError(f"not NIH ChestX-ray14 labels: {unknown}")
    covered = {v for v in NIH_TO_CHEXPERT.values() if v}
    positive = {NIH_TO_CHEXPERT[n] for n in names if NIH_TO_CHEXPERT[n] and n != "No Finding"}
    labels = {o: (int(o in positive) if o in covered else None) for o in OBSERVATIONS}
    return {**labels, "No Finding": int(not positive)}


# Google 2019 expert label (vlm.datasets.EXPERT_LABELS) -> CheXpert observation.
EXPERT_TO_CHEXPERT = {"Fracture": "Fracture", "Pneumothorax": "Pneumothorax", "Airspace opacity": "Lung Opacity",
                      "Nodule or mass": "Lung Lesion"}


def expert_to_chexpert(expert: dict[str, bool]) -> dict[str, int | None]:
    """CheXpert-style labels from an image's expert labels ({"Pneumothorax": True, ...}, all four read):
    1 / 0 on the four observations the experts adjudicated, None on the other ten, "No Finding" included
    (four findings read say nothing about the rest of the image)."""
    if set(expert) != set(EXPERT_TO_CHEXPERT):
        raise ValueError(f"expert labels need all of {', '.join(EXPERT_TO_CHEXPERT)}, got {', '.join(expert) or 'none'}")
    read = {EXPERT_TO_CHEXPERT[name]: int(positive) for name, positive in expert.items()}
    return {o: read.get(o) for o in OBSERVATIONS}


def _binary(label: int | None, uncertain_as_positive: bool) -> bool:
    return label == POSITIVE or (uncertain_as_positive and label == UNCERTAIN)


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    # An empty denominator scores 0, as sklearn's zero_division=0.
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def clinical_efficacy(pred_labels: Sequence[dict], gold_labels: Sequence[dict], observations: Sequence[str],
                      uncertain_as_positive: bool) -> dict:
    """Precision/recall/F1 of predicted vs gold labels, positive vs not-positive.

    Both sides are binarized the same way: 1 is positive; -1 too when `uncertain_as_positive`;
    0, None (and -1 otherwise) are not. Micro pools the counts over `observations` (pass
    OBSERVATIONS or CONDITIONS_5); macro averages the per-observation precision, recall and F1
    (macro F1 is the mean of F1s, not the F1 of the means).
    """
    if len(pred_labels) != len(gold_labels):
        raise ValueError(f"{len(pred_labels)} predicted vs {len(gold_labels)} gold label sets")
    per_label, totals = {}, [0, 0, 0]
    for obs in observations:
        pred = [_binary(p.get(obs), uncertain_as_positive) for p in pred_labels]
        gold = [_binary(g.get(obs), uncertain_as_positive) for g in gold_labels]
        counts = [sum(p and g for p, g in zip(pred, gold)), sum(p and not g for p, g in zip(pred, gold)),
                  sum(g and not p for p, g in zip(pred, gold))]
        totals = [t + c for t, c in zip(totals, counts)]
        p, r, f = _prf(*counts)
        per_label[obs] = {"precision": p, "recall": r, "f1": f, "support": sum(gold)}
    micro = _prf(*totals)
    n = max(len(per_label), 1)
    macro = [sum(v[k] for v in per_label.values()) / n for k in ("precision", "recall", "f1")]
    return {"micro_precision": micro[0], "micro_recall": micro[1], "micro_f1": micro[2],
            "macro_precision": macro[0], "macro_recall": macro[1], "macro_f1": macro[2], "per_label": per_label}
