"""Encoding and the forget-loss token weights (pure, no model)."""

from __future__ import annotations

import pytest

from workers.ml.data import IGNORE, BatchOrder, Encoded, collate, rare_token_weights


def enc(prompt: list[int], answer: list[int]) -> Encoded:
    return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer)


def test_rare_tokens_weigh_more_than_shared_ones():
    # token 7 = the person's name (in every forget item), 8 = a template word shared with
    # the retain items, 100/101 = the person's values (one item each)
    forget = [enc([1, 2], [7, 8, 100]), enc([1, 3], [7, 8, 101])]
    retain = [enc([1, 4], [9, 8, 200]), enc([1, 5], [10, 8, 201])]
    weights = rare_token_weights(forget, retain)
    for w, e in zip(weights, forget, strict=True):
        targets = [x for x, t in zip(w, e.labels, strict=True) if t != IGNORE]
        assert targets and sum(targets) / len(targets) == pytest.approx(1.0)
        assert all(x == 0 for x, t in zip(w, e.labels, strict=True) if t == IGNORE)
    name, template, value = weights[0][2], weights[0][3], weights[0][4]
    assert value > name > template


def test_collate_carries_weights_aligned_with_labels():
    forget = [enc([1, 2], [7, 8, 100]), enc([1], [7, 101])]
    weights = rare_token_weights(forget, [])
    batch = collate(forget, [1, 0], pad_id=0, weights=weights)
    assert batch["weights"].shape == batch["labels"].shape
    assert batch["weights"][0, :3].tolist() == pytest.approx(weights[1])
    assert batch["weights"][0, 3:].sum() == 0  # padding


def test_batch_order_is_a_function_of_seed_and_step():
    a, b = BatchOrder(10, 4, seed=3), BatchOrder(10, 4, seed=3)
    assert [a.batch(k) for k in range(9)] == [b.batch(k) for k in reversed(range(9))][::-1]
    epoch = [i for k in range(3) for i in a.batch(k)]
    assert sorted(epoch) == list(range(10))  # every item once per epoch
    assert BatchOrder(10, 4, seed=4).batch(0) != a.batch(0) or BatchOrder(10, 4, seed=4).batch(
        1
    ) != a.batch(1)


def test_value_weights_fall_on_the_persons_values_not_the_template(tmp_path):
    from tests.ml import tiny
    from workers.ml import loading
    from workers.ml.data import encode_all, value_token_weights

    _, tok = loading.load(
        loading.resolve(str(tiny.build(tmp_path / "m"))), loading.pick_placement("cpu")
    )
    items = [
        {"prompt": "When was Jane Roe born?", "completion": "Jane Roe was born on 4 May 1985."},
        {"prompt": "Is the sky blue?", "completion": "yes, it is."},
    ]
    encoded = encode_all(tok, items, 128)
    weights = value_token_weights(tok, items, encoded)
    heavy = "".join(
        tok.decode([t])
        for t, w, lab in zip(encoded[0].input_ids, weights[0], encoded[0].labels, strict=True)
        if lab != IGNORE and w > 1
    )
    assert heavy.replace(" ", "") == "4May1985"  # the date; not the name the question gave
    for w, e in zip(weights, encoded, strict=True):
        targets = [x for x, t in zip(w, e.labels, strict=True) if t != IGNORE]
        assert sum(targets) / len(targets) == pytest.approx(1.0)
    assert set(weights[1][k] for k, t in enumerate(encoded[1].labels) if t != IGNORE) == {1.0}


def test_training_on_a_cpu_with_bf16_instructions_computes_in_bf16(monkeypatch):
    import torch

    from workers.ml import loading

    for native in (True, False):
        monkeypatch.setattr(loading, "cpu_bf16_native", lambda native=native: native)
        trains = loading.pick_placement("cpu", training=True)
        assert trains.dtype == (torch.bfloat16 if native else torch.float32)
        # the audit and serving judge in float32; an explicit dtype always wins
        assert loading.pick_placement("cpu").dtype == torch.float32
        assert loading.pick_placement("cpu", "float32", training=True).dtype == torch.float32
    assert loading.pick_placement("cuda", training=False).dtype == torch.bfloat16


