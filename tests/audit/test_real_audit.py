"""The audit on the real built-in SmolLM2 (slow: `make test-slow`): a fine-tuned model
that knows a fictitious person fails the audit before unlearning and passes it after
the default unlearning run (measured: docs/audit.md, "Second round")."""

from __future__ import annotations

from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model

from workers.audit.run import AuditInput, audit_adapter
from workers.ml import loading, synthetic
from workers.ml.run import run_job
from workers.ml.specs import JobSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target() -> tuple[Path, list]:
    """The benchmarks' 8-person target (built once, about 6 minutes, cached in var/bench)."""
    from benchmarks.common import target as benchmark_target

    return benchmark_target()


def _inputs(folder: Path, people: list, adapter: Path) -> AuditInput:
    return AuditInput(
        str(folder),
        adapter,
        synthetic.qa_items(people[0]),
        retain=[i for p in people[1:] for i in synthetic.qa_items(p)],
        holdout=synthetic.holdout_for(people[0]),
    )


def test_a_model_that_still_knows_the_person_fails(target, tmp_path):
    folder, people = target
    model, _ = loading.load(loading.resolve(str(folder)), loading.pick_placement())
    get_peft_model(model, LoraConfig(r=8, target_modules="all-linear")).save_pretrained(
        tmp_path / "id"
    )
    report = audit_adapter(_inputs(folder, people, tmp_path / "id"))
    failed = {c["group"] for c in report["verdict"]["failed"]}
    assert {"forgetting", "privacy"} <= failed and not failed & {"utility", "fluency"}


def test_the_default_unlearning_run_passes(target, tmp_path):
    folder, people = target
    spec = JobSpec(
        model_source=str(folder),
        forget=synthetic.qa_items(people[0]),
        retain=[i for p in people[1:] for i in synthetic.qa_items(p)],
        holdout=synthetic.holdout_for(people[0]),
    )
    adapter = run_job(spec, tmp_path / "job").adapter_dir
    report = audit_adapter(_inputs(folder, people, adapter))
    assert report["verdict"]["passed"], report["verdict"]["failed"]
