"""Tar files handed from step to step (a repository snapshot, a build): open them, unpack them safely.

A tar comes from outside the plugin (another step, ultimately a repository
someone else controls), so its members are not trusted: unpacking refuses
anything that would land outside the target directory, device files, and
links that point out of the tree.
"""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_archive(archive: Path) -> None:
    """Refuse a path that is not a regular file, naming it (the usual mistake: a wrong step output)."""
    if not archive.is_file():
        raise ValueError(f"archive: {archive} does not exist or is not a file")


@contextmanager
def open_tar(archive: Path) -> Iterator[tarfile.TarFile]:
    """Open `archive` for reading; any tar error, while opening or reading, becomes a ValueError.

    A broken archive is bad input, not a bug in the plugin, so it is reported
    as one (`archive: ... is not a readable tar file: ...`).
    """
    check_archive(archive)
    try:
        with tarfile.open(archive) as tar:
            yield tar
    except tarfile.TarError as exc:
        raise ValueError(f"archive: {archive} is not a readable tar file: {exc}") from None


def unpack_tar(archive: Path, dest: Path) -> None:
    """Extract `archive` into `dest` (emptied first), refusing members that would land outside it.

    `dest` is removed and made again so that a rerun starts from a clean tree,
    never from what an earlier attempt left half-unpacked.
    """
    check_archive(archive)  # before `dest` is touched
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with open_tar(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python < 3.11.4: check the members ourselves
            root = dest.resolve()
            for member in tar.getmembers():
                target = (root / member.name).resolve()
                if (
                    not target.is_relative_to(root)
                    or member.isdev()
                    or (
                        (member.issym() or member.islnk())
                        and not (target.parent / member.linkname).resolve().is_relative_to(root)
                    )
                ):
                    raise ValueError(f"archive: member {member.name!r} would land outside the tree")
            tar.extractall(dest)
