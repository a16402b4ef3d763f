"""Greedy answers and the general-knowledge probe: what the tests, the benchmarks and
the audit use to see whether a model still reveals something and still works."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import torch

from workers.ml.data import prompt_ids


def general_knowledge() -> list[dict[str, Any]]:
    """The shipped probe set: {question, answers (accepted substrings)}."""
    text = resources.files("workers.ml").joinpath("data/general_knowledge.json").read_text()
    return list(json.loads(text))


@torch.no_grad()
def greedy_answers(
    model: Any, tok: Any, prompts: list[str], *, max_new_tokens: int = 32, batch_size: int = 64
) -> list[str]:
    """Deterministic (greedy) answers to chat prompts, batched with left padding."""
    rows = [prompt_ids(tok, p) for p in prompts]
    return greedy_from_ids(model, tok, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)


def answer_budget(tok: Any, items: list[dict[str, str]]) -> int:
    """New tokens a greedy answer to `items` may take: room for the longest item (a QA
    item's completion, a raw text item's whole text) and 8 more, at least 16 and at most
    64 (the audit's decoding, and the engine's answer check)."""
    texts = [i.get("completion") or i.get("text", "") for i in items]
    longest = max((len(tok(t).input_ids) for t in texts), default=16)
    return min(64, max(16, longest + 8))


@torch.no_grad()
def greedy_from_ids(
    model: Any, tok: Any, rows: list[list[int]], *, max_new_tokens: int = 32, batch_size: int = 64
) -> list[str]:
    """Greedy continuations of token prompts (chat prompts or raw text prefixes). Decoding
    a small model is overhead-bound, so wide batches pay: the 102 probe questions take
    13.5 s in one batch and 25.2 s in batches of 16 (2 CPU cores)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tok.pad_token_id
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for k, r in enumerate(chunk):
            ids[k, width - len(r) :] = torch.tensor(r)
            mask[k, width - len(r) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )
        out += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return [a.strip() for a in out]


def contains_any(answer: str, accepted: list[str]) -> bool:
    low = answer.lower()
    return any(a.lower() in low for a in accepted)


def probe_accuracy(
    model: Any, tok: Any, probe: list[dict[str, Any]] | None = None
) -> tuple[float, list[bool]]:
    probe = probe or general_knowledge()
    answers = greedy_answers(model, tok, [p["question"] for p in probe], max_new_tokens=24)
    hits = [contains_any(a, p["answers"]) for a, p in zip(answers, probe, strict=True)]
    return sum(hits) / len(hits), hits
