"""Shared by the benchmarks: the fine-tuned target model that knows fictitious people."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from workers.ml import synthetic
from workers.ml.finetune import finetune

BENCH_DIR = Path("var/bench")


def target(
    n_people: int = 8,
    seed: int = 7,
    epochs: float = 4.0,
    lr: float = 1e-4,
    device: str | None = None,
) -> tuple[Path, list]:
    """SmolLM2 fine-tuned on `n_people` fictitious people (cached under var/bench), in
    float32 on `device` (default: CUDA if present)."""
    from workers.ml.loading import pick_placement

    people = synthetic.people(n_people, seed=seed)
    out = BENCH_DIR / f"target{n_people}-s{seed}-e{epochs:g}-lr{lr:g}"
    if not (out / "config.json").is_file():
        items = [i for p in people for i in synthetic.qa_items(p)]
        out.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        res = finetune(
            "builtin:smollm2-135m-instruct",
            items,
            out,
            epochs=epochs,
            lr=lr,
            batch_size=8,
            placement=pick_placement(device, "float32"),
        )
        print(
            f"built target {out} in {time.perf_counter() - t:.0f}s ({res.steps} steps, "
            f"final loss {res.final_loss:.3f})",
            flush=True,
        )
    return out, people


def load_model(
    folder: Path,
    adapter: Path | str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[Any, Any]:
    """A benchmark model and its tokenizer, with `adapter` applied by plain PEFT."""
    from peft import PeftModel

    from workers.ml.loading import load, pick_placement, resolve

    model, tok = load(resolve(str(folder)), pick_placement(device, dtype))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, tok


def first_person_spec(folder: Path, people: list, method: Any, **job: Any) -> Any:
    """The job that forgets people[0] of a target: retain the others, holdout a synthetic
    stand-in (`job`: other JobSpec fields, such as dtype)."""
    from workers.ml.specs import JobSpec

    return JobSpec(
        model_source=str(folder),
        forget=synthetic.qa_items(people[0]),
        retain=[i for p in people[1:] for i in synthetic.qa_items(p)],
        holdout=synthetic.holdout_for(people[0]),
        method=method,
        **job,
    )


def unlearn_first_person(folder: Path, people: list, method: dict, workdir: Path) -> tuple:
    """Forget people[0] (retain: the others, holdout: a synthetic stand-in) and summarise
    the run: (JobResult, row of figures)."""
    import shutil

    from workers.ml.run import run_job

    shutil.rmtree(workdir, ignore_errors=True)
    spec = first_person_spec(folder, people, method)
    t = time.perf_counter()
    result = run_job(spec, workdir)
    out, record = result.record["outcome"], result.record
    base, final = out["base"], out["final"]
    row = {
        "stopped": out["stopped"],
        "steps": out["steps"],
        "best_step": out["best_step"],
        "train_s": round(out["seconds"], 1),
        "job_wall_s": round(time.perf_counter() - t, 1),
        "tokens_per_s": round(out["tokens"] / out["seconds"], 1),
        "job_peak_rss_gb": round(record["job_peak_rss_bytes"] / 2**30, 2),
        "weights_gb": round(record["base_model"]["weights_bytes"] / 2**30, 2),
        "forget_prob": [round(base["forget_prob"], 3), round(final["forget_prob"], 3)],
        "holdout_prob": round(base.get("holdout_prob", float("nan")), 3),
        "retain_nll": [round(base["retain_nll"], 3), round(final["retain_nll"], 3)],
    }
    return result, row
