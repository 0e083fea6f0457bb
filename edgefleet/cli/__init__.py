"""The `edgefleet` command line: run the services, submit and watch jobs.

Exit codes of the client commands: 0 ok; 1 the job failed or was cancelled
(`submit --wait`, `status --wait`); 2 bad input (the router or the CLI refused
it: one line `error: <field>: <reason>`); 3 the router is unreachable or failed.

The composition root: the one package that imports `router` and `workers` (in the
service commands) and wires the core together; tests/test_layering.py checks it.
"""

from __future__ import annotations

import typer

from edgefleet.cli import artifacts, jobs, models, plugin_commands, schedules, services, tokens

EPILOG = (
    "Client commands find the router at --url, EDGEFLEET_ROUTER_URL or the cluster `edgefleet up` runs, "
    "and send --token, EDGEFLEET_TOKEN or the token `edgefleet up` wrote to <data dir>/token. "
    "Exit codes: 0 ok, 1 job failed/cancelled, 2 bad input, 3 router unreachable or failing."
)

app = typer.Typer(
    help="edgefleet: one task cluster from your home-lab and edge boxes.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# `edgefleet --help` lists the commands in this order.
app.command()(services.router)
app.command()(services.worker)
app.command()(services.up)
app.command()(jobs.submit)
app.command()(jobs.status)
app.command()(jobs.jobs)
app.command()(jobs.cancel)
app.command()(artifacts.fetch)
app.command()(jobs.gc)
app.command()(jobs.workers)
app.add_typer(plugin_commands.plugins_app, name="plugins")
app.add_typer(tokens.tokens_app, name="token")
app.add_typer(schedules.schedule_app, name="schedule")
app.add_typer(models.models_app, name="models")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
