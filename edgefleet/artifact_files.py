"""Artifact bytes, the same on every box: hashing, folders as deterministic tars, safe extraction,
and the credential a node shows the router to move artifacts.

A folder travels as one artifact of kind `tree`: an uncompressed tar of its regular files and
folders, entries sorted, owners, times and modes normalised, so that the same folder always
has the same sha256 (a second upload or run stores nothing new). Links and special files are
left out: on another box they would point at nothing, or somewhere they must not.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024
NODE_CREDENTIAL_PREFIX = "efnode."


def sha256_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = hash_into(digest, path)
    return digest.hexdigest(), size


def hash_into(digest: hashlib._Hash, path: Path) -> int:
    """Feed a file to `digest` in chunks (a download resumed from its partial file goes on hashing);
    returns the bytes read."""
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size


def file_chunks(path: Path, start: int = 0, length: int | None = None) -> Iterator[bytes]:
    """The bytes of a file from `start`, `length` of them (None: to the end), in chunks."""
    with open(path, "rb") as handle:
        handle.seek(start)
        left = length
        while left is None or left > 0:
            chunk = handle.read(CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                return
            if left is not None:
                left -= len(chunk)
            yield chunk


def _tree_entries(folder: Path) -> Iterator[tuple[str, Path, bool]]:
    """(name in the tar, path, is a folder) of the folder's regular files and folders, sorted."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        base = Path(root)
        for name in dirs:
            path = base / name
            if not path.is_symlink():
                yield path.relative_to(folder).as_posix(), path, True
        for name in sorted(files):
            path = base / name
            if stat.S_ISREG(path.lstat().st_mode):
                yield path.relative_to(folder).as_posix(), path, False
        # os.walk does not descend into links to folders (followlinks=False): they are left out.
        dirs[:] = [d for d in dirs if not (base / d).is_symlink()]


def write_tree(folder: Path, out: BinaryIO) -> None:
    """The folder as a deterministic tar on `out` (see the module's docstring)."""
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, path, is_dir in _tree_entries(folder):
            info = tarfile.TarInfo(name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if is_dir:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                continue
            executable = path.stat().st_mode & stat.S_IXUSR
            info.mode = 0o755 if executable else 0o644
            info.size = path.stat().st_size
            with open(path, "rb") as handle:
                tar.addfile(info, handle)


class UnsafeTree(ValueError):
    """A tree artifact holding something other than plain files and folders inside itself."""


def extract_tree(tar_path: Path, dest: Path) -> None:
    """Unpack a tree artifact into `dest` (made here): files and folders only, nothing outside it,
    readable by every uid (a plugin runs as its own)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, mode="r:") as tar:
        members = tar.getmembers()
        for member in members:
            if not (member.isfile() or member.isdir()):
                raise UnsafeTree(f"{member.name!r} is neither a file nor a folder")
        # The "data" filter refuses absolute names, '..', and anything that would land outside dest.
        tar.extractall(dest, members=members, filter="data")
    for root, _dirs, files in os.walk(dest):
        os.chmod(root, 0o755)
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, (os.stat(path).st_mode & 0o111) | 0o444)


# --- the credential a node shows the router ----------------------------------------------------
# `efnode.<hex HMAC-SHA256 of the node's name under the cluster's artifact secret>.<node name>`.
# The secret lives in the job store, which every node already reaches, so a node needs no token
# of its own; the router also requires the node to be live (a heartbeat in the store).


def node_credential(secret: str, node: str) -> str:
    mac = hmac.new(secret.encode(), node.encode(), hashlib.sha256).hexdigest()
    return f"{NODE_CREDENTIAL_PREFIX}{mac}.{node}"


def node_of_credential(secret: str, credential: str) -> str | None:
    """The node a credential names, if the credential is right for it; else None."""
    if not secret or not credential.startswith(NODE_CREDENTIAL_PREFIX):
        return None
    _mac, sep, node = credential[len(NODE_CREDENTIAL_PREFIX) :].partition(".")
    if not sep or not node:
        return None
    expected = node_credential(secret, node)
    return node if hmac.compare_digest(expected.encode(), credential.encode()) else None
