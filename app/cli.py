"""The `graft` command. Commands that need torch import it lazily, inside their bodies."""
from __future__ import annotations

import typer

from worker.engine.cli import register

app = typer.Typer(help="Graft: transfer learning on images, from the command line or the browser.",
                  no_args_is_help=True, add_completion=False)
register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
