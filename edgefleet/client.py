"""A small synchronous client for the router's HTTP API (used by the CLI; usable from any script).

    from edgefleet.client import Client

    with Client("http://127.0.0.1:8700", token="...") as client:
        job = client.submit({"template": "text-report", "inputs": {"text": "a b a"}})
        done = client.wait(job.id, timeout=60)
        print(done.state, [st.output for st in done.subtasks])

Every non-2xx answer raises `ApiError` (status, error code, field-level detail);
a router that cannot be reached raises `RouterUnreachable`.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx

from edgefleet.artifact_files import CHUNK, extract_tree, write_tree
from edgefleet.schedule_schemas import ScheduleStatus
from edgefleet.schemas import ArtifactInfo, JobPage, JobState, JobStatus, NodeInfo

if TYPE_CHECKING:
    from edgefleet.settings import Settings

BATCH_MAX_JOBS = 500  # the router's default EDGEFLEET_BATCH_MAX_JOBS: jobs per POST /v1/jobs:batch
TOKEN_FILE = "token"  # <data_dir>/token, written by `edgefleet up` (mode 0600)
ROUTER_URL_FILE = "router_url"  # <data_dir>/router_url, written by `edgefleet up` while it runs


class ClientError(Exception):
    """Base class of the errors this client raises."""


class ApiError(ClientError):
    """The router answered with an error: `status`, an `error` code and `detail` items.

    `str(err)` is one line, e.g. `422 invalid_plan: steps.0.plugin: unknown plugin 'x'`.
    """

    def __init__(self, status: int, error: str, detail: list[dict[str, str]] | None = None) -> None:
        self.status = status
        self.error = error
        self.detail: list[dict[str, str]] = list(detail or [])
        super().__init__(str(self))

    @property
    def problems(self) -> list[str]:
        """Each detail item as `field: reason` (or just the reason when it names no field)."""
        out = []
        for item in self.detail:
            field = str(item.get("field") or "").strip()
            reason = " ".join(str(item.get("reason") or "").split())
            out.append(f"{field}: {reason}" if field else reason)
        return out

    def __str__(self) -> str:
        problems = "; ".join(p for p in self.problems if p)
        return f"{self.status} {self.error}" + (f": {problems}" if problems else "")

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            detail = body.get("detail")
            items: list[dict[str, str]] = []
            if isinstance(detail, list):
                for item in detail:
                    if isinstance(item, dict):
                        items.append({"field": str(item.get("field", "")), "reason": str(item.get("reason", ""))})
                    else:
                        items.append({"field": "", "reason": str(item)})
            elif detail is not None:
                items.append({"field": "", "reason": str(detail)})
            return cls(response.status_code, body["error"], items)
        text = " ".join(response.text.split())[:200] or response.reason_phrase
        return cls(response.status_code, "http_error", [{"field": "", "reason": text}])


class RouterUnreachable(ClientError):
    """No HTTP answer at all: the router is not running, or the URL is wrong."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot reach the router at {url}: {reason}")


class WaitTimeout(ClientError):
    """`Client.wait` gave up before the job finished; `status` is the last one seen."""

    def __init__(self, job_id: str, timeout: float, status: JobStatus | None) -> None:
        self.job_id = job_id
        self.status = status
        super().__init__(f"job {job_id} still running after {timeout:g}s")


@dataclass(frozen=True)
class BatchItem:
    """One job of `Client.submit_many`, at its index among the bodies given: its job, or why not."""

    index: int
    status: int  # as POST /v1/jobs would answer: 201 created, 200 an existing job (its key), else 4xx/5xx
    id: str | None = None
    created: bool = False
    state: JobState | None = None
    error: ApiError | None = None  # fields named from the bodies given: `jobs.<index>.steps.0.plugin`

    @property
    def ok(self) -> bool:
        return self.error is None


_JOB_FIELD = re.compile(r"^jobs\.(\d+)")


