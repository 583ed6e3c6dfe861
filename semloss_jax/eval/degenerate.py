"""Degenerate-text detector: replies that are mostly repetition or gibberish.

    degeneracy_features(text) -> dict of the measures below
    is_degenerate(text)       -> bool (the stated rule of DegenerateRule)

Measures (on the NFKC-normalized, lowercased reply):
* `n_words`: whitespace-separated words;
* `distinct1`: distinct words / words (1.0 for an empty reply);
* `rep3`: the share of word 3-grams that repeat an earlier 3-gram of the reply;
* `compress`: zlib-compressed size / raw size of the UTF-8 text (loops compress well);
* `alpha`: letters / non-space characters (emoji, punctuation and digit runs score low);
* `top_word`: the share of the most frequent word among the words.

A reply is degenerate when it is empty, or when (at least `min_chars` characters long) its
repetition or its share of non-letters passes the rule's thresholds; see DegenerateRule. The
judge uses the rule stored in its artifact, whose thresholds were chosen on the TRAIN part of
the labelled own outputs (eval.judge_v2_fit.choose_degenerate_rule; figures in docs/EVAL.md).
"""
from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass

FEATURE_NAMES = ("n_words", "distinct1", "rep3", "compress", "alpha", "top_word")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().lower()


def degeneracy_features(text: str) -> dict[str, float]:
    """The repetition and gibberish measures of one reply (see the module docstring)."""
    t = _norm(text)
    words = t.split()
    n = len(words)
    grams = [tuple(words[i:i + 3]) for i in range(max(0, n - 2))]
    seen: set = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    raw = t.encode("utf-8")
    chars = [c for c in t if not c.isspace()]
    return {
        "n_words": float(n),
        "distinct1": len(set(words)) / n if n else 1.0,
        "rep3": repeats / len(grams) if grams else 0.0,
        "compress": len(zlib.compress(raw, 9)) / len(raw) if raw else 1.0,
        "alpha": sum(c.isalpha() for c in chars) / len(chars) if chars else 0.0,
        "top_word": Counter(words).most_common(1)[0][1] / n if n else 0.0,
    }


@dataclass(frozen=True)
class DegenerateRule:
    """degenerate = empty, or (long enough and (rep3 >= max_rep3 or compress <= min_compress
    or alpha <= min_alpha or distinct1 <= min_distinct1))."""

    max_rep3: float = 0.5
    min_compress: float = 0.3
    min_alpha: float = 0.5
    min_distinct1: float = 0.25
    min_chars: int = 20

    def decide(self, text: str, f: dict[str, float]) -> bool:
        """The rule on a reply and its precomputed degeneracy_features f."""
        t = _norm(text)
        if not t:
            return True
        if len(t) < self.min_chars:
            return False
        return (f["rep3"] >= self.max_rep3 or f["compress"] <= self.min_compress
                or f["alpha"] <= self.min_alpha or f["distinct1"] <= self.min_distinct1)

    def __call__(self, text: str) -> bool:
        """Whether `text` is degenerate under this rule."""
        return self.decide(text, degeneracy_features(text))


DEFAULT_RULE = DegenerateRule()


def is_degenerate(text: str, rule: DegenerateRule = DEFAULT_RULE) -> bool:
    """True when the reply is empty or mostly repetition / non-letters (DEFAULT_RULE)."""
    if not isinstance(text, str):
        raise TypeError(f"is_degenerate expects a str, got {type(text).__name__}")
    return rule(text)
