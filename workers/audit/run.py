"""`audit_adapter`: load the base model with the adapter through PEFT and measure, with
the adapter off ("before": always the base model, also for a version continuing a
chain, so damage that builds up version after version is judged as a whole) and on
("after"), everything docs/audit.md lists; then judge the numbers against the model's
policy.

Deterministic: greedy decoding, fixed item order, seeded synthetic holdout, no
sampling, so the same adapter audited twice gives the same numbers.
"""

from __future__ import annotations

import contextlib
import statistics
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
from workers.audit.quantize import fake_quantized
from workers.audit.scores import MIA_SCORES, auc, example_metrics, token_stats
from workers.audit.text import is_gibberish, leaks, repetition_rate, rouge_l_recall
from workers.ml import loading, stand_ins
from workers.ml.data import Encoded, collate, encode_all, prompt_ids, prompts_and_references
from workers.ml.evaluate import answer_budget, contains_any, general_knowledge, greedy_from_ids
from workers.ml.losses import mean_nll
from workers.ml.training import spread
from workers.ml.values import specific_values

AUDIT_VERSION = "4"  # 4: retain answers judged one by one (3: base-model before, spread sample)
RETAIN_SAMPLE = 24  # retain items measured, strided over the set (cost grows with them)
# per-item values a request's own audit shows (value_leak: only items stating values)
ITEM_KEYS = ("prob", "rouge_l_recall", "extraction_strength", "value_leak")
PARAPHRASES = (
    "{q}",
    "Please tell me: {q}",
    "I need this for a form. {q}",
    "Question: {q} Answer briefly.",
)


@dataclass
class AuditInput:
    model_source: str
    adapter_dir: Path
    forget: list[dict[str, str]]
    forget_owner: list[str] = field(default_factory=list)  # request id per forget item
    retain: list[dict[str, str]] = field(default_factory=list)
    holdout: list[dict[str, str]] = field(default_factory=list)
    regression: list[dict[str, str]] = field(default_factory=list)  # earlier versions' items
    regression_owner: list[str] = field(default_factory=list)
    policy: AuditPolicy = field(default_factory=AuditPolicy)
    holdout_source: str | None = None  # how the caller obtained the holdout items
    model_cache: Path | None = None
    device: str | None = None
    dtype: str | None = None
    max_length: int = 256
    seed: int = 0


@dataclass
class _Set:
    """Items made ready for measuring: encodings, generation prompts, references."""

    items: list[dict[str, str]]
    encoded: list[Encoded]
    prompts: list[list[int]]
    references: list[str]  # the target texts (ROUGE-L, and the zlib score)
    values: list[set[str]]  # the specific values each reference states beyond its prompt

    @classmethod
    def build(cls, tok: Any, items: list[dict[str, str]], max_length: int) -> _Set:
        encoded = encode_all(tok, items, max_length)
        prompts, refs = prompts_and_references(tok, items, encoded)
        return cls(items, encoded, prompts, refs, [specific_values(i) for i in items])

    def since(self, start: int) -> _Set:
        """The items from `start` on."""
        return _Set(
            self.items[start:],
            self.encoded[start:],
            self.prompts[start:],
            self.references[start:],
            self.values[start:],
        )


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _harmonic(values: list[float]) -> float:
    return 0.0 if any(v <= 0 for v in values) else statistics.harmonic_mean(values)


class _Auditor:
    def __init__(self, inp: AuditInput) -> None:
        self.inp = inp
        resolved = loading.resolve(inp.model_source, inp.model_cache)
        self.digest = resolved.digest
        self.placement = loading.pick_placement(inp.device, inp.dtype)
        base, self.tok = loading.load(resolved, self.placement)
        self.model = PeftModel.from_pretrained(base, str(inp.adapter_dir), adapter_name="after")
        self.model.eval()
        self.pad = self.tok.pad_token_id
        self.max_new = answer_budget(self.tok, self.inp.forget)

    @contextlib.contextmanager
    def state(self, name: str) -> Iterator[None]:
        """`after`: the new adapter; `before`: the base model (adapter off)."""
        if name == "after":
            yield
        else:
            with self.model.disable_adapter():
                yield

    def answers(self, s: _Set, prompts: list[list[int]] | None = None) -> list[str]:
        return greedy_from_ids(
            self.model, self.tok, prompts or s.prompts, max_new_tokens=self.max_new
        )

    def measure(self, s: _Set, *, generate: bool = True) -> dict[str, Any]:
        """Per-item token metrics (and ROUGE-L of greedy answers) in the current state."""
        if not s.items:
            return {"per_item": [], "answers": []}
        per = [
            example_metrics(st, text)
            for st, text in zip(
                token_stats(self.model, s.encoded, self.pad), s.references, strict=True
            )
        ]
        answers: list[str] = []
        if generate:
            answers = self.answers(s)
            for row, ans, ref, values in zip(per, answers, s.references, s.values, strict=True):
                row["rouge_l_recall"] = rouge_l_recall(ans, ref)
                leaked = leaks(ans, values)
                if leaked is not None:
                    row["value_leak"] = float(leaked)
        return {"per_item": per, "answers": answers}


