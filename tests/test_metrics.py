"""Answer and report metrics: hand-computed values, and agreement with reference implementations.

References: pycocoevalcap (BLEU, ROUGE-L, CIDEr; its pure-Python scorers, not the Java ones) and
NLTK (corpus_bleu, meteor_score, PorterStemmer). Tests that need them skip when not installed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.metrics import (
    bleu,
    bleu1,
    bootstrap_ci,
    bootstrap_ci_fn,
    cider,
    closed_lenient,
    closed_options,
    closed_strict,
    exact_match,
    meteor,
    normalize_answer,
    paired_bootstrap_ci,
    porter_stem,
    rouge_l,
    token_f1,
    token_recall,
    tokenize,
)

# --- normalization -------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "normalized"), [
    ("Yes.", "yes"),                        # final period dropped, lowercased
    ("The MRI", "mri"),                     # article removed
    ("an X-ray", "x ray"),                  # "-" not next to a space becomes a space
    ("two nodules", "2 nodules"),           # number words -> digits
    ("None", "0"),                          # as the official table: "none" -> "0"
    ("dont know", "don't know"),            # contractions restored
    ("2.5 cm.", "2.5 cm"),                  # decimal point kept, final period dropped
    ("1,000", "1000"),                      # digit,digit comma: punctuation deleted, not spaced
    ("left, right", "left right"),          # ", " is glued punctuation: deleted
    ("left-sided (mild)", "left sided mild"),
    ("  Brain\n", "brain"),
])
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


# --- closed questions ----------------------------------------------------------------------------


@pytest.mark.parametrize(("prediction", "answer", "strict"), [
    ("no, there is not", "no", True),       # one yes/no word, the right one
    ("No.", "no", True),
    ("Yes.", "yes", True),
    ("yes and no", "yes", False),           # both words: neither answer
    ("yes and no", "no", False),
    ("nodule", "no", False),                # "no" must be a whole word
    ("There is a nodule.", "no", False),
    ("There is no nodule.", "no", True),
    ("yes", "no", False),
    ("I cannot tell.", "yes", False),       # no yes/no word at all
    ("Yes, yes.", "yes", True),             # repeating the same word is still one answer
])
def test_closed_strict_yes_no(prediction, answer, strict):
    assert closed_strict(prediction, answer) is strict


def test_closed_lenient_is_the_llava_med_substring_rule():
    assert closed_lenient("Yes, there is an effusion.", "yes")
    assert closed_lenient("yes and no", "no")          # lenient accepts both words
    assert closed_lenient("nodule", "no")              # and plain substrings: why strict exists
    assert not closed_lenient("Yes.", "no")
    assert closed_lenient("This is an MRI of the brain", "MRI")


@pytest.mark.parametrize(("question", "options"), [
    ("Is this an MRI or a CT?", ["mri", "ct"]),
    ("Is this a CT or an MRI?", ["ct", "mri"]),
    ("Is the lesion on the left or right?", ["left", "right"]),
    ("Is the mass in the left lung or the right lung?", ["left lung", "right lung"]),
    ("Is the small bowel or large bowel dilated?", ["small bowel", "large bowel"]),
    ("Is this a contrast or non-contrast CT?", ["contrast", "non contrast"]),
    ("Is this a T1 or T2 weighted MRI?", ["t1", "t2"]),
    ("Is this image taken above or below the diaphragm?", ["above", "below"]),
    ("Is this a CT, MRI, or X-ray?", ["ct", "mri", "x ray"]),
    ("Which side is the lesion on, left or right?", ["left", "right"]),
    ("Is there a pleural effusion?", []),
    ("Is there an effusion or not?", []),
])
def test_closed_options(question, options):
    assert closed_options(question) == options


@pytest.mark.parametrize(("question", "prediction", "answer", "strict"), [
    ("Is this an MRI or a CT?", "It is an MRI.", "MRI", True),
    ("Is this an MRI or a CT?", "This is a CT scan.", "mri", False),
    ("Is this an MRI or a CT?", "MRI, not CT", "mri", False),           # names the other option too
    ("Is this an MRI or a CT?", "A brain scan.", "mri", False),         # names no option
    ("Is the lesion on the left or right?", "Right.", "right", True),
    ("Is the lesion on the left or right?", "the right side", "right", True),
    ("Is the lesion on the left or right?", "left and right", "right", False),
    ("Is the mass in the left lung or the right lung?", "In the left lung.", "left lung", True),
    ("Is the mass in the left lung or the right lung?", "left", "left lung", False),
    ("Is this a contrast or non-contrast CT?", "non-contrast", "non-contrast", True),
    ("Is this a contrast or non-contrast CT?", "This is a non-contrast CT", "contrast", False),
    ("Is this a contrast or non-contrast CT?", "with contrast", "contrast", True),
    ("Is this a T1 or T2 weighted MRI?", "T2", "t2 weighted", True),  # gold contains option "t2"
])
def test_closed_strict_options(question, prediction, answer, strict):
    assert closed_strict(prediction, answer, closed_options(question)) is strict


def test_closed_strict_yes_no_gold_ignores_options():
    # "Is there a fluid collection or abscess?" has options, but a yes/no gold uses the yes/no rule
    assert closed_strict("Yes, an abscess.", "yes", closed_options("Is there a fluid collection or abscess?"))


# --- open questions ------------------------------------------------------------------------------


def test_exact_match():
    assert exact_match("The Liver.", "liver")
    assert exact_match("two", "2")
    assert not exact_match("left liver lobe", "liver")


def test_token_recall():
    # gold {left, lung, mass}; prediction "there is mass in left lung" has all 3 -> 3/3
    assert token_recall("There is a mass in the left lung.", "left lung mass") == 1.0
    # gold {left, lung}; prediction {right, lung} -> 1/2
    assert token_recall("right lung", "left lung") == 0.5
    # distinct gold tokens: gold "lung lung" is {lung} -> 1/1
    assert token_recall("lung", "lung lung") == 1.0
    assert token_recall("heart", "liver") == 0.0


def test_token_f1():
    # pred "mass in left lung" (4), gold "left lung mass" (3), common 3: P 3/4, R 1, F1 = 1.5/1.75 = 6/7
    assert token_f1("a mass in the left lung", "left lung mass") == pytest.approx(6 / 7)
    # pred "lung lung" vs gold "lung": multiset overlap 1: P 1/2, R 1, F1 = 1/1.5 = 2/3
    assert token_f1("lung lung", "lung") == pytest.approx(2 / 3)
    assert token_f1("heart", "liver") == 0.0
    assert token_f1("The", "a") == 1.0  # both normalize to nothing


def test_bleu1_sentence():
    # c = 2, r = 3: precision 2/2, brevity penalty exp(1 - 3/2) = exp(-0.5)
    assert bleu1("left lung", "left lung mass") == pytest.approx(math.exp(-0.5))
    # "lung" clipped to its 1 gold occurrence: 1/3; c = 3 > r = 2 so no penalty
    assert bleu1("lung lung lung", "left lung") == pytest.approx(1 / 3)
    # c == r: penalty exp(0) = 1; 2 of 3 unigrams match
    assert bleu1("right lung mass", "left lung mass") == pytest.approx(2 / 3)
    assert bleu1("", "liver") == 0.0


# --- report metrics, hand computed ---------------------------------------------------------------

REFS_2 = ["The heart size is normal.", "There is no pleural effusion."]
HYPS_2 = ["Heart size is normal.", "No pleural effusion is seen."]


def test_bleu_hand_computed():
    # Report 2 alone: hyp "no pleural effusion is seen", ref "there is no pleural effusion" (5 and 5).
    # 1-grams 4/5 (all but "seen"); 2-grams 2/4 (no pleural, pleural effusion); 3-grams 1/3; 4-grams 0/2.
    # No brevity penalty (c = r).
    assert bleu(REFS_2[1:], HYPS_2[1:], n=1) == pytest.approx(0.8)
    assert bleu(REFS_2[1:], HYPS_2[1:], n=2) == pytest.approx(math.sqrt(0.8 * 0.5))
    assert bleu(REFS_2[1:], HYPS_2[1:], n=3) == pytest.approx((0.8 * 0.5 / 3) ** (1 / 3))
    assert bleu(REFS_2[1:], HYPS_2[1:], n=4) == 0.0
    # Corpus of both: report 1 is "heart size is normal" vs "the heart size is normal" (4 vs 5 tokens),
    # all its n-grams match: 4/4, 3/3, 2/2, 1/1. Pooled: p1 = 8/9, p2 = 5/7, p3 = 3/5, p4 = 1/3;
    # c = 9, r = 10 -> brevity penalty exp(1 - 10/9).
    bp = math.exp(1 - 10 / 9)
    assert bleu(REFS_2, HYPS_2, n=1) == pytest.approx(bp * 8 / 9)
    assert bleu(REFS_2, HYPS_2, n=4) == pytest.approx(bp * (8 / 9 * 5 / 7 * 3 / 5 * 1 / 3) ** 0.25)


def test_bleu_closest_reference_length():
    # hyp has 4 tokens, references 3 and 6: closest is 3, so c > r and there is no penalty
    refs = [["effusion is small", "there is a small left effusion"]]
    assert bleu(refs, ["small left effusion is"], n=1) == pytest.approx(1.0)


def test_rouge_l_hand_computed():
    # "heart size is normal" vs "the heart size is normal": LCS 4, P = 4/4, R = 4/5;
    # F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * 0.8 / (0.8 + 1.44) = 1.952 / 2.24
    assert rouge_l(REFS_2[:1], HYPS_2[:1]) == pytest.approx(1.952 / 2.24)
    # "no pleural effusion is seen" vs "there is no pleural effusion": LCS "no pleural effusion" = 3,
    # P = R = 3/5 -> F = 3/5; corpus ROUGE-L is the mean over reports
    assert rouge_l(REFS_2, HYPS_2) == pytest.approx((1.952 / 2.24 + 0.6) / 2)


def test_meteor_hand_computed():
    # hyp "effusions are small", ref "small effusion": "small" matches exactly, "effusions" matches
    # "effusion" by Porter stem ("effus"); 2 matches, P = 2/3, R = 2/2.
    # Fmean = P R / (0.9 P + 0.1 R) = (2/3) / 0.7; the matches are in 2 chunks (their order is
    # swapped), penalty 0.5 * (2/2)^3 = 0.5 -> 0.5 * (2/3) / 0.7 = 0.476190...
    assert porter_stem("effusions") == porter_stem("effusion") == "effus"
    assert meteor(["small effusion"], ["effusions are small"]) == pytest.approx(0.5 * (2 / 3) / 0.7)
    # identical 3 words: Fmean 1, one chunk: 1 - 0.5 * (1/3)^3 = 1 - 1/54
    assert meteor(["heart is normal"], ["Heart is normal."]) == pytest.approx(1 - 1 / 54)
    # several references: the best one counts
    assert meteor([["lungs clear", "heart is normal"]], ["heart is normal"]) == pytest.approx(1 - 1 / 54)
    assert meteor(["heart"], [""]) == 0.0


def test_cider_hand_computed():
    # Two reports: refs "effusion present" / "effusion absent", both hyps "effusion present".
    # Document frequencies over the 2 reference sets: effusion 2, present 1, absent 1, each bigram 1.
    # idf = log(2) - log(df): effusion 0, the others log 2.
    # Report 1: hyp == ref, so unigram and bigram cosines are 1; no 3-, 4-grams (score 0); same
    # length, so no penalty: mean(1, 1, 0, 0) * 10 = 5.
    # Report 2: the only weighted n-grams differ ("present" vs "absent"): 0. CIDEr = (5 + 0) / 2.
    refs = ["effusion present", "effusion absent"]
    assert cider(refs, ["effusion present", "effusion present"]) == pytest.approx(2.5)
    # Length penalty. Hyps "effusion present present" and "x" (report 2 then scores 0: "x" is in no
    # reference). Report 1: pycocoevalcap's length is the bigram count, 2 vs 1 -> exp(-1 / (2 * 6^2)).
    # Unigrams: hyp {effusion: 0, present: 2 ln2}, ref {effusion: 0, present: ln2}; clipped dot
    # min(2 ln2, ln2) * ln2 over norms 2 ln2 * ln2 -> 1/2. Bigrams: hyp {(effusion present): ln2,
    # (present present): ln2} (df 0 counts as 1), ref {(effusion present): ln2} -> ln2^2 / (sqrt(2) ln2 * ln2)
    # = 1/sqrt(2). Trigram: the reference has none -> 0.
    expected = 10 * (0.5 + 1 / math.sqrt(2) + 0 + 0) / 4 * math.exp(-1 / 72) / 2
    assert cider(refs, ["effusion present present", "x"]) == pytest.approx(expected)


def test_report_metrics_validate_input():
    with pytest.raises(ValueError):
        bleu(["a b"], ["a b", "c"])
    with pytest.raises(ValueError):
        rouge_l([[]], ["a b"])


def test_tokenize():
    assert tokenize("A 2.5 cm nodule, left-sided.") == ["a", "2.5", "cm", "nodule", "left", "sided"]


# --- agreement with reference implementations ----------------------------------------------------

# A fixed small corpus of report findings (written for this test), some with two references.
CORPUS_REFS = [
    ["The heart size is normal. The lungs are clear. There is no pleural effusion or pneumothorax.",
     "Normal heart size. Clear lungs. No effusion or pneumothorax."],
    ["Moderate cardiomegaly with mild pulmonary edema and small bilateral pleural effusions."],
    ["There is a small left apical pneumothorax. No pleural effusion.",
     "Small left apical pneumothorax is present without effusion."],
    ["Right lower lobe consolidation concerning for pneumonia. The heart size is normal."],
    ["The endotracheal tube terminates 4 cm above the carina. Lungs are clear."],
    ["Bibasilar atelectasis. No focal consolidation. The cardiomediastinal silhouette is normal."],
]
CORPUS_HYPS = [
    "The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax is seen.",
    "There is cardiomegaly with pulmonary edema and small bilateral pleural effusions.",
    "Small left pneumothorax. There is no pleural effusion.",
    "Consolidation in the right lower lobe may represent pneumonia. Heart size is normal.",
    "The endotracheal tube is 4 cm above the carina. The lungs are clear.",
    "Mild bibasilar atelectasis without focal consolidation. Normal cardiomediastinal silhouette.",
]


def _coco_inputs():
    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, refs in enumerate(CORPUS_REFS)}
    res = {i: [" ".join(tokenize(h))] for i, h in enumerate(CORPUS_HYPS)}
    return gts, res


def test_bleu_rouge_cider_match_pycocoevalcap():
    pytest.importorskip("pycocoevalcap", reason="reference implementation pycocoevalcap not installed")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _coco_inputs()  # the same tokens on both sides: pycocoevalcap splits on spaces
    ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(1, 5):
        # pycocoevalcap adds 1e-9 / 1e-15 smoothing constants, hence the tolerance
        assert bleu(CORPUS_REFS, CORPUS_HYPS, n=n) == pytest.approx(ref_bleu[n - 1], abs=1e-6)
    ref_rouge, _ = Rouge().compute_score(gts, res)
    assert rouge_l(CORPUS_REFS, CORPUS_HYPS) == pytest.approx(ref_rouge, abs=1e-12)
    ref_cider, _ = Cider().compute_score(gts, res)
    assert cider(CORPUS_REFS, CORPUS_HYPS) == pytest.approx(ref_cider, abs=1e-9)
    assert 0 < cider(CORPUS_REFS, CORPUS_HYPS) < 10


def test_bleu_matches_nltk_corpus_bleu():
    pytest.importorskip("nltk", reason="reference implementation nltk not installed")
    from nltk.translate.bleu_score import corpus_bleu

    refs = [[tokenize(r) for r in rs] for rs in CORPUS_REFS]
    hyps = [tokenize(h) for h in CORPUS_HYPS]
    for n in range(1, 5):
        expected = corpus_bleu(refs, hyps, weights=(1 / n,) * n)
        assert bleu(CORPUS_REFS, CORPUS_HYPS, n=n) == pytest.approx(expected, abs=1e-12)


def test_meteor_and_stemmer_match_nltk():
    pytest.importorskip("nltk", reason="reference implementation nltk not installed")
    from nltk.stem.porter import PorterStemmer
    from nltk.translate.meteor_score import meteor_score

    class NoWordNet:  # exact + stem matching only: no synonyms, and no WordNet download
        @staticmethod
        def synsets(word):
            return []

    expected = np.mean([meteor_score([tokenize(r) for r in rs], tokenize(h), wordnet=NoWordNet())
                        for rs, h in zip(CORPUS_REFS, CORPUS_HYPS)])
    assert meteor(CORPUS_REFS, CORPUS_HYPS) == pytest.approx(expected, abs=1e-12)

    stemmer = PorterStemmer()  # NLTK_EXTENSIONS, the mode meteor_score uses
    texts = [r for refs in CORPUS_REFS for r in refs] + CORPUS_HYPS
    words = {w for text in texts for w in tokenize(text)} | {
        "caresses", "ponies", "ties", "dies", "cried", "tied", "agreed", "feed", "plastered", "motoring", "sing",
        "hopping", "falling", "hissing", "filing", "happy", "sky", "skies", "dying", "relational", "conditional",
        "radically", "logically", "hopefulness", "electrical", "adjustment", "adoption", "probate", "controlling",
        "generalizations", "opacities", "opacified", "atelectatic", "consolidative", "effusions", "enlarged",
        "enlargement", "visualized", "hyperinflation", "yyyy", "as", "is", "by", "syzygy", "toy", "news",
    }
    assert {w: porter_stem(w) for w in words} == {w: stemmer.stem(w) for w in words}


# --- bootstrap -----------------------------------------------------------------------------------


def test_bootstrap_ci_contains_mean_is_deterministic_and_shrinks_with_more_data():
    rng = np.random.default_rng(1)
    small = rng.random(50) < 0.7  # per-question correctness, accuracy about 0.7
    large = rng.random(2000) < 0.7
    low, high = bootstrap_ci(small)
    assert low <= small.mean() <= high
    assert bootstrap_ci(small) == (low, high)                   # same seed, same interval
    scores = rng.random(50)  # continuous scores, so another seed visibly moves the percentiles
    assert bootstrap_ci(scores, seed=0) == bootstrap_ci(scores, seed=0)
    assert bootstrap_ci(scores, seed=1) != bootstrap_ci(scores, seed=0)
    low_l, high_l = bootstrap_ci(large)
    assert low_l <= large.mean() <= high_l
    assert high_l - low_l < (high - low) / 3                    # width ~ 1/sqrt(n): 50 -> 2000 is /6.3
    # a 95% interval of a proportion is about +-1.96 sqrt(p(1-p)/n) = +-0.020 at n = 2000
    assert (high_l - low_l) / 2 == pytest.approx(1.96 * math.sqrt(0.7 * 0.3 / 2000), rel=0.2)


def test_bootstrap_ci_other_stat_and_level():
    values = np.arange(100.0)
    low, high = bootstrap_ci(values, stat=np.median, n=500)
    assert low <= 49.5 <= high
    low90, high90 = bootstrap_ci(values, level=0.90)
    low95, high95 = bootstrap_ci(values, level=0.95)
    assert high90 - low90 < high95 - low95


def test_bootstrap_ci_fn_for_corpus_metrics_and_paired():
    refs, hyps = CORPUS_REFS, CORPUS_HYPS
    low, high = bootstrap_ci_fn(lambda idx: bleu([refs[i] for i in idx], [hyps[i] for i in idx], n=1),
                                len(hyps), n=200)
    assert low <= bleu(refs, hyps, n=1) <= high
    # paired: system a beats b by exactly 0.1 on every item -> the interval is a point at 0.1
    a = np.linspace(0.2, 0.9, 30)
    low, high = paired_bootstrap_ci(a, a - 0.1)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1, 2], [1])

