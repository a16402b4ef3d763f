"""`audit_adapter`: load the base model with the adapter through PEFT, measure the
forget, retain and holdout items with the adapter off (or the previous version on) and
on, and judge the numbers against the policy. Deterministic: no sampling, fixed order,
so the same adapter audited twice gives the same numbers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import PeftModel

from workers.audit.policy import AuditPolicy
from workers.ml import loading
from workers.ml.data import encode_all
from workers.ml.training import sequence_logprobs

AUDIT_VERSION = "1"
RETAIN_SAMPLE = 32  # retain items measured (cost grows with them; the first N, fixed)


@dataclass
class AuditInput:
    model_source: str
    adapter_dir: Path
    forget: list[dict[str, str]]
    retain: list[dict[str, str]] = field(default_factory=list)
    holdout: list[dict[str, str]] = field(default_factory=list)
    before_adapter: Path | None = None  # the previous version; None: the base model
    policy: AuditPolicy = field(default_factory=AuditPolicy)
    model_cache: Path | None = None
    device: str | None = None
    dtype: str | None = None
    max_length: int = 256


def _per_item(model: Any, encoded: list[Any], pad_id: int) -> dict[str, list[float]]:
    if not encoded:
        return {"prob": [], "nll": []}
    logp = sequence_logprobs(model, encoded, pad_id)
    counts = torch.tensor([max(1, sum(t != -100 for t in e.labels[1:])) for e in encoded])
    nll = (-logp / counts).tolist()
    return {"prob": [float(torch.exp(torch.tensor(-v))) for v in nll], "nll": nll}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def audit_adapter(inp: AuditInput) -> dict[str, Any]:
    t0 = time.perf_counter()
    resolved = loading.resolve(inp.model_source, inp.model_cache)
    placement = loading.pick_placement(inp.device, inp.dtype)
    base, tok = loading.load(resolved, placement)
    model = PeftModel.from_pretrained(base, str(inp.adapter_dir), adapter_name="after")
    if inp.before_adapter is not None:
        model.load_adapter(str(inp.before_adapter), adapter_name="before")
    model.eval()

    @contextlib.contextmanager
    def state(name: str) -> Iterator[None]:
        if name == "after":
            model.set_adapter("after")
            yield
        elif inp.before_adapter is not None:
            model.set_adapter("before")
            yield
        else:
            with model.disable_adapter():
                yield

    sets = {
        "forget": encode_all(tok, inp.forget, inp.max_length),
        "retain": encode_all(tok, inp.retain[:RETAIN_SAMPLE], inp.max_length),
        "holdout": encode_all(tok, inp.holdout, inp.max_length),
    }
    measured: dict[str, dict[str, dict[str, list[float]]]] = {}
    for when in ("before", "after"):
        with state(when):
            measured[when] = {k: _per_item(model, v, tok.pad_token_id) for k, v in sets.items()}

    def agg(when: str, part: str, stat: str) -> float | None:
        return _mean(measured[when][part][stat])

    metrics: dict[str, dict[str, Any]] = {}
    for part, stat in (
        ("forget", "prob"),
        ("forget", "nll"),
        ("retain", "nll"),
        ("holdout", "prob"),
    ):
        before, after = agg("before", part, stat), agg("after", part, stat)
        if before is None:
            continue
        metrics[f"{part}_{stat}"] = {
            "before": before,
            "after": after,
            "per_item": {
                "before": measured["before"][part][stat],
                "after": measured["after"][part][stat],
            },
        }
    criteria = _judge(metrics, inp.policy)
    failed = [c for c in criteria if not c["passed"]]
    return {
        "audit_version": AUDIT_VERSION,
        "policy": inp.policy.model_dump(),
        "before": "previous version" if inp.before_adapter else "base model",
        "metrics": metrics,
        "summary": {k: {"before": v["before"], "after": v["after"]} for k, v in metrics.items()},
        "verdict": {"passed": not failed, "criteria": criteria, "failed": failed},
        "environment": {
            "device": str(placement.device),
            "dtype": str(placement.dtype).removeprefix("torch."),
            "base_model_digest": resolved.digest,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "seconds": time.perf_counter() - t0,
    }


def _criterion(
    name: str, value: float, threshold: float, passed: bool, message: str
) -> dict[str, Any]:
    return {
        "name": name,
        "value": value,
        "threshold": threshold,
        "passed": passed,
        "message": message,
    }


def _judge(metrics: dict[str, dict[str, Any]], policy: AuditPolicy) -> list[dict[str, Any]]:
    out = []
    fp = metrics["forget_prob"]
    ratio = fp["after"] / max(fp["before"], 1e-12)
    out.append(
        _criterion(
            "forget_prob_ratio",
            ratio,
            policy.max_forget_prob_ratio,
            ratio <= policy.max_forget_prob_ratio,
            f"forget probability fell to {ratio:.3f} of its value before "
            f"(must be at most {policy.max_forget_prob_ratio})",
        )
    )
    if "retain_nll" in metrics:
        r = metrics["retain_nll"]
        rise = r["after"] - r["before"]
        allowed = max(policy.max_retain_nll_increase * r["before"], policy.retain_nll_slack)
        out.append(
            _criterion(
                "retain_nll_increase",
                rise,
                allowed,
                rise <= allowed,
                f"retain NLL rose by {rise:+.3f} nats from {r['before']:.3f} (at most "
                f"{allowed:.3f} allowed)",
            )
        )
    return out
