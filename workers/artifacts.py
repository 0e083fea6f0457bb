"""The node's side of artifacts: store what a step produced, fetch what a step needs.

**What becomes an artifact.** When an attempt succeeds, every string in its output that is an
absolute path whose real location (links resolved) lies inside the attempt's workspace and is
a regular file or a folder. A file is stored as it is; a folder as one `tree` artifact (a
deterministic tar, edgefleet.artifact_files). Each is uploaded to the backend and recorded in
the job store, all before the attempt reports success, so a box that dies afterwards loses
nothing.

Each byte is read once: with the router backend a file is hashed while it is sent, and the
router, which hashes what it receives, answers the id it stored it under; the node records it
only if that is the id it computed (else the attempt fails, retryably). The price: a file the
router already holds is sent again (the router keeps its one copy); skipping that would need
its hash first, a second read of every output every time. A folder's tar is hashed while it is
written, so its id is known before it is sent and one already stored is not sent again; so is
a file with the S3 backend, which names objects by id before upload.

**What a step gets.** Before an attempt starts, each string of its resolved args that names an
artifact of its job (the path, or a path inside a folder artifact), and each
`{"$artifact": id}`, gets a local copy:
- the original, untouched, when this box produced it and it is still there (nothing copied);
- else the box's cache, `<workspace_dir>/.artifacts/<id>`: a cached copy is hashed again before
  each use (a corrupt one is dropped and fetched again); a fetched one is streamed, hashed and
  kept only if its sha256 is its id, else the attempt fails, retryably, and nothing reaches the
  plugin. The copy the step sees is `<job dir>/.artifacts/<id>/<name>`: a hard link to the
  cached file (a folder: unpacked there), so it lies in the job folder that every sandbox
  already may read (bubblewrap binds it, Landlock allows it), and files that name other files
  of the job by path (the photo manifests) keep working on this box.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from edgefleet.artifact_files import (
    CHUNK,
    UnsafeTree,
    extract_tree,
    node_credential,
    sha256_file,
    write_tree,
)
from edgefleet.client import read_router_url_file, resolve_connection
from edgefleet.refs import ARTIFACT_KEY, RefError, find_artifacts, is_artifact
from edgefleet.schemas import ArtifactInfo, SubtaskEnvelope
from edgefleet.settings import Settings
from edgefleet.store import JobStore

log = logging.getLogger(__name__)

MIB = 1024 * 1024
KEEP_ALIVE_EVERY = 1.0  # seconds between lease renewals during a long transfer
TRANSFER_TRIES = 3
JOB_INPUTS = ".artifacts"  # <job dir>/.artifacts/<id>/<name>: the copies a job's steps read


class ArtifactFailure(Exception):
    """An attempt cannot go on because of its artifacts; `retryable` says whether to try again."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class AttemptLost(ArtifactFailure):
    """The lease was lost during a transfer: another attempt owns the subtask now."""


KeepAlive = Callable[[], bool]
ArtifactKind = Literal["file", "tree"]


@dataclass(frozen=True)
class _Output:
    """An output to store: `blob` is what is sent (a folder's tar); `id` None until it is sent."""

    path: Path
    kind: ArtifactKind
    blob: Path
    id: str | None
    size: int


class _Ticker:
    """Calls `keep_alive` (renew the lease) at most every KEEP_ALIVE_EVERY seconds of a transfer."""

    def __init__(self, keep_alive: KeepAlive | None) -> None:
        self.keep_alive = keep_alive
        self.last = time.monotonic()

    def __call__(self, *_: object) -> None:
        if self.keep_alive is None or time.monotonic() - self.last < KEEP_ALIVE_EVERY:
            return
        self.last = time.monotonic()
        if not self.keep_alive():
            raise AttemptLost("the attempt lost its lease while moving artifacts")


# --- where the bytes go -------------------------------------------------------------------------


