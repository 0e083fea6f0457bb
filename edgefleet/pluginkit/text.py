"""Plain-text helpers shared by the text-handling plugins: sentences, stop words, text-block files.

Several plugins must agree on these: the `knowledge` plugin writes text-block
files that `knowledge_index` reads back, and the summarizer and the question
answerer must cut sentences the same way, or an answer quotes a sentence that
the summary split in two.
"""

from __future__ import annotations

import re
from pathlib import Path

# A sentence ends at . ! or ? (plus closing quotes/brackets) before whitespace and a capital,
# digit or opening quote; "e.g. the" therefore stays one sentence.
SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9À-Ý])")

# English function words that say nothing about what a text is about. Each use extends the
# set with its own (contractions for a summarizer, question words for a search), so the core
# set is kept here only once. A word list reads best as text.
STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before
    being below between both but by can cannot could did do does doing down during each few for from
    further had has have having he her here hers him his how i if in into is it its itself just me
    more most my no nor not of off on once only or other our out over own same she should so some
    such than that the their them then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your""".split()  # noqa: SIM905
)


def split_sentences(text: str) -> list[str]:
    """The sentences of one paragraph, stripped, empty ones dropped (see SENTENCE_END for the rule)."""
    return [s.strip() for s in SENTENCE_END.split(text) if s.strip()]


# --- text-block files ------------------------------------------------------------------------
# The format the knowledge plugins hand on extracted page text in: blocks separated by blank
# lines, headings marked with "# ". A plain file, so it can be read (and diffed) by people too.


def render_blocks(blocks: list[tuple[str, str]]) -> str:
    """`(kind, text)` blocks ("heading" or "text") as the text-block file format."""
    return "\n\n".join(f"# {text}" if kind == "heading" else text for kind, text in blocks) + "\n"


def read_blocks(path: Path) -> list[tuple[str, str]]:
    """The `(kind, text)` blocks of a text-block file: the inverse of `render_blocks`."""
    out = []
    for block in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
        block = block.strip()
        if block.startswith("# "):
            out.append(("heading", block[2:].strip()))
        elif block:
            out.append(("text", block))
    return out
