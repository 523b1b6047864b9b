"""Answer and report metrics: pure functions over strings, no model code.

VQA answers are compared after the official VQAv2 normalization. Report metrics re-implement the
pycocoevalcap scorers (BLEU, ROUGE-L, CIDEr-D) and NLTK's METEOR in plain Python, so evaluation
needs neither Java nor NLTK data; tests check them against the reference packages.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise, takewhile

import numpy as np

from eval.stemmer import porter_stem

# --- VQAv2 answer normalization (tables copied from the official vqaEval.py) ---------------------

_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't havent=haven't
hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm
Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't
notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've
somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd thered've=there'd've
there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't
whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've
whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's
wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've""".split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!"]
# The official lookbehind is mistyped as "(?!<=\d)", so in effect a period is dropped unless a
# digit follows it ("2.5" survives, "yes." loses it). We keep that effective behaviour.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_STRIP = re.compile(r"\d,\d")


def normalize_answer(s: str) -> str:
    """VQAv2 normalization: punctuation, lowercase, number words -> digits, articles, contractions.

    As the official script: a punctuation mark next to a space (or any text with a digit,digit
    comma) is deleted, otherwise it becomes a space ("x-ray" -> "x ray"). Note "none" -> "0".
    """
    text = s.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:  # the official script tests the original text, not the running output
        glued = p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None
        out = out.replace(p, "" if glued else " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split()


# --- Closed questions ----------------------------------------------------------------------------

# Words that end an option phrase when walking away from "or" ("is this an MRI or a CT" -> mri, ct).
_OPTION_STOP = frozenset("""is are was were does do did this these that those it there which what
where how image images scan film study in on of at to from with by for as taken seen shown located
visible found be being not no patient""".split())


def _option_run(tokens: Iterable[str]) -> list[str]:
    return list(takewhile(lambda t: t != "," and t not in _OPTION_STOP, tokens))


def closed_options(question: str) -> list[str]:
    """Options named by an "X or Y" question, normalized; [] when there are none.

    Options are single words next to "or" ("Is the lesion on the left or right?" -> left, right),
    widened when both sides repeat a head noun ("the small bowel or the large bowel"), plus
    earlier items of a comma list ("Is this a CT, MRI, or x-ray?").
    """
    words = re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*|,", question.lower())
    words = [w for w in words if w not in _ARTICLES]
    if "or" not in words:
        return []
    i = words.index("or")
    left = words[:i]
    while left and left[-1] == ",":  # Oxford comma
        left.pop()
    left_run = _option_run(reversed(left))[::-1]
    right_run = _option_run(words[i + 1:])
    if not left_run or not right_run:
        return []
    # A repeated head noun ("left lung or right lung") makes each option that many words long.
    j = next((k for k in range(1, min(4, len(right_run))) if right_run[k] == left_run[-1]), 0)
    if j and len(left_run) > j:
        first, last = left_run[-(j + 1):], right_run[:j + 1]
    else:
        first, last = left_run[-1:], right_run[:1]
    options = [" ".join(first), " ".join(last)]
    rest = left[:len(left) - len(left_run)]
    while rest and rest[-1] == ",":  # "a CT, MRI or x-ray": earlier list items, one word each
        rest.pop()
        item = _option_run(reversed(rest))
        if not item:
            break
        options.insert(0, item[0])
        rest = rest[:len(rest) - len(item)]
    return [normalize_answer(o) for o in options]


def _named_options(tokens: list[str], options: Iterable[str]) -> set[str]:
    """Options occurring as whole-word phrases; longer ones claim their words first, so
    "non contrast" is not also read as "contrast"."""
    taken = [False] * len(tokens)
    named = set()
    for opt in sorted(set(options), key=lambda o: -len(o.split())):
        words = opt.split()
        for i in range(len(tokens) - len(words) + 1):
            if tokens[i:i + len(words)] == words and not any(taken[i:i + len(words)]):
                named.add(opt)
                taken[i:i + len(words)] = [True] * len(words)
    return named


def closed_strict(prediction: str, answer: str, options: Sequence[str] | None = None) -> bool:
    """Strict closed-question accuracy.

    Yes/no gold (MedEvalKit rule): the normalized prediction contains exactly one of the whole
    words "yes"/"no", and it is the gold one ("yes and no" is wrong; "nodule" is not "no").
    Otherwise the prediction must name the gold option and no other option; `options` come from
    the caller (e.g. `closed_options(question)`); a gold answer that is not among them is matched
    to the option it contains, or else counts as an extra option itself.
    """
    gold = normalize_answer(answer)
    pred = _tokens(prediction)
    if gold in ("yes", "no"):
        return {w for w in pred if w in ("yes", "no")} == {gold}
    opts = [o for o in (normalize_answer(x) for x in options or []) if o]
    target = gold
    if gold not in opts:
        inside = _named_options(gold.split(), opts)
        target = inside.pop() if len(inside) == 1 else gold
    return _named_options(pred, set(opts) | {target}) == {target}


def closed_lenient(prediction: str, answer: str) -> bool:
    """LLaVA-Med rule: the normalized gold string is a substring of the normalized prediction.

    Deliberately the paper's plain substring test, so "no" is found in "nodule"; closed_strict
    is the whole-word rule.
    """
    return normalize_answer(answer) in normalize_answer(prediction)


# --- Open questions ------------------------------------------------------------------------------

def exact_match(prediction: str, answer: str) -> bool:
    """Normalized strings are equal."""
    return normalize_answer(prediction) == normalize_answer(answer)


def token_recall(prediction: str, answer: str) -> float:
    """LLaVA-Med open-question recall: share of distinct gold tokens present in the prediction."""
    gold, pred = set(_tokens(answer)), set(_tokens(prediction))
    if not gold:
        return float(not pred)
    return len(gold & pred) / len(gold)


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD-style token F1 (multiset overlap) after normalization."""
    pred, gold = _tokens(prediction), _tokens(answer)
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)


def bleu1(prediction: str, answer: str) -> float:
    """Sentence BLEU-1: clipped unigram precision times the brevity penalty exp(1 - r/c) if c <= r."""
    pred, gold = _tokens(prediction), _tokens(answer)
    if not pred:
        return 0.0
    clipped = sum((Counter(pred) & Counter(gold)).values())
    bp = 1.0 if len(pred) > len(gold) else math.exp(1 - len(gold) / len(pred))
    return bp * clipped / len(pred)


# --- Report metrics (corpus level) ---------------------------------------------------------------

_WORD = re.compile(r"\d+(?:\.\d+)+|[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lowercase words and numbers, punctuation dropped (what PTBTokenizer + its filter leaves)."""
    return _WORD.findall(text.lower())


def _prepare(refs: Sequence[str | Sequence[str]], hyps: Sequence[str]):
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} reference sets for {len(hyps)} hypotheses")
    ref_sets = [[tokenize(r) for r in ([rs] if isinstance(rs, str) else rs)] for rs in refs]
    if any(not rs for rs in ref_sets):
        raise ValueError("every hypothesis needs at least one reference")
    return ref_sets, [tokenize(h) for h in hyps]


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu(refs: Sequence[str | Sequence[str]], hyps: Sequence[str], n: int = 4) -> float:
    """Corpus BLEU-n (uniform weights over 1..n), as pycocoevalcap's Bleu and nltk corpus_bleu.

    Clipped n-gram counts are summed over the corpus; the brevity penalty compares the total
    hypothesis length with the summed closest reference lengths (ties -> the shorter one).
    Any order with zero matches gives 0 (pycocoevalcap's smoothing leaves a residue of ~1e-4 there).
    """
    ref_sets, hyp_toks = _prepare(refs, hyps)
    correct, guess = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for rs, h in zip(ref_sets, hyp_toks):
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for k in range(1, n + 1):
            max_ref = Counter()
            for r in rs:
                max_ref |= _ngrams(r, k)
            correct[k - 1] += sum((_ngrams(h, k) & max_ref).values())
            guess[k - 1] += max(0, len(h) - k + 1)
    if hyp_len == 0 or min(correct) == 0:
        return 0.0
    log_p = sum(math.log(c / g) for c, g in zip(correct, guess)) / n
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(refs: Sequence[str | Sequence[str]], hyps: Sequence[str], beta: float = 1.2) -> float:
    """Mean per-report ROUGE-L F-measure, as pycocoevalcap: best LCS precision and best LCS
    recall over the references (taken separately), combined with beta = 1.2."""
    ref_sets, hyp_toks = _prepare(refs, hyps)
    scores = []
    for rs, h in zip(ref_sets, hyp_toks):
        lcs = [_lcs(r, h) for r in rs]
        p = max((m / len(h) if h else 0.0) for m in lcs)
        r = max((m / len(ref) if ref else 0.0) for m, ref in zip(lcs, rs))
        scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0)
    return float(np.mean(scores))