def router_url_for(settings: Settings, store: JobStore) -> str:
    """The router's URL for this box: configured (EDGEFLEET_ROUTER_URL, `edgefleet up`'s file, a join),
    else what the router published in the job store, else its broker's host on the router's port."""
    if "router_url" in settings.model_fields_set or read_router_url_file(settings.data_dir):
        return resolve_connection(settings)[0]
    endpoint = store.nodes.router_endpoint()
    if endpoint is None:
        return settings.router_url
    port, advertised = endpoint
    if advertised:
        return advertised
    host = urlsplit(settings.redis_url).hostname or "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _HashingWriter:
    """Writes through to `out`, hashing and counting on the way: one pass over the bytes."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> int:
        self.digest.update(chunk)
        self.size += len(chunk)
        written: int = self.out.write(chunk)
        return written

    def tell(self) -> int:  # tarfile asks where writing starts
        return self.size


class RouterBackend:
    """Artifacts kept by the router: nodes upload and fetch over its API with a node credential."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        url = router_url_for(settings, store)
        self._store = store
        self._node = settings.node_name
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"User-Agent": "edgefleet-node"},
            timeout=httpx.Timeout(60.0, connect=10.0),
        )
        self._authorize()

    def _authorize(self) -> None:
        credential = node_credential(self._store.artifacts.node_secret(), self._node)
        self._http.headers["Authorization"] = f"Bearer {credential}"

    def _check(self, response: httpx.Response) -> None:
        if response.status_code == 401:
            # The secret was rotated (a box was revoked): a new credential, and the transfer is tried again.
            self._authorize()
        response.raise_for_status()

    def has(self, artifact_id: str) -> bool:
        response = self._http.head(f"/v1/artifacts/{artifact_id}")
        if response.status_code == 404:
            return False
        self._check(response)
        return True

    def upload(self, artifact_id: str, path: Path, tick: _Ticker) -> None:
        def body() -> Iterator[bytes]:
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    tick()
                    yield chunk

        response = self._http.put(
            f"/v1/artifacts/{artifact_id}",
            content=body(),
            headers={"Content-Length": str(path.stat().st_size), "Content-Type": "application/octet-stream"},
        )
        if response.status_code == 413:
            raise ArtifactFailure(f"the router refused {path.name}: {response.text[:300]}", retryable=False)
        self._check(response)

    def upload_named(self, path: Path, tick: _Ticker) -> tuple[str, int]:
        """Send a file, hashing it on the way; (its sha256, size) once the router answered the same."""
        digest = hashlib.sha256()
        size = 0

        def body() -> Iterator[bytes]:
            nonlocal size
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    tick()
                    yield chunk

        response = self._http.post(
            "/v1/node-artifacts",
            content=body(),
            headers={"Content-Length": str(path.stat().st_size), "Content-Type": "application/octet-stream"},
        )
        if response.status_code == 413:
            raise ArtifactFailure(f"the router refused {path.name}: {response.text[:300]}", retryable=False)
        self._check(response)
        answer = response.json()
        sent = digest.hexdigest()
        if answer.get("id") != sent or answer.get("size") != size:
            # Changed on the way (or on disk while sent): never recorded under either id.
            raise ArtifactFailure(
                f"the router stored {path.name} as {answer.get('id')} ({answer.get('size')} bytes), "
                f"but this box sent {sent} ({size} bytes)"
            )
        return sent, size

    def download(self, artifact_id: str, out: Any, tick: _Ticker) -> None:
        with self._http.stream("GET", f"/v1/artifacts/{artifact_id}") as response:
            if response.status_code == 404:
                raise ArtifactFailure(f"artifact {artifact_id} is not stored (the router has no copy)")
            if response.status_code >= 400:
                response.read()
                self._check(response)
            for chunk in response.iter_bytes():  # as they arrive: regrouping them would copy each byte
                tick()
                out.write(chunk)

    def close(self) -> None:
        self._http.close()


class S3Backend:
    """Artifacts in an S3-compatible bucket, which nodes reach themselves."""

    def __init__(self, settings: Settings) -> None:
        from edgefleet.artifact_s3 import S3Blobs

        self._blobs = S3Blobs(settings)

    def has(self, artifact_id: str) -> bool:
        return self._blobs.size(artifact_id) is not None

    def upload(self, artifact_id: str, path: Path, tick: _Ticker) -> None:
        self._blobs.put_file(artifact_id, path)
        tick()

    def download(self, artifact_id: str, out: Any, tick: _Ticker) -> None:
        for chunk in self._blobs.open(artifact_id).chunks:
            tick()
            out.write(chunk)

    def close(self) -> None:
        pass


Backend = RouterBackend | S3Backend


