"""Using a model through `ctx.model(task)` when one is there, and falling back when it is not.

The model layer is not settled yet: on most nodes `ctx.model()` raises
ModelUnavailable, and where it does return something, the object's shape
depends on the backend. Plugins that can use a model therefore all do the
same three things: ask for it without failing, call it whatever its shape,
and turn any failure into a short reason to report beside their fallback
result. This module does those three things once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgefleet.plugin_context import PluginContext

# Dict keys that may hold the answer's text, in the order they are tried.
ANSWER_KEYS = ("text", "content", "answer")


def error_text(exc: BaseException) -> str:
    """A one-line reason for a model failure, as plugins report it (`model_error`)."""
    return f"{type(exc).__name__}: {exc}"


def model_for(ctx: PluginContext, task: str) -> tuple[Any | None, str | None]:
    """`(model, None)` for `ctx.model(task)`, or `(None, reason)` when no model can be had.

    Any exception counts as "no model" (ModelUnavailable, or a backend that
    fails to load): a plugin with a fallback must not fail because of the model.
    """
    try:
        return ctx.model(task), None
    except Exception as exc:
        return None, error_text(exc)


def call_model(model: Any, prompt: str, *, max_tokens: int, keys: Sequence[str] = ANSWER_KEYS) -> str:
    """Ask whatever `ctx.model()` returned for a completion, and return its text.

    Accepts the usual shapes: an object with `generate(prompt, ...)` or
    `complete(prompt, ...)`, or a callable; one that does not take
    `max_tokens` is called with the prompt alone. The answer is read with
    `answer_text` (`keys`: the dict keys to look in).
    """
    for name in ("generate", "complete"):
        method = getattr(model, name, None)
        if callable(method):
            break
    else:
        if not callable(model):
            raise TypeError(f"model object {type(model).__name__} has no generate/complete method")
        method = model
    try:
        answer = method(prompt, max_tokens=max_tokens)
    except TypeError:
        answer = method(prompt)
    return answer_text(answer, keys)


def answer_text(answer: Any, keys: Sequence[str] = ANSWER_KEYS) -> str:
    """The text of a model's answer: a str; a dict with one of `keys`; an OpenAI-style
    `choices` list (`text`, or `message.content`); or an object with a `.text` attribute.
    """
    if isinstance(answer, str):
        return answer
    if isinstance(answer, dict):
        for key in keys:
            if isinstance(answer.get(key), str):
                return str(answer[key])
        choices = answer.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            first = choices[0]
            if isinstance(first.get("text"), str):
                return str(first["text"])
            message = first.get("message")
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                return str(message["content"])
    text = getattr(answer, "text", None)
    if isinstance(text, str):
        return text
    raise TypeError(f"model returned {type(answer).__name__}, not text")
