"""Built-in `llm` plugin: generate, summarize and classify through ctx.model."""

from __future__ import annotations

from typing import Any

from edgefleet.plugin_context import PluginContext

# Small local models lose the thread on long inputs; the head of a document carries most of it.
MAX_INPUT_CHARS = 6000


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    if action == "generate":
        return _generate(ctx, args)
    if action == "summarize":
        return _summarize(ctx, args)
    if action == "classify":
        return _classify(ctx, args)
    raise ValueError(f"llm plugin has no action {action!r} (actions: generate, summarize, classify)")


def _served(reply: Any) -> dict[str, Any]:
    return {
        "model": reply.model,
        "fell_back_from": [list(f) for f in reply.fell_back_from],
        "tokens_in": reply.tokens_in,
        "tokens_out": reply.tokens_out,
        "seconds": round(reply.seconds, 3),
        "load_seconds": round(reply.load_seconds, 3),
        "first_token_seconds": reply.first_token_seconds,
    }


def _generate(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    ctx.progress(0.0, "asking the model")
    reply = ctx.model(args.get("task_type", "generate")).generate(
        args["prompt"],
        system=args.get("system"),
        max_tokens=int(args.get("max_tokens", 256)),
        temperature=float(args.get("temperature", 0.0)),
    )
    return {"text": reply.text, **_served(reply)}


def _summarize(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    if "path" in args:
        text = ctx.input_path(args["path"]).read_text(encoding="utf-8", errors="replace")
    else:
        text = args["text"]
    clipped = text[:MAX_INPUT_CHARS]
    ctx.progress(0.0, "summarizing")
    reply = ctx.model("summarize").generate(
        f"Summarize the following text in two or three sentences.\n\n{clipped}",
        system="You write short, faithful summaries.",
        max_tokens=int(args.get("max_tokens", 128)),
    )
    return {
        "summary": reply.text.strip(),
        "input_chars": len(text),
        "clipped": len(text) > len(clipped),
        **_served(reply),
    }


def _classify(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    labels: list[str] = args["labels"]
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": labels}},
        "required": ["label"],
    }
    reply = ctx.model("classify").generate(
        "Classify the text with exactly one of these labels: "
        + ", ".join(labels)
        + f'. Answer as JSON {{"label": ...}}.\n\nText: {args["text"][:MAX_INPUT_CHARS]}',
        max_tokens=32,
        json_schema=schema,
    )
    label = reply.json().get("label")
    if label not in labels:
        raise ValueError(f"the model answered {label!r}, not one of the labels")
    return {"label": label, **_served(reply)}
