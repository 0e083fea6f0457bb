"""Built-in `ci_alert` plugin: POST a JSON alert to a webhook when the failure rate is too high."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from edgefleet.plugin_context import PluginContext
from edgefleet.pluginkit.actions import dispatch

DEFAULT_THRESHOLD = 0.2
DEFAULT_TIMEOUT_S = 10.0
EVENT = "edgefleet.ci.failure_rate"


class AlertError(RuntimeError):
    """The webhook could not be reached or refused the alert."""


def run(ctx: PluginContext, action: str, args: dict[str, Any]) -> dict[str, Any]:
    """Entry point named in plugin.yaml."""
    return dispatch(ctx, action, args, plugin="ci_alert", actions={"webhook": webhook})


def _not_sent(reason: str, url: str | None) -> dict[str, Any]:
    return {"alerted": False, "reason": reason, "status": None, "url": url}


def alert_text(summary: dict[str, Any], rate: float, threshold: float) -> str:
    tests = summary.get("tests") or {}
    where = f"{summary.get('repo', 'repository')} @ {str(summary.get('head') or '')[:12]}".strip(" @")
    return (
        f"CI alert for {where}: test failure rate {rate * 100:.1f}% is above {threshold * 100:.1f}% "
        f"({tests.get('failed', 0)} failed, {tests.get('errors', 0)} errors, {tests.get('passed', 0)} passed; "
        f"{summary.get('lint_issues', 0)} lint issues)"
    )


def webhook(ctx: PluginContext, args: dict[str, Any]) -> dict[str, Any]:
    url = args.get("url")
    rate = args.get("failure_rate")
    threshold = float(args.get("threshold", DEFAULT_THRESHOLD))
    timeout = float(args.get("timeout", DEFAULT_TIMEOUT_S))
    summary = args.get("summary") or {}
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise ValueError(f"failure_rate: must be a number from 0 to 1, got {rate!r}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold: must be a number from 0 to 1, got {threshold!r}")
    if not isinstance(summary, dict):
        raise ValueError("summary: must be an object")
    if url is not None:
        parts = urlsplit(str(url))
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url: must be an http:// or https:// URL, got {url!r}")

    if not url:
        return _not_sent("no alert url given", None)
    if summary.get("changed") is False:
        return _not_sent("no new commits", url)
    if rate <= threshold:
        return _not_sent(f"failure rate {rate:.4g} is not above the threshold {threshold:.4g}", url)

    body = {
        "event": EVENT,
        "job_id": ctx.job_id,
        "text": alert_text(summary, float(rate), threshold),
        "failure_rate": rate,
        "threshold": threshold,
        "summary": summary,
    }
    ctx.check_cancelled()
    try:
        response = httpx.post(
            url,
            json=body,
            timeout=min(timeout, max(0.5, ctx.time_left())),
            headers={"User-Agent": "edgefleet-ci-alert/1.0"},
        )
    except httpx.HTTPError as exc:
        raise AlertError(f"POST {url} failed: {type(exc).__name__}: {exc}") from None
    if response.status_code >= 400:
        raise AlertError(f"POST {url} answered HTTP {response.status_code} {response.reason_phrase}".rstrip())
    ctx.progress(1.0, f"alert sent ({response.status_code})")
    return {
        "alerted": True,
        "reason": f"failure rate {rate:.4g} is above the threshold {threshold:.4g}",
        "status": response.status_code,
        "url": url,
    }
