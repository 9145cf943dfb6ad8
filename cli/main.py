"""The `graft` entry point: one Typer app holding the engine and the server commands."""
from __future__ import annotations

import typer

from cli import accounts, engine, labels, server

app = typer.Typer(help="Graft: transfer learning on images, from the command line or the browser.",
                  no_args_is_help=True, add_completion=False)
engine.register(app)
labels.register(app)
server.register(app)
accounts.register(app)


def main() -> None:
    app()
