"""Shared by the benchmarks: the fine-tuned target model that knows fictitious people."""

from __future__ import annotations

import time
from pathlib import Path

from workers.ml import synthetic
from workers.ml.finetune import finetune

BENCH_DIR = Path("var/bench")


def target(
    n_people: int = 8, seed: int = 7, epochs: float = 4.0, lr: float = 1e-4
) -> tuple[Path, list]:
    """SmolLM2 fine-tuned on `n_people` fictitious people (cached under var/bench)."""
    people = synthetic.people(n_people, seed=seed)
    out = BENCH_DIR / f"target{n_people}-s{seed}-e{epochs:g}-lr{lr:g}"
    if not (out / "config.json").is_file():
        items = [i for p in people for i in synthetic.qa_items(p)]
        out.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        res = finetune(
            "builtin:smollm2-135m-instruct", items, out, epochs=epochs, lr=lr, batch_size=8
        )
        print(
            f"built target {out} in {time.perf_counter() - t:.0f}s ({res.steps} steps, "
            f"final loss {res.final_loss:.3f})",
            flush=True,
        )
    return out, people
