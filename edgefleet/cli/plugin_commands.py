"""`edgefleet plugins`: list the catalogue (this box or the router's), check manifests and
workflow templates, scaffold a new plugin."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.cli.common import TokenOption, UrlOption, api_errors, fail, load_settings, make_client, out_console

plugins_app = typer.Typer(
    help="Plugins: list the catalogue, check manifests, scaffold a new plugin.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DirsArgument = Annotated[
    list[Path] | None,
    typer.Argument(
        metavar="[DIR...]",
        help="extra plugin folders, after the built-in one and settings' plugin_dirs",
        show_default=False,
    ),
]


@plugins_app.callback(invoke_without_command=True)
def plugins_main(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON (with input schemas)")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Plugins: `list` (this box, or --remote), `check [DIR...]`, `new NAME`.

    Without a subcommand: the router's view, as `edgefleet plugins list --remote`.

    Examples:

        edgefleet plugins list
        edgefleet plugins check ./my-plugins
        edgefleet plugins new resize_images --resource-class cpu --dir ./my-plugins
        edgefleet plugins --json | jq '.plugins[] | {name, nodes}'
    """
    if ctx.invoked_subcommand is None:
        _remote_plugins(as_json, url, token)


def _plugin_dirs(extra: list[Path] | None) -> list[Path]:
    settings = load_settings()
    dirs = []
    for folder in extra or []:
        if (folder / "plugin.yaml").is_file():
            # One plugin's own folder: the catalogue is read from the folder that holds it.
            sys.stderr.write(f"note: {folder} is a plugin folder; reading its parent {folder.parent}\n")
            folder = folder.parent
        dirs.append(folder)
    return [*settings.plugin_folders, *dirs]


def _problem_lines(error: Any) -> list[str]:
    """One `file: field: reason` line per problem of a ManifestError."""
    return [f"{error.file}: {field}: {' '.join(str(reason).split())}" for field, reason in error.details]


