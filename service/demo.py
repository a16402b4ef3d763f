"""`unlearn demo`: the whole product, end to end, on the embedded defaults.

1. Builds a "customer support assistant": the built-in SmolLM2 fine-tuned on synthetic
   customer records (fixed seed), until it answers questions about them. Cached.
2. Starts the service (`unlearn up`: API, dispatcher, one worker; SQLite, no servers)
   in a child process, registers the assistant, submits an erasure request for one
   customer through the REST API, follows it with a progress bar, shows the audit and
   downloads the adapter (digests verified).
3. Answers the same questions about that customer and about another one, before and
   after applying the downloaded adapter with plain PEFT, side by side.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from service.ports import free_port

console = Console()
FACTS = ("birthday", "address", "phone", "employer", "account")
MODEL_NAME = "support-assistant"
SEED = 2024


def _stage(title: str) -> float:
    console.rule(f"[bold]{title}")
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    console.print(f"[green]{what}[/] in {time.perf_counter() - t0:.0f} s")


def customers(n: int) -> list[Any]:
    from workers.ml import synthetic

    return synthetic.people(n, seed=SEED)


def customer_items(person: Any, forms: tuple[int, ...] = (0, 1)) -> list[dict[str, str]]:
    """The records the assistant learns: each fact asked two ways."""
    from workers.ml import synthetic

    return synthetic.fact_items(person, FACTS, forms)


def build_assistant(folder: Path, people: list[Any], epochs: float, lr: float) -> dict[str, Any]:
    """Fine-tune the built-in model on every customer's records (once; cached)."""
    from rich.progress import Progress

    from workers.ml.finetune import finetune
    from workers.ml.loading import pick_placement

    marker = folder / "demo.json"
    if marker.is_file():
        return {**json.loads(marker.read_text()), "cached": True}
    items = [i for p in people for i in customer_items(p)]
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("fine-tuning", total=None)

        def tick(step: int, total: int, loss: float) -> None:
            bar.update(
                task, completed=step, total=total, description=f"fine-tuning, loss {loss:.3f}"
            )

        res = finetune(
            "builtin:smollm2-135m-instruct",
            items,
            folder,
            epochs=epochs,
            lr=lr,
            batch_size=8,
            placement=pick_placement(None, "float32"),
            progress=tick,
        )
    info = {
        "customers": len(people),
        "items": len(items),
        "steps": res.steps,
        "seconds": res.seconds,
    }
    marker.write_text(json.dumps(info))
    return info


def answers(folder: Path, questions: list[str], adapter: Path | None = None) -> list[str]:
    from peft import PeftModel

    from workers.ml import loading
    from workers.ml.evaluate import greedy_answers

    base, tok = loading.load(loading.resolve(str(folder)), loading.pick_placement(None, "float32"))
    model: Any = base
    if adapter is not None:
        model = PeftModel.from_pretrained(base, str(adapter))  # plain PEFT, nothing of ours
    return greedy_answers(model, tok, questions, max_new_tokens=40)


