"""Every audit metric against values computed by hand on crafted inputs."""

from __future__ import annotations

import math

import pytest
import torch

from tests.ml import tiny
from workers.audit import text
from workers.audit.quantize import fake_quantize
from workers.audit.scores import (
    TokenStats,
    auc,
    example_metrics,
    extraction_strength,
    min_k,
    token_stats,
)
from workers.ml import loading
from workers.ml import stand_ins as holdout
from workers.ml.data import encode_all


def test_auc_of_known_scores():
    # members beat non-members in 8 of 9 pairs, and tie in one (counts half)
    assert auc([3, 4, 5], [1, 2, 3]) == pytest.approx(8.5 / 9)
    assert auc([1, 2], [3, 4]) == 0.0
    assert auc([1, 2], [1, 2]) == pytest.approx(0.5)
    assert auc([], [1.0]) is None


def test_rouge_l_recall_of_known_strings():
    # LCS "the cat on the mat" = 5 of the reference's 6 words
    assert text.rouge_l_recall("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(
        5 / 6
    )
    assert text.rouge_l_recall("anything", "") == 0.0
    assert text.rouge_l_recall("", "Jane Roe") == 0.0
    assert text.rouge_l_recall("Roe, Jane", "Jane Roe") == pytest.approx(1 / 2)
    assert text.rouge_l_recall("She lives at 12 Elm Street", "12 Elm Street") == 1.0


def test_extraction_strength_and_exact_memorization_of_a_crafted_case():
    # argmax right from token 2 on: k* = 1 of 4 -> 1 - 1/4
    assert extraction_strength([False, True, True, True]) == pytest.approx(0.75)
    assert extraction_strength([True, True, True]) == 1.0
    assert extraction_strength([True, True, False]) == 0.0  # last token wrong: k* = |y|
    stats = TokenStats(
        logp=[-0.1, -0.2, -3.0, -0.1], hit=[True, False, True, True], zscore=[1, 0, -2, 1]
    )
    got = example_metrics(stats, "some target text")
    assert got["exact_memorization"] == pytest.approx(3 / 4)
    assert got["extraction_strength"] == pytest.approx(1 - 2 / 4)
    assert got["nll"] == pytest.approx(3.4 / 4)
    assert got["prob"] == pytest.approx(math.exp(-0.85))
    assert got["mia_min_k"] == pytest.approx((-3.0 + -0.2) / 2)  # lowest 40% of 4 = 2 tokens
    assert got["mia_min_k_pp"] == pytest.approx((-2 + 0) / 2)


def test_min_k_takes_the_lowest_share():
    assert min_k([-1.0, -2.0, -3.0, -4.0, -5.0]) == pytest.approx(-4.5)
    assert min_k([-1.0]) == -1.0


def test_min_k_plus_plus_on_a_tiny_model_matches_the_formula(tmp_path):
    folder = tiny.build(tmp_path / "m")
    model, tok = loading.load(loading.resolve(str(folder)), loading.pick_placement("cpu"))
    item = {"prompt": "Where does Jane live?", "completion": "In Paris."}
    [enc] = encode_all(tok, [item], 64)
    [stats] = token_stats(model, [enc], tok.pad_token_id)
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double()  # the formula in float64, as exact as can be
    first = next(k for k, t in enumerate(enc.labels) if t != -100)
    expected_z, expected_hit = [], []
    for pos in range(first, len(enc.input_ids)):
        logp = torch.log_softmax(logits[pos - 1], dim=-1)
        p = logp.exp()
        mu = (p * logp).sum()
        sigma = ((p * (logp - mu) ** 2).sum()).sqrt()
        target = enc.input_ids[pos]
        expected_z.append(((logp[target] - mu) / sigma).item())
        expected_hit.append(int(logits[pos - 1].argmax()) == target)
    assert stats.zscore == pytest.approx(expected_z, rel=1e-4, abs=1e-5)
    assert stats.hit == expected_hit


def test_fake_quantization_per_group_absmax():
    w = torch.tensor([[1.0, -0.55, 0.26, 0.1], [0.0, 0.0, 0.0, 0.0]])
    q8 = fake_quantize(w, 8, group=4)
    assert q8[0].tolist() == pytest.approx([round(127 * x) / 127 for x in (1.0, -0.55, 0.26, 0.1)])
    q4 = fake_quantize(w, 4, group=4)  # 7 levels each side of 0
    assert q4[0].tolist() == pytest.approx([1.0, -4 / 7, 2 / 7, 1 / 7])
    assert q4[1].tolist() == [0.0] * 4


