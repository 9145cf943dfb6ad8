"""The `graft` commands that run the server side: the web app, workers, the inference service, the
database and accounts. They import the web app and the worker bridge lazily, so `graft --help` stays fast."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import typer

from app.db.migrate import run_migrations


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
    from app.services import storage

    st = storage.for_settings(s)
    if isinstance(st, storage.S3Storage):
        try:
            made = st.ensure_bucket()
        except storage.StorageError as e:
            _fail(str(e))
        typer.echo(f"storage {st.url}: bucket {'created' if made else 'ready'}")


def _sessions():
    from app.db.session import session_factory

    s = _settings()
    run_migrations(s.db_url)
    return s, session_factory(s.db_url)


def worker(concurrency: int | None = typer.Option(None, min=1, help="Jobs run at the same time by this worker "
                                                  "(default: GRAFT_JOBS_PER_GPU x this host's GPUs, 1 without a "
                                                  "GPU)."),
           loglevel: str = typer.Option("INFO")) -> None:
    """Run a worker that trains queued jobs (on any host that shares GRAFT_DATA_DIR and the database)."""
    s = _settings()
    from app.services.queue import QUEUE
    from worker.runjob import default_concurrency, worker_gpus
    from worker.tasks import celery_app

    gpus = worker_gpus()  # (asks NVML: CUDA stays uninitialised in this process, which forks the pool children)
    if concurrency is None:
        concurrency = default_concurrency(s.jobs_per_gpu, gpus)
    if gpus:  # each pool child takes GPU (its pool index modulo the GPUs) at its first job (worker.runjob)
        _say(f"worker: up to {concurrency} job(s) at once on {gpus} GPU(s), {s.jobs_per_gpu} per GPU "
             f"(GRAFT_JOBS_PER_GPU); a job starts when {s.gpu_job_min_free_mb} MiB are free on its GPU "
             "(GRAFT_GPU_JOB_MIN_FREE_MB)")
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


def _die_with_parent() -> None:
    """In a child of `graft serve`: get SIGTERM when `graft serve` dies, even by SIGKILL (Linux). (The kernel
    sends it when the *thread* that started the child ends: serve's supervisor thread lives until serve
    stops its children anyway.) Its own process group, too: a Ctrl-C in the terminal reaches `graft serve`
    alone, which stops supervising first and then stops its children itself."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
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
    uvicorn.run(create_inference_app(s.data_dir, cache_size, s), host=host, port=port, log_level="warning")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# a child that exits is started again after RESTART_FIRST_S, doubling up to RESTART_MAX_S while it keeps
# failing; the delay starts over once a child has run for RESTART_RESET_S
RESTART_FIRST_S, RESTART_MAX_S, RESTART_RESET_S = 1.0, 30.0, 60.0
SUPERVISE_POLL_S = 0.5
STOP_TIMEOUT_S = 10.0  # a stopped worker first puts its running job back in the queue


def _exit_text(rc: int) -> str:
    """'killed by SIGKILL' or 'status 1', from a Popen returncode."""
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"status {rc}"