def cider(refs: Sequence[str | Sequence[str]], hyps: Sequence[str], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D as pycocoevalcap's Cider: tf-idf n-gram vectors (n = 1..4) with document frequency
    over the evaluated references, clipped hypothesis weights, gaussian length penalty, x10."""
    ref_sets, hyp_toks = _prepare(refs, hyps)
    def grams(words: list[str]) -> Counter:
        return Counter({g: c for k in range(1, n + 1) for g, c in _ngrams(words, k).items()})

    ref_grams = [[grams(r) for r in rs] for rs in ref_sets]
    df = Counter(g for rgs in ref_grams for g in set().union(*rgs))
    log_docs = math.log(len(ref_sets))

    def vec(counts: Counter):
        v = [{} for _ in range(n)]
        for g, tf in counts.items():
            v[len(g) - 1][g] = tf * (log_docs - math.log(max(1.0, df[g])))
        norms = [math.sqrt(sum(x * x for x in d.values())) for d in v]
        # pycocoevalcap's "length" counts bigrams (its n == 1 is the 0-based index), kept as is.
        return v, norms, sum(c for g, c in counts.items() if len(g) == 2)

    scores = []
    for h, rgs in zip(hyp_toks, ref_grams):
        vh, nh, lh = vec(grams(h))
        total = 0.0
        for rg in rgs:
            vr, nr, lr = vec(rg)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] and nr[k]:
                    dot /= nh[k] * nr[k]
                total += dot * penalty / n
        scores.append(10.0 * total / len(rgs))
    return float(np.mean(scores))


# --- METEOR (NLTK variant) -----------------------------------------------------------------------
# Porter stemming (eval/stemmer.py) matches NLTK's, so no nltk at run time.

def _align(hyp: list[str], ref: list[str]) -> list[tuple[int, int]]:
    """NLTK's greedy alignment: exact matches, then Porter-stem matches among the words left;
    scanning the hypothesis from its end, each word takes the last unused equal reference word."""
    matches, h_left, r_left = [], list(enumerate(hyp)), list(enumerate(ref))
    for key in (lambda x: x, porter_stem):
        positions: dict[str, list[int]] = {}
        for j, (_, word) in enumerate(r_left):
            positions.setdefault(key(word), []).append(j)
        used_h, used_r = set(), set()
        for i in reversed(range(len(h_left))):
            slots = positions.get(key(h_left[i][1]))
            if slots:
                j = slots.pop()
                used_h.add(i)
                used_r.add(j)
                matches.append((h_left[i][0], r_left[j][0]))
        h_left = [x for i, x in enumerate(h_left) if i not in used_h]
        r_left = [x for j, x in enumerate(r_left) if j not in used_r]
    return sorted(matches)


def _meteor_pair(ref: list[str], hyp: list[str], alpha=0.9, beta=3.0, gamma=0.5) -> float:
    matches = _align(hyp, ref)
    if not matches:
        return 0.0
    p, r = len(matches) / len(hyp), len(matches) / len(ref)
    fmean = p * r / (alpha * p + (1 - alpha) * r)
    chunks = 1 + sum(1 for (a, b), (c, d) in pairwise(matches) if not (c == a + 1 and d == b + 1))
    return (1 - gamma * (chunks / len(matches)) ** beta) * fmean


def meteor(refs: Sequence[str | Sequence[str]], hyps: Sequence[str]) -> float:
    """Mean per-report METEOR as NLTK's meteor_score (METEOR 1.0 form, Banerjee & Lavie 2005):
    exact then Porter-stem unigram matching, no WordNet synonyms; Fmean = PR / (0.9P + 0.1R),
    penalty 0.5 * (chunks / matches)^3; best reference per report.

    Not comparable with pycocoevalcap's METEOR 1.5 (Java: paraphrases, tuned parameters).
    """
    ref_sets, hyp_toks = _prepare(refs, hyps)
    return float(np.mean([max(_meteor_pair(r, h) for r in rs) for rs, h in zip(ref_sets, hyp_toks)]))


# --- Uncertainty ---------------------------------------------------------------------------------

def bootstrap_ci_fn(fn: Callable[[np.ndarray], float], size: int, n: int = 1000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of fn(indices) over `n` resamples of range(size) with
    replacement. Use it for corpus metrics (fn recomputes e.g. BLEU on the resampled reports) and
    for paired comparisons (fn returns a difference between two systems on the same items)."""
    if size < 1:
        raise ValueError("bootstrap needs at least one item")
    rng = np.random.default_rng(seed)
    stats = np.array([fn(rng.integers(0, size, size)) for _ in range(n)], dtype=float)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(values: Sequence[float], stat: Callable = np.mean, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """95% percentile bootstrap interval of stat(values)."""
    arr = np.asarray(values, dtype=float)
    return bootstrap_ci_fn(lambda idx: stat(arr[idx]), len(arr), n=n, seed=seed, level=level)


def paired_bootstrap_ci(a: Sequence[float], b: Sequence[float], n: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Interval of mean(a) - mean(b) for per-item scores of two systems on the same items;
    resampling items jointly keeps the pairing, so shared item difficulty cancels out."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired scores must have the same length")
    return bootstrap_ci_fn(lambda idx: float(a[idx].mean() - b[idx].mean()), len(a), n=n, seed=seed, level=level)
