"""Download a GGUF model file over HTTP(S): resumable, hash-checked, written atomically.

A name ``owner/repo/path/file.gguf`` is fetched from a hub with Hugging Face's URL layout,
``<hub>/owner/repo/resolve/<revision>/path/file.gguf``; any http(s) URL works too. The bytes go to
``<file>.part`` (resumed with an HTTP Range request on the next try or run; a server that ignores
the range restarts it from zero) and become ``<file>`` by a rename only once the size, the GGUF magic
and every known SHA-256 (the caller's, the hub's ``X-Linked-Etag``/``ETag``) check out.

The name, the URL and everything the server says are untrusted: the file name is one plain
``*.gguf`` component (never a path), only http and https are fetched, credentials in a URL are refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import httpx
import yaml

from edgefleet.artifact_files import hash_into
from edgefleet.models.config import GGUF_MAGIC

CHUNK_BYTES = 1 << 20
DEFAULT_REVISION = "main"
# One path component of a hub name: no "..", no separators, no leading dot or dash.
SEGMENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*\.gguf$", re.IGNORECASE)
REVISION_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
UNSATISFIED_RANGE_RE = re.compile(r"^bytes \*/(\d+)$")
# Statuses worth another try (the server's trouble, not the request's).
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

ProgressCallback = Callable[[int, int | None], None]


class PullError(Exception):
    """A download failed or was refused. `field` names what was wrong; `bad_input`: the caller's mistake."""

    def __init__(self, field: str, reason: str, *, bad_input: bool = False) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.bad_input = bad_input


@dataclass
class PullResult:
    path: Path
    size: int
    sha256: str
    url: str
    resumed_from: int = 0  # bytes already on disk when this run started
    checked_against: list[str] = field(default_factory=list)  # where the expected hashes came from


# -- names and URLs ------------------------------------------------------------------------


def hub_url(name: str, hub: str, revision: str = DEFAULT_REVISION) -> str:
    """The download URL of ``owner/repo/path/file.gguf`` on `hub` (Hugging Face's layout)."""
    parts = name.split("/")
    if len(parts) < 3:
        raise PullError(
            "name", "give owner/repo/file.gguf (a file in a hub repository) or an http(s) URL", bad_input=True
        )
    for part in parts:
        if not SEGMENT_RE.match(part):
            raise PullError("name", f"{part!r} is not a plain path component (letters, digits, . _ -)", bad_input=True)
    if not REVISION_RE.match(revision):
        raise PullError("--revision", "a branch, tag or commit: letters, digits, . _ -", bad_input=True)
    check_url(hub, field="hub")
    owner, repo, rest = parts[0], parts[1], "/".join(parts[2:])
    return f"{hub.rstrip('/')}/{owner}/{repo}/resolve/{revision}/{rest}"


def check_url(url: str, *, field: str = "--url") -> str:
    """`url` if it is http(s) with a host and no credentials; `PullError` naming `field` otherwise."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise PullError(field, f"not a valid URL ({exc})", bad_input=True) from None
    if parts.scheme not in ("http", "https"):
        raise PullError(field, "only http:// and https:// URLs are fetched", bad_input=True)
    if not parts.hostname:
        raise PullError(field, "the URL has no host", bad_input=True)
    if parts.username is not None or parts.password is not None:
        # They would end up in logs and shell history; a hub token belongs in a header.
        raise PullError(field, "credentials in the URL are not accepted", bad_input=True)
    return url


def file_name_for(url: str, output: str | None = None) -> str:
    """The local file name: `output`, else the URL path's last component; one plain ``*.gguf`` name."""
    if output is not None:
        name, where = output, "--output"
    else:
        name, where = unquote(urlsplit(url).path.rsplit("/", 1)[-1]), "url"
    if not FILE_NAME_RE.match(name) or name in (".", ".."):
        hint = "" if where == "--output" else " (name it with --output NAME.gguf)"
        raise PullError(
            where,
            f"{name!r} is not a plain file name ending in .gguf (letters, digits, . _ + -){hint}",
            bad_input=True,
        )
    return name