class Child:
    """A child process of `graft serve` (the worker, the inference service): how to start it, where its
    output goes (appended to `log_path`), the process now, and its restart delay."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path,
                 preexec: Callable[[], None] | None = None, where: str = ""):
        self.name, self.argv, self.env, self.log_path, self.preexec, self.where = name, argv, env, log_path, preexec, where
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.delay = RESTART_FIRST_S
        self.restart_at: float | None = None

    def start(self) -> subprocess.Popen:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"----- graft serve starts {self.name} at {time.strftime('%Y-%m-%d %H:%M:%S')} -----\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, preexec_fn=self.preexec)
        self.started_at = time.monotonic()
        return self.proc

    def line(self) -> str:
        """The start-up line: 'worker  pid 1234'."""
        assert self.proc is not None
        return f"{self.name}  pid {self.proc.pid}{' ' + self.where if self.where else ''}"


class Supervisor(threading.Thread):
    """Starts again any child that exits while `graft serve` runs, with a growing delay (RESTART_*), and
    says so on stderr, one line each. `pause()` (from a signal handler: it only sets a flag) stops any
    further restart; `stop()` also waits for a restart under way, then ends the thread."""

    def __init__(self, children: list[Child], poll_s: float = SUPERVISE_POLL_S):
        super().__init__(name="graft-supervisor", daemon=True)
        self.children, self.poll_s = children, poll_s
        self._paused = threading.Event()
        self._lock = threading.Lock()

    def pause(self) -> None:
        self._paused.set()

    def stop(self) -> None:
        self._paused.set()
        with self._lock:  # a restart under way is finished (and its process stopped by the caller)
            pass
        if self.is_alive():
            self.join(timeout=5)

    def run(self) -> None:
        while not self._paused.wait(self.poll_s):
            with self._lock:
                for child in self.children:
                    if self._paused.is_set():
                        return
                    try:
                        self._check(child)
                    except Exception as e:  # never stop supervising
                        _say(f"could not supervise the {child.name} ({type(e).__name__}: {e})")

    def _check(self, child: Child) -> None:
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restart_at = None
                try:
                    child.start()
                except OSError as e:
                    child.restart_at = now + child.delay
                    _say(f"could not start the {child.name} ({e}); trying again in {child.delay:g} s")
                    child.delay = min(child.delay * 2, RESTART_MAX_S)
                else:
                    _say(f"{child.line()} (started again)")
            return
        rc = child.proc.poll() if child.proc is not None else None
        if rc is None:
            return
        if now - child.started_at >= RESTART_RESET_S:
            child.delay = RESTART_FIRST_S
        delay, child.delay = child.delay, min(child.delay * 2, RESTART_MAX_S)
        child.restart_at = now + delay
        _say(f"{child.name} exited ({_exit_text(rc)}); starting it again in {delay:g} s")


def _say(line: str) -> None:
    typer.echo(line, err=True)


def _stop_children(children: list[Child], hurry: threading.Event, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every live child, wait for them (the worker puts its running job back in the queue first),
    SIGKILL those still alive after `timeout` seconds (or at once when `hurry` is set: a second Ctrl-C)."""
    procs = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline and not hurry.is_set():
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


class _Stop(Exception):
    """SIGTERM or SIGINT: stop `graft serve` (exit status 0)."""


def _raise_stop(signum, frame) -> None:
    raise _Stop(signum)


