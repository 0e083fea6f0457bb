"""Built-in `text` plugin: count and transform plain text, inline or from a file."""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

from edgefleet.plugin_context import PluginContext

MAX_RETURNED_CHARS = 10_000
TOP_WORDS = 10
# How many lines go by between two looks at cancellation / progress.
CHECK_EVERY_LINES = 2_000
# A word: letters/digits, with inner apostrophes or hyphens ("don't", "well-known").
WORD_RE = re.compile(r"\w+(?:['’-]\w+)*")


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    if action == "count":
        return _count(ctx, args)
    if action == "transform":
        return _transform(ctx, args)
    raise ValueError(f"text plugin has no action {action!r} (actions: count, transform)")


def _source(ctx: PluginContext, args: dict[str, Any]) -> tuple[str | None, Path | None]:
    has_text, has_path = "text" in args, "path" in args
    if has_text == has_path:
        raise ValueError("give exactly one of 'text' or 'path'")
    if has_text:
        if not isinstance(args["text"], str):
            raise ValueError("'text' must be a string")
        return args["text"], None
    path = ctx.input_path(str(args["path"]))
    if not path.exists():
        raise FileNotFoundError(f"path {args['path']!r}: no such file ({path})")
    if not path.is_file():
        raise IsADirectoryError(f"path {args['path']!r}: not a regular file ({path})")
    return None, path


def _read_text(path: Path) -> str:
    # newline="" keeps the file's own line endings, so counts match the bytes on disk.
    with path.open("r", encoding="utf-8", errors="replace", newline="") as f:
        return f.read()


def _count_lines(ctx: PluginContext, lines: Iterable[str], total_chars: int | None) -> dict[str, Any]:
    counter: Counter[str] = Counter()
    n_lines = n_chars = 0
    for n_lines, line in enumerate(lines, start=1):
        n_chars += len(line)
        counter.update(WORD_RE.findall(line.lower()))
        if n_lines % CHECK_EVERY_LINES == 0:
            ctx.check_cancelled()
            if total_chars:
                ctx.progress(min(0.99, n_chars / total_chars), f"{n_lines} lines")
    top = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_WORDS]
    return {
        "words": sum(counter.values()),
        "lines": n_lines,
        "chars": n_chars,
        "top": [[word, n] for word, n in top],
    }


def _count(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    text, path = _source(ctx, args)
    if text is not None:
        result = _count_lines(ctx, io.StringIO(text, newline=""), len(text))
    else:
        assert path is not None
        # Streamed line by line: a fetched file may be far larger than we want in memory.
        with path.open("r", encoding="utf-8", errors="replace", newline="") as f:
            result = _count_lines(ctx, f, path.stat().st_size)
    ctx.progress(1.0, "counted")
    return result


class _TextExtractor(HTMLParser):
    """Collects the visible text of an HTML document (no script/style), block tags as line breaks."""

    _BLOCK: ClassVar[set[str]] = {
        "p",
        "div",
        "br",
        "li",
        "ul",
        "ol",
        "tr",
        "table",
        "section",
        "article",
        "header",
        "footer",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "blockquote",
        "hr",
        "title",
    }
    _HIDDEN: ClassVar[set[str]] = {"script", "style", "noscript", "template"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden_depth += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden_depth = max(0, self._hidden_depth - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._hidden_depth:
            self.parts.append(data)


def _strip_html(text: str) -> str:
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    # Collapse the runs of blank lines that nested block tags leave behind.
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _title(text: str) -> str:
    # str.title() would give "Don'T"; capitalise whole words instead.
    return WORD_RE.sub(lambda m: m[0][:1].upper() + m[0][1:].lower(), text)


def _reverse_words(text: str) -> str:
    return "\n".join(" ".join(reversed(line.split())) for line in text.splitlines())


_OPS = {
    "upper": str.upper,
    "lower": str.lower,
    "title": _title,
    "reverse_words": _reverse_words,
    "strip_html": _strip_html,
}


def _transform(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    op = args.get("op")
    if op not in _OPS:
        raise ValueError(f"'op' must be one of {', '.join(_OPS)}, got {op!r}")
    text, path = _source(ctx, args)
    if text is None:
        assert path is not None
        text = _read_text(path)
    ctx.check_cancelled()
    result = _OPS[op](text)
    saved: str | None = None
    if args.get("save_as"):
        target = ctx.workspace_path(str(args["save_as"]))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        tmp.write_text(result, encoding="utf-8")
        tmp.replace(target)  # atomic: readers never see half a file
        saved = str(target)
    ctx.progress(1.0, f"{op} done")
    return {
        "text": result[:MAX_RETURNED_CHARS],
        "chars": len(result),
        "path": saved,
        "truncated": len(result) > MAX_RETURNED_CHARS,
    }