def _batch_items(answer: dict[str, Any], offset: int) -> list[BatchItem]:
    """The router's batch answer for one chunk, indexes (and the fields naming them) from `offset`."""

    def renumber(field: str) -> str:
        return _JOB_FIELD.sub(lambda m: f"jobs.{int(m.group(1)) + offset}", field)

    items = []
    for raw in answer["results"]:
        error = None
        if raw.get("error"):
            detail = [
                {"field": renumber(str(d.get("field", ""))), "reason": str(d.get("reason", ""))} for d in raw["detail"]
            ]
            error = ApiError(int(raw["status"]), str(raw["error"]), detail)
        state = JobState(raw["state"]) if raw.get("state") else None
        index = int(raw["index"]) + offset
        items.append(BatchItem(index, int(raw["status"]), raw.get("id"), bool(raw.get("created")), state, error))
    return items


def read_token_file(data_dir: Path) -> str | None:
    """The admin token `edgefleet up` wrote for this box, if any."""
    path = Path(data_dir) / TOKEN_FILE
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


def read_router_url_file(data_dir: Path) -> str | None:
    path = Path(data_dir) / ROUTER_URL_FILE
    try:
        url = path.read_text().strip()
    except OSError:
        return None
    return url or None


def resolve_connection(settings: Settings, url: str | None = None, token: str | None = None) -> tuple[str, str | None]:
    """Router URL and token: explicit values, then settings (env/YAML), then `edgefleet up`'s files."""
    if not url:
        if "router_url" in settings.model_fields_set:
            url = settings.router_url
        else:
            url = read_router_url_file(settings.data_dir) or settings.router_url
    if not token:
        if settings.token is not None and settings.token.get_secret_value():
            token = settings.token.get_secret_value()
        else:
            token = read_token_file(settings.data_dir)
    return url, token