def check_sha256(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    if not SHA256_RE.match(value):
        raise PullError("--sha256", "64 hexadecimal digits", bad_input=True)
    return value


def _hub_hashes(response: httpx.Response) -> dict[str, str]:
    """SHA-256 digests the server chain vouches for: a hub's X-Linked-Etag, or an ETag that is one."""
    found: dict[str, str] = {}
    for resp in [*response.history, response]:
        for header in ("x-linked-etag", "etag"):
            value = resp.headers.get(header)
            if not value:
                continue
            value = value.strip()
            value = value.removeprefix("W/").strip('"').lower()
            if SHA256_RE.match(value):
                found.setdefault(f"the server's {header.title()} header", value)
    return found


def _hub_size(response: httpx.Response) -> int | None:
    for resp in [*response.history, response]:
        value = resp.headers.get("x-linked-size")
        if value and value.isdigit():
            return int(value)
    return None


# -- the download ----------------------------------------------------------------------------


@dataclass
class _Part:
    """The `.part` file, locked for this process, with the running hash of what it holds."""

    path: Path
    handle: IO[bytes]
    hasher: Any
    size: int

    def restart(self) -> None:
        self.handle.truncate(0)
        self.handle.seek(0)
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.hasher.update(data)
        self.size += len(data)

    def head(self) -> bytes:
        self.handle.flush()
        with open(self.path, "rb") as f:
            return f.read(len(GGUF_MAGIC))


@contextlib.contextmanager
def _open_part(path: Path) -> Iterator[_Part]:
    handle = open(path, "ab")  # noqa: SIM115 - held (and locked) for the whole download
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PullError("destination", f"another download is writing {path}") from None
        hasher = hashlib.sha256()
        size = hash_into(hasher, path)
        yield _Part(path, handle, hasher, size)
    finally:
        handle.close()


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_meta(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _discard(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def pull(
    url: str,
    dest_dir: Path,
    *,
    file_name: str | None = None,
    sha256: str | None = None,
    force: bool = False,
    retries: int = 3,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
    on_progress: ProgressCallback | None = None,
    retry_wait: float = 1.0,
) -> PullResult:
    """Download `url` to ``dest_dir/file_name``; `PullError` when it cannot be done or does not check out.

    A connection that drops is resumed from the bytes already written, up to `retries` more times
    within this call; a `.part` left behind by a failed run is resumed by the next run of the same URL.
    """
    check_url(url)
    file_name = file_name_for(url, file_name)
    expected = check_sha256(sha256)
    dest_dir = Path(dest_dir).expanduser()
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PullError("--dir", f"cannot create {dest_dir}: {exc.strerror or exc}", bad_input=True) from None
    dest = dest_dir / file_name
    if dest.resolve().parent != dest_dir.resolve():  # cannot happen with a checked name; cheap to be sure
        raise PullError("name", "the file would land outside the models folder", bad_input=True)
    if dest.exists() and not force:
        raise PullError("destination", f"{dest} already exists (pass --force to download it again)", bad_input=True)
    part_path = dest.with_name(dest.name + ".part")
    meta_path = _meta_path(part_path)
    meta = _read_meta(meta_path)
    if part_path.exists() and meta.get("url") != url:
        _discard(part_path)  # a partial of some other URL is no use
        meta = {}

    with _open_part(part_path) as part, httpx.Client(timeout=timeout, follow_redirects=True) as client:
        resumed_from = part.size
        hub_hashes: dict[str, str] = {}
        total: int | None = meta.get("total") if isinstance(meta.get("total"), int) else None
        failures = 0
        while True:
            try:
                hub_hashes_now, total_now = _fetch(client, url, part, meta, headers or {}, on_progress)
            except _Retry as exc:
                failures += 1
                if failures > retries:
                    kept = f"; {part.size} bytes kept in {part_path}: run again to resume" if part.size else ""
                    _discard_if_empty(part, meta_path)
                    raise PullError("download", f"{exc}{kept}") from None
                time.sleep(retry_wait * failures)
                continue
            except PullError:
                _discard_if_empty(part, meta_path)
                raise
            hub_hashes.update(hub_hashes_now)
            total = total_now if total_now is not None else total
            break

        part.handle.flush()
        os.fsync(part.handle.fileno())
        if total is not None and part.size != total:
            raise PullError("download", f"got {part.size} bytes of {total}; run again to resume")
        if part.head() != GGUF_MAGIC:
            _discard(part_path, meta_path)
            raise PullError("url", "the file is not a GGUF model (it does not start with 'GGUF'); nothing was kept")
        digest = part.hasher.hexdigest()
        checks = {**({"--sha256": expected} if expected else {}), **hub_hashes}
        for source, want in checks.items():
            if digest != want:
                _discard(part_path, meta_path)
                raise PullError(
                    "sha256",
                    f"the download's SHA-256 is {digest} but {source} says {want}; the partial file was deleted",
                )
        if dest.exists() and not force:
            raise PullError("destination", f"{dest} appeared meanwhile (pass --force to replace it)", bad_input=True)
        os.replace(part_path, dest)
        _discard(meta_path)
    _fsync_dir(dest_dir)
    return PullResult(dest, part.size, digest, url, resumed_from, list(checks))


def _discard_if_empty(part: _Part, meta_path: Path) -> None:
    """A failure before any byte arrived leaves nothing behind (a partial with bytes is kept to resume)."""
    if part.size == 0:
        _discard(part.path, meta_path)


class _Retry(Exception):
    """This attempt failed in a way another attempt (resuming) may fix."""


def _fetch(
    client: httpx.Client,
    url: str,
    part: _Part,
    meta: dict[str, Any],
    extra_headers: dict[str, str],
    on_progress: ProgressCallback | None,
) -> tuple[dict[str, str], int | None]:
    """One GET to the end of the file. Returns (hub hashes, total size); raises `_Retry` or `PullError`."""
    offset = part.size
    headers = {**extra_headers, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("validator"):
            # The server sends the whole file instead if it changed since the partial was written.
            headers["If-Range"] = str(meta["validator"])
    try:
        with client.stream("GET", url, headers=headers) as response:
            final_url = str(response.url)
            if urlsplit(url).scheme == "https" and response.url.scheme != "https":
                raise PullError("url", "redirected from https to plain http: refused")
            status = response.status_code
            hashes = _hub_hashes(response)
            total = _hub_size(response)
            if status == 416 and offset:
                match = UNSATISFIED_RANGE_RE.match(response.headers.get("content-range", ""))
                if match and int(match.group(1)) == offset:
                    return hashes, offset  # the partial was already whole
                part.restart()
                raise _Retry("the server refused to resume the partial download; starting over")
            if status in RETRY_STATUSES:
                raise _Retry(f"HTTP {status} from {urlsplit(final_url).hostname}")
            if status not in (200, 206):
                raise PullError("url", f"HTTP {status} from {urlsplit(final_url).hostname}")
            if status == 206:
                match = CONTENT_RANGE_RE.match(response.headers.get("content-range", ""))
                if not match or int(match.group(1)) != offset:
                    part.restart()
                    raise _Retry("the server answered a different range than asked; starting over")
                if match.group(3) != "*":
                    total = int(match.group(3))
            else:
                if offset:
                    part.restart()  # it ignored the Range (or the file changed): the whole file follows
                length = response.headers.get("content-length")
                if length and length.isdigit():
                    total = int(length)
            validator = response.headers.get("etag") or response.headers.get("last-modified")
            meta.update({"url": url, "validator": validator, "total": total})
            _write_meta(_meta_path(part.path), meta)
            if on_progress is not None:
                on_progress(part.size, total)
            checked_magic = part.size >= len(GGUF_MAGIC)
            for chunk in response.iter_raw():  # as it arrives: a drop loses nothing received
                part.write(chunk)
                if not checked_magic and part.size >= len(GGUF_MAGIC):
                    checked_magic = True
                    if part.head() != GGUF_MAGIC:
                        # Often an HTML error or login page served with 200: stop before downloading it all.
                        _discard(part.path, _meta_path(part.path))
                        raise PullError(
                            "url", "the server did not send a GGUF model (no 'GGUF' magic); nothing was kept"
                        )
                if on_progress is not None:
                    on_progress(part.size, total)
            return hashes, total
    except httpx.UnsupportedProtocol:
        raise PullError("url", "redirected to a URL that is not http(s): refused") from None
    except httpx.TransportError as exc:
        raise _Retry(f"connection to {urlsplit(url).hostname} failed: {type(exc).__name__}: {exc}") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- registering the file --------------------------------------------------------------------


def add_to_models_file(models_file: Path, name: str, path: Path) -> None:
    """Add ``name: {backend: llama_cpp, path: <path>}`` under `models:` of `models_file`, keeping the rest.

    The line is inserted into the text (comments and layout stay); the result must parse to exactly
    the old registry plus the new model, else nothing is written. A missing file is created.
    """
    from edgefleet.models.config import NAME_RE, ModelsConfig
    from edgefleet.models.errors import ModelsConfigError

    if not NAME_RE.match(name):
        raise PullError("--add", "a model name uses letters, digits and _ . : -", bad_input=True)
    entry = {"backend": "llama_cpp", "path": str(path)}
    line = f"{name}: {json.dumps(entry)}"  # JSON is valid YAML flow style, and quotes the path safely
    models_file = Path(models_file).expanduser()
    if models_file.exists():
        text = models_file.read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise PullError("--add", f"{models_file} is not a mapping")
        models = data.get("models") or {}
        if not isinstance(models, dict):
            raise PullError("--add", f"models: in {models_file} is not a mapping")
        if name in models:
            raise PullError("--add", f"model {name!r} is already in {models_file}", bad_input=True)
        new_text = _insert_model_line(text, line)
        if new_text is None:
            raise PullError("--add", f"cannot place the model in {models_file} safely; add this under models: {line}")
    else:
        data, new_text = {}, f"models:\n  {line}\n"
    try:
        ModelsConfig.parse(yaml.safe_load(new_text))
    except (ModelsConfigError, yaml.YAMLError) as exc:
        raise PullError("--add", f"the models file would not be valid: {exc}") from None
    expected = {**data, "models": {**(data.get("models") or {}), name: entry}}
    if yaml.safe_load(new_text) != expected:
        raise PullError("--add", f"cannot place the model in {models_file} safely; add this under models: {line}")
    tmp = models_file.with_name(models_file.name + ".tmp")
    models_file.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(new_text)
    os.replace(tmp, models_file)


def _insert_model_line(text: str, line: str) -> str | None:
    """`text` with `line` as the first entry of its block-style top-level `models:`; None if there is none."""
    lines = text.splitlines(keepends=True)
    for i, current in enumerate(lines):
        stripped = current.split("#", 1)[0].rstrip()
        if stripped == "models:":
            indent = "  "
            for following in lines[i + 1 :]:
                if following.strip() and not following.lstrip().startswith("#"):
                    width = len(following) - len(following.lstrip(" "))
                    if width:
                        indent = " " * width
                    break
            newline = "" if current.endswith("\n") else "\n"
            return "".join([*lines[: i + 1], newline, f"{indent}{line}\n", *lines[i + 1 :]])
    if not any(ln.startswith("models") for ln in lines):
        return text + ("" if not text or text.endswith("\n") else "\n") + f"models:\n  {line}\n"
    return None
