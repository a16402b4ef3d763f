"""The audit end to end on the tiny model: nothing forgotten fails, gibberish fails
utility and fluency, a real unlearning run passes, and results are reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.ml.targets import FORGET, RETAIN, TINY_ANSWER_GUARD_OFF
from workers.audit.policy import AuditPolicy
from workers.audit.run import AuditInput, audit_adapter, judge_report
from workers.ml import loading, stand_ins
from workers.ml.answers import AnswerCheck
from workers.ml.data import encode_all
from workers.ml.run import run_job
from workers.ml.specs import JobSpec
from workers.ml.training import spread

UNLEARN = {
    "name": "simnpo",
    "lr": 5e-3,
    "max_steps": 30,
    "eval_every": 2,
    **TINY_ANSWER_GUARD_OFF,
}


def _adapter(target: str, folder: Path, *, scramble: bool) -> Path:
    """An adapter that changes nothing (B = 0, the base model itself), or one with large
    random weights (a model broken into gibberish)."""
    model, _ = loading.load(loading.resolve(target), loading.pick_placement("cpu"))
    torch.manual_seed(0)
    config = LoraConfig(
        r=8,
        lora_alpha=400 if scramble else 16,
        target_modules="all-linear",
        init_lora_weights=not scramble,  # False: B random too, so the adapter acts
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(folder))
    return folder


def _failed(report: dict) -> set[str]:
    return {c["name"] for c in report["verdict"]["failed"]}


def _groups(report: dict) -> set[str]:
    return {c["group"] for c in report["verdict"]["failed"]}


def test_the_base_model_fails_the_audit(tiny_target, tmp_path):
    report = audit_adapter(
        AuditInput(
            tiny_target,
            _adapter(tiny_target, tmp_path / "id", scramble=False),
            FORGET,
            retain=RETAIN,
        )
    )
    assert report["verdict"]["passed"] is False
    assert "forget_prob_ratio" in _failed(report)
    assert report["metrics"]["forget_prob"]["after"] == pytest.approx(
        report["metrics"]["forget_prob"]["before"]
    )
    assert _groups(report) >= {"forgetting"}
    assert "utility" not in _groups(report) and "fluency" not in _groups(report)
    leak = report["metrics"]["forget_value_leak"]
    assert leak["after"] == leak["before"] > 0 and "forget_value_leak" in _failed(report)
    kept = report["metrics"]["retain_answers_kept"]
    assert kept["answers"] > 0 and kept["after"] == 1.0  # the base model breaks no answer
    # the engine's answer check (`stop_answers_leak`) finds what the audit finds
    model, tok = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    holdout = stand_ins.synthesize(FORGET, seed=0)  # the audit's, as it made them
    check = AnswerCheck.build(
        tok, (FORGET, encode_all(tok, FORGET, 256)), (holdout, encode_all(tok, holdout, 256))
    )
    assert check is not None and check.leaking(model)[1] == leak["before"]
    assert check.chance_share(model) == report["metrics"]["holdout_value_leak"]["before"]
    idx = spread(len(RETAIN), 24)  # the audit's retain sample, and the job's
    sample = [RETAIN[i] for i in idx]
    check.with_retain(sample, encode_all(tok, sample, 256), idx)
    assert len(check.retain_stating(model)) == kept["answers"]


def test_a_gibberish_model_fails_utility_and_fluency(tiny_target, tmp_path):
    report = audit_adapter(
        AuditInput(
            tiny_target,
            _adapter(tiny_target, tmp_path / "bad", scramble=True),
            FORGET,
            retain=RETAIN,
        )
    )
    assert report["verdict"]["passed"] is False
    assert {"utility", "fluency"} <= _groups(report), report["verdict"]["failed"]
    assert "retain_answers_kept" in _failed(report)  # the retain answers broke too
    assert (
        report["metrics"]["gibberish_rate"]["after"] > report["metrics"]["gibberish_rate"]["before"]
    )


@pytest.fixture(scope="module")
def unlearned(tiny_target, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("unlearn")
    return run_job(
        JobSpec(model_source=tiny_target, forget=FORGET, retain=RETAIN, method=UNLEARN), work
    ).adapter_dir


def test_a_real_unlearning_run_passes_and_reports_everything(tiny_target, unlearned):
    inp = AuditInput(tiny_target, unlearned, FORGET, ["r1"] * len(FORGET), retain=RETAIN)
    # Judging the membership test on these 8 items: only it fails, as it must on this
    # toy (see TINY_AUDIT_POLICY): forgotten items still beat never-seen ones.
    inp.policy = AuditPolicy(mia_min_items=2)
    strict = audit_adapter(inp)
    assert _groups(strict) == {"privacy"}, strict["verdict"]["failed"]
    assert strict["metrics"]["mia_loss_auc"]["after"] > 0.8
    # a stored report judged again from its own metrics and policy: the same criteria
    assert judge_report(json.loads(json.dumps(strict))) == strict["verdict"]["criteria"]

    # By default 8 items are too few to judge membership: reported, not judged.
    inp.policy = AuditPolicy()
    report = audit_adapter(inp)
    assert report["membership_test"].startswith("reported, not judged")
    assert report["verdict"]["passed"] is True, report["verdict"]["failed"]
    assert judge_report(json.loads(json.dumps(report))) == report["verdict"]["criteria"]
    groups = {c["group"] for c in report["verdict"]["criteria"]}
    assert groups == {"forgetting", "utility", "fluency", "robustness"}
    m = report["metrics"]
    assert "mia_loss_auc" in m  # still measured and shown
    assert m["forget_prob"]["after"] < m["forget_prob"]["before"]
    assert m["forget_rouge"]["after"] < m["forget_rouge"]["before"]
    assert {"quantized_8bit_rouge", "quantized_4bit_rouge", "paraphrase_rouge"} <= set(m)
    assert report["holdout_source"] == "synthesized"
    assert [i["index"] for i in report["items"]] == list(range(len(FORGET)))
    assert all(i["request_id"] == "r1" for i in report["items"])


def test_the_same_adapter_audited_twice_gives_identical_results(tiny_target, unlearned):
    inp = AuditInput(
        tiny_target, unlearned, FORGET, retain=RETAIN, policy=AuditPolicy(relearn_steps=3)
    )
    first, second = audit_adapter(inp), audit_adapter(inp)
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    assert first["metrics"]["relearned_rouge"]["after"] is not None