class EmbeddedService:
    """`unlearn up` in a child process with its own SQLite database, broker and artifact
    folders under `root`, and an admin key minted beforehand."""

    def __init__(self, root: Path, model_cache: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DATABASE_URL": f"sqlite:///{self.root / 'unlearn.sqlite'}",
            "BROKER_URL": f"sqla+sqlite:///{self.root / 'broker.sqlite'}",
            "ARTIFACT_ROOT": str(self.root / "artifacts"),
            "WORK_ROOT": str(self.root / "work"),
            "MODEL_CACHE": str(model_cache.resolve()),
            "BATCH_WINDOW_SECONDS": "0",  # one request: no reason to wait for others
            "LOG_LEVEL": "WARNING",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def admin_key(self) -> str:
        """Migrate the demo database and mint a key with every scope (printed once by
        `unlearn keys create`, like any key)."""
        from service.access.scopes import ALL_SCOPES

        cli = [sys.executable, "-m", "service.cli"]
        subprocess.run(
            [*cli, "migrate", "--no-bootstrap-admin"], env=self.env, capture_output=True, check=True
        )
        scopes = [arg for scope in ALL_SCOPES for arg in ("--scope", scope)]
        out = subprocess.run(
            [*cli, "keys", "create", "--tenant", "demo", "--name", "demo", *scopes],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip().splitlines()[-1]

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--port", str(self.port)],
            env=self.env,
            stdout=(self.root / "service.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited; see {self.root / 'service.log'}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the service did not become ready; see {self.root / 'service.log'}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # `unlearn up` stops its worker in order
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _audit_summary(report: dict[str, Any]) -> None:
    verdict = report["verdict"]
    table = Table(title="audit of the adapter", show_lines=False)
    for col in ("", "criterion", "value", "threshold"):
        table.add_column(col)
    for c in verdict["criteria"]:
        table.add_row(
            "[green]pass[/]" if c["passed"] else "[red]FAIL[/]",
            c["name"],
            f"{c['value']:.3f}",
            f"{c['threshold']:.3f}",
        )
    console.print(table)
    s = report["summary"]
    console.print(
        f"forget probability {s['forget_prob']['before']:.3f} -> {s['forget_prob']['after']:.3f} "
        f"(never-seen stand-ins: {s['holdout_prob']['after']:.3f}); "
        f"general-knowledge accuracy {s['probe_accuracy']['before']:.3f} -> "
        f"{s['probe_accuracy']['after']:.3f}"
    )
    retried = f" in audit round {report['round']} (a retry)" if report.get("round") else ""
    console.print(f"verdict: {'[green]PASSED' if verdict['passed'] else '[red]FAILED'}[/]{retried}")


def run(
    root: Path = Path("var/demo"),
    n_customers: int = 12,
    forget_index: int = 0,
    epochs: float = 6.0,
    lr: float = 2e-4,
) -> bool:
    """The story; returns whether the forgotten customer's facts are gone and the other
    customer's intact."""
    from service.client import ApiError, Client
    from workers.ml import synthetic

    t_start = time.perf_counter()
    people = customers(n_customers)
    gone, kept = people[forget_index], people[(forget_index + 1) % len(people)]
    assistant = root / f"assistant-e{epochs:g}-lr{lr:g}"  # a cache per recipe

    t0 = _stage("1. the customer support assistant")
    info = build_assistant(assistant, people, epochs, lr)
    how = f"{info['customers']} customers, {info['items']} records, {info['steps']} steps"
    if info.get("cached"):
        how += f" (fine-tuned in {info['seconds']:.0f} s by an earlier run; cached in {assistant})"
    _done(t0, how)
    questions = [i["prompt"] for i in customer_items(gone, (0,)) + customer_items(kept, (0,))]
    before = answers(assistant, questions)
    secrets = synthetic.fact_secrets(gone, FACTS) + synthetic.fact_secrets(kept, FACTS)
    known = sum(synthetic.revealed(before, secrets))
    console.print(
        f"it answers {known}/{len(questions)} questions about the two customers correctly"
    )

    t0 = _stage("2. the erasure, through the REST API")
    service = EmbeddedService(root / "service", Path(os.environ.get("MODEL_CACHE", "var/models")))
    key = service.admin_key()
    service.start()
    console.print(f"service on {service.url} (log: {service.root / 'service.log'})")
    try:
        with Client(service.url, key, timeout=60) as c:
            try:
                c.model(MODEL_NAME)  # registered by an earlier run of the demo
            except ApiError as exc:
                if exc.status != 404:
                    raise
                retain = [i for p in people if p is not gone for i in customer_items(p)]
                c.register_model(MODEL_NAME, str(assistant.resolve()), retain)
            req = c.submit(MODEL_NAME, f"customer-{gone.name}", customer_items(gone))
            console.print(f"erasure request {req['id']} for {gone.name}: {req['status']}")
            done = c.wait(req["id"], progress=True, poll=1.0)
            console.print(f"request {done['status']}: {done.get('status_reason') or ''}")
            version = done.get("adapter_version")
            if version is None:
                return False
            report = c.adapter_audit(MODEL_NAME, version)
            _audit_summary(report)
            page = root / f"audit-v{version}.html"
            page.write_text(c.adapter_audit_html(MODEL_NAME, version))
            console.print(f"the audit report for people: {page}")
            if not report["verdict"]["passed"]:
                console.print("[red]the adapter is quarantined: it cannot be downloaded[/]")
                return False
            adapter = c.download(MODEL_NAME, version, root / f"adapter-v{version}")
            console.print(f"downloaded and verified: {adapter}")
    finally:
        service.stop()
    _done(t0, "erasure fulfilled")

    t0 = _stage("3. before and after, with plain PEFT")
    after = answers(assistant, questions, adapter)
    hits_after = synthetic.revealed(after, secrets)
    hits_before = synthetic.revealed(before, secrets)
    table = Table(show_lines=True)
    for col in ("question", "before", "after"):
        table.add_column(col, overflow="fold")
    for q, b, a, hb, ha in zip(questions, before, after, hits_before, hits_after, strict=True):
        table.add_row(q, f"{'[red]' if hb else ''}{b}", f"{'[red]' if ha else ''}{a}")
    console.print(table)
    n = len(FACTS)
    gone_after, kept_before, kept_after = (
        sum(hits_after[:n]),
        sum(hits_before[n:]),
        sum(hits_after[n:]),
    )
    console.print(
        f"{gone.name}: {sum(hits_before[:n])}/{n} facts revealed before, {gone_after}/{n} after; "
        f"{kept.name}: {kept_before}/{n} before, {kept_after}/{n} after"
    )
    _done(t_start, "demo finished")
    return gone_after == 0 and kept_after >= kept_before
