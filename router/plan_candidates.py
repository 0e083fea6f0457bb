"""Which templates and actions a goal is about: BM25 over the catalogue, before any model is asked.

A small planning model picks well among three or four candidates and badly among twenty,
and a prompt that lists the whole catalogue does not fit its context. Each template and
each plugin action is one document (its name, descriptions, input names and a few ways
people ask for it); the goal is the query, widened with everyday synonyms. A goal that
matches nothing in the catalogue gets no candidates, which the goal planner turns into
a refusal without calling a model at all.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from edgefleet.plugin_catalog import PluginCatalog
from edgefleet.templates import TemplateCatalog

# BM25's usual constants: term-frequency saturation and length normalisation.
_K1 = 1.2
_B = 0.75
# A goal must share this much (BM25) with a target for it to be a candidate at all:
# about one distinctive word; "order a pizza" shares only common words with the catalogue.
MIN_SCORE = 1.5
# Candidates scoring under this fraction of the best one are left out of the shortlist.
RELATIVE_CUTOFF = 0.35
# The model is offered only the candidates this close to the best: SmolLM2-135M picked the wrong one
# of four far more often than the retriever (bench_planner), and a close second stays a choice.
OFFERED_CUTOFF = 0.9

_WORD = re.compile(r"[a-z0-9]+")
_STOP_WORDS = """a an the and or of to in on at for from by with without into onto is are be been being it its this that
    these those my me i we our you your please can could would should will just then than so do does did
    done some any all each every new old also very up out as if not no yes what which who how when where
    there here get make let give want need like one two three file files thing things way use using
    order given other others more most only same such via per about after before again them they their
    set list show tell run"""
_STOP = frozenset(_STOP_WORDS.split())
# Everyday words for what the catalogue calls otherwise; both sides are stemmed like the goal.
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "picture": ("photo", "image"),
    "pic": ("photo", "image"),
    "pics": ("photo", "image"),
    "snap": ("photo",),
    "snapshot": ("photo",),
    "image": ("photo",),
    "jpeg": ("photo",),
    "jpg": ("photo",),
    "camera": ("photo", "exif"),
    "holiday": ("photo",),
    "vacation": ("photo",),
    "movie": ("slideshow", "video"),
    "clip": ("slideshow", "video"),
    "mp4": ("video", "slideshow"),
    "sharpest": ("best", "sharpness", "score"),
    "sharp": ("sharpness", "best"),
    "blurry": ("sharpness", "best"),
    "favourite": ("best",),
    "nicest": ("best",),
    "pixel": ("max", "edge", "resize"),
    "favorite": ("best",),
    "top": ("best",),
    "shrink": ("resize",),
    "smaller": ("resize",),
    "scale": ("resize",),
    "thumbnail": ("resize",),
    "sort": ("classify", "group"),
    "organise": ("classify",),
    "organize": ("classify",),
    "categorise": ("classify", "label"),
    "categorize": ("classify", "label"),
    "category": ("classify", "label"),
    "tag": ("classify", "label"),
    "sentiment": ("classify", "label"),
    "positive": ("classify", "label"),
    "negative": ("classify", "label"),
    "spam": ("classify", "label"),
    "download": ("fetch", "http", "get"),
    "grab": ("fetch", "get"),
    "pull": ("fetch",),
    "website": ("web", "page", "url"),
    "site": ("web", "page", "url"),
    "link": ("url",),
    "http": ("url",),
    "https": ("url",),
    "webpage": ("web", "page"),
    "article": ("page", "text"),
    "wiki": ("knowledge", "page"),
    "doc": ("knowledge", "page"),
    "docs": ("knowledge", "page"),
    "documentation": ("knowledge", "page"),
    "howmany": ("count",),
    "many": ("count",),
    "tally": ("count",),
    "wordcount": ("count", "word"),
    "length": ("count",),
    "long": ("count",),
    "capital": ("upper", "transform"),
    "caps": ("upper", "transform"),
    "uppercase": ("upper", "transform"),
    "lowercase": ("lower", "transform"),
    "shout": ("upper", "transform"),
    "yell": ("upper", "transform"),
    "loud": ("upper", "transform"),
    "backwards": ("reverse_words", "transform"),
    "reverse": ("reverse_words", "transform"),
    "html": ("strip_html", "transform"),
    "tag_strip": ("strip_html",),
    "clean": ("strip_html", "transform"),
    "summary": ("summarize",),
    "summarise": ("summarize",),
    "tldr": ("summarize",),
    "tl": ("summarize",),
    "sum": ("summarize",),
    "gist": ("summarize",),
    "shorten": ("summarize",),
    "condense": ("summarize",),
    "recap": ("summarize",),
    "write": ("generate", "prompt"),
    "compose": ("generate", "prompt"),
    "draft": ("generate", "prompt"),
    "poem": ("generate", "prompt"),
    "story": ("generate", "prompt"),
    "haiku": ("generate", "prompt"),
    "email": ("generate", "prompt"),
    "joke": ("generate", "prompt"),
    "knowledgebase": ("knowledge", "index"),
    "kb": ("knowledge", "index"),
    "search": ("index", "question", "ask"),
    "lookup": ("ask", "question"),
    "answer": ("ask", "question"),
    "question": ("ask",),
    "why": ("ask", "question"),
    "refresh": ("update", "index"),
    "reindex": ("update", "index"),
    "crawl": ("fetch", "web", "index"),
    "ingest": ("index", "update"),
    "repo": ("repository", "git"),
    "repository": ("git",),
    "commit": ("git", "repository"),
    "branch": ("git",),
    "ci": ("test", "lint", "pytest"),
    "pipeline": ("ci",),
    "unit": ("test", "pytest"),
    "testsuite": ("test", "pytest"),
    "lint": ("pyflakes",),
    "linter": ("pyflakes", "lint"),
    "flake": ("pyflakes", "lint"),
    "pyflake": ("pyflakes", "lint"),
    "unused": ("pyflakes", "lint"),
    "notify": ("alert", "webhook"),
    "slack": ("alert", "webhook"),
    "ping": ("alert", "webhook"),
    "failing": ("failure", "test"),
    "broke": ("failure", "test"),
    "broken": ("failure", "test"),
    "wait": ("sleep",),
    "pause": ("sleep",),
    "nap": ("sleep",),
    "delay": ("sleep",),
    "second": ("sleep", "seconds"),
    "tick": ("tick", "count"),
}
# How people ask for each built-in target; a template or plugin without an entry is
# still found by its own name, descriptions and input names.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "template:photo-pipeline": (
        "go through my holiday pictures, pick the nicest and make a video of them",
        "slideshow of the best photos in a folder",
    ),
    "template:ci-pipeline": (
        "check my repo for new commits, run its tests and lint, and tell me if it broke",
        "ci run on a git repository with a report and alert",
    ),
    "template:knowledge-refresh": (
        "keep my knowledge base up to date with these web pages",
        "crawl these urls into my search index",
    ),
    "template:knowledge-ask": ("what does my knowledge base say about a question",),
    "template:fetch-and-count": ("download a page and count its words",),
    "template:text-report": ("word count of a text and shout it in capitals",),
    "text.count": ("how many words are in this sentence",),
    "text.transform": ("make this text upper case", "strip the html tags from a text"),
    "http_fetch.get": ("download a file from a url",),
    "llm.generate": ("write a short poem", "answer a prompt with the language model"),
    "llm.summarize": ("give me the gist of this paragraph",),
    "llm.classify": ("is this review positive or negative", "label this message"),
    "photo.classify": ("sort my photos by camera or by date", "read the exif data of a photo folder"),
    "photo.resize": ("make my photos smaller", "shrink the pictures to a max size"),
    "photo_rank.best_shots": ("find the sharpest photos", "pick the top pictures"),
    "video.slideshow": ("turn these images into a video",),
    "repo_watch.detect": ("any new commits in my repository since the last sha",),
    "ci_tests.pytest": ("run the unit tests of an exported source archive",),
    "ci_lint.pyflakes": ("lint the python code in a source archive",),
    "ci_report.markdown": ("write a markdown ci report",),
    "ci_alert.webhook": ("send an alert to a webhook when tests fail",),
    "web.fetch_pages": ("fetch several web pages",),
    "knowledge.extract": ("extract the readable text of fetched pages",),
    "knowledge.summarize": ("summarize fetched web pages",),
    "knowledge_index.update": ("add pages to my search index",),
    "knowledge_query.ask": ("ask my knowledge index a question",),
    "knowledge_query.validators": ("etags of indexed pages",),
    "sleep.sleep": ("wait a few seconds",),
    "sleep.tick": ("count ticks with checkpoints",),
}


def stem(word: str) -> str:
    """A crude English stemmer: enough that "photos", "counting" and "indexed" meet their catalogue words."""
    for suffix in ("ing", "ies", "es", "ed", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            if suffix == "ies":
                return word[:-3] + "y"
            if suffix == "es" and not word.endswith(("ses", "xes", "ches", "shes")):
                return word[:-1]
            if suffix == "s" and word.endswith("ss"):
                return word
            return word[: -len(suffix)]
    return word


_URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)


def terms(text: str) -> list[str]:
    """Stemmed content words of `text`; `snake_case` names also give their parts.

    A URL counts as the word "url": its host and path words say little about what to do.
    """
    out: list[str] = []
    text = _URL.sub(" url ", text)
    for raw in _WORD.findall(text.lower().replace("_", " ").replace("-", " ")):
        if raw in _STOP or len(raw) < 2:
            continue
        out.append(stem(raw))
    return out


_STEMMED_SYNONYMS = {stem(k): tuple(stem(v) for v in vs) for k, vs in _SYNONYMS.items()}


def query_terms(goal: str) -> list[str]:
    """The goal's terms plus their synonyms (a synonym counts half: see `Retriever.score`)."""
    base = terms(goal)
    return base + [syn for t in base for syn in _STEMMED_SYNONYMS.get(t, ())]