# --- the node's artifacts -------------------------------------------------------------------------


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for inner in value.values():
            yield from _strings(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _strings(inner)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def output_paths(output: Any, workspace: Path) -> list[Path]:
    """The files and folders an output reports (see the module's docstring), each once, in order."""
    root = os.path.realpath(workspace)
    found: dict[str, Path] = {}
    for text in _strings(output):
        if not text.startswith("/") or "\x00" in text:
            continue
        real = os.path.realpath(text)
        if real == root or not _within(real, root) or real in found:
            continue
        if os.path.isfile(real) or os.path.isdir(real):
            found[real] = Path(text)
    return list(found.values())


class NodeArtifacts:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.node = settings.node_name
        self.cache = settings.effective_workspace_dir / ".artifacts"
        self.max_file_bytes = int(settings.artifact_max_file_mb * MIB)
        self.max_job_bytes = int(settings.artifact_max_job_mb * MIB)
        self.cache_bytes = int(settings.artifact_cache_mb * MIB)
        self._backend: Backend | None = None
        self.fetched = 0  # artifacts this process downloaded (a cache hit is not one)

    @property
    def backend(self) -> Backend:
        # Made on first use: a node whose steps never move files never contacts the backend.
        if self._backend is None:
            if self.settings.artifact_backend == "s3":
                self._backend = S3Backend(self.settings)
            else:
                self._backend = RouterBackend(self.settings, self.store)
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()

    def _retried(self, what: str, call: Callable[[], Any]) -> Any:
        """A transfer, tried again after a connection error or a 5xx; then a retryable failure."""
        for attempt in range(1, TRANSFER_TRIES + 1):
            try:
                return call()
            except ArtifactFailure:
                raise
            except Exception as exc:  # httpx and botocore errors alike: the backend is away
                if attempt == TRANSFER_TRIES:
                    raise ArtifactFailure(f"{what} failed: {type(exc).__name__}: {exc}") from exc
                log.warning("artifact transfer failed; retrying", extra={"what": what, "error": str(exc)})
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    # --- after success: store what the step produced ------------------------------------------

    def collect(
        self, env: SubtaskEnvelope, pid: int, workspace: Path, output: Any, keep_alive: KeepAlive | None = None
    ) -> list[ArtifactInfo]:
        """Upload and record the artifacts of a succeeded attempt's output (before it is reported)."""
        try:
            return self._collect(env, pid, workspace, output, keep_alive)
        except OSError as exc:  # a full disk, a file gone: this attempt cannot store its outputs
            raise ArtifactFailure(f"storing the step's output files failed: {exc}") from exc

    def _collect(
        self, env: SubtaskEnvelope, pid: int, workspace: Path, output: Any, keep_alive: KeepAlive | None
    ) -> list[ArtifactInfo]:
        paths = output_paths(output, workspace)
        if not paths:
            return []
        tick = _Ticker(keep_alive)
        started, cpu = time.monotonic(), time.thread_time()
        staged: list[Path] = []
        artifacts: list[ArtifactInfo] = []
        try:
            outputs: list[_Output] = []
            for path in paths:
                if path.is_dir():
                    tar, artifact_id, size = self._tar(path)
                    staged.append(tar)
                    outputs.append(_Output(path, "tree", tar, artifact_id, size))
                else:
                    # Its id comes with the upload (one read); the size on disk serves the limits.
                    outputs.append(_Output(path, "file", path, None, path.stat().st_size))
                tick()
            for out in outputs:
                self._check_file_limit(out.path, out.size)
            self._check_job_limit(env, sum(out.size for out in outputs))
            for out in outputs:
                store = functools.partial(self._store_blob, out, tick)
                artifact_id, size = self._retried(f"upload of {out.path.name}", store)
                self._check_file_limit(out.path, size)  # it grew while it was sent
                artifacts.append(
                    ArtifactInfo(
                        id=artifact_id,
                        name=out.path.name,
                        size=size,
                        kind=out.kind,
                        node=self.node,
                        subtask=env.subtask_id,
                        path=str(out.path),
                        created_at=time.time(),
                    )
                )
        finally:
            for blob in staged:
                blob.unlink(missing_ok=True)
        recorded = self.store.artifacts.record_outputs(
            env, node=self.node, pid=pid, artifacts=artifacts, max_job_bytes=self.max_job_bytes
        )
        if recorded.verdict == "too_large":
            raise ArtifactFailure(self._job_limit_reason(recorded.job_bytes), retryable=False)
        # "stale": this attempt lost the subtask; its completion is refused the same way.
        log.info(
            "artifacts stored",
            extra={
                "job_id": env.job_id,
                "subtask": env.subtask_id,
                "count": len(artifacts),
                "bytes": sum(a.size for a in artifacts),
                "seconds": round(time.monotonic() - started, 3),  # hashing and uploads
                "cpu_seconds": round(time.thread_time() - cpu, 3),  # this box's CPU for them
                "verdict": recorded.verdict,
            },
        )
        return artifacts

    def _store_blob(self, out: _Output, tick: _Ticker) -> tuple[str, int]:
        """Put one output in the backend; its (id, size)."""
        backend = self.backend
        if out.id is None and isinstance(backend, RouterBackend):  # it names what it receives
            return backend.upload_named(out.blob, tick)
        artifact_id, size = (out.id, out.size) if out.id is not None else sha256_file(out.blob)
        tick()
        if not backend.has(artifact_id):  # else the same bytes are stored already (S3 names objects by id)
            backend.upload(artifact_id, out.blob, tick)
        return artifact_id, size

    def _check_file_limit(self, path: Path, size: int) -> None:
        if size > self.max_file_bytes:
            raise ArtifactFailure(
                f"output {path} is {size / MIB:.1f} MiB, over the artifact limit "
                f"({self.settings.artifact_max_file_mb:g} MiB, EDGEFLEET_ARTIFACT_MAX_FILE_MB)",
                retryable=False,
            )

    def _tar(self, folder: Path) -> tuple[Path, str, int]:
        """The folder's tar in the cache's staging folder, hashed while it is written: (path, id, size)."""
        staging = self.cache / ".tmp"
        staging.mkdir(parents=True, exist_ok=True)
        target = staging / f"tree-{uuid.uuid4().hex}"
        with open(target, "wb") as out:
            sink = _HashingWriter(out)
            write_tree(folder, sink)  # type: ignore[arg-type]  # writes only, what tarfile needs
        return target, sink.digest.hexdigest(), sink.size

    def _check_job_limit(self, env: SubtaskEnvelope, adding: int) -> None:
        total = self.store.artifacts.job_bytes(env.job_id, except_subtask=env.subtask_id) + adding
        if total > self.max_job_bytes:
            raise ArtifactFailure(self._job_limit_reason(total), retryable=False)

    def _job_limit_reason(self, total: int) -> str:
        return (
            f"the job's artifacts would take {total / MIB:.1f} MiB, over the limit "
            f"({self.settings.artifact_max_job_mb:g} MiB, EDGEFLEET_ARTIFACT_MAX_JOB_MB)"
        )

    # --- before start: local copies of what the step reads ----------------------------------

    def localise(
        self,
        env: SubtaskEnvelope,
        args: dict[str, Any],
        needs: list[str],
        job_dir: Path,
        keep_alive: KeepAlive | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """`args` (refs already resolved) with artifact paths and `$artifact`s pointing at local
        copies; and whether any copy was made in the job folder (the step has inputs to read)."""
        try:
            return self._localise(env, args, needs, job_dir, keep_alive)
        except RefError as exc:  # a malformed `$artifact` that came out of an earlier step's output
            raise ArtifactFailure(str(exc), retryable=False) from exc
        except UnsafeTree as exc:
            raise ArtifactFailure(f"a folder artifact cannot be unpacked: {exc}", retryable=False) from exc
        except (OSError, tarfile.TarError) as exc:
            raise ArtifactFailure(f"making local copies of the step's inputs failed: {exc}") from exc

    def _localise(
        self,
        env: SubtaskEnvelope,
        args: dict[str, Any],
        needs: list[str],
        job_dir: Path,
        keep_alive: KeepAlive | None,
    ) -> tuple[dict[str, Any], bool]:
        wanted = find_artifacts(args)
        if not needs and not wanted:
            return args, False
        tick = _Ticker(keep_alive)
        # Every artifact of the job, not only of the steps it needs: a step may pass on paths an
        # earlier step made (photo_rank's `paths` name photo.resize's files).
        produced = self.store.artifacts.of_job(env.job_id)
        local: dict[str, str] = {}  # original path (or "$artifact:<id>") -> local path
        made = False
        for text in _strings(args):
            for artifact in produced:
                assert artifact.path is not None
                if artifact.path in local or not _within(text, artifact.path):
                    continue
                if artifact.node == self.node and self._original_intact(artifact):
                    local[artifact.path] = artifact.path  # this box made it: read it where it is
                else:
                    local[artifact.path] = str(self._materialise(artifact, job_dir, tick))
                    made = True
        for _, artifact_id in wanted:
            key = f"{ARTIFACT_KEY}:{artifact_id}"
            if key not in local:
                info = self.store.artifacts.get(artifact_id)
                if info is None:
                    raise ArtifactFailure(f"artifact {artifact_id} is unknown to the job store", retryable=False)
                local[key] = str(self._materialise(info, job_dir, tick))
                made = True
        return _rewrite(args, local), made

    def _original_intact(self, artifact: ArtifactInfo) -> bool:
        assert artifact.path is not None
        path = Path(artifact.path)
        if artifact.kind == "tree":
            return path.is_dir()
        try:
            return path.is_file() and path.stat().st_size == artifact.size
        except OSError:
            return False

    def _materialise(self, artifact: ArtifactInfo, job_dir: Path, tick: _Ticker) -> Path:
        """`<job dir>/.artifacts/<id>/<name>`, from the verified cache (fetched if needed)."""
        folder = job_dir / JOB_INPUTS / artifact.id
        target = folder / artifact.name
        if target.exists() and (artifact.kind == "tree" or sha256_file(target)[0] == artifact.id):
            return target
        cached = self._cached(artifact, tick)
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o755)
        os.chmod(folder.parent, 0o755)
        staging = folder / f".{uuid.uuid4().hex}"
        try:
            if artifact.kind == "tree":
                extract_tree(cached, staging)
            else:
                try:
                    os.link(cached, staging)  # no copy: the same bytes as the verified cache
                except OSError:
                    shutil.copyfile(cached, staging)
                    os.chmod(staging, 0o444)
            try:
                os.replace(staging, target)
            except OSError:
                if not target.exists():
                    raise
                # Another step of the job on this box made the same copy a moment ago: use that one.
        finally:
            if staging.is_dir():
                shutil.rmtree(staging, ignore_errors=True)
            elif staging.exists():
                staging.unlink()
        return target

    def _cached(self, artifact: ArtifactInfo, tick: _Ticker) -> Path:
        """The cache's verified copy, fetched when it is missing or does not hash to its id."""
        path = self.cache / artifact.id
        if path.exists():
            if sha256_file(path)[0] == artifact.id:
                os.utime(path)  # recently used: evicted last
                return path
            log.warning("cached artifact is corrupt; fetching it again", extra={"artifact": artifact.id})
            path.unlink(missing_ok=True)
        self._retried(f"fetch of {artifact.name}", lambda: self._fetch(artifact, path, tick))
        self.store.artifacts.add_holder(artifact.id, self.node)
        self._evict(keep=path)
        return path

    def _fetch(self, artifact: ArtifactInfo, path: Path, tick: _Ticker) -> None:
        """Stream it into a staging file of the cache, hashed on the way; renamed to its cache
        path only if it hashes to its id (then linked, not copied, into the step's inputs)."""
        staging = self.cache / ".tmp"
        staging.mkdir(parents=True, exist_ok=True)
        partial = staging / f"fetch-{uuid.uuid4().hex}"
        started, cpu = time.monotonic(), time.thread_time()
        try:
            with open(partial, "wb") as out:
                sink = _HashingWriter(out)
                self.backend.download(artifact.id, sink, tick)
            got = sink.digest.hexdigest()
            if got != artifact.id:
                # Never handed to a plugin: the attempt fails and is retried (the store's retries).
                raise ArtifactFailure(
                    f"artifact {artifact.name} ({artifact.id}) arrived corrupt: its sha256 is {got} "
                    f"({sink.size} bytes); not used"
                )
            os.chmod(partial, 0o444)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        self.fetched += 1
        log.info(
            "artifact fetched",
            extra={
                "artifact": artifact.id,
                "bytes": artifact.size,
                "seconds": round(time.monotonic() - started, 3),
                "cpu_seconds": round(time.thread_time() - cpu, 3),  # download, hash, write
                "node": self.node,
            },
        )

    def _evict(self, keep: Path) -> None:
        """Least recently used cache entries out until the cache fits EDGEFLEET_ARTIFACT_CACHE_MB."""
        entries = []
        for entry in self.cache.iterdir():
            if entry.is_file() and len(entry.name) == 64:
                stat = entry.stat()
                entries.append((stat.st_mtime, stat.st_size, entry))
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries):
            if total <= self.cache_bytes:
                return
            if entry == keep:
                continue
            entry.unlink(missing_ok=True)
            self.store.artifacts.remove_holder(entry.name, self.node)
            total -= size


def _rewrite(value: Any, local: dict[str, str]) -> Any:
    """Artifact paths (and paths inside folder artifacts) replaced by their local copies."""
    if is_artifact(value):
        return local[f"{ARTIFACT_KEY}:{value[ARTIFACT_KEY]}"]
    if isinstance(value, str):
        for original, copy in local.items():
            if original.startswith(ARTIFACT_KEY) or original == copy:
                continue
            if value == original:
                return copy
            if value.startswith(original.rstrip("/") + "/"):
                return copy + value[len(original.rstrip("/")) :]
        return value
    if isinstance(value, dict):
        return {k: _rewrite(v, local) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, local) for v in value]
    return value