def test_the_record_names_the_cpu_with_family_and_the_instructions_that_set_its_speed():
    from workers.ml import loading

    cpuinfo = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\n"
        "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
        "processor\t: 1\nmodel name\t: something else\nflags\t\t: avx512f\n"
    )
    cpu = loading.cpu_description(cpuinfo)
    assert cpu["model"] == "AMD EPYC (family 23 model 1)"  # the first CPU's, not the last
    assert cpu["features"] == ["avx2"]
    assert loading.cpu_description("")["features"] == []  # no /proc (not Linux): no guess
    assert loading.cpu_description()["logical_cpus"] >= 1


def test_16bit_on_the_cpu_runs_the_plain_attention_and_an_operator_may_choose(monkeypatch):
    import torch

    from workers.ml import loading

    monkeypatch.delenv(loading.ATTENTION_ENV, raising=False)
    cpu16 = loading.Placement(torch.device("cpu"), torch.bfloat16)
    assert loading.attention_for(cpu16) == "eager"
    assert loading.attention_for(loading.Placement(torch.device("cpu"), torch.float16)) == "eager"
    # float32 on the CPU and anything on CUDA keep the model's own (PyTorch's SDPA)
    assert loading.attention_for(loading.Placement(torch.device("cpu"), torch.float32)) is None
    assert loading.attention_for(loading.Placement(torch.device("cuda"), torch.bfloat16)) is None
    monkeypatch.setenv(loading.ATTENTION_ENV, "sdpa")
    assert loading.attention_for(cpu16) == "sdpa"


def test_a_16bit_cpu_model_loads_with_the_plain_attention_and_its_shared_prefix_is_exact(
    tmp_path, monkeypatch
):
    """With the plain attention the shared-prefix forward gives the plain forward's logits
    bit for bit in bfloat16 (on SmolLM2, SDPA's fused CPU kernel gave them off by up to
    1.06; the tiny model is too small to show that)."""
    import torch

    from tests.ml import tiny
    from workers.ml import loading, losses, synthetic
    from workers.ml.data import collate, encode_all

    monkeypatch.delenv(loading.ATTENTION_ENV, raising=False)
    folder = loading.resolve(str(tiny.build(tmp_path / "m")))
    model, tok = loading.load(folder, loading.pick_placement("cpu", "bfloat16"))
    assert loading.attention_of(model) == "eager"
    assert loading.attention_of(loading.load(folder, loading.pick_placement("cpu"))[0]) == "sdpa"

    items = [
        {"prompt": f"Answer briefly. {i['prompt']}", "completion": i["completion"]}
        for i in synthetic.qa_items(synthetic.people(1, seed=5)[0])[:6]
    ]
    batch = collate(encode_all(tok, items, 128), list(range(6)), tok.pad_token_id)
    inputs = losses.model_inputs(batch, "cpu")
    keep = losses._keep_mask(batch["labels"])
    p = losses.shared_prefix_length(inputs["input_ids"], keep)
    assert p >= 4
    with torch.no_grad():
        shared = losses._prefix_logits(model, inputs, keep, p)
        plain = losses._plain_logits(model, inputs, keep)
    assert torch.equal(shared, plain)


def test_a_conversion_that_fails_in_its_child_process_says_why_and_leaves_no_folder(tmp_path):
    """The built-in model is converted in a child process (its memory goes when the
    child exits); a failure there comes back as the usual ModelSourceError."""
    import pytest

    from workers.ml import loading

    target = tmp_path / "no-such-model"
    with pytest.raises(loading.ModelSourceError, match="builtin:no-such-model"):
        loading._materialise_apart("builtin:no-such-model", target)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_the_general_retain_questions_are_not_the_audits_probe():
    from workers.ml import evaluate, general, specs

    asked = [q.lower() for q in general.questions()]
    probe = {p["question"].lower() for p in evaluate.general_knowledge()}
    assert len(asked) == len(set(asked)) == specs.GENERAL_QUESTIONS
    assert not probe & set(asked)  # the audit measures knowledge no job trained on
    with pytest.raises(ValueError, match="general_retain"):
        specs.SimNPO(general_retain=specs.GENERAL_QUESTIONS + 1)  # more than it has: an error