@plugins_app.command("list")
def plugins_list(
    dirs: DirsArgument = None,
    remote: Annotated[bool, typer.Option("--remote", help="ask the router (its catalogue and the live nodes)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """List the plugin catalogue of this box: name, version, class, permissions, and whether it runs here.

    `status` is `ok` when this box meets the plugin's dependencies (Python
    packages, binaries), else what is missing; a worker here advertises only the
    `ok` ones. Rejected manifests are listed below the table. With --remote, the
    router's catalogue and the nodes that run each plugin.

    Examples:

        edgefleet plugins list
        edgefleet plugins list ./my-plugins --json
        edgefleet plugins list --remote
    """
    if remote:
        if dirs:
            fail("DIR", "--remote lists the router's catalogue; it takes no folders")
        _remote_plugins(as_json, url, token)
        return
    from rich.markup import escape
    from rich.table import Table

    from edgefleet.plugin_catalog import PluginCatalog

    catalog = PluginCatalog.load(_plugin_dirs(dirs))
    rows = []
    for entry in catalog.describe():
        entry["folder"] = str(catalog.get(entry["name"]).folder)  # type: ignore[union-attr]
        entry["unmet_dependencies"] = catalog.unmet_dependencies(entry["name"])
        entry["status"] = "ok" if not entry["unmet_dependencies"] else "unmet deps here"
        rows.append(entry)
    if as_json:
        print(json.dumps({"plugins": rows, "errors": catalog.describe_errors()}, indent=2))
        return
    console = out_console()
    table = Table(title="plugins")
    for column in ("name", "version", "class", "permissions", "actions", "status"):
        table.add_column(column, overflow="fold")
    for entry in rows:
        status_text = (
            "[green]ok[/green]"
            if entry["status"] == "ok"
            else ("[yellow]unmet deps here:[/yellow] " + escape("; ".join(entry["unmet_dependencies"])))
        )
        table.add_row(
            escape(entry["name"]),
            escape(entry["version"]),
            entry["resource_class"],
            escape(", ".join(entry["permissions"]) or "-"),
            escape(", ".join(entry["actions"])),
            status_text,
        )
    console.print(table)
    for error in catalog.errors:
        for line in _problem_lines(error):
            console.print(f"[red]rejected:[/red] {escape(line)}")


@plugins_app.command("check")
def plugins_check(dirs: DirsArgument = None) -> None:
    """Load the catalogue (built-in, settings' plugin_dirs, DIRs) and print every problem.

    Each problem is one line `file: field: reason`: malformed manifests,
    incompatible `requires.edgefleet`, missing, conflicting or cyclic plugin
    requirements, broken workflow templates. Unmet dependencies on this box are
    printed as warnings (they stop a worker here from running the plugin, not the
    catalogue from loading). Exit code 0 when there is no problem, 1 otherwise.

    Example:

        edgefleet plugins check ./my-plugins
    """
    from edgefleet.plugin_catalog import PluginCatalog
    from edgefleet.templates import TemplateCatalog

    plugin_dirs = _plugin_dirs(dirs)
    catalog = PluginCatalog.load(plugin_dirs)
    problems = [line for error in catalog.errors for line in _problem_lines(error)]
    first: dict[Path, Path] = {}
    for folder in plugin_dirs:
        first.setdefault(folder.resolve(), folder)  # each folder once, in order
    unique = list(first.values())
    templates = TemplateCatalog.load(unique)
    n_templates = len(templates.names())
    problems += [line for error in templates.errors for line in _problem_lines(error)]
    problems += _template_step_problems(templates, catalog, unique)
    for line in problems:
        print(line)
    for name in catalog.names():
        plugin = catalog.get(name)
        for unmet in catalog.unmet_dependencies(name):
            print(f"warning: {plugin.folder / 'plugin.yaml'}: dependencies: {unmet}")  # type: ignore[union-attr]
    summary = f"{len(catalog)} plugins loaded, {n_templates} templates"
    if problems:
        sys.stderr.write(f"{len(problems)} problem{'s' if len(problems) != 1 else ''}; {summary}\n")
        raise typer.Exit(1)
    print(f"ok: {summary} ({', '.join(catalog.names())})")


def _template_step_problems(templates: Any, catalog: Any, dirs: list[Path]) -> list[str]:
    """Template steps naming a plugin or action the catalogue lacks (literal names only)."""
    files: dict[str, Path] = {}
    for base in dirs:
        for path in sorted([*(base / "workflows").glob("*.yaml"), *(base / "workflows").glob("*.yml")]):
            files.setdefault(path.stem, path)
    out = []
    for name in templates.names():
        where = files.get(name, Path(name))
        for i, step in enumerate(templates.get(name).steps):
            plugin_name, action = step.get("plugin"), step.get("action")
            if not isinstance(plugin_name, str) or "${" in plugin_name:
                continue
            plugin = catalog.get(plugin_name)
            if plugin is None:
                why = catalog.rejected.get(plugin_name)
                reason = (
                    f"plugin {plugin_name!r} was rejected ({why.field}: {why.reason})"
                    if why
                    else (f"unknown plugin {plugin_name!r}")
                )
                out.append(f"{where}: steps.{i}.plugin: {' '.join(reason.split())}")
            elif isinstance(action, str) and "${" not in action and action not in plugin.manifest.actions:
                known = ", ".join(sorted(plugin.manifest.actions))
                out.append(f"{where}: steps.{i}.action: plugin {plugin_name!r} has no action {action!r} (has: {known})")
    return out


@plugins_app.command("new")
def plugins_new(
    name: Annotated[str, typer.Argument(metavar="NAME", help="the plugin name: lowercase letters, digits, '_'")],
    directory: Annotated[Path, typer.Option("--dir", help="the plugin folder to create it in")] = Path("plugins"),
    resource_class: Annotated[
        str, typer.Option("--resource-class", help="cpu, gpu or io: the queue that runs it")
    ] = "cpu",
) -> None:
    """Scaffold a plugin in DIR/NAME: plugin.yaml (every field documented), code and a test.

    The scaffold loads, runs and passes its test as written; then edit it.
    Refuses an invalid name or an existing folder (exit 2).

    Example:

        edgefleet plugins new shout --dir ./my-plugins
        python -m pytest my-plugins/shout
        edgefleet plugins check ./my-plugins
    """
    from edgefleet.plugin_catalog import PluginCatalog, builtin_plugin_dir
    from edgefleet.plugin_scaffold import ScaffoldError, scaffold

    builtin = builtin_plugin_dir()
    if directory.resolve() != builtin.resolve() and name in PluginCatalog.load([builtin]):
        fail("NAME", f"{name!r} is the name of a built-in plugin; choose another name")
    try:
        made = scaffold(name, directory, resource_class)
    except ScaffoldError as exc:
        fail(exc.field, exc.reason)
    except OSError as exc:
        fail("--dir", f"cannot write in {directory}: {exc.strerror or exc}")
    print(f"created {made.folder}/")
    for path in made.files:
        print(f"  {path.name}")
    print(f"next: python -m pytest {made.folder}  and  edgefleet plugins check {directory}")


def _remote_plugins(as_json: bool, url: str | None, token: str | None) -> None:
    """The router's catalogue: plugins, the nodes that run them, templates and rejected manifests."""
    from rich.markup import escape
    from rich.table import Table

    with api_errors(), make_client(url, token) as client:
        data = client.plugins()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console = out_console()
    table = Table(title="plugins")
    for column in ("name", "version", "class", "permissions", "actions", "nodes", "description"):
        table.add_column(column, overflow="fold")
    for plugin in data.get("plugins", []):
        table.add_row(
            escape(plugin["name"]),
            escape(str(plugin.get("version", ""))),
            plugin.get("resource_class", ""),
            escape(", ".join(plugin.get("permissions", [])) or "-"),
            escape(", ".join(plugin.get("actions", {}))),
            escape(", ".join(plugin.get("nodes", [])) or "-"),
            escape(plugin.get("description", "")),
        )
    console.print(table)
    templates = data.get("templates", [])
    if templates:
        ttable = Table(title="templates")
        for column in ("name", "inputs", "description"):
            ttable.add_column(column, overflow="fold")
        for tpl in templates:
            ins = ", ".join(
                f"{k}{'' if spec.get('required', True) and spec.get('default') is None else '?'}"
                for k, spec in tpl.get("inputs", {}).items()
            )
            ttable.add_row(escape(tpl["name"]), escape(ins or "-"), escape(tpl.get("description", "")))
        console.print(ttable)
    for problem in data.get("errors", []):
        # A dict (file, field, reason) from this router; a plain string from an older one.
        text = (
            problem
            if isinstance(problem, str)
            else f"{problem.get('file')}: {problem.get('field')}: {problem.get('reason')}"
        )
        console.print(f"[yellow]not loaded:[/yellow] {escape(text)}")
