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

from edgefleet.pluginkit.text import STOP_WORDS as CORE_STOP_WORDS
from edgefleet.pluginkit.text import split_sentences

WORD_RE = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
MIN_SENTENCE_WORDS = 5
MAX_SENTENCE_WORDS = 60
MAX_SUMMARY_CHARS = 1200

# The core English stop words, plus contractions (WORD_RE keeps them whole) and words that
# carry no topic in running prose. A word list reads best as text.
STOP_WORDS = CORE_STOP_WORDS | frozenset(
    """aren't can't couldn't didn't doesn't don't hadn't hasn't haven't isn't it's let's mustn't
    shan't shouldn't that's there's wasn't weren't what's who's won't wouldn't herself himself
    myself ours ourselves theirs themselves yours yourself yourselves now ought one two may might
    many much must us however within without via per yet""".split()  # noqa: SIM905
)


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD_RE.findall(text)]


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOP_WORDS and len(w) > 1 and not w.isdigit()]


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
