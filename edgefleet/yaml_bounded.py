"""YAML from untrusted hands: safe types only, no aliases, bounded nesting.

`yaml.safe_load` refuses arbitrary objects but still expands aliases: a "billion
laughs" document of a few hundred bytes (each anchor a list of ten aliases of the
previous one) becomes 10^9 nodes and exhausts memory. A job body never needs an
alias, so they are refused outright, as is nesting deeper than any job needs
(PyYAML composes recursively and would otherwise hit the interpreter's limit).
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionStartEvent
from yaml.nodes import Node

MAX_DEPTH = 64


class YamlRefused(ValueError):
    """The text is not YAML this loader accepts; the message is one line for the user."""


class _BoundedLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]  # PyYAML's own parser API
        if isinstance(event, AliasEvent):
            raise YamlRefused(
                f"YAML aliases (*{event.anchor}) are not allowed (line {event.start_mark.line + 1 if event.start_mark else '?'})"
            )
        nested = isinstance(event, CollectionStartEvent)
        if nested:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise YamlRefused(f"nested deeper than {MAX_DEPTH} levels (line {event.start_mark.line + 1})")
        try:
            return super().compose_node(parent, index)
        finally:
            if nested:
                self._depth -= 1


def load_bounded(text: str) -> Any:
    """One YAML document as plain data; YamlRefused (one line) for anything else."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except YamlRefused:
        raise
    except yaml.YAMLError as exc:
        raise YamlRefused(f"neither JSON nor YAML: {' '.join(str(exc).split())}") from None
    finally:
        loader.dispose()
