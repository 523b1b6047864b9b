"""The Porter stemmer, written to match NLTK's PorterStemmer (tested on its vocabulary), for METEOR's
stem matching without nltk at run time."""

from __future__ import annotations

_PORTER_POOL = {"skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
                "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
                "cannings": "canning", "canning": "canning", "howe": "howe", "proceed": "proceed",
                "exceed": "exceed", "succeed": "succeed"}
_STEP2 = [("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
          ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"),
          ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"),
          ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"), ("fulli", "ful"), ("logi", "log")]
_STEP3 = [("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""), ("ness", "")]
_STEP4 = "al ance ence er ic able ible ant ement ment ent ion ou ism ate iti ous ive ize".split()


def _cv(word: str) -> str:
    """'c'/'v' per letter; y is a vowel after a consonant (Porter's definition)."""
    out = ""
    for i, ch in enumerate(word):
        out += "v" if ch in "aeiou" or (ch == "y" and i > 0 and out[-1] == "c") else "c"
    return out


def _m(stem: str) -> int:
    return _cv(stem).count("vc")


def _cvc(w: str) -> bool:
    s = _cv(w)
    return (len(w) >= 3 and s.endswith("cvc") and w[-1] not in "wxy") or (len(w) == 2 and s == "vc")


def _rule(word: str, rules, cond) -> str:
    """First rule whose suffix matches decides: applied if cond(stem), else the word is kept."""
    for suffix, repl in rules:
        if word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
            return stem + repl if cond(stem, word) else word
    return word


def porter_stem(word: str) -> str:
    """Porter stemmer, NLTK_EXTENSIONS mode (nltk.stem.PorterStemmer's default, which NLTK's
    meteor_score uses): the 1980 algorithm plus Martin Porter's and NLTK's amendments, so that
    METEOR's stem matches are the same words as NLTK's."""
    w = word.lower()
    if w in _PORTER_POOL or len(w) <= 2:  # NLTK: irregular forms, and short words left alone
        return _PORTER_POOL.get(w, w)
    # Step 1a, plurals ("dies" -> "die" is NLTK's).
    if w.endswith("ies") and len(w) == 4:
        w = w[:-1]
    else:
        w = _rule(w, [("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")], lambda s, _: True)
    # Step 1b, -ed / -ing, restoring an e or undoubling a consonant after removal.
    if w.endswith("ied"):  # NLTK
        w = w[:-3] + ("ie" if len(w) == 4 else "i")
    elif w.endswith("eed"):
        w = w[:-1] if _m(w[:-3]) > 0 else w
    elif (w.endswith("ed") and "v" in _cv(w[:-2])) or (w.endswith("ing") and "v" in _cv(w[:-3])):
        w = w[:-2] if w.endswith("ed") else w[:-3]
        if w.endswith(("at", "bl", "iz")):
            w += "e"
        elif len(w) >= 2 and w[-1] == w[-2] and _cv(w)[-1] == "c":
            w = w if w[-1] in "lsz" else w[:-1]
        elif _m(w) == 1 and _cvc(w):
            w += "e"
    # Step 1c, y -> i after a consonant (NLTK's condition, so "enjoy" keeps its y).
    if w.endswith("y") and len(w) > 2 and _cv(w[:-1])[-1] == "c":
        w = w[:-1] + "i"
    # Steps 2-4, derivational suffixes by measure; NLTK first turns -alli into -al.
    if w.endswith("alli") and _m(w[:-4]) > 0:
        w = w[:-2]
    w = _rule(w, _STEP2, lambda s, full: _m(full[:-3] if full.endswith("logi") else s) > 0)
    w = _rule(w, _STEP3, lambda s, _: _m(s) > 0)
    w = _rule(w, [(s, "") for s in _STEP4],
              lambda s, full: _m(s) > 1 and (not full.endswith("ion") or s[-1:] in ("s", "t")))
    # Step 5, a final e and a final double l.
    if w.endswith("e") and (_m(w[:-1]) > 1 or (_m(w[:-1]) == 1 and not _cvc(w[:-1]))):
        w = w[:-1]
    if w.endswith("ll") and _m(w[:-1]) > 1:
        w = w[:-1]
    return w
