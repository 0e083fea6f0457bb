"""`edgefleet models pull`: download a GGUF model into the models folder.

Exit codes: 0 downloaded; 1 the download failed or did not check out (HTTP error, dropped
connection after the retries, not a GGUF, SHA-256 mismatch); 2 bad input (name, URL, options).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import typer

from edgefleet.cli.common import err_console, fail, load_settings

if TYPE_CHECKING:
    from edgefleet.models.pull import PullResult
    from edgefleet.settings import Settings

models_app = typer.Typer(
    help="Model files: download GGUF models into the models folder.", no_args_is_help=True, add_completion=False
)


def _source(name: str | None, url: str | None, revision: str, settings: Settings) -> tuple[str, dict[str, str]]:
    """The URL to fetch and the headers to send: a hub token goes to the hub's host only."""
    from edgefleet.models.pull import check_url, hub_url

    if (name is None) == (url is None):
        fail("name", "give either NAME (owner/repo/file.gguf or an http(s) URL) or --url, not both or neither")
    if url is None and name is not None and "://" in name:
        url = name
    target = check_url(url) if url is not None else hub_url(str(name), settings.model_hub_url, revision)
    headers: dict[str, str] = {}
    token = settings.model_hub_token
    hub = urlsplit(settings.model_hub_url)
    mine = urlsplit(target)
    if token is not None and (mine.scheme, mine.netloc) == (hub.scheme, hub.netloc):
        headers["Authorization"] = f"Bearer {token.get_secret_value()}"
    return target, headers


@models_app.command("pull")
def pull(
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="[NAME|URL]",
            help="owner/repo/file.gguf on the hub (EDGEFLEET_MODEL_HUB_URL), or an http(s) URL",
            show_default=False,
        ),
    ] = None,
    url: Annotated[str | None, typer.Option("--url", help="any http(s) URL of a GGUF file", show_default=False)] = None,
    revision: Annotated[str, typer.Option("--revision", help="hub branch, tag or commit")] = "main",
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="expected SHA-256 of the file (hex)", show_default=False)
    ] = None,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="file name in the models folder (default: the URL's)", show_default=False),
    ] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option("--dir", help="models folder (default: EDGEFLEET_MODELS_DIR or <data dir>/models)"),
    ] = None,
    add: Annotated[
        str | None,
        typer.Option("--add", help="register the file as this model name in EDGEFLEET_MODELS_FILE (llama_cpp backend)"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="download again over an existing file")] = False,
    retries: Annotated[int, typer.Option("--retries", min=0, help="resumes after a dropped connection")] = 3,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="seconds without data before a try fails")] = 30.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Download a GGUF model (resumable, hash-checked) into the models folder; print its path and SHA-256."""
    from edgefleet.models.pull import PullError, file_name_for

    settings = load_settings()
    if add is not None and settings.models_file is None:
        fail("--add", "set EDGEFLEET_MODELS_FILE to the models file to register the model in")
    folder = models_dir or settings.effective_models_dir
    try:
        target, headers = _source(name, url, revision, settings)
        file_name = file_name_for(target, output)
        result = _download(
            target,
            folder,
            file_name,
            sha256=sha256,
            force=force,
            retries=retries,
            timeout=timeout,
            headers=headers,
            quiet=quiet,
        )
        if add is not None and settings.models_file is not None:
            from edgefleet.models.pull import add_to_models_file

            add_to_models_file(settings.models_file, add, result.path)
    except PullError as exc:
        fail(exc.field, exc.reason, 2 if exc.bad_input else 1)
    typer.echo(f"{result.path}")
    err = err_console()
    resumed = f", resumed at byte {result.resumed_from}" if result.resumed_from else ""
    checked = f"; checked against {', '.join(result.checked_against)}" if result.checked_against else ""
    # soft_wrap: a hash or path is never broken across lines (piped stderr is 80 columns to rich).
    err.print(f"{result.size} bytes, sha256 {result.sha256}{resumed}{checked}", soft_wrap=True)
    if add is not None:
        err.print(
            f"added model {add!r} to {settings.models_file}; name it in a route (routes:) to use it", soft_wrap=True
        )


def _download(
    target: str,
    folder: Path,
    file_name: str,
    *,
    sha256: str | None,
    force: bool,
    retries: int,
    timeout: float,
    headers: dict[str, str],
    quiet: bool,
) -> PullResult:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from edgefleet.models.pull import pull as run_pull

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console(),
        disable=quiet,
        transient=False,
    ) as progress:
        task = progress.add_task(file_name, total=None)

        def on_progress(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        return run_pull(
            target,
            folder,
            file_name=file_name,
            sha256=sha256,
            force=force,
            retries=retries,
            timeout=timeout,
            headers=headers,
            on_progress=on_progress,
        )
