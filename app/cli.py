"""The `graft` command. Commands that need torch import it lazily, inside their bodies; the web commands
import the web app lazily too, so `graft --help` stays fast."""
from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from worker.engine.cli import register

ROOT = Path(__file__).resolve().parents[1]

app = typer.Typer(help="Graft: transfer learning on images, from the command line or the browser.",
                  no_args_is_help=True, add_completion=False)
register(app)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
user_app = typer.Typer(help="Users.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(user_app, name="user")


def _settings():
    from app.core.settings import get_settings

    s = get_settings()
    s.ensure_dirs()
    if s.weights_dir:
        os.environ["TORCH_HOME"] = str(s.weights_dir)
    return s


def run_migrations(url: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def migrate() -> None:
    """Upgrade the database to the latest schema (Alembic)."""
    s = _settings()
    run_migrations(s.db_url)
    typer.echo(f"database at {s.db_url.split('@')[-1]} is up to date")


def _sessions():
    from app.db.session import session_factory

    s = _settings()
    run_migrations(s.db_url)
    return s, session_factory(s.db_url)


@user_app.command("create")
def user_create(name: str = typer.Argument(..., help="The new user's name.")) -> None:
    """Add a user."""
    from app.core.errors import AppError
    from app.services import auth

    s, S = _sessions()
    with S() as db:
        try:
            user = auth.create_user(db, name)
        except AppError as e:
            _fail(e.message)
        typer.echo(f"created user {user.name} (id {user.id})")


@token_app.command("create")
def token_create(name: str = typer.Option(..., "--name", help="What the token is for."),
                 user: Optional[str] = typer.Option(None, "--user", help="Whose token (default: the default user).")) -> None:
    """Create an API token; the token alone is printed on the last line."""
    from app.core.errors import AppError
    from app.services import auth

    s, S = _sessions()
    with S() as db:
        try:
            u = auth.get_user(db, user) if user else auth.ensure_user(db, s.default_user)
        except AppError as e:
            _fail(e.message)
        token = auth.create_token(db, u, name)
    typer.echo(f"API token {name!r} for user {u.name} (shown once; send it as 'Authorization: Bearer <token>'):",
               err=True)
    typer.echo(token)


@app.command()
def worker(concurrency: int = typer.Option(1, help="Jobs run at the same time by this worker."),
           loglevel: str = typer.Option("INFO")) -> None:
    """Run a worker that trains queued jobs (on any host that shares GRAFT_DATA_DIR and the database)."""
    s = _settings()
    from worker.celery_app import QUEUE
    from worker.tasks import celery_app

    argv = ["worker", f"--loglevel={loglevel}", f"--concurrency={concurrency}", "-Q", QUEUE,
            "--pool", "solo" if concurrency == 1 else "prefork", "--without-gossip", "--without-mingle",
            "-n", f"graft-{os.getpid()}@%h"]
    celery_app.worker_main(argv)


def requeue_orphans(S, settings) -> None:
    """Embedded mode has one local worker, so a job still 'running' at start-up lost its worker (Ctrl-C,
    crash): put it back in the queue; it resumes from its last checkpoint. Every queued job is (re)sent:
    the worker's conditional claim makes a duplicate message harmless."""
    from sqlalchemy import select, update

    from app.db.models import Job, JobEvent, JobStatus
    from worker.celery_app import enqueue_job

    with S() as db:
        orphans = db.scalars(select(Job.id).where(Job.status == JobStatus.running.value)).all()
        if orphans:
            db.execute(update(Job).where(Job.id.in_(orphans)).values(status=JobStatus.queued.value))
            for jid in orphans:
                db.add(JobEvent(job_id=jid, kind="message", data={"message": "worker stopped; job re-queued"}))
            db.commit()
        for jid in db.scalars(select(Job.id).where(Job.status == JobStatus.queued.value)).all():
            enqueue_job(jid, settings)


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _die_with_parent() -> None:
    """In the worker child: get SIGTERM when `graft serve` dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@app.command()
def inference(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8001),
              cache_size: int = typer.Option(4, help="Models kept loaded.")) -> None:
    """Run the inference service that answers POST /api/v1/jobs/{id}/predict (set GRAFT_INFERENCE_URL on the web)."""
    import uvicorn

    from worker.inference import create_inference_app

    s = _settings()
    uvicorn.run(create_inference_app(s.data_dir, cache_size), host=host, port=port, log_level="warning")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
          port: int = typer.Option(8000, help="Port to listen on."),
          no_worker: bool = typer.Option(False, "--no-worker", help="Do not start a local worker."),
          open_browser: bool = typer.Option(False, "--open", help="Open the sign-in link in a browser.")) -> None:
    """Migrate the database, start the web app and one worker; print a one-time sign-in link."""
    import uvicorn

    from app.services import auth

    s, S = _sessions()
    with S() as db:
        user = auth.ensure_user(db, s.default_user)
        login = auth.create_token(db, user, "sign-in link", kind="login", ttl=auth.LOGIN_TTL)
    if not no_worker:
        try:
            requeue_orphans(S, s)
        except Exception as e:  # the queue is down: the worker re-sends queued jobs when it starts
            typer.secho(f"warning: could not re-queue jobs ({type(e).__name__}: {e})", fg=typer.colors.YELLOW,
                        err=True)
    children = []
    env = {**os.environ, "GRAFT_DATA_DIR": str(s.data_dir)}
    if not no_worker:
        children.append(subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--loglevel", "WARNING"],
                                         env=env, preexec_fn=_die_with_parent))
    if not s.inference_url:
        iport = _free_port()
        children.append(subprocess.Popen([sys.executable, "-m", "app.cli", "inference", "--port", str(iport)],
                                         env=env, preexec_fn=_die_with_parent))
        os.environ["GRAFT_INFERENCE_URL"] = f"http://127.0.0.1:{iport}"
        from app.core.settings import get_settings

        get_settings.cache_clear()  # the app (built by uvicorn's factory below) reads the new variable
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/login?token={login}"
    typer.echo(f"Graft is starting (data in {s.data_dir}, database {s.db_url.split('@')[-1]}, "
               f"queue {s.broker.split('://')[0]}).")
    typer.echo(f"Open this link to sign in (valid once, for 24 hours):\n\n    {url}\n", err=False)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into SystemExit so that the worker is
    # stopped below (docker stop, systemd), as Ctrl-C (KeyboardInterrupt) already is
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run("app.main:app_from_env", factory=True, host=host, port=port, log_level="warning",
                    timeout_graceful_shutdown=3)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=10)  # a running job is re-queued at the next start and resumes
            except subprocess.TimeoutExpired:
                child.kill()
        typer.echo("Graft stopped.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