@dataclass(frozen=True)
class Candidate:
    """One plan target: a template, or one plugin action."""

    kind: str  # "template" | "action"
    name: str  # template name, or "plugin.action"
    score: float = 0.0

    @property
    def key(self) -> str:
        return f"template:{self.name}" if self.kind == "template" else self.name


@dataclass(frozen=True)
class Shortlist:
    """What a goal may be planned with, best first; empty when nothing in the catalogue fits."""

    goal: str
    candidates: list[Candidate]
    closest: list[Candidate]  # the best targets even when under the threshold, for the refusal text

    @property
    def templates(self) -> list[str]:
        return [c.name for c in self.candidates if c.kind == "template"]

    @property
    def actions(self) -> list[tuple[str, str]]:
        out = []
        for c in self.candidates:
            if c.kind == "action":
                plugin, _, action = c.name.partition(".")
                out.append((plugin, action))
        return out

    def keys(self) -> set[str]:
        return {c.key for c in self.candidates}

    def confident(self, cutoff: float = OFFERED_CUTOFF) -> Shortlist:
        """The candidates scoring within `cutoff` of the best: what the model is offered to choose from."""
        if not self.candidates:
            return self
        best = self.candidates[0].score
        return Shortlist(self.goal, [c for c in self.candidates if c.score >= best * cutoff], self.closest)


