"""Forgetting quality against retraining, TOFU-style, through the running service.

For each forget set (the first 1 or 4 of 40 fictitious people, benchmarks.quality_models)
and each method: register the target model under its own name (every model starts its
own chain, so no run continues another's), POST one erasure request per person (the
requests of a forget set arrive together and the dispatcher batches them into one job),
wait, and take the adapter out: downloaded and verified when it passed its audit, read
from the artifact store when it was quarantined (a benchmark may look at what a user
cannot). Then measure it (benchmarks.quality_metrics) against the retrained model.

Rows are kept in var/bench/quality/results.json as they finish, so a rerun only does
what is missing; `--report` writes the table (results.md) and the scatter plot
(quality.png) from them.

    .venv/bin/python -m benchmarks.quality [--forget-sets forget01,forget04]
        [--methods simnpo,npo,...] [--report]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import quality_metrics as qm
from benchmarks.quality_models import (
    FORGET_SETS,
    QUALITY_DIR,
    cohort,
    retrained,
    retraining_seconds,
    target,
)
from workers.ml import synthetic

RESULTS = QUALITY_DIR / "results.json"
# Every run keeps the same retain data and utility sample, so rows compare: the people
# after the chain's five (the forget sets are the first 1 and 4).
CHAIN_VERSIONS = 5
RETAIN_FROM = CHAIN_VERSIONS
UTILITY_PEOPLE = 6  # strided over the retain people


def _load() -> dict[str, Any]:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def _save(results: dict[str, Any]) -> None:
    RESULTS.write_text(json.dumps(results, indent=1))


def _people(forget_set: str) -> tuple[list[Any], list[Any], list[Any]]:
    people = cohort()
    retain = people[RETAIN_FROM:]
    step = len(retain) // UTILITY_PEOPLE
    return people[: FORGET_SETS[forget_set]], retain, retain[::step][:UTILITY_PEOPLE]


def _seconds(job: dict[str, Any], a: str, b: str) -> float:
    return (datetime.fromisoformat(job[b]) - datetime.fromisoformat(job[a])).total_seconds()


def _quarantined_folder(service_root: Path, job_id: str) -> Path | None:
    db = sqlite3.connect(service_root / "unlearn.sqlite")
    try:
        found = db.execute(
            "SELECT storage_prefix FROM adapter_versions WHERE job_id = ?", (job_id,)
        ).fetchone()
    finally:
        db.close()
    return None if found is None else service_root / "artifacts" / found[0]


def register(c: Any, base: str, method: str, retain: list[Any]) -> str:
    """Register the target under a fresh name (a model's first request starts a chain)."""
    from service.client import ApiError

    for attempt in range(100):  # a rerun after a failure: a fresh chain, a new name
        name = base + (f"-{attempt}" if attempt else "")
        try:
            c.register_model(
                name,
                str(target().resolve()),
                [i for p in retain for i in synthetic.qa_items(p)],
                # "default": no method named, so the job runs the service's default
                default_method=None if method == "default" else {"name": method},
            )
            return name
        except ApiError as exc:
            if exc.status != 409:
                raise
    raise RuntimeError(f"no free model name for {base}")


def erase(c: Any, svc: Any, name: str, people: list[Any]) -> dict[str, Any]:
    """POST one erasure request per person, together; wait; take the adapter out (its
    folder, None if the job published nothing) with timings and the audit's verdict."""
    t0 = time.perf_counter()
    reqs = [
        c.submit(name, f"person-{p.name}", synthetic.qa_items(p), holdout=synthetic.holdout_for(p))
        for p in people
    ]
    done = [c.wait(r["id"], poll=2.0) for r in reqs]
    wall = time.perf_counter() - t0
    job_ids = {d["job_id"] for d in done}
    if len(job_ids) != 1:
        raise RuntimeError(f"{name}: the requests ran in {len(job_ids)} jobs, not one")
    job = c.job(job_ids.pop())
    row: dict[str, Any] = {
        "statuses": sorted({d["status"] for d in done}),
        "wall_s": round(wall, 1),
        "job_run_s": round(_seconds(job, "started_at", "finished_at"), 1),
        "audit_rounds": job["audit_rounds"],
        "version": job["adapter_version"],
    }
    version = job["adapter_version"]  # set for a quarantined version too
    if version is not None and c.adapter(name, version)["downloadable"]:
        folder: Path | None = c.download(
            name, version, QUALITY_DIR / "adapters" / name / str(version)
        )
        row["audit"] = "passed"
    else:
        folder = _quarantined_folder(svc.root, job["id"])
        if folder is None:  # the job failed before it published anything
            return {"folder": None, **row, "audit": f"no adapter: {job['error']}"}
        verdict = json.loads((folder / "audit.json").read_text())["verdict"]
        row["audit"] = "failed: " + ", ".join(sorted({c_["name"] for c_ in verdict["failed"]}))
    record = json.loads((folder / "record.json").read_text())
    row["train_s"] = round(record["durations_s"]["train"], 1)
    row["steps"] = record["outcome"]["steps"]
    row["stopped"] = record["outcome"]["stopped"]
    return {"folder": str(folder), **row}


def run_method(svc: Any, key: str, forget_set: str, method: str) -> dict[str, Any]:
    """One method on one forget set through the HTTP API."""
    from service.client import Client

    forget, retain, _ = _people(forget_set)
    with Client(svc.url, key, timeout=120) as c:
        name = register(c, f"q-{forget_set}-{method}", method, retain)
        return erase(c, svc, name, forget)


def _measured(folder: Path, adapter: Path | None, forget_set: str) -> dict[str, Any]:
    forget, _, utility = _people(forget_set)
    t = time.perf_counter()
    row = qm.measure(folder, adapter, forget, utility)
    return row | {"measure_s": round(time.perf_counter() - t, 1)}


def _keep(results: dict[str, Any], key: str, row: dict[str, Any]) -> None:
    results[key] = row
    _save(results)
    print(key, _brief(row), flush=True)


def evaluate_models(results: dict[str, Any], forget_set: str) -> None:
    for name, folder in (("target", target()), ("retrained", retrained(forget_set))):
        key = f"{forget_set}/{name}"
        if key not in results:
            _keep(results, key, {"method": name, **_measured(folder, None, forget_set)})


def _brief(row: dict[str, Any]) -> str:
    skip = {"truth_forget", "sample_answers", "folder"}
    return json.dumps({k: v for k, v in row.items() if k not in skip})


def run(forget_sets: list[str], methods: list[str]) -> None:
    results = _load()
    for fs in forget_sets:
        evaluate_models(results, fs)
    todo = [(fs, m) for fs in forget_sets for m in methods if f"{fs}/{m}" not in results]
    if not todo:
        return
    with _service() as (svc, key):
        for fs, method in todo:
            print(f"{fs}/{method}: through the service", flush=True)
            row = run_method(svc, key, fs, method)
            if row["folder"] is None:
                print(f"{fs}/{method}", _brief(row), flush=True)
                continue  # not saved: a rerun tries again
            row |= _measured(target(), Path(row["folder"]), fs)
            _keep(results, f"{fs}/{method}", {"method": method, **row})


def chain(method: str, versions: int = CHAIN_VERSIONS) -> None:
    """Sequential requests: one person per request, each job continuing from the previous
    version (the service does that by itself); after each version, what every person
    forgotten so far still reveals, and utility."""
    from service.client import Client

    people = cohort()
    _, retain, utility = _people("forget01")
    out = QUALITY_DIR / f"chain-{method}.json"
    # version 0: what the target states about each of the chain's people
    rows = [{"request": 0, "version": 0, **_chain_measure(None, people[:versions], utility)}]
    print(_brief(rows[-1]), flush=True)
    with _service() as (svc, key), Client(svc.url, key, timeout=120) as c:
        name = register(c, f"q-chain-{method}", method, retain)
        for v in range(1, versions + 1):
            row = erase(c, svc, name, [people[v - 1]])
            if row["folder"] is None:
                raise RuntimeError(f"version {v}: {row['audit']}")
            # A quarantined version is not a link: the next job continues from the newest
            # passing one and its request failed. Every requested person is measured
            # anyway; `audit` and `statuses` say which were erased.
            rows.append(
                {
                    "request": v,
                    **row,
                    **_chain_measure(Path(row["folder"]), people[:v], utility),
                }
            )
            out.write_text(json.dumps(rows, indent=1))
            print(_brief(rows[-1]), flush=True)
    plot_chain(rows, QUALITY_DIR / f"chain-{method}.png")


def _chain_measure(
    adapter: Path | None, forgotten: list[Any], utility: list[Any]
) -> dict[str, Any]:
    row = qm.measure(target(), adapter, forgotten, utility)
    row.pop("truth_forget")
    return row


def plot_chain(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = [r["request"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(v, [r["utility"] for r in rows], "o-", label="model utility")
    ax.plot(v, [r["utility_parts"]["probe"] for r in rows], "s-", label="general knowledge")
    ax.plot(
        v,
        [r["secrets_revealed"] / r["forget_items"] for r in rows],
        "^-",
        label="people requested so far: secrets stated",
    )
    # A quarantined version is not served and the next continues from the last passing one
    for r in rows:
        if r.get("audit", "passed") != "passed":
            ax.axvline(r["request"], color="grey", lw=6, alpha=0.2)
    ax.set_xlabel("requests (one person each; 0: the target; shaded: quarantined)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@contextmanager
def _service() -> Iterator[tuple[Any, str]]:
    """`unlearn up` in a child process under var/bench/quality, and an admin key."""
    from service.demo import EmbeddedService

    svc = EmbeddedService(
        QUALITY_DIR / "service", Path(os.environ.get("MODEL_CACHE", "var/models"))
    )
    # The requests of a forget set are sent together: wait long enough to batch them.
    svc.env["BATCH_WINDOW_SECONDS"] = "5"
    key = svc.admin_key()
    svc.start()
    try:
        yield svc, key
    finally:
        svc.stop()


def table(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, r in results.items():
        fs, _ = key.split("/")
        gold = results[f"{fs}/retrained"]
        base = results[f"{fs}/target"]
        row = {
            "forget_set": fs,
            "method": r["method"],
            "forget_quality": qm.forget_quality(r["truth_forget"], gold["truth_forget"]),
            "utility": r["utility"],
            "utility_vs_target": r["utility"] / base["utility"],
            "mia_auc": r["mia_auc"],
            "forget_rouge": r["forget_rouge"],
            "secrets": f"{r['secrets_revealed']}/{r['forget_items']}",
            "probe": r["utility_parts"]["probe"],
        }
        if "wall_s" in r:
            retrain = retraining_seconds(fs)
            row |= {
                "audit": r["audit"],
                "train_s": r["train_s"],
                "wall_s": r["wall_s"],
                "train_share": r["train_s"] / retrain,
                "wall_share": r["wall_s"] / retrain,
            }
        rows.append(row)
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:.3f}"
    return str(v)


def report(results: dict[str, Any]) -> None:
    rows = table(results)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    (QUALITY_DIR / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, QUALITY_DIR / "quality.png")
    print(f"wrote {QUALITY_DIR / 'results.md'} and {QUALITY_DIR / 'quality.png'}")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Only the forget sets measured (results live under var/, so a fresh checkout may
    # hold one set only).
    sets = [fs for fs in FORGET_SETS if any(r["forget_set"] == fs for r in rows)]
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), sharey=True, squeeze=False)
    for ax, fs in zip(axes[0], sets, strict=True):
        for r in (r for r in rows if r["forget_set"] == fs):
            xy = (r["utility"], max(r["forget_quality"], 1e-12))
            if r["method"] in ("target", "retrained"):
                ax.scatter(*xy, marker="*", s=90, color="black")
            else:  # hollow: the audit quarantined it (not downloadable)
                passed = r.get("audit") == "passed"
                ax.scatter(*xy, s=50, edgecolors="C0", facecolors="C0" if passed else "none")
            ax.annotate(r["method"], xy, fontsize=8, xytext=(4, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("model utility")
        ax.set_title(f"{fs} ({FORGET_SETS[fs]} of 40 people)")
        ax.axhline(0.1, ls="--", lw=0.8, color="grey")
    axes[0][0].set_ylabel("forget quality (KS p-value, log)")
    fig.suptitle("hollow: quarantined by the audit; stars: no unlearning", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from workers.ml.specs import METHOD_NAMES

    ap = argparse.ArgumentParser()
    ap.add_argument("--forget-sets", default=",".join(FORGET_SETS))
    ap.add_argument("--methods", default=",".join(("default", *METHOD_NAMES)))
    ap.add_argument("--report", action="store_true", help="only write the table and plot")
    ap.add_argument("--chain", metavar="METHOD", help="the sequential benchmark instead")
    args = ap.parse_args()
    if args.chain:
        chain(args.chain)
        return
    if not args.report:
        run(args.forget_sets.split(","), args.methods.split(","))
    report(_load())


if __name__ == "__main__":
    from workers.allocator import reexec_under_jemalloc

    reexec_under_jemalloc()  # the workers' allocator (UNLEARN_JEMALLOC=0: glibc's)
    main()
