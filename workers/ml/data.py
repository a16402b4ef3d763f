"""Turning items into token ids with the prompt masked out of the labels, padding them
into batches, and a deterministic batch order that depends only on (seed, step).

QA items use the tokenizer's chat template when it has one ("Question/Answer" text
otherwise); a raw text item is split in the middle (by tokens) into a prefix and the
continuation the model must stop producing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens


def _ids(value: Any) -> list[int]:
    if isinstance(value, dict) or hasattr(value, "keys"):
        value = value["input_ids"]
    return list(value)


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The tokens a model sees before it answers `prompt` (also used for generation)."""
    if tok.chat_template:
        return _ids(
            tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
        )
    return _ids(tok(f"Question: {prompt}\nAnswer:", add_special_tokens=True))


def encode_item(tok: PreTrainedTokenizerBase, item: dict[str, str], max_length: int) -> Encoded:
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if "text" in item:
        ids = _ids(tok(item["text"], add_special_tokens=True))[:max_length]
        cut = max(1, len(ids) // 2)
        return Encoded(ids, [IGNORE] * cut + ids[cut:])
    head = prompt_ids(tok, item["prompt"])
    sep = "" if tok.chat_template else " "
    answer = _ids(tok(sep + item["completion"], add_special_tokens=False)) + eos
    head = head[: max(1, max_length - len(answer))]
    ids = (head + answer)[:max_length]
    return Encoded(ids, ([IGNORE] * len(head) + answer)[:max_length])


def encode_all(
    tok: PreTrainedTokenizerBase, items: list[dict[str, str]], max_length: int
) -> list[Encoded]:
    return [encode_item(tok, item, max_length) for item in items]


def prompts_and_references(
    tok: PreTrainedTokenizerBase, items: list[dict[str, str]], encoded: list[Encoded]
) -> tuple[list[list[int]], list[str]]:
    """Each item's generation prompt (a QA item's chat prompt, a raw text's prefix as
    encoded) and the reference its answer is compared with: what the audit decodes from,
    and the engine's answer check too."""
    prompts: list[list[int]] = []
    refs: list[str] = []
    for item, enc in zip(items, encoded, strict=True):
        if "text" in item:
            cut = next(k for k, t in enumerate(enc.labels) if t != IGNORE)
            prompts.append(enc.input_ids[:cut])
            refs.append(str(tok.decode(enc.input_ids[cut:], skip_special_tokens=True)))
        else:
            prompts.append(prompt_ids(tok, item["prompt"]))
            refs.append(item["completion"])
    return prompts, refs


def rare_token_weights(forget: list[Encoded], others: list[Encoded]) -> list[list[float]]:
    """Per-position weights for the forget loss: 1/df of each target token, df = how many
    target sequences (forget and retain) contain it, scaled to mean 1 per item.

    A person's values ("Copperfield Avenue", "555-430-9107") occur in one or two items;
    their name occurs in every forget item and the answer templates ("was born on") in
    every retain item too. Pushing down those frequent tokens is the cheap way to lower
    a sequence's likelihood, and it damages everyone else who shares the template."""
    df: Counter[int] = Counter()
    for e in forget + others:
        df.update({t for t in e.labels if t != IGNORE})
    out = []
    for e in forget:
        raw = [1.0 / df[t] if t != IGNORE else 0.0 for t in e.labels]
        targets = [r for r, t in zip(raw, e.labels, strict=True) if t != IGNORE]
        mean = sum(targets) / len(targets) if targets else 1.0
        out.append([r / mean for r in raw])
    return out


def value_token_weights(
    tok: PreTrainedTokenizerBase,
    items: list[dict[str, str]],
    encoded: list[Encoded],
    other: float = 0.1,
) -> list[list[float]]:
    """Per-position weights for the forget loss that put it on the person's specific
    values (workers/ml/values.py: dates, numbers, names, places, e-mail addresses not
    already in the question): value tokens weigh 1, the other answer tokens `other`,
    scaled to mean 1 per item. The answer's template ("was born on") is shared with
    everyone else's facts; pushing it down is what damages them. An item without values
    (or a raw text item) keeps uniform weights."""
    from workers.ml.values import value_spans

    out = []
    for item, enc in zip(items, encoded, strict=True):
        targets = [k for k, t in enumerate(enc.labels) if t != IGNORE]
        weights = [0.0 if t == IGNORE else 1.0 for t in enc.labels]
        if "completion" in item and targets:
            sep = "" if tok.chat_template else " "
            answer = sep + item["completion"]
            spans = value_spans(answer, exclude=item["prompt"])
            offsets = tok(answer, add_special_tokens=False, return_offsets_mapping=True)[
                "offset_mapping"
            ]
            first = targets[0]
            hit = [any(a < e and b > s for s, e in spans) for a, b in offsets]
            if any(hit):
                for k in targets:
                    j = k - first
                    weights[k] = 1.0 if j < len(hit) and hit[j] else other
        mean = sum(weights[k] for k in targets) / len(targets) if targets else 1.0
        out.append([w / mean for w in weights])
    return out


def collate(
    encoded: list[Encoded],
    indices: list[int],
    pad_id: int,
    weights: list[list[float]] | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked in attention and labels. `weights` (per
    position, aligned with `encoded`) become the batch's per-token loss weights."""
    rows = [encoded[i] for i in indices]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        n = len(r.input_ids)
        ids[k, :n] = torch.tensor(r.input_ids)
        labels[k, :n] = torch.tensor(r.labels)
        mask[k, :n] = 1
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "index": torch.tensor(indices, dtype=torch.long),
    }
    if weights is not None:
        w = torch.zeros((len(rows), width), dtype=torch.float32)
        for k, i in enumerate(indices):
            w[k, : len(weights[i])] = torch.tensor(weights[i])
        batch["weights"] = w
    return batch


def mark_passes(batch: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    """Ask for `batch` to be run as consecutive groups of `rows` rows, one pass each (the
    retain loss stays the mean over the whole batch's target tokens)."""
    if sum(rows) != batch["input_ids"].shape[0]:
        raise ValueError(
            f"passes of {rows} rows do not cover a batch of {batch['input_ids'].shape[0]}"
        )
    batch["passes"] = torch.tensor(rows, dtype=torch.long)
    return batch


def passes(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The batch's passes (`mark_passes`; the whole batch when unmarked), each cut to its
    own longest row: right padding, so the same tokens at the same positions."""
    if "passes" not in batch:
        return [batch]
    out, start = [], 0
    for n in batch["passes"].tolist():
        rows = slice(start, start + n)
        width = int(batch["attention_mask"][rows].sum(dim=1).max())
        out.append(
            {
                k: v[rows, :width] if v.dim() == 2 else v[rows]
                for k, v in batch.items()
                if k != "passes"
            }
        )
        start += n
    return out


class BatchOrder:
    """Batch `k` of a dataset of `n` items: epochs are seeded permutations, so the order
    is a pure function of (seed, k) and a resumed run sees the same batches."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def batch(self, k: int) -> list[int]:
        per_epoch = -(-self.n // self.batch_size)
        epoch, j = divmod(k, per_epoch)
        perm = self._permutation(epoch)
        return perm[j * self.batch_size : (j + 1) * self.batch_size]
