"""The `graft` commands for accounts: users (create, invite links) and API tokens."""
from __future__ import annotations

import typer

from cli.server import _fail, _sessions

token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
user_app = typer.Typer(help="Users.", no_args_is_help=True)


@user_app.command("create")
def user_create(name: str = typer.Argument(..., help="The new user's name."),
                admin: bool = typer.Option(False, "--admin", help="Also manages users and shared workspaces.")) -> None:
    """Add a user; their one-time invite link (valid 7 days, origin GRAFT_PUBLIC_URL) is the last line."""
    from app.core.errors import AppError
    from app.services import auth

    s, S = _sessions()
    with S() as db:
        try:
            user = auth.create_user(db, name, admin=admin)
        except AppError as e:
            _fail(e.message)
        link = auth.invite_link(db, user, s.public_url)
        typer.echo(f"created {'admin' if admin else 'user'} {user.name} (id {user.id}); send them this invite "
                   "link (it sets their password; valid once, for 7 days):", err=True)
    typer.echo(link)


@user_app.command("invite")
def user_invite(name: str = typer.Argument(..., help="An existing user.")) -> None:
    """A new invite link for a user who lost theirs or their password (their password is forgotten and
    their sessions end); the link is the last line."""
    from app.core.errors import AppError
    from app.services import auth

    s, S = _sessions()
    with S() as db:
        try:
            user = auth.get_user(db, name)
        except AppError as e:
            _fail(e.message)
        link = auth.reset(db, user, s.public_url)
        typer.echo(f"new invite link for {user.name} (valid once, for 7 days):", err=True)
    typer.echo(link)


@user_app.command("list")
def user_list() -> None:
    """The users, their role and state."""
    from sqlalchemy import select

    from app.db.models import User

    _, S = _sessions()
    with S() as db:
        for u in db.scalars(select(User).order_by(User.name)):
            state = "disabled" if u.disabled else "active" if (u.password_hash or u.oidc_subject) else "invited"
            typer.echo(f"{u.name}\t{'admin' if u.is_admin else 'user'}\t{state}")


@token_app.command("create")
def token_create(name: str = typer.Option(..., "--name", help="What the token is for."),
                 user: str | None = typer.Option(None, "--user", help="Whose token (default: the default user).")) -> None:
    """Create an API token; the token alone is printed on the last line."""
    from app.core.errors import AppError
    from app.services import auth

    s, S = _sessions()
    with S() as db:
        try:
            u = auth.get_user(db, user) if user else auth.ensure_user(db, s.default_user, admin=True)
        except AppError as e:
            _fail(e.message)
        token = auth.create_token(db, u, name)
    typer.echo(f"API token {name!r} for user {u.name} (shown once; send it as 'Authorization: Bearer <token>'):",
               err=True)
    typer.echo(token)


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")
    app.add_typer(user_app, name="user")