class Client:
    """Synchronous client of the router API; a context manager (or call `close()`)."""

    def __init__(self, base_url: str, token: str | None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": "edgefleet-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    @classmethod
    def from_settings(
        cls, settings: Settings, url: str | None = None, token: str | None = None, timeout: float = 30.0
    ) -> Client:
        """URL from `url`, EDGEFLEET_ROUTER_URL or `up`'s file; token from `token`, EDGEFLEET_TOKEN or `up`'s file."""
        base_url, resolved_token = resolve_connection(settings, url, token)
        return cls(base_url, resolved_token, timeout=timeout)

    # --- plumbing -----------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise RouterUnreachable(self.base_url, str(exc) or type(exc).__name__) from exc
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return response

    # --- API ----------------------------------------------------------------------------

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> JobStatus:
        """POST /v1/jobs; a repeated idempotency key returns the job it created first."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return JobStatus.model_validate(self._request("POST", "/v1/jobs", json=body, headers=headers).json())

    def submit_many(
        self,
        bodies: Sequence[dict[str, Any]],
        chunk_size: int = BATCH_MAX_JOBS,
        on_progress: Callable[[int, int], None] | None = None,
        on_items: Callable[[builtins.list[BatchItem]], None] | None = None,
    ) -> builtins.list[BatchItem]:
        """POST /v1/jobs:batch, `chunk_size` jobs per request: one BatchItem per body, in order.

        A body may carry its own `idempotency_key` (a resubmitted chunk then makes no second
        job). A refused job refuses only itself: its item has `error`, the others their `id`.
        `chunk_size` must not exceed the router's EDGEFLEET_BATCH_MAX_JOBS (default 500).
        After each chunk: `on_items(its items)`, then `on_progress(done, total)`. A chunk refused
        as a whole (or an unreachable router) raises ApiError (RouterUnreachable) then; the chunks
        before it were submitted, and `on_items` has seen them."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        items: list[BatchItem] = []
        for offset in range(0, len(bodies), chunk_size):
            chunk = list(bodies[offset : offset + chunk_size])
            answer = self._request("POST", "/v1/jobs:batch", json={"jobs": chunk}).json()
            chunk_items = _batch_items(answer, offset)
            items += chunk_items
            if on_items is not None:
                on_items(chunk_items)
            if on_progress is not None:
                on_progress(len(items), len(bodies))
        return items

    def get(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def list(self, state: JobState | str | None = None, limit: int = 50, cursor: str | None = None) -> JobPage:
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = state.value if isinstance(state, JobState) else state
        if cursor is not None:
            params["cursor"] = cursor
        return JobPage.model_validate(self._request("GET", "/v1/jobs", params=params).json())

    def cancel(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._request("DELETE", f"/v1/jobs/{job_id}").json())

    def workers(self) -> builtins.list[NodeInfo]:  # `list` is a method name in this class
        return [NodeInfo.model_validate(item) for item in self._request("GET", "/v1/workers").json()]

    def bench_workers(self) -> dict[str, Any]:
        """Ask every node to benchmark again (admin): `{request, nodes}`; see NodeInfo.bench.request."""
        return cast(dict[str, Any], self._request("POST", "/v1/workers/bench").json())

    def gc(self, older_than: float | None = None, limit: int | None = None) -> dict[str, Any]:
        """Remove finished jobs past their retention now (admin): one batch, `{removed, remaining}`."""
        body = {k: v for k, v in (("older_than", older_than), ("limit", limit)) if v is not None}
        return cast(dict[str, Any], self._request("POST", "/v1/admin/gc", json=body).json())

    def plugins(self) -> dict[str, Any]:
        return cast(dict[str, Any], self._request("GET", "/v1/plugins").json())

    # --- artifacts ------------------------------------------------------------------------

    def upload(
        self, path: str | Path, name: str | None = None, on_progress: Callable[[int, int], None] | None = None
    ) -> ArtifactInfo:
        """POST /v1/artifacts, streamed: a file as it is, a folder as one tar (kind `tree`, unpacked
        as a folder where a step reads it). Use the answer in args as `{"$artifact": info.id}`.
        `on_progress(sent, total)` is called as bytes go out."""
        source = Path(path)
        if not source.is_dir():
            return self._upload_file(source, name or source.name, "file", on_progress)
        with tempfile.TemporaryDirectory(prefix="edgefleet-upload-") as staging:
            tar = Path(staging) / "tree.tar"
            with open(tar, "wb") as out:
                write_tree(source, out)
            return self._upload_file(tar, name or source.resolve().name, "tree", on_progress)

    def _upload_file(
        self, path: Path, name: str, kind: str, on_progress: Callable[[int, int], None] | None
    ) -> ArtifactInfo:
        total = path.stat().st_size

        def body() -> Iterator[bytes]:
            sent = 0
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    sent += len(chunk)
                    yield chunk
                    if on_progress is not None:
                        on_progress(sent, total)

        response = self._request(
            "POST",
            "/v1/artifacts",
            params={"name": name, "kind": kind},
            content=body(),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(total)},
        )
        return ArtifactInfo.model_validate(response.json())

    def artifacts(self, job_id: str) -> builtins.list[ArtifactInfo]:
        """GET /v1/jobs/{id}/artifacts: the files the job's steps produced."""
        return [ArtifactInfo.model_validate(a) for a in self._request("GET", f"/v1/jobs/{job_id}/artifacts").json()]

    def download(
        self,
        artifact_id: str,
        dest: str | Path,
        on_progress: Callable[[int, int], None] | None = None,
        kind: str | None = None,
    ) -> Path:
        """GET /v1/artifacts/{id}, streamed to `dest` and checked against its sha256 (a mismatch
        raises ClientError and leaves nothing at `dest`). A folder artifact (kind `tree`) is
        unpacked into the folder `dest`. `on_progress(received, total)` as bytes arrive."""
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        partial = Path(partial_name)
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with self._http.stream("GET", f"/v1/artifacts/{artifact_id}") as response:
                        if response.status_code >= 400:
                            response.read()
                            raise ApiError.from_response(response)
                        kind = kind or response.headers.get("x-artifact-kind", "file")
                        total = int(response.headers.get("content-length") or 0)
                        received = 0
                        for chunk in response.iter_bytes(CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                            received += len(chunk)
                            if on_progress is not None:
                                on_progress(received, total)
                except httpx.TransportError as exc:
                    raise RouterUnreachable(self.base_url, str(exc) or type(exc).__name__) from exc
            if digest.hexdigest() != artifact_id:
                raise ClientError(f"artifact {artifact_id} arrived corrupt (sha256 {digest.hexdigest()})")
            if kind == "tree":
                extract_tree(partial, target)
            else:
                os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def healthz(self) -> dict[str, Any]:
        try:
            response = self._http.get("/healthz")
        except httpx.TransportError as exc:
            raise RouterUnreachable(self.base_url, str(exc) or type(exc).__name__) from exc
        if response.status_code >= 400 and response.status_code != 503:
            raise ApiError.from_response(response)
        return cast(dict[str, Any], response.json())

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[dict[str, Any]]:
        """The job's server-sent events, in order, until the job ends (each event a dict).

        Each dict has `type` (e.g. `job`, `subtask`), `ts`, and, as the router sends
        them, `subtask`, `state` and more; `id` is the stream id (usable as
        `last_event_id` to resume).
        """
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        # No read timeout: the router pings every 15 s, the stream ends with the job.
        timeout = httpx.Timeout(self._http.timeout.connect or 30.0, read=None)
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError.from_response(response)
                yield from _parse_sse(response.iter_lines())
        except httpx.TransportError as exc:
            raise RouterUnreachable(self.base_url, str(exc) or type(exc).__name__) from exc

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_update: Callable[[JobStatus], None] | None = None,
        poll_interval: float = 0.2,
        max_poll_interval: float = 1.0,
    ) -> JobStatus:
        """Poll the job until it reaches a terminal state; return its final status.

        `on_update` is called with the first status and each status that differs
        from the one before. Raises `WaitTimeout` after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = poll_interval
        last_fingerprint: str | None = None
        status: JobStatus | None = None
        while True:
            status = self.get(job_id)
            fingerprint = status.model_dump_json(exclude={"updated_at"})
            if fingerprint != last_fingerprint:
                last_fingerprint = fingerprint
                interval = poll_interval
                if on_update is not None:
                    on_update(status)
            else:
                interval = min(max_poll_interval, interval * 1.5)
            if status.state.terminal:
                return status
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(job_id, timeout or 0.0, status)
                time.sleep(min(interval, left))
            else:
                time.sleep(interval)

    # --- schedules ------------------------------------------------------------------------

    def create_schedule(self, body: dict[str, Any]) -> ScheduleStatus:
        """POST /v1/schedules: `job` (a job body) with `cron` or `interval_s`, and its policies."""
        return ScheduleStatus.model_validate(self._request("POST", "/v1/schedules", json=body).json())

    def schedules(self, limit: int = 100) -> builtins.list[ScheduleStatus]:
        answer = self._request("GET", "/v1/schedules", params={"limit": limit}).json()
        return [ScheduleStatus.model_validate(item) for item in answer["schedules"]]

    def schedule(self, schedule_id: str, runs: int = 20) -> ScheduleStatus:
        """One schedule with its next fire times and its last `runs` runs (newest first)."""
        answer = self._request("GET", f"/v1/schedules/{schedule_id}", params={"runs": runs}).json()
        return ScheduleStatus.model_validate(answer)

    def pause_schedule(self, schedule_id: str) -> ScheduleStatus:
        return ScheduleStatus.model_validate(self._request("POST", f"/v1/schedules/{schedule_id}/pause").json())

    def resume_schedule(self, schedule_id: str) -> ScheduleStatus:
        return ScheduleStatus.model_validate(self._request("POST", f"/v1/schedules/{schedule_id}/resume").json())

    def delete_schedule(self, schedule_id: str) -> None:
        self._request("DELETE", f"/v1/schedules/{schedule_id}")


def _parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-sent events (text/event-stream) to dicts; comments and pings are skipped."""
    event_type: str | None = None
    event_id: str | None = None
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r")
        if line == "":
            if data:
                payload = "\n".join(data)
                try:
                    parsed = json.loads(payload)
                except ValueError:
                    parsed = {"data": payload}
                event = parsed if isinstance(parsed, dict) else {"data": parsed}
                event.setdefault("type", event_type or "message")
                if event_id is not None:
                    event["id"] = event_id
                yield event
            event_type, event_id, data = None, None, []
            continue
        if line.startswith(":"):
            continue  # a comment: sse-starlette's keep-alive ping
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id":
            event_id = value


__all__ = [
    "ApiError",
    "BatchItem",
    "Client",
    "ClientError",
    "RouterUnreachable",
    "WaitTimeout",
    "read_token_file",
    "resolve_connection",
]