def _documents(plugins: PluginCatalog, templates: TemplateCatalog, allowed: Iterable[str]) -> dict[Candidate, str]:
    allowed_set = set(allowed)
    docs: dict[Candidate, str] = {}
    for name in templates.names():
        template = templates.get(name)
        if template is None:
            continue
        used = {str(s.get("plugin")) for s in template.steps}
        if allowed_set and not used <= allowed_set:
            continue  # a template some step of which no live node can run
        parts = [name, name, template.description]
        for input_name, spec in template.inputs.items():
            parts += [input_name, spec.description]
        parts += PHRASINGS.get(f"template:{name}", ())
        docs[Candidate("template", name)] = " ".join(parts)
    for plugin_name in plugins.names():
        if allowed_set and plugin_name not in allowed_set:
            continue
        plugin = plugins.get(plugin_name)
        if plugin is None:
            continue
        for action_name, action in sorted(plugin.manifest.actions.items()):
            key = f"{plugin_name}.{action_name}"
            parts = [plugin_name, action_name, action_name, action.description, plugin.manifest.description[:300]]
            for arg, spec in (action.input_schema.get("properties") or {}).items():
                parts.append(arg)
                if isinstance(spec, dict):
                    parts.append(str(spec.get("description", "")))
                    parts += [str(v) for v in spec.get("enum") or []]
            parts += PHRASINGS.get(key, ())
            docs[Candidate("action", key)] = " ".join(parts)
    return docs


class Retriever:
    """BM25 over the catalogue's templates and actions. Build once per catalogue (cheap: a few ms)."""

    def __init__(self, plugins: PluginCatalog, templates: TemplateCatalog, allowed: Iterable[str] = ()) -> None:
        docs = _documents(plugins, templates, allowed)
        self._targets = list(docs)
        self._tf = [Counter(terms(text)) for text in docs.values()]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg = (sum(self._len) / len(self._len)) if self._len else 1.0
        df: Counter[str] = Counter()
        for tf in self._tf:
            df.update(tf.keys())
        n = len(self._tf)
        self._idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}

    def score(self, goal: str) -> list[Candidate]:
        """Every target with its score, best first (ties keep templates first, then by name)."""
        base = Counter(terms(goal))
        synonyms: Counter[str] = Counter()
        for t in base:
            for syn in _STEMMED_SYNONYMS.get(t, ()):
                if syn not in base:
                    synonyms[syn] += 1
        scored = []
        for target, tf, length in zip(self._targets, self._tf, self._len, strict=True):
            total = 0.0
            for weight, query in ((1.0, base), (0.5, synonyms)):
                for term, count in query.items():
                    f = tf.get(term, 0)
                    if not f:
                        continue
                    norm = f * (_K1 + 1) / (f + _K1 * (1 - _B + _B * length / self._avg))
                    total += weight * min(count, 2) * self._idf[term] * norm
            scored.append(Candidate(target.kind, target.name, round(total, 4)))
        scored.sort(key=lambda c: (-c.score, c.kind != "template", c.name))
        return scored

    def shortlist(self, goal: str, *, limit: int = 4) -> Shortlist:
        """The few targets worth showing a model for `goal`; none when even the best is under MIN_SCORE."""
        scored = self.score(goal)
        closest = [c for c in scored[:3] if c.score > 0]
        if not scored or scored[0].score < MIN_SCORE:
            return Shortlist(goal, [], closest)
        best = scored[0].score
        chosen = [c for c in scored if c.score >= max(MIN_SCORE, best * RELATIVE_CUTOFF)][:limit]
        return Shortlist(goal, chosen, closest)