def serve(host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
          port: int = typer.Option(8000, help="Port to listen on."),
          no_worker: bool = typer.Option(False, "--no-worker", help="Do not start a local worker."),
          open_browser: bool = typer.Option(False, "--open", help="Open the sign-in link in a browser.")) -> None:
    """Migrate the database, start the web app, one worker and the inference service, and keep them running
    (a child that dies is started again; lost jobs are re-queued); print a one-time sign-in link. SIGTERM or
    Ctrl-C stops everything (a running job goes back to the queue) and exits 0."""
    import uvicorn

    from app.services import auth
    from worker.reaper import Maintenance

    s, S = _sessions()
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    origin = s.public_url if os.environ.get("GRAFT_PUBLIC_URL") else f"http://{shown}:{port}"
    if not os.environ.get("GRAFT_PUBLIC_URL"):  # invite links made by the app point at this server
        os.environ["GRAFT_PUBLIC_URL"] = origin
        from app.core.settings import get_settings

        get_settings.cache_clear()
    with S() as db:
        user = auth.ensure_user(db, s.default_user, admin=True)
        if not user.is_admin:  # the default user is always an admin
            user.is_admin = True
            db.commit()
        if user.password_hash is None and user.oidc_subject is None:  # the first start: the admin's invite
            url = auth.invite_link(db, user, origin)
            link_text = (f"Open this link to set the password of {user.name}, the admin (valid once, for 7 "
                         "days; `graft user invite NAME` makes a new one):")
        else:
            url = f"{origin}/login?token=" + auth.create_token(db, user, "sign-in link", kind="login",
                                                               ttl=auth.LOGIN_TTL)
            link_text = f"Open this link to sign in as {user.name} (valid once, for 24 hours), or sign in at {origin}/login:"
    if not no_worker:
        try:
            requeue_orphans(S, s)
        except Exception as e:  # the queue is down: the worker re-sends queued jobs when it starts
            typer.secho(f"warning: could not re-queue jobs ({type(e).__name__}: {e})", fg=typer.colors.YELLOW,
                        err=True)
    logs = s.data_dir / "logs"
    children: list[Child] = []
    env = {**os.environ, "GRAFT_DATA_DIR": str(s.data_dir)}
    if not no_worker:  # its banner and warnings go to its log, not to this terminal
        children.append(Child("worker", [sys.executable, "-m", "cli", "worker", "--loglevel", "WARNING"], env,
                              logs / "worker.log", preexec=_worker_child))
    if not s.inference_url:
        iport = _free_port()
        children.append(Child("inference", [sys.executable, "-m", "cli", "inference", "--port", str(iport)], env,
                              logs / "inference.log", preexec=_die_with_parent, where=f"on 127.0.0.1:{iport}"))
        os.environ["GRAFT_INFERENCE_URL"] = f"http://127.0.0.1:{iport}"
        from app.core.settings import get_settings

        get_settings.cache_clear()  # the app (built by uvicorn's factory below) reads the new variable
    typer.echo(f"Graft is starting (data in {s.data_dir}, database {s.db_url.split('@')[-1]}, "
               f"queue {s.broker.split('://')[0]}).")
    typer.echo(f"{link_text}\n\n    {url}\n", err=False)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    supervisor = Supervisor(children)
    maintenance = Maintenance(s)  # the reconciler: lost jobs back to the queue, lost messages sent again
    hurry = threading.Event()
    started = True
    # SIGTERM (docker stop, systemd) and Ctrl-C: uvicorn handles them while it runs (a graceful shutdown),
    # then raises them again, here as _Stop; before and after it, they raise _Stop at once
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        typer.echo(f"web  http://{shown}:{port}")
        for child in children:
            child.start()
            typer.echo(child.line())
        if children:
            typer.echo(f"logs  {logs} ({', '.join(c.log_path.name for c in children)})")
        if s.broker.startswith("filesystem"):  # a warning of every connection to it, meaningless there
            logging.getLogger("kombu.connection").addFilter(lambda r: "No hostname was supplied" not in r.getMessage())
        supervisor.start()
        maintenance.start()  # the reconciler: lost jobs back to the queue, lost messages sent again
        config = uvicorn.Config("app.main:app_from_env", factory=True, host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=3)
        server = uvicorn.Server(config)
        handle_exit = server.handle_exit

        def on_signal(sig, frame) -> None:  # no restart from now on: the children are stopped next
            supervisor.pause()
            handle_exit(sig, frame)

        server.handle_exit = on_signal  # type: ignore[method-assign]
        server.run()
        started = server.started
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, lambda *_: hurry.set())
        signal.signal(signal.SIGINT, lambda *_: hurry.set())
        supervisor.stop()
        maintenance.stop()
        _stop_children(children, hurry)
        typer.echo("Graft stopped.")
    if not started:  # uvicorn could not start (the port is taken...): it said why
        raise typer.Exit(1)


def web(host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
        port: int = typer.Option(8000, help="Port to listen on."),
        workers: int = typer.Option(1, min=1, help="Web processes (uvicorn workers) sharing the port."),
        log_level: str = typer.Option("info", help="uvicorn's log level.")) -> None:
    """Run the web app alone (for production, next to `graft worker` and `graft inference`; run `graft
    migrate` first, and set GRAFT_INFERENCE_URL to the inference service)."""
    import uvicorn

    s = _settings()
    if not s.inference_url:
        typer.secho("warning: GRAFT_INFERENCE_URL is not set: predictions answer 503 (run `graft inference`)",
                    fg=typer.colors.YELLOW, err=True)
    uvicorn.run("app.main:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level.lower(), timeout_graceful_shutdown=10)


def register(app: typer.Typer) -> None:
    for command in (migrate, worker, reconcile, inference, web, serve):
        app.command()(command)
