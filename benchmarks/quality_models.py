"""The models the quality benchmark compares against (TOFU's protocol on our own data).

40 fictitious people, 20 QA items each. The *target* is SmolLM2 fully fine-tuned on all
of them; each *retrained* model is the same fine-tune (same hyperparameters, seed and
data order rule) on all but one forget set, the gold standard an unlearning method is
measured against. Forget sets are the first k people: `forget01` (k=1), `forget04` (k=4).

Cached under var/bench/quality/ with the seconds each build took (the retraining cost
that unlearning is compared with) in `models.json`.

    .venv/bin/python -m benchmarks.quality_models
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_DIR
from workers.ml import synthetic
from workers.ml.finetune import finetune

QUALITY_DIR = BENCH_DIR / "quality"
N_PEOPLE = 40
PEOPLE_SEED = 7
# Three epochs at 2e-4: fewer passes than the 8-person target's four at 1e-4, because 40
# people cost five times the steps per epoch (measured: ~0.45 s per item and epoch here).
EPOCHS = 3.0
LR = 2e-4
FORGET_SETS = {"forget01": 1, "forget04": 4}


def cohort() -> list[synthetic.Person]:
    return synthetic.people(N_PEOPLE, seed=PEOPLE_SEED)


def _record() -> dict[str, Any]:
    path = QUALITY_DIR / "models.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _build(name: str, people: list[synthetic.Person]) -> Path:
    out = QUALITY_DIR / name
    if (out / "config.json").is_file():
        return out
    items = [i for p in people for i in synthetic.qa_items(p)]
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()

    def tick(step: int, total: int, loss: float) -> None:
        if step % 25 == 0 or step == total:
            print(
                f"  {name}: step {step}/{total} loss {loss:.3f} ({time.perf_counter() - t:.0f}s)",
                flush=True,
            )

    res = finetune("builtin:smollm2-135m-instruct", items, out, epochs=EPOCHS, lr=LR, progress=tick)
    rec = _record()
    rec[name] = {
        "people": len(people),
        "items": len(items),
        "steps": res.steps,
        "final_loss": round(res.final_loss, 4),
        "seconds": round(res.seconds, 1),
        "epochs": EPOCHS,
        "lr": LR,
    }
    (QUALITY_DIR / "models.json").write_text(json.dumps(rec, indent=1))
    print(f"built {out}: {rec[name]}", flush=True)
    return out


def target() -> Path:
    return _build("target", cohort())


def retrained(forget_set: str) -> Path:
    """The model fine-tuned without the forget set's people."""
    return _build(f"retrained-{forget_set}", cohort()[FORGET_SETS[forget_set] :])


def retraining_seconds(forget_set: str) -> float:
    """What retraining without the forget set costs: its measured build time, or its steps
    at the fastest step rate of any build if that is lower (a build that shared the
    machine with something else must not make unlearning look cheaper)."""
    rec = _record()
    own = rec[f"retrained-{forget_set}"]
    rate = min(r["seconds"] / r["steps"] for r in rec.values())
    return float(min(own["seconds"], rate * own["steps"]))


def main() -> None:
    target()
    for name in FORGET_SETS:
        retrained(name)
    print(json.dumps(_record(), indent=1))


if __name__ == "__main__":
    main()
