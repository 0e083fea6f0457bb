"""Readable text from an HTML page with the standard library's html.parser.

Keeps the title, headings, paragraphs, list items, table cells and
preformatted blocks; drops scripts, styles, navigation, asides, footers,
forms, embedded frames and anything marked hidden. The result is a list of
blocks (kind, text) that the caller joins with blank lines.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

# Elements whose whole content is not part of the readable text.
SKIP_TAGS = frozenset(
    {
        "script",
        "style",
        "noscript",
        "template",
        "nav",
        "aside",
        "footer",
        "form",
        "button",
        "select",
        "textarea",
        "svg",
        "math",
        "iframe",
        "object",
        "embed",
        "canvas",
        "dialog",
        "menu",
    }
)
SKIP_ROLES = frozenset({"navigation", "complementary", "contentinfo", "search", "menu", "menubar", "dialog"})
# Elements that start and end a block of text.
BLOCK_TAGS = frozenset(
    {
        "p",
        "div",
        "section",
        "article",
        "main",
        "header",
        "blockquote",
        "li",
        "dt",
        "dd",
        "ul",
        "ol",
        "dl",
        "table",
        "tr",
        "caption",
        "figure",
        "figcaption",
        "pre",
        "address",
        "details",
        "summary",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "hr",
        "br",
        "body",
        "html",
        "center",
    }
)
HEADING_TAGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
CELL_TAGS = frozenset({"td", "th"})
# Void elements never get an end tag, so they must never enter the skip stack.
VOID_TAGS = frozenset(
    {
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "param",
        "source",
        "track",
        "wbr",
    }
)
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:-]+)""", re.IGNORECASE)
_HEADER_CHARSET = re.compile(r"""charset\s*=\s*["']?([A-Za-z0-9._:-]+)""", re.IGNORECASE)


@dataclass
class Extracted:
    title: str
    blocks: list[tuple[str, str]] = field(default_factory=list)  # (kind, text); kind: heading | text

    @property
    def text(self) -> str:
        return "\n\n".join(text for _, text in self.blocks)


def _hidden(attrs: list[tuple[str, str | None]]) -> bool:
    for name, value in attrs:
        value = (value or "").strip().lower()
        if name == "hidden":
            return True
        if name == "aria-hidden" and value == "true":
            return True
        if name == "role" and value in SKIP_ROLES:
            return True
        if name == "style" and re.search(r"display\s*:\s*none|visibility\s*:\s*hidden", value):
            return True
    return False


class _Extractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title_parts: list[str] = []
        self.blocks: list[tuple[str, str]] = []
        self._skip: list[str] = []  # open elements whose content is dropped
        self._in_title = 0
        self._heading = 0
        self._buffer: list[str] = []
        self._buffer_kind = "text"

    # -- blocks -----------------------------------------------------------------------------
    def _flush(self) -> None:
        text = " ".join("".join(self._buffer).split())
        if text:
            self.blocks.append((self._buffer_kind, text))
        self._buffer = []
        self._buffer_kind = "heading" if self._heading else "text"

    # -- parser callbacks -------------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip:
            if tag not in VOID_TAGS:
                self._skip.append(tag)
            return
        if tag not in VOID_TAGS and (tag in SKIP_TAGS or _hidden(attrs)):
            self._flush()
            self._skip.append(tag)
            return
        if tag == "title":
            self._in_title += 1
        elif tag in HEADING_TAGS:
            self._flush()
            self._heading += 1
            self._buffer_kind = "heading"
        elif tag in BLOCK_TAGS:
            self._flush()
        elif tag in CELL_TAGS:
            self._buffer.append(" ")
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt and alt.strip():
                self._buffer.append(f" {alt.strip()} ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/>, <div/>: an element with no content; only its block boundary matters.
        if self._skip:
            return
        if tag in BLOCK_TAGS or tag in HEADING_TAGS:
            self._flush()
        elif tag == "img":
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if self._skip:
            # Close up to the matching open element; a stray end tag changes nothing.
            if tag in self._skip:
                while self._skip and self._skip.pop() != tag:
                    pass
            return
        if tag == "title":
            self._in_title = max(0, self._in_title - 1)
        elif tag in HEADING_TAGS:
            self._flush()
            self._heading = max(0, self._heading - 1)
            self._buffer_kind = "heading" if self._heading else "text"
        elif tag in BLOCK_TAGS:
            self._flush()
        elif tag in CELL_TAGS:
            self._buffer.append(" ")

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        if self._in_title:
            self.title_parts.append(data)
        else:
            self._buffer.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def extract_html(html: str) -> Extracted:
    """Title and readable blocks of an HTML document (str)."""
    parser = _Extractor()
    parser.feed(html)
    parser.close()
    title = " ".join("".join(parser.title_parts).split())
    if not title:
        heading = next((text for kind, text in parser.blocks if kind == "heading"), "")
        title = heading
    return Extracted(title=title[:300], blocks=parser.blocks)


def extract_plain(text: str) -> Extracted:
    """Blocks of a plain-text document: paragraphs separated by blank lines; title = first line."""
    blocks = [("text", " ".join(p.split())) for p in re.split(r"\n\s*\n", text) if p.strip()]
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return Extracted(title=first_line[:300], blocks=blocks)


def _codec(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def decode_body(body: bytes, content_type: str | None) -> str:
    """Decode a page: BOM, then the Content-Type charset, then <meta charset>, then UTF-8, else cp1252."""
    if body.startswith(codecs.BOM_UTF8):
        return body[len(codecs.BOM_UTF8) :].decode("utf-8", errors="replace")
    for bom, name in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if body.startswith(bom):
            return body[len(bom) :].decode(name, errors="replace")
    header = _HEADER_CHARSET.search(content_type or "")
    meta = _META_CHARSET.search(body[:4096])
    for candidate in (header.group(1) if header else None, meta.group(1).decode("ascii") if meta else None):
        codec = _codec(candidate)
        if codec:
            return body.decode(codec, errors="replace")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body.decode("cp1252", errors="replace")


def looks_like_html(body: bytes, content_type: str | None) -> bool:
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if "html" in kind or kind.endswith("+xml"):
        return True
    if kind and kind != "application/octet-stream":
        return False
    head = body[:1024].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<p" in head


def is_text_type(content_type: str | None) -> bool:
    """Whether the page is something we can extract text from (HTML, XHTML or any text/*)."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    return (
        not kind
        or kind.startswith("text/")
        or "html" in kind
        or kind in ("application/xml", "application/octet-stream")
        or kind.endswith("+xml")
    )
