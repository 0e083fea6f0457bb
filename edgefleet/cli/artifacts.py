"""Files to and from the cluster: `--input key=@path` uploads for `submit`, and `edgefleet fetch`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet.cli.common import TokenOption, UrlOption, api_errors, err_console, fail, make_client

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from edgefleet.client import Client
    from edgefleet.schemas import ArtifactInfo, JobStatus

UPLOAD_MARK = "@"


def _progress() -> Progress:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = err_console()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=console.is_terminal,
    )


def _advance(progress: Progress, task: TaskID) -> Callable[[int, int], None]:
    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total or None)

    return update


def upload_inputs(client: Client, inputs: dict[str, Any]) -> dict[str, Any]:
    """Template inputs with each `@<path>` value uploaded and replaced by `{"$artifact": id}`
    (a folder becomes one folder artifact). A literal string starting with @: key:='"@..."'."""
    wanted = {k: v[1:] for k, v in inputs.items() if isinstance(v, str) and v.startswith(UPLOAD_MARK)}
    if not wanted:
        return inputs
    for key, raw in wanted.items():
        if not raw or not Path(raw).expanduser().exists():
            fail(f"--input {key}", f"no such file or folder: {raw!r}")
    uploaded = dict(inputs)
    with _progress() as progress:
        for key, raw in wanted.items():
            path = Path(raw).expanduser()
            task = progress.add_task(f"uploading {path.name}", total=None)
            info = client.upload(path, on_progress=_advance(progress, task))
            uploaded[key] = {"$artifact": info.id}
    return uploaded


def final_artifacts(status: JobStatus, every: bool) -> list[ArtifactInfo]:
    """The job's outputs for the asker: the artifacts of steps no other step needs (or all)."""
    if every:
        return list(status.artifacts)
    needed = {dep for st in status.subtasks for dep in st.needs}
    return [a for a in status.artifacts if a.subtask not in needed]


def _targets(artifacts: list[ArtifactInfo], dest: Path) -> list[tuple[ArtifactInfo, Path]]:
    """Where each goes: `dest/<name>`, or `dest/<step>-<name>` when two share a name."""
    names = [a.name for a in artifacts]
    return [
        (a, dest / (a.name if names.count(a.name) == 1 else f"{a.subtask or 'upload'}-{a.name}")) for a in artifacts
    ]


def fetch(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="the job id")],
    dest: Annotated[Path, typer.Argument(help="folder to put the files in (made if missing)")] = Path("."),
    every: Annotated[bool, typer.Option("--all", help="every artifact of the job, not only its final outputs")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Download a job's final outputs (the files of steps no other step needs), sha256-checked.

    A folder artifact comes back as a folder; --all fetches the files of every step.

    Examples:

        edgefleet fetch 3f2a... ./out
        edgefleet fetch 3f2a... --all
    """
    with api_errors(), make_client(url, token, timeout=120.0) as client:
        status = client.get(job_id)
        chosen = final_artifacts(status, every)
        if not chosen:
            fail("JOB", f"job {job_id} ({status.state.value}) has no {'' if every else 'final '}artifacts")
        done: list[Path] = []
        with _progress() as progress:
            for artifact, target in _targets(chosen, dest):
                task = progress.add_task(f"{artifact.name}", total=artifact.size)
                client.download(
                    artifact.id,
                    target,
                    on_progress=_advance(progress, task),
                    kind=artifact.kind,
                )
                done.append(target)
    for path in done:
        print(path)
