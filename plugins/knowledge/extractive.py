"""Extractive summaries: score sentences by word frequency, keep the best few in their order.

A Luhn-style method: a word's weight is its frequency in the document
(stop words excluded) relative to the most frequent word; a sentence's score
is the mean weight of its content words, with a bonus for words of the title
and a small one for the opening sentences (news and reference pages put the
gist first). Deterministic: ties keep the earlier sentence.
"""

from __future__ import annotations

import math
import re
from collections import Counter

WORD_RE = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
# A sentence ends at . ! or ? (plus closing quotes/brackets) before whitespace and a capital,
# digit or opening quote; "e.g. the" therefore stays one sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9À-Ý])")
MIN_SENTENCE_WORDS = 5
MAX_SENTENCE_WORDS = 60
MAX_SUMMARY_CHARS = 1200

# A word list reads best as text.
STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are aren't as at be because been
    before being below between both but by can can't cannot could couldn't did didn't do does doesn't
    doing don't down during each few for from further had hadn't has hasn't have haven't having he
    her here hers herself him himself his how i if in into is isn't it it's its itself just let's me
    more most mustn't my myself no nor not now of off on once only or other ought our ours ourselves
    out over own same shan't she should shouldn't so some such than that that's the their theirs them
    themselves then there there's these they this those through to too under until up very was wasn't
    we were weren't what what's when where which while who who's whom why will with won't would
    wouldn't you your yours yourself yourselves one two may might many much must us also however
    within without via per yet""".split()  # noqa: SIM905
)


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD_RE.findall(text)]


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOP_WORDS and len(w) > 1 and not w.isdigit()]


def split_sentences(block: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(block) if s.strip()]


def sentences_of(blocks: list[str]) -> list[str]:
    out: list[str] = []
    for block in blocks:
        out.extend(split_sentences(block))
    return out


def summarize(blocks: list[str], *, title: str = "", max_sentences: int = 3) -> str:
    """The `max_sentences` best sentences of `blocks` (paragraph texts), in document order."""
    candidates = [s for s in sentences_of(blocks) if len(words(s)) >= MIN_SENTENCE_WORDS]
    if not candidates:
        # Nothing sentence-like (a list page, a stub): the first text we have, shortened.
        text = " ".join(b for b in blocks if b.strip())
        return _shorten(text)
    freq = Counter(w for s in candidates for w in content_words(s))
    if not freq:
        return _shorten(" ".join(candidates[:max_sentences]))
    top = max(freq.values())
    title_words = set(content_words(title))
    scored: list[tuple[float, int]] = []
    for position, sentence in enumerate(candidates):
        terms = content_words(sentence)
        if not terms:
            continue
        weight = sum(freq[w] / top for w in terms) / math.sqrt(len(terms))
        if title_words:
            weight += 0.5 * len(title_words & set(terms)) / len(title_words)
        if position < 2:
            weight += 0.15 * (2 - position)
        if len(words(sentence)) > MAX_SENTENCE_WORDS:
            weight *= 0.5
        scored.append((weight, position))
    best = sorted(scored, key=lambda item: (-item[0], item[1]))[: max(1, max_sentences)]
    chosen = [candidates[position] for _, position in sorted(best, key=lambda item: item[1])]
    return _shorten(" ".join(chosen))


def _shorten(text: str, limit: int = MAX_SUMMARY_CHARS) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut.rstrip(",;:") + "…"
