"""General retain items: everyday questions answered by the job's own reference model.

A job's retain data says what to keep about other people, not what to keep about the
world. Pushing a person's places and names away moved a small model's answers to
unrelated questions towards other fictitious values ("Mexico's capital is Port
Avery"), and the retain term could not see it. With these items in the retain data
(one per retain batch, on top of the caller's items), the KL (or NLL) retain term also
holds the model's own answers to general questions (docs/engine.md, "General retain").

The questions are disjoint from the audit's general-knowledge probe
(`data/general_knowledge.json`, a test checks it), so the audit still measures
knowledge the job never trained on. The answers are the reference's greedy answers,
right or wrong: the job keeps behaviour, it does not teach facts.

The answers are a greedy decode of 48 prompts before training (7-9 s of a job on the
built-in model on 2 CPU cores), and every job on the same model asks the same
questions: `cached_reference_items` keeps them in the model cache, keyed by everything
that decides them (the weights, the tokenizer, the previous adapter, dtype, device,
attention kernel, CPU, threads, library versions), so a worker decodes them once per
model version and machine. A changed input is a new key: a cached answer is always the
one the decode would give.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from workers.ml.evaluate import greedy_answers

log = logging.getLogger(__name__)

# Room for a one-sentence answer; a longer one is cut, which the retain term does not mind.
ANSWER_TOKENS = 32
CACHE_FOLDER = "general-answers"  # under the model cache
CACHE_FORMAT = 1  # bump when what a cached file holds, or how it is decoded, changes


def questions() -> list[str]:
    """The shipped general questions, in a fixed order."""
    text = resources.files("workers.ml").joinpath("data/general_prompts.json").read_text()
    return list(json.loads(text))


def reference_items(model: Any, tok: Any, count: int) -> list[dict[str, str]]:
    """QA items of the first `count` questions with `model`'s greedy answers (the model
    as the job loaded it: the base, or the previous adapter version in a chain), those
    with an empty answer left out."""
    asked = questions()[:count]
    if not asked:
        return []
    return _items(asked, _decode(model, tok, asked))


def _decode(model: Any, tok: Any, asked: list[str]) -> list[str]:
    return greedy_answers(model, tok, asked, max_new_tokens=ANSWER_TOKENS)


def _items(asked: list[str], answers: list[str]) -> list[dict[str, str]]:
    """QA items of the questions and their answers, those with an empty answer left out."""
    return [{"prompt": q, "completion": a} for q, a in zip(asked, answers, strict=True) if a]


def cache_key(identity: dict[str, Any], count: int) -> str:
    """The file name of the answers to the first `count` questions of the model that
    `identity` describes (the run's own description of the model as loaded)."""
    parts = {
        "format": CACHE_FORMAT,
        "identity": identity,
        "questions": questions()[:count],
        "answer_tokens": ANSWER_TOKENS,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _read_answers(path: Path, count: int) -> list[str] | None:
    """The answers a cache file holds, or None for a missing or unreadable one."""
    try:
        answers = json.loads(path.read_text())["answers"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(answers, list) or len(answers) != count:
        return None
    if not all(isinstance(a, str) for a in answers):
        return None
    return answers


def _write_answers(path: Path, answers: list[str], identity: dict[str, Any]) -> None:
    """Write beside the file, then rename: a reader never sees half of it. A cache that
    cannot be written (a read-only volume) only costs the next job the decode."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide it from workers run as other users
        with os.fdopen(fd, "w") as fh:
            json.dump({"identity": identity, "answers": answers}, fh, default=str)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("general answers not cached in %s: %s", path.parent, exc)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def cached_reference_items(
    model: Any,
    tok: Any,
    count: int,
    cache_dir: Path,
    describe: Callable[[], dict[str, Any]],
) -> tuple[list[dict[str, str]], bool]:
    """`reference_items`, the answers read from `cache_dir` when a job on the same model
    decoded them before; returns the items and whether they were cached. `describe`
    gives the model's identity, asked only when there are questions (it hashes files)."""
    asked = questions()[:count]
    if not asked:
        return [], False
    identity = describe()
    path = cache_dir / CACHE_FOLDER / f"{cache_key(identity, len(asked))}.json"
    answers = _read_answers(path, len(asked))
    hit = answers is not None
    if answers is None:
        answers = _decode(model, tok, asked)
        _write_answers(path, answers, identity)
    return _items(asked, answers), hit
