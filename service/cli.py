"""`unlearn`: the one command line for every role (API, dispatcher, worker, migrations,
keys)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from service.access.scopes import ALL_SCOPES, DEFAULT_CLIENT_SCOPES
from service.config import get_settings

app = typer.Typer(
    help="Unlearning service: erasure requests in, audited LoRA adapters out.", no_args_is_help=True
)
keys_app = typer.Typer(help="API keys and the data-encryption key.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console()


def _alembic_config():  # type: ignore[no-untyped-def]
    from alembic.config import Config

    root = Path(__file__).resolve().parent.parent
    cfg = Config(str(root / "alembic.ini"))
    cfg.set_main_option("script_location", str(root / "migrations"))
    return cfg


def run_migrations() -> None:
    from alembic import command

    command.upgrade(_alembic_config(), "head")


@app.command()
def migrate(
    bootstrap_admin: Annotated[
        bool, typer.Option(help="mint the first admin key if no admin key exists yet")
    ] = True,
) -> None:
    """Upgrade the database to the newest schema; on first setup, mint an admin key."""
    from service.access import service as access
    from service.db import session_scope

    run_migrations()
    console.print(f"[green]database at head[/] ({_redacted(get_settings().database_url)})")
    if not bootstrap_admin:
        return
    with session_scope() as session:
        if access.any_admin_key(session):
            return
        minted = access.mint_key(
            session, tenant_name="admin", scopes=ALL_SCOPES, name="bootstrap admin"
        )
    console.print("[bold]First admin key (shown once, store it now):[/]")
    typer.echo(minted.token)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="tenant name; created if new")],
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", "-s", help=f"repeatable; one of {ALL_SCOPES}"),
    ] = None,
    name: Annotated[str, typer.Option(help="a label for this key")] = "cli",
) -> None:
    """Mint an API key for a tenant and print it once (only its hash is stored)."""
    from service.access import service as access
    from service.db import session_scope

    try:
        with session_scope() as session:
            minted = access.mint_key(
                session, tenant_name=tenant, scopes=scope or DEFAULT_CLIENT_SCOPES, name=name
            )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    console.print(
        f"key [bold]{minted.key_id}[/] for tenant {minted.tenant_name}, "
        f"scopes {', '.join(minted.scopes)}",
        highlight=False,
    )
    typer.echo(minted.token)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke an API key by its id (the part after `ulk_`)."""
    from service.access import service as access
    from service.db import session_scope

    with session_scope() as session:
        done = access.revoke_key(session, key_id=key_id)
    if not done:
        raise typer.BadParameter(f"no active key {key_id!r}")
    console.print(f"revoked {key_id}")


@keys_app.command("gen-data-key")
def keys_gen_data_key() -> None:
    """Print a new DATA_ENCRYPTION_KEY (32 random bytes, url-safe base64)."""
    typer.echo(base64.urlsafe_b64encode(os.urandom(32)).decode())


