"""The `graft` commands that run the server side: the web app, workers, the inference service, the
database and accounts. They import the web app and the worker bridge lazily, so `graft --help` stays fast."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import typer

from app.db.migrate import run_migrations

token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
user_app = typer.Typer(help="Users.", no_args_is_help=True)


def _settings():
    from app.core.settings import get_settings

    s = get_settings()
    s.ensure_dirs()
    s.use_weights_dir()
    return s


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


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
                 user: str | None = typer.Option(None, "--user", help="Whose token (default: the default user).")) -> None:
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


def worker(concurrency: int = typer.Option(1, help="Jobs run at the same time by this worker."),
           loglevel: str = typer.Option("INFO")) -> None:
    """Run a worker that trains queued jobs (on any host that shares GRAFT_DATA_DIR and the database)."""
    s = _settings()  # noqa: F841
    from app.services.queue import QUEUE
    from worker.tasks import celery_app

    argv = ["worker", f"--loglevel={loglevel}", f"--concurrency={concurrency}", "-Q", QUEUE,
            "--pool", "solo" if concurrency == 1 else "prefork", "--without-gossip", "--without-mingle",
            "-n", f"graft-{os.getpid()}@%h"]
    celery_app.worker_main(argv)


def requeue_orphans(S, settings) -> None:
    """At start-up: a job still 'running' lost its worker (crash, power cut; a worker that is stopped puts
    its job back itself). With the embedded queue the only worker is this command's child, so every running
    job is an orphan; with a shared broker only those whose heartbeat is late (other hosts' workers may be
    running jobs). Orphans are re-queued (up to GRAFT_MAX_ATTEMPTS starts, then failed) and resume from
    their last checkpoint. Then every queued job is (re)sent: the worker's conditional claim makes a
    duplicate message harmless, and the embedded queue may have lost messages."""
    from sqlalchemy import select

    from app.db.models import Job, JobStatus
    from worker.reaper import reap, send_job, send_unsent

    reap(S, settings, stale_after_s=0 if not settings.broker_url else None)
    send_unsent(S, settings)
    with S() as db:
        rows = db.execute(select(Job.id, Job.celery_task_id).where(Job.status == JobStatus.queued.value,
                                                                   Job.celery_task_id.is_not(None))).all()
    for jid, task_id in rows:
        send_job(S, settings, jid, task_id)


def reconcile(wait: float = typer.Option(2.0, help="Seconds between the two looks at the broker (a message "
                                                   "missing at both is taken as lost).")) -> None:
    """Once: re-queue (or fail) jobs whose worker stopped responding, and send queued jobs the broker does
    not have. Every worker already does this every GRAFT_RECONCILE_INTERVAL_S seconds."""
    from worker.reaper import Reconciler

    s = _settings()
    run_migrations(s.db_url)
    rec = Reconciler(s)
    try:
        first = rec.tick()
        time.sleep(wait)
        second = rec.tick()
    except Exception as e:
        _fail(f"could not reconcile ({type(e).__name__}: {e}): check GRAFT_DATABASE_URL and GRAFT_BROKER_URL")
    done = {k: sorted(set(first[k]) | set(second[k])) for k in first}
    labels = {"requeued": "re-queued (worker lost)", "failed": "failed (worker lost too often)",
              "cancelled": "cancelled (worker lost)", "sent": "sent to the queue",
              "resent": "sent again (the broker had lost them)"}
    for k, ids in done.items():
        if ids:
            typer.echo(f"{labels[k]}: job(s) {', '.join(map(str, ids))}")
    if not any(done.values()):
        typer.echo("nothing to do: no lost jobs, the broker has every queued job")


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _die_with_parent() -> None:
    """In the worker child: get SIGTERM when `graft serve` dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


WORKER_NICE = 10


def _worker_child() -> None:
    """In the worker child of `graft serve`: die with it, and train at a lower CPU priority, so that the web
    app on the same cores stays quick while a job trains (docs/benchmarks.md, "Issue 5: load while
    training"); training only gives way while the web is busy."""
    _die_with_parent()
    try:
        os.nice(WORKER_NICE)
    except OSError:
        pass


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
        children.append(subprocess.Popen([sys.executable, "-m", "cli", "worker", "--loglevel", "WARNING"],
                                         env=env, preexec_fn=_worker_child))
    if not s.inference_url:
        iport = _free_port()
        children.append(subprocess.Popen([sys.executable, "-m", "cli", "inference", "--port", str(iport)],
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
                child.wait(timeout=10)  # the worker puts a running job back in the queue first
            except subprocess.TimeoutExpired:
                child.kill()
        typer.echo("Graft stopped.")


def register(app: typer.Typer) -> None:
    for command in (migrate, worker, reconcile, inference, serve):
        app.command()(command)
    app.add_typer(token_app, name="token")
    app.add_typer(user_app, name="user")