def test_repetition_and_gibberish_rates_of_crafted_texts():
    assert text.repetition_rate("I like tea and I like coffee") == 0.0
    assert text.repetition_rate("go go go go go go") == pytest.approx(1 - 1 / 4)
    assert not text.is_gibberish("Jane Roe lives at 12 Elm Street in Springfield.")
    assert text.is_gibberish("")
    assert text.is_gibberish("xkcd qwrtp zzzz ### %%% brrrp")
    assert text.is_gibberish("the the the the the the the the the the")


def test_synthetic_holdout_replaces_specific_values_consistently():
    items = [
        {"prompt": "Where does Jane Roe live?", "completion": "Jane Roe lives at 12 Elm Street."},
        {"prompt": "When was Jane Roe born?", "completion": "On 4 May 1985."},
        {"prompt": "What is Jane Roe's e-mail?", "completion": "jane.roe@acme.com"},
        {"prompt": "Is the sky blue?", "completion": "Yes."},
    ]
    out = holdout.synthesize(items, seed=3)
    assert out == holdout.synthesize(items, seed=3)  # deterministic
    assert len(out) == 3  # nothing specific in the last item: dropped
    name = out[0]["prompt"].removeprefix("Where does ").removesuffix(" live?")
    assert name != "Jane Roe" and out[0]["completion"].startswith(name)
    assert out[1]["prompt"] == f"When was {name} born?"
    assert "1985" not in out[1]["completion"] and out[1]["completion"].startswith("On ")
    assert out[2]["completion"].endswith("@example.org") and "jane" not in out[2]["completion"]
    assert "12 " not in out[0]["completion"] and "Street" in out[0]["completion"]


def test_alternatives_keep_the_question_and_replace_the_answers_values():
    items = [
        {"prompt": "Where does Jane Roe live?", "completion": "Jane Roe lives at 12 Elm Street."},
        {"prompt": "When was Jane Roe born?", "completion": "Jane Roe was born on 4 May 1985."},
        {"prompt": "What is Jane Roe's hobby?", "completion": "She enjoys knitting."},
        {"text": "Jane Roe joined Acme in 2011 and moved to Springfield in 2015."},
    ]
    versions = holdout.alternatives(items, count=3, seed=0)
    assert versions == holdout.alternatives(items, count=3, seed=0)  # deterministic
    assert [len(v) for v in versions] == [3, 3, 3, 3]
    for item, alts in zip(items[:2], versions[:2], strict=True):
        for alt in alts:
            assert alt["prompt"] == item["prompt"]  # same question, same person
            assert alt["completion"].startswith("Jane Roe ")  # named in the question: kept
            assert alt["completion"] != item["completion"]
    assert len({a["completion"] for a in versions[1]}) == 3  # three different stand-ins
    assert "1985" not in versions[1][0]["completion"]
    assert all(a == items[2] for a in versions[2])  # nothing to replace: unchanged
    text = versions[3][0]["text"]
    assert text.startswith("Jane Roe joined Acme in 2011")  # the prompt half is kept
    assert "Springfield" not in text and "2015" not in text
    # Never the holdout's values: the audit compares against those.
    synthesized = {i.get("completion") for i in holdout.synthesize(items[:2], seed=0)}
    assert not synthesized & {a["completion"] for v in versions[:2] for a in v}


def test_value_leak_of_crafted_answers():
    assert text.states_value("She lives at 14 Elm Road, Dunmore.", "Dunmore")
    assert text.states_value("dunmore, I believe", "Dunmore")  # case does not matter
    assert not text.states_value("She lives in Dunmoreton.", "Dunmore")  # whole words only
    assert text.states_value("Call 555 0142.", "555-0142")  # other separators
    assert not text.states_value("Call 555-0143.", "555-0142")
    assert not text.states_value("Room 14.", "140")
    # an identifying value (date, e-mail, 4+ digits) leaks on its own
    assert text.leaks("Born on 3 May 1990.", {"3 May 1990", "Dunmore"}) is True
    assert text.leaks("I do not know.", {"3 May 1990", "Dunmore"}) is False
    # the words of a name or an address: more than half of them
    employer = {"Vireo", "Software"}
    assert text.leaks("She works at Vireo Software.", employer) is True
    assert text.leaks("She works at Bluefen Software.", employer) is False
    address = {"155", "Copperfield", "Quillford"}
    assert text.leaks("She lives in Quillford.", address) is False  # a city many share
    assert text.leaks("She lives at 155 Copperfield Avenue.", address) is True
    assert text.leaks("Anything.", set()) is None  # nothing to leak