@app.command()
def api(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the HTTP API with uvicorn."""
    import uvicorn

    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=get_settings().log_level.lower(),
    )


@app.command()
def dispatcher(
    once: Annotated[bool, typer.Option(help="run one tick and exit")] = False,
) -> None:
    """Batch pending requests into jobs, send them to workers, reap, purge."""
    from service import dispatcher as disp
    from service.logs import configure

    settings = get_settings()
    configure(settings.log_level, settings.log_json)
    if once:
        report = disp.tick()
        console.print(report)
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    disp.run_forever(stop)


WORKER_FLAGS = ["--without-gossip", "--without-mingle", "--concurrency", "1"]


def worker_argv(queues: str, name: str, loglevel: str) -> list[str]:
    return ["worker", "-Q", queues, "-n", f"{name}@%h", "-l", loglevel, *WORKER_FLAGS]


@app.command()
def worker(
    queues: str = typer.Option(
        "unlearning,default", help="queues to consume: 'unlearning' needs a GPU (or CPU)"
    ),
    name: str = typer.Option("worker", help="node name (one worker process per GPU)"),
    loglevel: str = typer.Option("INFO", help="Celery log level"),
) -> None:
    """A worker: runs unlearning jobs one at a time, each in a fresh child process (so
    GPU memory is freed after every job). Start one per GPU, with CUDA_VISIBLE_DEVICES
    set to that GPU."""
    from workers.allocator import reexec_under_jemalloc

    reexec_under_jemalloc()  # before anything starts: the jobs' allocator (workers/allocator.py)
    from workers.celery_app import app as celery_app

    celery_app.worker_main(worker_argv(queues, name, loglevel))


@app.command()
def up(
    host: str = "127.0.0.1",
    port: int = 8000,
    with_worker: bool = typer.Option(True, "--worker/--no-worker", help="start one worker too"),
) -> None:
    """Everything on the configured (by default embedded) backends: migrations, the API
    and the dispatcher in this process, one worker in a child process. Ctrl-C stops all."""
    import uvicorn

    from service import dispatcher as disp
    from workers.allocator import with_jemalloc

    migrate(bootstrap_admin=True)
    stop = threading.Event()
    loop = threading.Thread(target=disp.run_forever, args=(stop,), name="dispatcher")
    loop.start()
    child = None
    if with_worker:
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.celery_app",
                *worker_argv("unlearning,default", "embedded", get_settings().log_level),
            ],
            env=with_jemalloc(os.environ),  # the jobs' allocator (workers/allocator.py)
            start_new_session=True,  # Ctrl-C reaches it through us, in order
        )
    console.print(
        f"[bold]API on http://{host}:{port}[/] (docs at /docs); dispatcher"
        f"{' and one worker' if child else ''} running. Ctrl-C stops."
    )
    # uvicorn handles SIGINT/SIGTERM itself, then re-raises the signal once the server
    # has stopped. SIGTERM's default action would end this process on the spot, before
    # the `finally` below stops the worker (it went on running, holding its job): turn
    # it into an exception instead, as SIGINT already is.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.run(
            "service.main:create_app",
            factory=True,
            host=host,
            port=port,
            log_level=get_settings().log_level.lower(),
        )
    finally:
        stop.set()
        if child is not None:
            # Celery's warm shutdown waits for a running job; give it a moment, then stop
            # it hard. The job keeps its checkpoint and is re-queued by the reaper (after
            # HEARTBEAT_TIMEOUT_SECONDS) once the service runs again.
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        loop.join(timeout=30)
        console.print("stopped")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@app.command("verify-trail")
def verify_trail() -> None:
    """Recompute the audit trail's hash chain; exit 1 at the first broken link."""
    from service.db import session_scope
    from service.trail import service as trail

    with session_scope() as session:
        trail.seal_pending(session)
    with session_scope() as session:
        result = trail.verify(session)
    console.print(result)
    raise typer.Exit(0 if result.ok else 1)


# ---- talking to a running service (the Python client) -----------------------------

UrlOpt = Annotated[str, typer.Option("--url", envvar="UNLEARN_URL", help="the service's base URL")]
KeyOpt = Annotated[
    str, typer.Option("--key", envvar="UNLEARN_API_KEY", help="an API key (ulk_...)")
]
models_app = typer.Typer(help="Registered base models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _client(url: str, key: str):  # type: ignore[no-untyped-def]
    from service.client import Client

    return Client(url, key)


def _print_json(data: object) -> None:
    console.print_json(json.dumps(data, default=str))


def _call(fn):  # type: ignore[no-untyped-def]
    """Run a client call; a problem from the service becomes a readable error, exit 1."""
    from service.client import ApiError

    try:
        return fn()
    except ApiError as exc:
        console.print(
            f"[red]{exc.status} {exc.problem.get('title', '')}[/]: {exc.problem.get('detail', '')}"
        )
        raise typer.Exit(1) from exc


def _load_items(path: Path) -> list[dict[str, str]]:
    data = json.loads(path.read_text())
    return list(data["items"] if isinstance(data, dict) else data)


@models_app.command("add")
def models_add(
    name: str,
    source: Annotated[
        str, typer.Option(help="'builtin:smollm2-135m-instruct' or a model folder")
    ] = ("builtin:smollm2-135m-instruct"),
    retain: Annotated[
        Path | None, typer.Option(help="JSON file: a list of {prompt, completion} or {text} items")
    ] = None,
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = "",
) -> None:
    """Register a base model (admin key)."""
    items = _load_items(retain) if retain else []
    with _client(url, key) as c:
        _print_json(_call(lambda: c.register_model(name, source, items)))


@app.command()
def submit(
    model: Annotated[str, typer.Option(help="a registered model's name")],
    subject: Annotated[str, typer.Option(help="your reference for the data subject")],
    items: Annotated[Path, typer.Option(help="JSON file: the items to forget (a list)")],
    holdout: Annotated[Path | None, typer.Option(help="JSON file: holdout items")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="default: a new UUID")] = None,
    wait: Annotated[bool, typer.Option(help="wait for the outcome with a progress bar")] = False,
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = "",
) -> None:
    """Submit an erasure request (and optionally wait until it is fulfilled)."""
    with _client(url, key) as c:
        req = _call(
            lambda: c.submit(
                model,
                subject,
                _load_items(items),
                holdout=_load_items(holdout) if holdout else None,
                idempotency_key=idempotency_key,
            )
        )
        if wait:
            req = _call(lambda: c.wait(req["id"], progress=True))
        _print_json(req)
        if req["status"] in ("failed", "rejected"):
            raise typer.Exit(1)


@app.command()
def status(request_id: str, url: UrlOpt = "http://127.0.0.1:8000", key: KeyOpt = "") -> None:
    """An erasure request's status (and its job's stage and progress)."""
    with _client(url, key) as c:
        req = _call(lambda: c.request(request_id))
        if req.get("job_id"):
            job = _call(lambda: c.job(req["job_id"]))
            req["job"] = {k: job[k] for k in ("stage", "progress", "attempts", "error")}
        _print_json(req)


@app.command()
def audit(
    request_id: Annotated[str | None, typer.Argument(help="a request id")] = None,
    model: Annotated[str | None, typer.Option(help="or: a model's adapter audit")] = None,
    version: Annotated[str, typer.Option(help="with --model: a version or 'latest'")] = "latest",
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = "",
) -> None:
    """The audit of a request (its own items) or of an adapter version (everything)."""
    with _client(url, key) as c:
        if model:
            report = _call(lambda: c.adapter_audit(model, version))
            verdict = report["verdict"]
            for crit in verdict["criteria"]:
                mark = "[green]pass[/]" if crit["passed"] else "[red]FAIL[/]"
                console.print(f"{mark} {crit['group']:<11} {crit['message']}")
            console.print(f"verdict: {'PASSED' if verdict['passed'] else 'FAILED'}")
        elif request_id:
            _print_json(_call(lambda: c.request_audit(request_id)))
        else:
            raise typer.BadParameter("give a request id or --model")


@app.command()
def download(
    model: str,
    version: Annotated[str, typer.Option(help="a version number or 'latest'")] = "latest",
    out: Annotated[Path, typer.Option(help="folder to extract the adapter into")] = Path("adapter"),
    url: UrlOpt = "http://127.0.0.1:8000",
    key: KeyOpt = "",
) -> None:
    """Download an audited adapter, verify every digest, extract it (a folder PEFT loads)."""
    with _client(url, key) as c:
        folder = _call(lambda: c.download(model, version, out))
    manifest = json.loads((folder / "manifest.json").read_text())
    console.print(
        f"{model} v{manifest['version']} -> {folder} (digests verified; base "
        f"{manifest['base_model']['digest']})"
    )


@app.command()
def demo(
    customers: Annotated[int, typer.Option(help="synthetic customers the assistant knows")] = 12,
    forget: Annotated[int, typer.Option(help="which customer asks to be forgotten")] = 0,
    root: Annotated[
        Path, typer.Option(help="the demo's own folder (cached model, service)")
    ] = Path("var/demo"),
) -> None:
    """The whole story on the embedded defaults: fine-tune a support assistant on
    synthetic customers (cached), start the service, erase one customer through the REST
    API, show the audit, download the adapter and compare answers before and after."""
    from service import demo as story

    ok = story.run(root=root, n_customers=customers, forget_index=forget)
    raise typer.Exit(0 if ok else 1)


def _redacted(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


if __name__ == "__main__":
    app()