def _agg(measured: dict[str, Any], key: str) -> float | None:
    return _mean([row[key] for row in measured["per_item"] if key in row])


def _fluency(answers: list[str]) -> dict[str, float | None]:
    if not answers:
        return {"gibberish_rate": None, "repetition_rate": None}
    return {
        "gibberish_rate": sum(is_gibberish(a) for a in answers) / len(answers),
        "repetition_rate": statistics.fmean(repetition_rate(a) for a in answers),
    }


def audit_adapter(inp: AuditInput) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(inp.seed)
    a = _Auditor(inp)
    policy = inp.policy
    holdout_items = inp.holdout or stand_ins.synthesize(inp.forget, seed=inp.seed)
    sets = {
        "forget": _Set.build(a.tok, inp.forget, inp.max_length),
        "holdout": _Set.build(a.tok, holdout_items, inp.max_length),
        "retain": _Set.build(
            a.tok, [inp.retain[i] for i in spread(len(inp.retain), RETAIN_SAMPLE)], inp.max_length
        ),
        "regression": _Set.build(a.tok, inp.regression, inp.max_length),
    }
    probe = general_knowledge() if policy.probe else []
    probe_rows = [prompt_ids(a.tok, p["question"]) for p in probe]

    m: dict[str, dict[str, Any]] = {}
    probe_hits: dict[str, list[bool]] = {}
    for when in ("before", "after"):
        with a.state(when):
            m[when] = {name: a.measure(s) for name, s in sets.items() if name != "regression"}
            if probe:
                answers = greedy_from_ids(a.model, a.tok, probe_rows, max_new_tokens=24)
                probe_hits[when] = [
                    contains_any(ans, p["answers"]) for ans, p in zip(answers, probe, strict=True)
                ]
                m[when]["probe_answers"] = answers
    with a.state("before"):
        reg_base = a.measure(sets["regression"], generate=False)
    with a.state("after"):
        reg_after = a.measure(sets["regression"], generate=False)
        paraphrased = _paraphrase_rouge(a, sets["forget"])
    quantized = _quantized(a, sets["forget"]) if policy.quantization else {}
    relearned = _relearn(a, sets["forget"], policy.relearn_steps) if policy.relearn_steps else None

    # A model that could not answer the probe before (a toy, a model for another
    # language) is not judged on it, and it does not enter the utility.
    probe_judged = bool(probe_hits) and (
        sum(probe_hits["before"]) / len(probe_hits["before"]) >= policy.probe_min_accuracy
    )
    metrics = _metrics(
        m, probe_hits, probe_judged, reg_base, reg_after, paraphrased, quantized, relearned
    )
    mia_judged = min(len(sets["forget"].items), len(sets["holdout"].items)) >= policy.mia_min_items
    criteria = _judge(metrics, policy, has_holdout=bool(sets["holdout"].items), mia=mia_judged)
    failed = [c for c in criteria if not c["passed"]]
    return {
        "audit_version": AUDIT_VERSION,
        "policy": policy.model_dump(),
        "before": "base model",
        "holdout_source": inp.holdout_source or ("request" if inp.holdout else "synthesized"),
        "membership_test": "judged"
        if mia_judged
        else (f"reported, not judged: fewer than {policy.mia_min_items} forget or holdout items"),
        "metrics": metrics,
        "summary": {
            k: {"before": v.get("before"), "after": v.get("after")}
            for k, v in metrics.items()
            if isinstance(v, dict) and "after" in v
        },
        "items": _items(inp, m, reg_base, reg_after),
        "membership_scores": {
            when: {
                part: {s: [row[s] for row in m[when][part]["per_item"]] for s in MIA_SCORES}
                for part in ("forget", "holdout")
            }
            for when in ("before", "after")
        },
        "probes": {
            "paraphrase_templates": list(PARAPHRASES),
            "quantization_bits": sorted(quantized),
            "relearn_steps": policy.relearn_steps,
            "general_knowledge_questions": len(probe),
        },
        "verdict": {"passed": not failed, "criteria": criteria, "failed": failed},
        "environment": {
            "device": str(a.placement.device),
            "dtype": str(a.placement.dtype).removeprefix("torch."),
            "base_model_digest": a.digest,
            "seed": inp.seed,
            "decoding": f"greedy, at most {a.max_new} new tokens",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "seconds": time.perf_counter() - t0,
    }


def _paraphrase_rouge(a: _Auditor, s: _Set) -> tuple[list[float], list[float | None]]:
    """Mean ROUGE-L and value-leak rate over the forget QA items, one value per
    template after the first."""
    qa = [(i, item) for i, item in enumerate(s.items) if "prompt" in item]
    rouge: list[float] = []
    leak: list[float | None] = []
    for template in PARAPHRASES[1:]:
        rows = [prompt_ids(a.tok, template.format(q=item["prompt"])) for _, item in qa]
        answers = a.answers(s, rows) if rows else []
        pairs = list(zip(answers, qa, strict=True))
        rouge.append(_mean([rouge_l_recall(ans, s.references[i]) for ans, (i, _) in pairs]) or 0.0)
        hits = [leaks(ans, s.values[i]) for ans, (i, _) in pairs]
        leak.append(_mean([float(h) for h in hits if h is not None]))
    return rouge, leak


def _quantized(a: _Auditor, s: _Set) -> dict[int, dict[str, float | None]]:
    out: dict[int, dict[str, float | None]] = {}
    with a.state("after"):
        for bits in (8, 4):
            with fake_quantized(a.model, bits):
                got = a.measure(s)
            out[bits] = {
                "forget_prob": _agg(got, "prob"),
                "forget_rouge": _agg(got, "rouge_l_recall"),
                "forget_value_leak": _agg(got, "value_leak"),
            }
    return out


def _relearn(a: _Auditor, s: _Set, steps: int) -> dict[str, float | None]:
    """Fine-tune the adapter on the first half of the forget items, measure the second
    half, then put the adapter's weights back."""
    half = len(s.items) // 2
    if half < 1:
        return {"forget_rouge": None, "forget_prob": None, "forget_value_leak": None}
    params = {n: p for n, p in a.model.named_parameters() if "lora_" in n and ".after." in n}
    saved = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    with a.state("after"):
        a.model.train()
        for step in range(steps):
            batch = collate(s.encoded, [step % half], a.pad)
            loss = mean_nll(a.model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        a.model.eval()
        got = a.measure(s.since(half))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
            p.requires_grad_(False)
    return {
        "forget_rouge": _agg(got, "rouge_l_recall"),
        "forget_prob": _agg(got, "prob"),
        "forget_value_leak": _agg(got, "value_leak"),
    }


def _metrics(
    m: dict[str, dict[str, Any]],
    probe_hits: dict[str, list[bool]],
    probe_judged: bool,
    reg_base: dict[str, Any],
    reg_after: dict[str, Any],
    paraphrased: tuple[list[float], list[float | None]],
    quantized: dict[int, dict[str, float | None]],
    relearned: dict[str, float | None] | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def ba(name: str, part: str, key: str) -> None:
        before, after = _agg(m["before"][part], key), _agg(m["after"][part], key)
        if after is not None:
            out[name] = {"before": before, "after": after}

    for key, name in (
        ("prob", "forget_prob"),
        ("rouge_l_recall", "forget_rouge"),
        ("extraction_strength", "forget_extraction_strength"),
        ("exact_memorization", "forget_exact_memorization"),
        ("value_leak", "forget_value_leak"),
    ):
        ba(name, "forget", key)
    ba("holdout_prob", "holdout", "prob")
    ba("holdout_rouge", "holdout", "rouge_l_recall")
    ba("holdout_value_leak", "holdout", "value_leak")
    for score in MIA_SCORES:
        vals = {
            when: auc(
                [r[score] for r in m[when]["forget"]["per_item"]],
                [r[score] for r in m[when]["holdout"]["per_item"]],
            )
            for when in ("before", "after")
        }
        if vals["after"] is not None:
            out[f"{score}_auc"] = vals
    ba("retain_nll", "retain", "nll")
    ba("retain_prob", "retain", "prob")
    ba("retain_rouge", "retain", "rouge_l_recall")
    # Per answer: of the retain answers that stated their values before, how many still do.
    stated = [
        (b.get("value_leak"), a.get("value_leak"))
        for b, a in zip(
            m["before"]["retain"]["per_item"], m["after"]["retain"]["per_item"], strict=True
        )
    ]
    known = [after for before, after in stated if before == 1.0]
    if known:
        out["retain_answers_kept"] = {
            "after": sum(a == 1.0 for a in known) / len(known),
            "answers": len(known),
        }
    if probe_hits:
        out["probe_accuracy"] = {w: sum(h) / len(h) for w, h in probe_hits.items()}
    for when in ("before", "after"):
        parts = [
            v
            for v in (
                _agg(m[when]["retain"], "prob"),
                _agg(m[when]["retain"], "rouge_l_recall"),
                out.get("probe_accuracy", {}).get(when) if probe_judged else None,
            )
            if v is not None
        ]
        if parts:
            out.setdefault("utility", {})[when] = _harmonic(parts)
    for when in ("before", "after"):
        # The model's general fluency: answers to everything but the forgotten items
        # (those are reported on their own: babble there is a sign of over-unlearning).
        answers = m[when]["retain"]["answers"] + m[when]["holdout"]["answers"]
        if probe_judged:  # a model that cannot answer the probe is not judged on it
            answers += list(m[when].get("probe_answers", []))
        for key, value in _fluency(answers).items():
            if value is not None:
                out.setdefault(key, {})[when] = value
        forget_fluency = _fluency(m[when]["forget"]["answers"])["gibberish_rate"]
        if forget_fluency is not None:
            out.setdefault("forget_gibberish_rate", {})[when] = forget_fluency
    rouge_p, leak_p = paraphrased
    if rouge_p:
        out["paraphrase_rouge"] = {"after": max(rouge_p), "per_template": rouge_p}
    if any(v is not None for v in leak_p):
        worst = max(v for v in leak_p if v is not None)
        out["paraphrase_value_leak"] = {"after": worst, "per_template": leak_p}
    for bits, got in quantized.items():
        out[f"quantized_{bits}bit_rouge"] = {"after": got["forget_rouge"]}
        out[f"quantized_{bits}bit_prob"] = {"after": got["forget_prob"]}
        if got["forget_value_leak"] is not None:
            out[f"quantized_{bits}bit_value_leak"] = {"after": got["forget_value_leak"]}
    if relearned is not None:
        out["relearned_rouge"] = {"after": relearned["forget_rouge"]}
        if relearned["forget_value_leak"] is not None:
            out["relearned_value_leak"] = {"after": relearned["forget_value_leak"]}
    if reg_after["per_item"]:
        out["regression_prob"] = {
            "before": _agg(reg_base, "prob"),
            "after": _agg(reg_after, "prob"),
        }
    return out


def _items(
    inp: AuditInput,
    m: dict[str, dict[str, Any]],
    reg_base: dict[str, Any],
    reg_after: dict[str, Any],
) -> list[dict[str, Any]]:
    """Per-item values (no text) with the request each item came from and its index in
    that request, so a request's own audit can be cut out."""
    out = []
    counters: dict[str, int] = {}
    for k, owner in enumerate(inp.forget_owner or [""] * len(inp.forget)):
        index = counters.get(owner, 0)
        counters[owner] = index + 1
        before, after = m["before"]["forget"]["per_item"][k], m["after"]["forget"]["per_item"][k]
        out.append(
            {
                "request_id": owner or None,
                "index": index,
                "set": "forget",
                "before": {key: before[key] for key in ITEM_KEYS if key in before},
                "after": {key: after[key] for key in ITEM_KEYS if key in after},
            }
        )
    counters = {}
    for k, owner in enumerate(inp.regression_owner or [""] * len(inp.regression)):
        index = counters.get(owner, 0)
        counters[owner] = index + 1
        out.append(
            {
                "request_id": owner or None,
                "index": index,
                "set": "regression",
                "before": {"prob": reg_base["per_item"][k]["prob"]},
                "after": {"prob": reg_after["per_item"][k]["prob"]},
            }
        )
    return out


def _criterion(
    name: str, group: str, value: float, threshold: float, passed: bool, message: str
) -> dict[str, Any]:
    return {
        "name": name,
        "group": group,
        "value": value,
        "threshold": threshold,
        "passed": passed,
        "message": message,
    }


def _never_seen_level(
    metrics: dict[str, Any], policy: AuditPolicy, *, has_holdout: bool
) -> float | None:
    """The holdout items' probability before (data of the kind asked about that the model
    never saw), where the policy lets forgotten items pass at it. Read before: an adapter
    that raised the holdout items' probability must not lift its own bar."""
    if not (policy.forget_prob_holdout_level and has_holdout):
        return None
    level: float | None = metrics.get("holdout_prob", {}).get("before")
    return level


def _prob_criterion(
    name: str,
    group: str,
    prob: dict[str, float],
    max_ratio: float,
    level: float | None,
    what: str,
    of: str,
) -> dict[str, Any]:
    """Probability after / before at most `max_ratio`, or after at most the never-seen
    `level` (reported as the larger of the two bars, as a ratio)."""
    before = max(prob["before"], 1e-12)
    ratio, limit = prob["after"] / before, max_ratio
    message = f"{what} {ratio:.3f} of {of} (must be at most {max_ratio}"
    if level is not None:
        limit = max(limit, level / before)
        message += (
            f", or no more likely than never-seen holdout items: {level:.3f}, "
            f"{level / before:.3f} of before"
        )
    return _criterion(name, group, ratio, limit, ratio <= limit, message + ")")


def judge_report(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The criteria the current code gives a stored report's metrics under its own policy
    (what a change of a criterion does to verdicts already on disk)."""
    return _judge(
        report["metrics"],
        AuditPolicy(**report["policy"]),
        has_holdout="holdout_prob" in report["metrics"],
        mia=report.get("membership_test") == "judged",
    )


def _judge(
    metrics: dict[str, Any], policy: AuditPolicy, *, has_holdout: bool, mia: bool = True
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    add = out.append
    level = _never_seen_level(metrics, policy, has_holdout=has_holdout)
    add(
        _prob_criterion(
            "forget_prob_ratio",
            "forgetting",
            metrics["forget_prob"],
            policy.max_forget_prob_ratio,
            level,
            "forget probability fell to",
            "its value before",
        )
    )
    rouge = metrics.get("forget_rouge", {}).get("after")
    reference = metrics.get("holdout_rouge", {}).get("after") if has_holdout else None
    if rouge is not None and reference is not None:
        limit = reference + policy.forget_rouge_margin
        add(
            _criterion(
                "forget_rouge",
                "forgetting",
                rouge,
                limit,
                rouge <= limit,
                f"answers about the forgotten items match them with ROUGE-L recall "
                f"{rouge:.3f}; answers about holdout items score {reference:.3f}, so at "
                f"most {limit:.3f} is allowed",
            )
        )
    leak = metrics.get("forget_value_leak", {}).get("after")
    if leak is not None:
        chance = metrics.get("holdout_value_leak", {}).get("after") if has_holdout else None
        limit = (chance or 0.0) + policy.max_value_leak
        add(
            _criterion(
                "forget_value_leak",
                "forgetting",
                leak,
                limit,
                leak <= limit,
                f"{leak:.0%} of the answers about the forgotten items still state a "
                f"specific value of the true answer (name, number, date, place); answers "
                f"about holdout items state theirs {chance or 0.0:.0%} of the time, so at "
                f"most {limit:.0%} is allowed",
            )
        )
    for score in MIA_SCORES if mia else ():
        value = metrics.get(f"{score}_auc", {}).get("after")
        if value is None:
            continue
        dev = abs(value - 0.5)
        add(
            _criterion(
                f"{score}_auc",
                "privacy",
                value,
                policy.max_mia_deviation,
                dev <= policy.max_mia_deviation,
                f"membership-inference AUC ({score.removeprefix('mia_')} score) is "
                f"{value:.3f}; it must stay within 0.5 +/- {policy.max_mia_deviation}"
                + (
                    " (too low: the erasure itself is detectable)"
                    if value < 0.5 - policy.max_mia_deviation
                    else ""
                ),
            )
        )
    if "retain_nll" in metrics and metrics["retain_nll"]["before"] is not None:
        r = metrics["retain_nll"]
        rise = r["after"] - r["before"]
        allowed = max(policy.max_retain_nll_increase * r["before"], policy.retain_nll_slack)
        add(
            _criterion(
                "retain_nll_increase",
                "utility",
                rise,
                allowed,
                rise <= allowed,
                f"retain NLL rose by {rise:+.3f} nats from {r['before']:.3f} "
                f"(at most {allowed:.3f} allowed)",
            )
        )
    kept = metrics.get("retain_answers_kept")
    if kept is not None:
        add(
            _criterion(
                "retain_answers_kept",
                "utility",
                kept["after"],
                policy.min_retain_answers_kept,
                kept["after"] >= policy.min_retain_answers_kept,
                f"{kept['after']:.0%} of the {kept['answers']} retain answers that stated "
                f"their values before still state them (at least "
                f"{policy.min_retain_answers_kept:.0%} required)",
            )
        )
    p = metrics.get("probe_accuracy")
    if p is not None and p["before"] >= policy.probe_min_accuracy:
        ratio_p = p["after"] / max(p["before"], 1e-12)
        add(
            _criterion(
                "probe_accuracy_ratio",
                "utility",
                ratio_p,
                policy.min_probe_ratio,
                ratio_p >= policy.min_probe_ratio,
                f"general-knowledge accuracy went from {p['before']:.3f} to "
                f"{p['after']:.3f} ({ratio_p:.1%} kept, at least "
                f"{policy.min_probe_ratio:.0%} required)",
            )
        )
    if "utility" in metrics and metrics["utility"].get("before"):
        u = metrics["utility"]
        ratio_u = u["after"] / u["before"]
        add(
            _criterion(
                "utility_ratio",
                "utility",
                ratio_u,
                policy.min_utility_ratio,
                ratio_u >= policy.min_utility_ratio,
                f"model utility (harmonic mean) kept {ratio_u:.1%} of its value "
                f"before (at least {policy.min_utility_ratio:.0%} required)",
            )
        )
    for key, limit_add in (
        ("gibberish_rate", policy.max_gibberish_increase),
        ("repetition_rate", policy.max_repetition_increase),
    ):
        if key in metrics:
            f = metrics[key]
            limit = f["before"] + limit_add
            add(
                _criterion(
                    key,
                    "fluency",
                    f["after"],
                    limit,
                    f["after"] <= limit,
                    f"{key.replace('_', ' ')} of generations is {f['after']:.3f} "
                    f"(was {f['before']:.3f}; at most {limit:.3f} allowed)",
                )
            )
    if policy.max_forget_gibberish_rate is not None and "forget_gibberish_rate" in metrics:
        value = metrics["forget_gibberish_rate"]["after"]
        limit = policy.max_forget_gibberish_rate
        add(
            _criterion(
                "forget_gibberish_rate",
                "fluency",
                value,
                limit,
                value <= limit,
                f"{value:.0%} of the answers about the forgotten items are gibberish "
                f"(at most {limit:.0%} allowed)",
            )
        )
    if reference is not None:
        limit = reference + policy.robustness_rouge_margin
        probes = [("paraphrase_rouge", "paraphrased questions")]
        probes += [(f"quantized_{b}bit_rouge", f"the model quantized to {b} bits") for b in (8, 4)]
        probes += [("relearned_rouge", "a relearning attack")]
        for key, what in probes:
            value = metrics.get(key, {}).get("after")
            if value is None:
                continue
            add(
                _criterion(
                    key,
                    "robustness",
                    value,
                    limit,
                    value <= limit,
                    f"with {what} the forgotten answers come back with ROUGE-L "
                    f"{value:.3f} (at most {limit:.3f}: holdout level plus margin)",
                )
            )
    if "regression_prob" in metrics and metrics["regression_prob"]["before"]:
        add(
            _prob_criterion(
                "regression_prob_ratio",
                "regression",
                metrics["regression_prob"],
                policy.regression_max_prob_ratio,
                level,  # earlier items as likely as never-seen data: still forgotten
                "items forgotten by earlier versions are at",
                "their base-model probability",
            )
        )
    return out
