"""Every method on a tiny model: it forgets, keeps the rest, is deterministic and
resumable, and writes an adapter plain PEFT loads."""

from __future__ import annotations

import math
import types
import typing

import pytest
import torch
from peft import PeftModel
from pydantic import ValidationError
from safetensors.torch import load_file

from tests.ml.targets import FORGET, FORGET_B, RETAIN, cancel_after
from workers.ml import evaluate, general, loading, methods, specs
from workers.ml.run import run_job
from workers.ml.specs import JobSpec
from workers.ml.training import Canceled

FAST = {
    "max_steps": 20,
    "eval_every": 2,
    "checkpoint_every": 5,
    "stop_target": "ratio",
    "stop_forget_ratio": None,  # never stop early for forgetting
    "retain_tolerance": 1.0,
    "retain_answers_tolerance": None,  # the guards are tested on their own, below
}
# Measured on the tiny target (see the sweep in docs/unlearning-defaults.md): the
# likelihood-pushing methods move 2-3x faster than the bounded or indirect ones.
LR = {
    "ga": 2e-3,
    "graddiff": 2e-3,
    "npo": 1e-3,
    "simnpo": 5e-3,
    "relabel": 5e-3,
    "idk": 5e-3,
    "rmu": 5e-3,
}


def spec_for(target: str, name: str, forget=FORGET, **overrides) -> JobSpec:
    return JobSpec(
        model_source=target,
        forget=forget,
        retain=RETAIN,
        method={"name": name, "lr": LR[name], **FAST, **overrides},
    )


@pytest.mark.parametrize("name", specs.METHOD_NAMES)
def test_method_forgets_and_keeps_retain_within_bounds(tiny_target, tmp_path, name):
    result = run_job(spec_for(tiny_target, name), tmp_path)
    out = result.record["outcome"]
    base, final = out["base"], out["final"]
    assert final["forget_nll"] > base["forget_nll"] + 0.3, out["evals"]
    assert final["retain_nll"] <= base["retain_nll"] * 2.0
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_registry_and_specs_agree():
    union = typing.get_args(typing.get_args(specs.MethodSpec)[0])
    spec_names = {typing.get_args(cls.model_fields["name"].annotation)[0]: cls for cls in union}
    assert set(methods.REGISTRY) == set(spec_names) == set(specs.METHOD_NAMES)
    for name, impl in methods.REGISTRY.items():
        assert impl.spec_type is spec_names[name]


def _adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def _resume_after_cut(spec, full, folder, steps: int, resumed_from: int):
    """Cancel a run of `spec` after `steps` steps, resume it, check it restarted at
    `resumed_from` and ended on `full`'s adapter bit for bit; the resumed result."""
    with pytest.raises(Canceled):
        run_job(spec, folder, should_cancel=cancel_after(steps))
    assert not (folder / "adapter").exists()  # nothing published when canceled
    resumed = run_job(spec, folder)
    assert resumed.record["outcome"]["resumed_from"] == resumed_from
    wa, wb = _adapter(full.adapter_dir), _adapter(resumed.adapter_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return resumed


def test_same_seed_same_adapter(tiny_target, tmp_path):
    a = run_job(spec_for(tiny_target, "npo", max_steps=8), tmp_path / "a")
    b = run_job(spec_for(tiny_target, "npo", max_steps=8), tmp_path / "b")
    wa, wb = _adapter(a.adapter_dir), _adapter(b.adapter_dir)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = run_job(spec_for(tiny_target, "npo", max_steps=8, seed=1), tmp_path / "c")
    assert not all(torch.equal(wa[k], _adapter(c.adapter_dir)[k]) for k in wa)


def test_resume_from_checkpoint_equals_uninterrupted_run(tiny_target, tmp_path):
    full = run_job(spec_for(tiny_target, "npo"), tmp_path / "full")

    # the last checkpoint before step 13 is at step 10
    resumed = _resume_after_cut(spec_for(tiny_target, "npo"), full, tmp_path / "cut", 13, 10)
    assert resumed.record["outcome"]["curve"] == full.record["outcome"]["curve"]


def test_adapter_loads_with_plain_peft_and_changes_only_what_it_should(tiny_target, tmp_path):
    from workers.ml.data import collate, encode_all
    from workers.ml.losses import sequence_stats

    result = run_job(spec_for(tiny_target, "npo"), tmp_path)
    resolved = loading.resolve(tiny_target)
    base, tok = loading.load(resolved, loading.pick_placement("cpu"))
    enc_f = encode_all(tok, FORGET, 128)
    enc_r = encode_all(tok, RETAIN[:8], 128)
    with torch.no_grad():
        _, base_f = sequence_stats(base, collate(enc_f, list(range(len(enc_f))), tok.pad_token_id))
        _, base_r = sequence_stats(base, collate(enc_r, list(range(len(enc_r))), tok.pad_token_id))
        peft_model = PeftModel.from_pretrained(base, result.adapter_dir)
        _, new_f = sequence_stats(
            peft_model, collate(enc_f, list(range(len(enc_f))), tok.pad_token_id)
        )
        _, new_r = sequence_stats(
            peft_model, collate(enc_r, list(range(len(enc_r))), tok.pad_token_id)
        )
    assert new_f.mean() > base_f.mean() + 0.3  # forgotten
    assert new_r.mean() < base_r.mean() * 2.0  # others kept
    assert abs(new_f.mean().item() - result.record["outcome"]["final"]["forget_nll"]) < 1e-3


def test_scope_control_stops_when_forgotten(tiny_target, tmp_path):
    result = run_job(
        spec_for(tiny_target, "simnpo", max_steps=60, stop_target="ratio", stop_forget_ratio=0.5),
        tmp_path,
    )
    out = result.record["outcome"]
    assert out["stopped"] == "forgotten" and out["steps"] < 60
    assert out["final"]["forget_prob"] <= 0.5 * out["base"]["forget_prob"]


def test_a_run_stops_as_forgotten_only_once_the_values_are_no_longer_stated(tiny_target, tmp_path):
    # the mean alone: forgotten at the first check where it halves
    level = {"max_steps": 60, "stop_target": "ratio", "stop_forget_ratio": 0.5}
    mean_only = run_job(spec_for(tiny_target, "simnpo", **level), tmp_path / "a")
    strict = run_job(
        spec_for(tiny_target, "simnpo", **level, stop_values_stated=0.0), tmp_path / "b"
    )
    a, b = mean_only.record["outcome"], strict.record["outcome"]
    assert "forget_stated" not in a["base"]
    assert b["base"]["forget_stated"] > 0.5  # the tiny target states most of its values
    stated = [e["forget_stated"] for e in b["evals"]]
    assert b["stopped"] == "forgotten" and b["final"]["forget_stated"] == 0.0, stated
    # the same trajectory up to the mean's stop (step 16 here), where half the items
    # still stated their values, so the strict run went on (to step 22)
    assert b["steps"] > a["steps"]
    at_a = next(e for e in b["evals"] if e["step"] == a["steps"])
    assert at_a["forget_prob"] == pytest.approx(a["final"]["forget_prob"], abs=1e-5)
    assert at_a["forget_stated"] > 0.0


def test_forgotten_waits_for_the_stated_share():
    from workers.ml.training import forgotten

    now = {"forget_prob": 0.2, "forget_stated": 0.15}
    assert forgotten(now, 0.3, None)
    assert not forgotten(now, 0.3, None, max_stated=0.1)
    assert forgotten(now, 0.3, None, max_stated=0.15)
    assert not forgotten({**now, "forget_stated": 0.0}, 0.1, None, max_stated=0.1)


def test_two_of_twenty_stated_is_within_a_bound_of_a_tenth():
    from workers.ml.training import forgotten, stated_share

    stated = torch.tensor([1.0] * 2 + [0.0] * 18)  # as measure_forget keeps it: float32
    now = {"forget_prob": 0.2, **stated_share(stated)}
    assert forgotten(now, 0.3, None, max_stated=0.1)
    assert not forgotten(now, 0.3, None, max_stated=0.05)


def test_retain_guard_rolls_back_to_the_last_state_within_bounds(tiny_target, tmp_path):
    result = run_job(
        spec_for(
            tiny_target, "ga", max_steps=40, lr=5e-3, retain_tolerance=0.3, retain_tolerance_abs=0
        ),
        tmp_path,
    )
    out = result.record["outcome"]
    assert out["stopped"] == "retain_guard"
    assert out["final"]["retain_nll"] <= out["base"]["retain_nll"] * 1.3 + 1e-6
    assert out["best_step"] < out["steps"]


def test_continuation_keeps_earlier_forgetting(tiny_target, tmp_path):
    v1 = run_job(spec_for(tiny_target, "simnpo"), tmp_path / "v1")
    v2 = run_job(
        JobSpec(
            model_source=tiny_target,
            forget=FORGET_B,
            retain=RETAIN,
            previous_adapter=str(v1.adapter_dir),
            method={"name": "simnpo", "lr": LR["simnpo"], **FAST},
        ),
        tmp_path / "v2",
    )
    assert v2.record["previous_adapter"] == str(v1.adapter_dir)
    out2 = v2.record["outcome"]
    assert out2["final"]["forget_nll"] > out2["base"]["forget_nll"] + 0.3  # B forgotten

    # A, forgotten by v1, is still forgotten by v2.
    from workers.ml.data import collate, encode_all
    from workers.ml.losses import sequence_stats

    resolved = loading.resolve(tiny_target)
    base, tok = loading.load(resolved, loading.pick_placement("cpu"))
    enc = encode_all(tok, FORGET, 128)
    batch = collate(enc, list(range(len(enc))), tok.pad_token_id)
    with torch.no_grad():
        _, base_nll = sequence_stats(base, batch)
        m2 = PeftModel.from_pretrained(base, v2.adapter_dir)
        _, v2_nll = sequence_stats(m2, batch)
    v1_nll = v1.record["outcome"]["final"]["forget_nll"]
    assert v2_nll.mean() > base_nll.mean() + 0.3
    assert v2_nll.mean() >= 0.8 * v1_nll


def test_record_holds_what_changes_results(tiny_target, tmp_path):
    record = run_job(spec_for(tiny_target, "simnpo", max_steps=4), tmp_path).record
    assert record["method"]["name"] == "simnpo" and record["method"]["seed"] == 0
    assert record["base_model"]["digest"].startswith("sha256:")
    env = record["environment"]
    auto = str(loading.pick_placement("cpu", training=True).dtype).removeprefix("torch.")
    assert env["device"] == "cpu" and env["dtype"] == auto and env["torch"]
    assert env["cpu"] == loading.cpu_description()  # timings compare on the same CPU only
    assert set(record["adapter_files"]) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert len(record["outcome"]["curve"]) == 4
    assert record["durations_s"]["train"] > 0


def test_unknown_model_source_is_a_clear_error(tmp_path):
    with pytest.raises(loading.ModelSourceError, match=r"config\.json"):
        run_job(JobSpec(model_source=str(tmp_path), forget=FORGET), tmp_path / "w")


def test_kept_logits_match_full_logits(tiny_target):
    from workers.ml import losses
    from workers.ml.data import collate, encode_all

    model, tok = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    enc = encode_all(tok, [*FORGET, {"text": "Ann Smith was born in Marlow Bay in 1990."}], 128)
    batch = collate(enc, list(range(len(enc))), tok.pad_token_id)
    with torch.no_grad():
        fast_sum, fast_nll = losses.sequence_stats(model, batch)
        losses._NO_KEEP.add(losses._kind(model))
        try:
            slow_sum, slow_nll = losses.sequence_stats(model, batch)
        finally:
            losses._NO_KEEP.discard(losses._kind(model))
    assert torch.allclose(fast_sum, slow_sum, atol=1e-4)
    assert torch.allclose(fast_nll, slow_nll, atol=1e-5)


SYSTEM = "You are the records assistant of Example Ltd; answer briefly and precisely."


def _plain_and_shared(model, batch):
    """Kept logits and LoRA gradients of a batch, without and with its prefix shared."""
    from workers.ml import losses

    out = []
    for share in (False, True):
        with losses.prefix_sharing(share):
            model.zero_grad(set_to_none=True)
            logits, targets = losses.kept_logits(model, batch)
            torch.nn.functional.cross_entropy(logits, targets).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        out.append((logits.detach(), grads))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_shared_prefix_runs_once_and_gives_the_same_logits_and_gradients(tmp_path, family):
    from peft import LoraConfig, get_peft_model

    from tests.ml import tiny
    from workers.ml import losses
    from workers.ml.data import collate, encode_all

    folder = tiny.build(tmp_path / "m", family=family)
    model, tok = loading.load(loading.resolve(str(folder)), loading.pick_placement("cpu"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # a trained adapter, not B = 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    items = [{"prompt": f"{SYSTEM} {i['prompt']}", "completion": i["completion"]} for i in FORGET]
    batch = collate(encode_all(tok, items, 128), [0, 1, 2, 3], tok.pad_token_id)
    keep = losses._keep_mask(batch["labels"])
    assert losses.shared_prefix_length(batch["input_ids"], keep) >= losses.MIN_SHARED

    counted: list[int] = []  # tokens the network sees per call
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: counted.append(int(args[0].numel()))
    )
    try:
        (plain, g_plain), (shared, g_shared) = _plain_and_shared(model, batch)
    finally:
        hook.remove()
    assert losses._SHARED_PREFIX[losses._share_key(model)] is True  # checked once per class
    assert losses.shared_prefix_used(model)
    assert torch.allclose(plain, shared, atol=1e-4)
    assert torch.allclose(g_plain, g_shared, rtol=1e-3, atol=1e-6)
    assert sum(counted[-2:]) < 0.8 * counted[0]  # the prefix went through once, not 4x


def test_the_prefix_check_allows_16bit_rounding_and_nothing_else():
    from workers.ml.losses import same_logits

    torch.manual_seed(0)
    plain = 10 * torch.randn(12, 50)
    # 16-bit paths: each logit rounded, plus rounding carried through the layers
    rounded = plain.bfloat16().float() + 0.02 * torch.randn(12, 50)
    assert same_logits(rounded, plain, torch.bfloat16)
    assert not same_logits(rounded, plain, torch.float32)  # float32 rounds 65536x finer
    assert same_logits(plain + 1e-5, plain, torch.float32)
    # a path that computes something else (other rows' logits) is refused in any dtype
    other = plain[torch.roll(torch.arange(12), 1)]
    assert not same_logits(other, plain, torch.bfloat16)
    assert not same_logits(plain + 3.0 * torch.randn(12, 50), plain, torch.bfloat16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_checks_batches_run_their_common_prefix_once_with_the_same_numbers(tmp_path, dtype):
    """Within one scope check the weights do not change, so the second and later batches
    reuse the first one's prefix keys and values: one prefix pass, not one per batch, and
    the per-item figures equal batch-by-batch passes bit for bit."""
    from peft import LoraConfig, get_peft_model

    from tests.ml import tiny
    from workers.ml import losses, training
    from workers.ml.data import collate, encode_all

    folder = tiny.build(tmp_path / "m")
    model, tok = loading.load(loading.resolve(str(folder)), loading.pick_placement("cpu", dtype))
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # a trained adapter, not B = 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    items = [
        {"prompt": f"{SYSTEM} {i['prompt']}", "completion": i["completion"]}
        for i in FORGET + RETAIN
    ]
    enc = encode_all(tok, items, 128)
    batches = [
        list(range(s, min(s + training.CHECK_BATCH, len(enc))))
        for s in range(0, len(enc), training.CHECK_BATCH)
    ]
    assert len(batches) >= 2
    model.eval()
    with torch.no_grad():
        each = torch.cat(
            [losses.sequence_stats(model, collate(enc, b, tok.pad_token_id))[0] for b in batches]
        )
        masks = [[1.0] * len(e.labels) for e in enc]
        each_exact = torch.cat(
            [
                losses.sequence_logp_exact(model, collate(enc, b, tok.pad_token_id, masks))[0]
                for b in batches
            ]
        )
    calls: list[int] = []  # tokens per row of each call of the network
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: calls.append(int(args[0].shape[0]))
    )
    try:
        reused = training.sequence_logprobs(model, enc, tok.pad_token_id)
        prefix_passes = calls.count(1)
        reused_exact, _ = training.logp_exact(model, enc, tok.pad_token_id, masks)
    finally:
        hook.remove()
    assert torch.equal(reused, each) and torch.equal(reused_exact, each_exact)
    prefixes = set()  # the batches' distinct common prefixes (here two lengths of three)
    for b in batches:
        ids = collate(enc, b, tok.pad_token_id)["input_ids"]
        keep = losses._keep_mask(collate(enc, b, tok.pad_token_id)["labels"])
        prefixes.add(tuple(ids[0, : losses.shared_prefix_length(ids, keep)].tolist()))
    assert prefix_passes == len(prefixes) < len(batches)  # batch-1 calls: once per prefix
    assert losses._REUSE.get() is None  # nothing is kept past the check


def test_a_shared_prefix_is_checked_per_compute_dtype(tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.ml import tiny
    from workers.ml import losses
    from workers.ml.data import collate, encode_all

    folder = tiny.build(tmp_path / "m")
    items = [{"prompt": f"{SYSTEM} {i['prompt']}", "completion": i["completion"]} for i in FORGET]
    for dtype in ("float32", "bfloat16"):
        placement = loading.pick_placement("cpu", dtype)
        model, tok = loading.load(loading.resolve(str(folder)), placement)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        batch = collate(encode_all(tok, items, 128), [0, 1, 2, 3], tok.pad_token_id)
        with torch.no_grad():
            losses.kept_logits(model, batch)
        key = losses._share_key(model)
        assert key[1] == getattr(torch, dtype)  # the frozen weights', not LoRA's float32
        assert losses._SHARED_PREFIX[key] is True
        assert losses.shared_prefix_used(model)


def test_no_prefix_is_shared_with_a_single_row_or_past_the_first_target():
    from workers.ml import losses

    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]])
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, 3:5] = True  # position 3 predicts the first target token
    assert losses.shared_prefix_length(ids, keep) == 3
    assert losses.shared_prefix_length(ids[:1], keep[:1]) == 0
    assert losses.shared_prefix_length(torch.tensor([[1, 9], [2, 9]]), keep[:, :2]) == 0


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_other_architectures_unlearn_too(tmp_path, family):
    from tests.ml import tiny
    from workers.ml.finetune import finetune

    base = tiny.build(tmp_path / "base", family=family)
    finetune(str(base), FORGET + RETAIN, tmp_path / "target", epochs=20, lr=3e-3, batch_size=8)
    result = run_job(spec_for(str(tmp_path / "target"), "npo"), tmp_path / "job")
    out = result.record["outcome"]
    assert out["final"]["forget_nll"] > out["base"]["forget_nll"] + 0.3, out["evals"]
    base_model, _ = loading.load(
        loading.resolve(str(tmp_path / "target")), loading.pick_placement()
    )
    assert PeftModel.from_pretrained(base_model, result.adapter_dir) is not None


def test_gradient_checkpointing_gives_the_same_adapter(tiny_target, tmp_path):
    # float32: the recomputed forward (and, without it, the shared prefix) agree to its
    # rounding; bfloat16 rounds 65536x coarser and its adapters differ at that level
    spec = spec_for(tiny_target, "npo", max_steps=6).model_copy(update={"dtype": "float32"})
    plain = run_job(spec, tmp_path / "plain")
    m = spec.method.model_copy(update={"gradient_checkpointing": True})
    ckpt = run_job(spec.model_copy(update={"method": m}), tmp_path / "gc")
    wa, wb = _adapter(plain.adapter_dir), _adapter(ckpt.adapter_dir)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_neighbours_are_the_retain_items_sharing_a_forget_value():
    from workers.ml.values import neighbours

    forget = [
        {"prompt": "Where does Ann Roe work?", "completion": "Ann Roe works at Vireo Software."}
    ]
    retain = [
        {"prompt": "Where does Bo Lin work?", "completion": "Bo Lin works at Halcyon Insurance."},
        {"prompt": "Where does Cy Ng work?", "completion": "Cy Ng works at Vireo Software."},
        {"prompt": "Who employs Di Ox?", "completion": "Di Ox is a Vireo contractor."},
    ]
    # Most shared values first; the name in the question is not a value of the answer.
    assert neighbours(forget, retain) == [1, 2]


def test_retain_focus_draws_every_retain_batch_partly_from_the_neighbours(
    tiny_target, tmp_path, monkeypatch
):
    from workers.ml import training
    from workers.ml.values import neighbours

    near = set(neighbours(FORGET, RETAIN))
    assert near and len(near) < len(RETAIN)
    batches: list[list[int]] = []
    collate = training.collate

    def spy(encoded, indices, pad_id, weights=None):
        if len(encoded) == len(RETAIN):  # the training retain set (checks use a slice)
            batches.append(list(indices))
        return collate(encoded, indices, pad_id, weights)

    monkeypatch.setattr(training, "collate", spy)
    spec = spec_for(tiny_target, "npo", max_steps=4, retain_batch_size=4, retain_focus=0.5)
    run_job(spec, tmp_path)
    assert len(batches) == 4
    assert all(len(b) == 4 and set(b[:2]) <= near for b in batches)


def test_simnpo_with_holdout_delta_pushes_forget_items_towards_the_holdout_level(
    tiny_target, tmp_path
):
    from tests.ml.targets import PEOPLE
    from workers.ml import synthetic

    holdout = synthetic.holdout_for(PEOPLE[0])[:8]
    spec = JobSpec(
        model_source=tiny_target,
        forget=FORGET,
        retain=RETAIN,
        holdout=holdout,
        method={"name": "simnpo", "delta": "holdout", "gamma": 1.0, "lr": 5e-3, **FAST},
    )
    out = run_job(spec, tmp_path).record["outcome"]
    assert out["base"]["holdout_nll"] > out["base"]["forget_nll"] + 1.0
    assert out["final"]["forget_nll"] > out["base"]["forget_nll"] + 0.3


def test_relabel_trains_towards_stand_in_values_and_pushes_items_without_any(tiny_target, tmp_path):
    from workers.ml.methods import build
    from workers.ml.specs import Relabel

    method = build(Relabel())
    items = [*FORGET[:2], {"prompt": "What is Ann's hobby?", "completion": "She enjoys knitting."}]
    subs = method.substitutes(items)
    assert [len(s) for s in subs] == [4, 4, 4]
    assert method.unchanged == {2}  # nothing to replace: NPO alone for that item
    out = run_job(spec_for(tiny_target, "relabel"), tmp_path).record["outcome"]
    assert (
        "relabel_nll" in out["curve"][0]
        and out["curve"][-1]["relabel_nll"] < out["curve"][0]["relabel_nll"]
    )


def test_retain_patience_trains_on_past_a_breach_and_still_ends_within_bounds(
    tiny_target, tmp_path
):
    args = {"max_steps": 40, "lr": 5e-3, "retain_tolerance": 0.3, "retain_tolerance_abs": 0}
    strict = run_job(spec_for(tiny_target, "ga", **args), tmp_path / "strict")
    patient = run_job(spec_for(tiny_target, "ga", retain_patience=100, **args), tmp_path / "p")
    s, p = strict.record["outcome"], patient.record["outcome"]
    assert s["stopped"] == p["stopped"] == "retain_guard"
    assert s["steps"] < 40 and p["steps"] == 40  # trained on past the first breach
    bound = p["base"]["retain_nll"] * 1.3 + 1e-6
    assert p["final"]["retain_nll"] <= bound  # but ends on a state within bounds
    breached = [e for e in p["evals"] if e["retain_nll"] > bound]
    assert breached and all(e["step"] > p["best_step"] for e in breached)


def test_retain_sample_is_strided_over_the_whole_retain_set():
    from workers.ml.training import spread

    assert spread(5, 8) == [0, 1, 2, 3, 4]
    assert spread(100, 4) == [0, 25, 50, 75]
    assert spread(10, 3) == [0, 3, 6]


def test_retain_bound_is_anchored_on_the_base_model_in_a_chain():
    from workers.ml.training import retain_bound

    spec = specs.GA(retain_tolerance=0.1, retain_tolerance_abs=0.05)
    assert retain_bound(spec, {"retain_nll": 2.0}) == pytest.approx(2.2)
    # a chain: the previous version starts at 2.1, the base model is at 2.0
    chain = {"retain_nll": 2.1, "retain_nll_base_model": 2.0}
    assert retain_bound(spec, chain) == pytest.approx(2.2)
    # an older version already past the bound: no worse than where it starts
    assert retain_bound(spec, {"retain_nll": 2.5, "retain_nll_base_model": 2.0}) == 2.5


def test_a_chain_never_drifts_past_the_base_models_retain_bound(tiny_target, tmp_path):
    args = {"max_steps": 40, "lr": 5e-3, "retain_tolerance": 0.3, "retain_tolerance_abs": 0}
    v1 = run_job(spec_for(tiny_target, "ga", **args), tmp_path / "v1")
    v2 = run_job(
        spec_for(tiny_target, "ga", forget=FORGET_B, **args).model_copy(
            update={"previous_adapter": str(v1.adapter_dir)}
        ),
        tmp_path / "v2",
    )
    b1, b2 = v1.record["outcome"]["base"], v2.record["outcome"]["base"]
    # v2 measured the base model with the adapter off: v1's starting point
    assert b2["retain_nll_base_model"] == pytest.approx(b1["retain_nll"], rel=1e-4)
    assert b2["retain_nll"] > b1["retain_nll"]  # v1 left some damage
    bound = max(1.3 * b1["retain_nll"], b2["retain_nll"]) + 1e-6
    assert v2.record["outcome"]["final"]["retain_nll"] <= bound


@pytest.mark.parametrize("name", ["graddiff", "npo", "simnpo"])
def test_separate_backward_passes_give_the_joint_losses_gradient(tiny_target, name):
    """The loop back-propagates the forget and the retain part one after the other (half
    the activations alive at once): the gradient must be the joint loss's."""
    from peft import LoraConfig, get_peft_model

    from workers.ml.data import collate, encode_all
    from workers.ml.methods.base import References
    from workers.ml.training import sequence_logprobs

    base, tok = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # B = 0 would make both gradients trivially alike in part
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    spec = JobSpec(forget=FORGET, method={"name": name, "retain_loss": "kl", "alpha": 3.0}).method
    method = methods.build(spec)
    forget = encode_all(tok, FORGET[:4], 128)
    retain = collate(encode_all(tok, RETAIN[:4], 128), [0, 1, 2, 3], tok.pad_token_id)
    refs = References(forget=sequence_logprobs(model, forget, tok.pad_token_id))
    f_batch = collate(forget, [0, 1, 2, 3], tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad()
    method.loss(model, f_batch, retain, refs)[0].backward()
    joint = [p.grad.clone() for p in params]
    model.zero_grad()
    method.loss(model, f_batch, None, refs)[0].backward()
    (spec.alpha * method.retain_term(model, retain)).backward()
    split = [p.grad.clone() for p in params]
    assert method.separable_retain
    assert all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(joint, split, strict=True)
    )
    assert any(g.abs().sum() > 0 for g in split)


def test_passes_cut_a_batch_into_its_row_groups_as_collated_alone():
    from workers.ml.data import Encoded, collate, mark_passes, passes

    rows = [Encoded([1, 2, 3], [-100, 2, 3]), Encoded([4, 5], [-100, 5])]
    rows.append(Encoded([6, 7, 8, 9, 10, 11], [-100, -100, 8, 9, 10, 11]))
    batch = collate(rows, [0, 1, 2], pad_id=0)
    assert passes(batch) == [batch]  # unmarked: one pass
    first, second = passes(mark_passes(batch, [2, 1]))
    for got, want in ((first, collate(rows, [0, 1], 0)), (second, collate(rows, [2], 0))):
        assert got.keys() == want.keys()  # the marker is not passed on
        assert all(torch.equal(got[k], want[k]) for k in want)  # cut to its own width
    with pytest.raises(ValueError, match="do not cover"):
        mark_passes(batch, [2, 2])


@pytest.mark.parametrize("kind", ["kl", "nll"])
def test_a_retain_batch_run_in_passes_gives_the_whole_batchs_loss_and_gradient(tiny_target, kind):
    """The loop runs the general question of a retain batch in a pass of its own (less
    padding and fewer activations alive at once): the loss is still the mean over every
    target token of the batch, and the gradient the whole batch's."""
    from peft import LoraConfig, get_peft_model

    from workers.ml.data import collate, encode_all, mark_passes
    from workers.ml.losses import retain_loss

    base, tok = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():  # B = 0: the KL and its gradient would be 0 at the start
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    spec = JobSpec(forget=FORGET, method={"name": "simnpo", "retain_loss": kind}).method
    method = methods.build(spec)
    longer = {"prompt": "What is the capital of France?", "completion": "Paris. " * 12}
    encoded = encode_all(tok, [*RETAIN[:4], longer], 128)
    params = [p for p in model.parameters() if p.requires_grad]

    whole = collate(encoded, [0, 1, 2, 3, 4], tok.pad_token_id)
    model.zero_grad()
    loss, _ = method.retain_backward(model, whole)
    joint = [p.grad.clone() for p in params]

    split = mark_passes(collate(encoded, [0, 1, 2, 3, 4], tok.pad_token_id), [4, 1])
    model.zero_grad()
    parts, logs = method.retain_backward(model, split)
    separate = [p.grad.clone() for p in params]
    assert torch.allclose(parts, loss, rtol=1e-5)
    assert logs["retain_loss"] == pytest.approx(loss.item() / spec.alpha, rel=1e-5)
    assert retain_loss(model, split, kind).item() == pytest.approx(
        float(loss) / spec.alpha, rel=1e-5
    )
    assert all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(joint, separate, strict=True)
    )
    assert any(g.abs().sum() > 0 for g in separate)


def test_general_own_pass_runs_a_retain_batchs_general_question_in_a_pass_of_its_own(
    tiny_target, tmp_path, monkeypatch
):
    from workers.ml.data import passes
    from workers.ml.methods.base import Method

    seen: list[list[int]] = []
    original = Method.retain_backward

    def spy(self, model, retain, scale=1.0):
        seen.append([int(g["input_ids"].shape[0]) for g in passes(retain)])
        return original(self, model, retain, scale)

    monkeypatch.setattr(Method, "retain_backward", spy)
    own = {"general_retain": 4, "general_own_pass": True}
    run_job(spec_for(tiny_target, "simnpo", max_steps=3, **own), tmp_path / "g")
    assert seen == [[2, 1]] * 3  # the caller's rows (retain_batch_size 2), then the question
    seen.clear()
    run_job(spec_for(tiny_target, "simnpo", max_steps=3, general_retain=4), tmp_path / "joint")
    assert seen == [[3]] * 3  # the default: one pass
    seen.clear()
    run_job(spec_for(tiny_target, "simnpo", max_steps=3, general_own_pass=True), tmp_path / "p")
    assert seen == [[2]] * 3  # no general question: nothing to split


def test_exact_flags_say_whether_the_greedy_answer_is_the_target(tiny_target):
    """`sequence_logp_exact` reads from one teacher-forced pass what a greedy decode
    would answer: the flag is true exactly when the decode reproduces the target."""
    from workers.ml.data import collate, encode_all
    from workers.ml.evaluate import greedy_answers
    from workers.ml.losses import sequence_logp_exact

    base, tok = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    items = RETAIN + FORGET
    enc = encode_all(tok, items, 128)
    _, exact = sequence_logp_exact(base, collate(enc, list(range(len(enc))), tok.pad_token_id))
    answers = greedy_answers(base, tok, [i["prompt"] for i in items], max_new_tokens=48)
    decoded = [a.strip() == i["completion"].strip() for a, i in zip(answers, items, strict=True)]
    assert 0 < sum(exact) < len(items)  # the test can tell the two cases apart
    assert exact.tolist() == decoded


def test_the_answer_guard_rolls_back_before_a_retain_answer_breaks(tiny_target, tmp_path):
    """Gradient ascent with a loose NLL bound breaks retain answers; with the answer
    guard at 0 the run ends on a state that still gives every guarded answer."""
    loose = {"max_steps": 24, "lr": 5e-3, "retain_tolerance": 3.0, "retain_tolerance_abs": 3.0}
    off = run_job(spec_for(tiny_target, "ga", retain_answers_tolerance=None, **loose), tmp_path)
    on = run_job(
        spec_for(tiny_target, "ga", retain_answers_tolerance=0.0, **loose), tmp_path / "on"
    )
    o_off, o_on = off.record["outcome"], on.record["outcome"]
    assert o_on["base"]["retain_intact"] > 0
    assert min(e["retain_kept"] for e in o_off["evals"] if "retain_kept" in e) < 1.0
    assert o_on["stopped"] == "retain_guard"
    assert o_on["final"]["retain_kept"] == 1.0
    assert o_on["final"]["forget_nll"] > o_on["base"]["forget_nll"]  # it did unlearn some


def test_answer_guard_bounds():
    from workers.ml.training import retain_breached

    spec = specs.GA(retain_answers_tolerance=0.1, retain_tolerance_abs=1.0)
    base = {"retain_nll": 0.1}
    assert not retain_breached(spec, base, {"retain_nll": 0.2, "retain_kept": 0.9})
    assert retain_breached(spec, base, {"retain_nll": 0.2, "retain_kept": 0.85})
    assert retain_breached(spec, base, {"retain_nll": 1.5, "retain_kept": 1.0})  # NLL bound
    # a chain whose start already lost answers may lose no more than it had
    assert not retain_breached(spec, {**base, "retain_kept": 0.8}, {"retain_kept": 0.8})
    assert retain_breached(spec, {**base, "retain_kept": 0.8}, {"retain_kept": 0.75})
    off = specs.GA(retain_answers_tolerance=None)
    assert not retain_breached(off, base, {"retain_nll": 0.1, "retain_kept": 0.0})


REPAIR = {  # gradient ascent that breaks retain answers on the tiny target, guarded at 0
    "max_steps": 12,
    "eval_every": 2,
    "checkpoint_every": 4,
    "lr": 5e-3,
    "retain_tolerance": 3.0,
    "retain_tolerance_abs": 3.0,
    "retain_answers_tolerance": 0.0,
    "retain_patience": 4,
    "retain_batch_size": 4,
    "retain_focus": 0.5,
}


def test_broken_retain_answers_become_the_retain_focus(tiny_target, tmp_path, monkeypatch):
    """Once a check finds guarded answers broken, the focus half of every later retain
    batch is drawn from exactly those items."""
    from workers.ml import training

    log: list[tuple[str, list[int]]] = []
    collate, scope = training.collate, training.scope_metrics

    def spy_collate(encoded, indices, pad_id, weights=None):
        if len(encoded) == len(RETAIN):  # the training retain set (checks use a slice)
            log.append(("batch", list(indices)))
        return collate(encoded, indices, pad_id, weights)

    def spy_scope(*args, broken=None, **kwargs):
        out = scope(*args, broken=broken, **kwargs)
        log.append(("check", list(broken or [])))
        return out

    monkeypatch.setattr(training, "collate", spy_collate)
    monkeypatch.setattr(training, "scope_metrics", spy_scope)
    run_job(spec_for(tiny_target, "ga", **REPAIR), tmp_path)
    first = next(k for k, (kind, ids) in enumerate(log) if kind == "check" and ids)
    broken: set[int] = set()
    for kind, ids in log[first:]:
        if kind == "check":
            broken |= set(ids)
        else:
            focus = min(2, len(broken))  # a pool smaller than the focus fills less of it
            assert set(ids[:focus]) <= broken, (ids, broken)
    assert any(kind == "batch" for kind, _ in log[first:])  # the run went on past it


def test_a_repairing_run_resumes_bit_for_bit(tiny_target, tmp_path):
    full = run_job(spec_for(tiny_target, "ga", **REPAIR), tmp_path / "full")
    evals = full.record["outcome"]["evals"]
    assert any(e.get("retain_kept", 1.0) < 1.0 for e in evals)  # the repair did start

    _resume_after_cut(spec_for(tiny_target, "ga", **REPAIR), full, tmp_path / "cut", 9, 8)


# simnpo on the tiny target: a guarded answer breaks at step 2 and is given again only
# at step 10, while the forget side reaches 0.9 x its start by step 4 (measured: it then
# stops at 0.69 against a level of 0.77 with the pause, at 0.16 without)
PAUSE = {
    **REPAIR,
    "lr": 1e-2,
    "max_steps": 20,
    "retain_patience": 6,
    "stop_target": "ratio",
    "stop_forget_ratio": 0.9,
}


def test_a_run_at_its_forget_level_while_repairing_pauses_the_forget_push(tiny_target, tmp_path):
    """Once a check finds the forget items at their level and the retain guard breached,
    the steps up to the next check train on the retain loss alone: the run stops near the
    level, where pushing on through the repair ends far under it (the overshoot)."""
    runs = {
        pause: run_job(
            spec_for(tiny_target, "simnpo", **PAUSE, repair_pauses_forget=pause),
            tmp_path / str(pause),
        ).record["outcome"]
        for pause in (True, False)
    }
    on, off = runs[True], runs[False]
    level = 0.9 * on["base"]["forget_prob"]
    assert on["stopped"] == off["stopped"] == "forgotten"
    assert off["final"]["forget_prob"] < 0.5 * level  # the scenario does overshoot
    assert 0.5 * level < on["final"]["forget_prob"] <= level, on["evals"]
    paused = [c for c in on["curve"] if c.get("forget_paused")]
    assert paused and all("forget_loss" not in c for c in paused)
    # only after a check that found both: at the level, and past the retain bound
    first = min(c["step"] for c in paused)
    check = max((e for e in on["evals"] if e["step"] < first), key=lambda e: e["step"])
    assert check["forget_prob"] <= level and check["retain_kept"] < 1.0
    assert all("forget_paused" not in c for c in off["curve"])


def test_a_run_resumed_while_the_forget_push_is_paused_matches_the_uninterrupted_one(
    tiny_target, tmp_path
):
    spec = spec_for(tiny_target, "simnpo", **PAUSE)
    full = run_job(spec, tmp_path / "full")
    assert any(c["step"] == 9 and c.get("forget_paused") for c in full.record["outcome"]["curve"])
    # the checkpoint at step 8 falls inside the pause
    _resume_after_cut(spec, full, tmp_path / "cut", 9, 8)


def test_only_a_check_that_repairs_answers_spares_the_patience():
    from workers.ml.training import repairing

    on, off = specs.GA(), specs.GA(retain_repair=False)
    assert repairing(on, 0.9, 0.8)
    assert not repairing(on, 0.8, 0.8)  # no better than the check before
    assert not repairing(on, 0.7, 0.8)
    assert not repairing(on, 0.9, None)  # the first check past the bound
    assert not repairing(off, 0.9, 0.8)


def _one_token_items(n: int) -> list:
    from workers.ml.data import Encoded

    return [Encoded(input_ids=[1, 2], labels=[-100, 2]) for _ in range(n)]


def test_a_batched_job_is_forgotten_only_when_every_request_is():
    from workers.ml.training import Datasets, forgotten, group_thresholds, groups_left, runs

    # two requests: four items already unlikely, one still memorised
    data = Datasets(
        forget=_one_token_items(5),
        retain=[],
        holdout=_one_token_items(2),
        forget_groups=runs([4, 1], 5),
        holdout_groups=runs([1, 1], 2),
    )
    spec = types.SimpleNamespace(stop_target="holdout", stop_forget_ratio=0.1)
    thresholds = group_thresholds(spec, data, torch.zeros(5), torch.log(torch.tensor([0.5, 0.3])))
    assert thresholds == pytest.approx([0.5, 0.3])  # each request against its own holdout
    logp = torch.log(torch.tensor([0.1, 0.1, 0.1, 0.1, 0.9]))
    now = {"forget_prob": logp.exp().mean().item()}
    now["forget_groups_left"] = float(groups_left(logp, data, thresholds))
    assert now["forget_groups_left"] == 1
    assert forgotten(now, 0.4, None)  # the job's mean (0.26) alone would stop here
    assert not forgotten(now, 0.4, thresholds)
    logp[4] = math.log(0.2)
    assert groups_left(logp, data, thresholds) == 0

    data.holdout_groups = []  # holdout items not grouped: every request against all
    level = group_thresholds(spec, data, torch.zeros(5), torch.log(torch.tensor([0.5, 0.3])))
    assert level == pytest.approx([0.4, 0.4])
    ratio = types.SimpleNamespace(stop_target="ratio", stop_forget_ratio=0.5)
    assert group_thresholds(ratio, data, logp, None) == pytest.approx([0.05, 0.1])
    data.forget_groups = runs(None, 5)  # one request: the job's own rule
    assert group_thresholds(spec, data, logp, None) is None


def test_groups_must_cover_their_items_and_a_batched_job_gets_each_request_a_budget():
    with pytest.raises(ValidationError, match="add up to 3, but there are 4"):
        JobSpec(forget=FORGET[:4], forget_groups=[1, 2])
    with pytest.raises(ValidationError, match="one size per forget group"):
        JobSpec(forget=FORGET[:4], holdout=FORGET[4:6], holdout_groups=[2])
    method = specs.default_method()
    batched = specs.for_batched_job(method, 4)
    assert batched.max_steps == 4 * method.max_steps
    warmup = math.ceil(method.warmup_ratio * method.max_steps)
    assert math.ceil(batched.warmup_ratio * batched.max_steps) == warmup  # same warm-up
    assert specs.for_batched_job(method, 1) is method


def test_a_batched_job_stops_once_each_request_is_under_its_own_level(tiny_target, tmp_path):
    from workers.ml.data import encode_all
    from workers.ml.training import group_probs, runs, sequence_logprobs

    forget = FORGET + FORGET_B[:4]
    spec = JobSpec(
        model_source=tiny_target,
        forget=forget,
        forget_groups=[8, 4],
        retain=RETAIN,
        dtype="float32",  # its step-0 levels are compared with a float32 re-measure below
        method={
            "name": "simnpo",
            "lr": LR["simnpo"],
            **FAST,
            "max_steps": 60,  # each request: 60, as test_scope_control_stops_when_forgotten
            "stop_forget_ratio": 0.5,
            "forget_eval_items": 5,  # measured in 3 turns of 4 items
        },
    )
    result = run_job(spec, tmp_path)
    record, out = result.record, result.record["outcome"]
    assert record["batched_requests"] == 2 and record["method"]["max_steps"] == 120
    assert all("forget_groups_left" in e for e in out["evals"])
    assert out["stopped"] == "forgotten" and out["final"]["forget_groups_left"] == 0
    assert [e["forget_measured"] for e in out["evals"][1:-1]] == [4.0] * (len(out["evals"]) - 2)
    assert out["evals"][-1]["forget_measured"] == 12.0  # confirmed on every item
    # measured again on the published adapter, with plain PEFT: each request under its level
    base, tok = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    encoded = encode_all(tok, forget, 128)
    before = group_probs(
        sequence_logprobs(base, encoded, tok.pad_token_id), encoded, runs([8, 4], 12)
    )
    assert out["group_thresholds"] == pytest.approx([0.5 * p for p in before], rel=1e-4)
    model = PeftModel.from_pretrained(base, result.adapter_dir)
    after = group_probs(
        sequence_logprobs(model, encoded, tok.pad_token_id), encoded, runs([8, 4], 12)
    )
    assert all(a <= t + 1e-4 for a, t in zip(after, out["group_thresholds"], strict=True))


def test_forget_items_are_measured_in_turns_that_cover_every_request():
    from workers.ml.training import forget_turn

    spec = types.SimpleNamespace(forget_eval_items=40)
    assert forget_turn(spec, 20, 0) is None  # one person's items: all, every check
    turns = [forget_turn(spec, 100, c) for c in range(3)]
    assert turns[0] == list(range(0, 100, 3)) and turns[1] == list(range(1, 100, 3))
    assert sorted(i for t in turns for i in t) == list(range(100))
    assert forget_turn(spec, 100, 3) == turns[0]
    assert all({i // 20 for i in t} == set(range(5)) for t in turns)  # all 5 requests
    assert forget_turn(types.SimpleNamespace(forget_eval_items=None), 100, 1) is None


def test_a_batched_job_measured_in_turns_resumes_bit_for_bit(tiny_target, tmp_path):
    def spec() -> JobSpec:
        return JobSpec(
            model_source=tiny_target,
            forget=FORGET + FORGET_B,
            forget_groups=[8, 8],
            retain=RETAIN,
            method={
                "name": "npo",
                "lr": LR["npo"],
                **FAST,
                "max_steps": 8,
                "forget_eval_items": 6,
            },
        )

    full = run_job(spec(), tmp_path / "full")

    resumed = _resume_after_cut(spec(), full, tmp_path / "cut", 13, 10)
    assert resumed.record["outcome"]["evals"] == full.record["outcome"]["evals"]


def test_sequence_stats_entropy_agrees_with_sequence_stats_and_the_full_logits(tiny_target):
    from workers.ml import losses
    from workers.ml.data import collate, encode_all

    model, tok = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    enc = encode_all(tok, FORGET[:3], 128)
    batch = collate(enc, list(range(len(enc))), tok.pad_token_id)
    with torch.no_grad():
        total, nll = losses.sequence_stats(model, batch)
        total_e, nll_e, entropy = losses.sequence_stats_entropy(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(total, total_e, atol=1e-4) and torch.allclose(nll, nll_e, atol=1e-5)
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    h = -(lp.exp() * lp).sum(-1)  # [B, T-1]: entropy of the prediction of token t+1
    mask = batch["labels"][:, 1:] != -100
    expected = (h * mask).sum(1) / mask.sum(1)
    assert torch.allclose(entropy, expected, atol=1e-4)
    assert (entropy > 0).all()


def test_a_token_past_the_nll_cap_gets_no_push_and_the_rest_the_same(tiny_target):
    """`token_nll_cap`: a token already that unlikely adds nothing to the forget loss's
    gradient; tokens under the cap get exactly the gradient they get without it."""
    from workers.ml import losses
    from workers.ml.data import collate, encode_all

    logp = torch.tensor([-0.5, -3.0, -9.0, -12.0], requires_grad=True)
    losses._capped(logp, 8.0).sum().backward()
    assert logp.grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert losses._capped(logp, None) is logp

    # through the model: each example's mean NLL counts its tokens' NLL up to the cap
    model, tok = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    enc = encode_all(tok, FORGET[:3], 128)
    batch = collate(enc, list(range(len(enc))), tok.pad_token_id)
    with torch.no_grad():
        logits, targets = losses.kept_logits(model, batch)
        nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        cap = float(nll.median())  # about half the tokens past it
        rows = losses._keep_mask(batch["labels"]).nonzero()[:, 0]
        expected = torch.stack([nll[rows == r].clamp(max=cap).mean() for r in range(3)])
        _, capped = losses.sequence_stats(model, batch, nll_cap=cap)
        _, capped_e, _ = losses.sequence_stats_entropy(model, batch, nll_cap=cap)
        _, plain = losses.sequence_stats(model, batch)
    assert torch.allclose(capped, expected, atol=1e-4) and torch.allclose(capped, capped_e)
    assert (capped < plain).all()
    with pytest.raises(ValidationError):
        specs.SimNPO(token_nll_cap=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_pass_gives_the_holdout_log_probs_and_entropies_of_two_bit_for_bit(tiny_target, dtype):
    """The step-0 holdout figures from one forward pass are exactly those of the two
    passes they replace (a rounding difference moves the stop level and the run)."""
    from workers.ml import losses, training
    from workers.ml.data import encode_all

    model, tok = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu", dtype))
    enc = encode_all(tok, FORGET[:11], 128)  # two batches of the check's size, one short
    pad = tok.pad_token_id
    logp, entropy = training.logprobs_and_entropies(model, enc, pad)
    assert torch.equal(logp, training.sequence_logprobs(model, enc, pad))
    two_passes = training._per_item(
        model, enc, pad, lambda m, b: losses.sequence_stats_entropy(m, b)[2]
    )
    assert torch.equal(entropy, two_passes)


def _entropy_spec(target, weight, **overrides):
    from tests.ml.targets import PEOPLE
    from workers.ml import synthetic

    method = {"name": "simnpo", "delta": "holdout", "lr": 5e-3, **FAST}
    return JobSpec(
        model_source=target,
        forget=FORGET,
        retain=RETAIN,
        holdout=synthetic.holdout_for(PEOPLE[0])[:8],
        method={**method, "entropy_match": weight, **overrides},
    )


def test_simnpo_entropy_match_moves_the_forget_entropy_towards_the_holdouts(tiny_target, tmp_path):
    def run(weight, where):
        return run_job(_entropy_spec(tiny_target, weight), tmp_path / where).record

    plain, matched = run(0.0, "plain"), run(5.0, "matched")
    assert "holdout_entropy" not in plain["outcome"]["base"]
    target = matched["outcome"]["base"]["holdout_entropy"]
    assert target > 0
    curve = [e["forget_entropy"] for e in matched["outcome"]["curve"]]
    # the term pulls each item's entropy to the holdout level: the gap shrinks
    assert abs(curve[-1] - target) < abs(curve[0] - target)


def test_a_run_with_entropy_match_resumes_bit_for_bit(tiny_target, tmp_path):
    spec = _entropy_spec(tiny_target, 5.0, checkpoint_every=2)
    full = run_job(spec, tmp_path / "full")

    resumed = _resume_after_cut(spec, full, tmp_path / "cut", 3, 2)  # the entropy came back
    assert resumed.record["outcome"]["curve"] == full.record["outcome"]["curve"]


def test_pending_items_are_those_above_their_level_or_still_stating_values():
    from workers.ml.data import Encoded
    from workers.ml.training import Datasets, pending_items

    # four items of two answer tokens: probabilities 0.9, 0.2, 0.2, 0.6
    items = [Encoded(input_ids=[1, 2, 3], labels=[-100, 2, 3]) for _ in range(4)]
    latest = 2 * torch.log(torch.tensor([0.9, 0.2, 0.2, 0.6]))
    stated = torch.tensor([1.0, 1.0, 0.0, 0.0])
    data = Datasets(forget=items, retain=[])
    on = specs.SimNPO(forget_pending_only=True, stop_values_stated=0.0)
    assert pending_items(on, data, latest, stated, 0.5, None) == [0, 1, 3]
    # without the values bound only the level counts
    level_only = specs.SimNPO(forget_pending_only=True)
    assert pending_items(level_only, data, latest, stated, 0.5, None) == [0, 3]
    # a batched job: each request against its own level
    data.forget_groups = [[0, 1], [2, 3]]
    assert pending_items(level_only, data, latest, stated, None, [0.95, 0.1]) == [2, 3]
    # nothing pending, or everything, or the focus off: batches draw on every item
    assert pending_items(level_only, data, latest, stated, None, [0.95, 0.95]) == []
    assert pending_items(level_only, data, latest, stated, 0.05, None) == []
    assert pending_items(specs.SimNPO(), data, latest, stated, 0.5, None) == []


# simnpo on the tiny target with the values bound at 0: the mean reaches its level
# while some items still state their values (measured: the level at step 16, half the
# items stating theirs; see test_a_run_stops_as_forgotten_only_once_...)
PENDING = {
    "max_steps": 60,
    "stop_target": "ratio",
    "stop_forget_ratio": 0.5,
    "stop_values_stated": 0.0,
    "checkpoint_every": 5,
}


def test_forget_batches_draw_only_on_the_items_not_yet_forgotten(tiny_target, tmp_path):
    runs = {
        on: run_job(
            spec_for(tiny_target, "simnpo", **PENDING, forget_pending_only=on), tmp_path / str(on)
        ).record["outcome"]
        for on in (True, False)
    }
    on, off = runs[True], runs[False]
    n = len(FORGET)
    pending = [e.get("forget_pending", n) for e in on["evals"][1:]]  # none at the stop
    assert "forget_pending" not in off["evals"][-1]
    assert min(pending) < n, pending  # the focus did narrow
    assert on["stopped"] == off["stopped"] == "forgotten"
    assert on["final"]["forget_stated"] == off["final"]["forget_stated"] == 0.0
    # the same run until the first check that leaves items out of the forget batches
    first = next(e["step"] for e in on["evals"][1:] if e.get("forget_pending", n) < n)
    for a, b in zip(on["curve"][:first], off["curve"][:first], strict=True):
        assert a["loss"] == b["loss"]
    assert on["curve"][first]["loss"] != off["curve"][first]["loss"]


def test_a_run_resumed_with_pending_items_matches_the_uninterrupted_one(tiny_target, tmp_path):
    spec = spec_for(tiny_target, "simnpo", **PENDING, forget_pending_only=True)
    full = run_job(spec, tmp_path / "full")
    out = full.record["outcome"]
    n = len(FORGET)
    narrowed = [e["step"] for e in out["evals"][1:] if e.get("forget_pending", n) < n]
    assert narrowed and narrowed[0] <= 10 < out["steps"], out["evals"]
    # the checkpoint at step 10 holds a narrowed focus
    _resume_after_cut(spec, full, tmp_path / "cut", 11, 10)


def test_adam_beta1_reaches_the_optimizer(tiny_target, tmp_path):
    """The running-mean factor is a real setting: the same run with less momentum ends
    on other weights (docs/unlearning-defaults.md, "Eighth round")."""
    runs = [
        run_job(spec_for(tiny_target, "simnpo", max_steps=4, **beta), tmp_path / str(k))
        for k, beta in enumerate(({}, {"adam_beta1": 0.9}, {"adam_beta1": 0.5}))
    ]
    default, same, less = (_adapter(r.adapter_dir) for r in runs)
    assert all(torch.equal(default[k], same[k]) for k in default)  # 0.9 is the default
    assert any(not torch.equal(default[k], less[k]) for k in default)
    assert runs[2].record["method"]["adam_beta1"] == 0.5


LANDING = {  # SimNPO fast enough to fall well past a 0.9 x start level in one 4-step interval
    "lr": 1e-2,
    "max_steps": 24,
    "eval_every": 4,
    "checkpoint_every": 2,
    "stop_target": "ratio",
    "stop_forget_ratio": 0.9,
}


def test_bisect_finds_the_least_fraction_accepted():
    from workers.ml.landing import bisect

    tried: list[float] = []

    def at_least(edge):
        def probe(t):
            tried.append(t)
            return f"ok {t}" if t >= edge else None

        return probe

    assert bisect(at_least(0.3), 3) == (0.375, "ok 0.375")
    assert tried == [0.5, 0.25, 0.375]
    assert bisect(at_least(2.0), 3) == (1.0, None)  # none accepted: the caller keeps 1
    assert bisect(at_least(0.0), 0) == (1.0, None)


def test_blend_ends_are_the_two_states_exactly():
    from workers.ml.landing import blend

    before = {"w": torch.tensor([0.1, -2.0, 3.3])}
    after = {"w": torch.tensor([0.7, 1.0, -1.1])}
    assert torch.equal(blend(before, after, 0.0)["w"], before["w"])
    assert torch.equal(blend(before, after, 1.0)["w"], after["w"])
    assert blend(before, after, 1.0)["w"] is not after["w"]
    assert torch.allclose(blend(before, after, 0.25)["w"], torch.tensor([0.25, -1.25, 2.2]))


def test_a_landing_stops_nearer_the_level_and_publishes_the_landed_state(tiny_target, tmp_path):
    """A check that finds the run forgotten far under its level bisects the adapter back
    toward the last check: the run stops forgotten, nearer the level, and the adapter it
    publishes is the state that landing probe measured."""
    off = run_job(spec_for(tiny_target, "simnpo", **LANDING), tmp_path / "off")
    on = run_job(spec_for(tiny_target, "simnpo", **LANDING, landing_probes=3), tmp_path / "on")
    a, b = off.record["outcome"], on.record["outcome"]
    level = 0.9 * a["base"]["forget_prob"]
    assert a["stopped"] == b["stopped"] == "forgotten" and a["steps"] == b["steps"]
    # the scenario does overshoot: the check lands well under the level
    assert a["final"]["forget_prob"] < level - 0.05, a["evals"]
    assert a["final"]["forget_prob"] < b["final"]["forget_prob"] <= level, b["evals"]
    probes = [e for e in b["evals"] if "landing" in e]
    assert len(probes) == 3 and all(e["step"] == b["steps"] for e in probes)
    (landed,) = [e for e in probes if e["landed"] == 1.0]
    assert 0 < landed["landing"] < 1
    assert b["final"] == {k: v for k, v in landed.items() if k in b["final"]}
    assert "retain_nll" in landed  # a state kept is read on the retain side too
    # the published adapter is that blend: the run started from lora_B = 0, so the
    # landed lora_B is the fraction of the unlanded run's (the same steps to the stop)
    wa, wb = _adapter(off.adapter_dir), _adapter(on.adapter_dir)
    lora_b = [k for k in wa if "lora_B" in k]
    assert lora_b and all(
        torch.allclose(wb[k], landed["landing"] * wa[k], atol=1e-7) for k in lora_b
    )


def test_a_run_resumed_before_its_landing_lands_the_same(tiny_target, tmp_path):
    spec = spec_for(tiny_target, "simnpo", **LANDING, landing_probes=3)
    full = run_job(spec, tmp_path / "full")
    resumed = _resume_after_cut(spec, full, tmp_path / "cut", 3, 2)
    assert resumed.record["outcome"]["evals"] == full.record["outcome"]["evals"]


def test_answers_clear_reads_the_greedy_answers_only_when_asked():
    from workers.ml.training import Datasets, answers_clear

    class Check:
        calls = 0

        def leaking(self, model):
            Check.calls += 1
            return [3, 5], 0.25

    data = Datasets(forget=[], retain=[], answer_check=Check())
    now: dict[str, float] = {}
    off, strict = (types.SimpleNamespace(stop_answers_leak=v) for v in (None, 0.0))
    assert answers_clear(None, off, data, now, {}) == (True, [])
    assert now == {} and Check.calls == 0
    assert answers_clear(None, strict, data, now, {}) == (False, [3, 5])
    assert now == {"forget_leaking": 0.25} and Check.calls == 1
    # allowed above chance: what the holdout items' answers state at step 0
    assert answers_clear(None, strict, data, now, {"holdout_leaking": 0.25})[0]
    audit_like = types.SimpleNamespace(stop_answers_leak=0.1)
    assert answers_clear(None, audit_like, data, now, {"holdout_leaking": 0.15})[0]
    assert not answers_clear(None, audit_like, data, now, {"holdout_leaking": 0.1})[0]


def test_a_run_forgotten_while_its_greedy_answers_leak_goes_on(tiny_target, tmp_path, monkeypatch):
    """The level reached while a greedy answer still states a value is not forgotten
    (`stop_answers_leak`): the run goes on, pushing only the leaking items, and stops at
    the first check whose answers are clear, recording the share at every check that
    read them."""
    from workers.ml.answers import AnswerCheck

    level = {"max_steps": 60, "stop_target": "ratio", "stop_forget_ratio": 0.5}
    plain = run_job(spec_for(tiny_target, "simnpo", **level), tmp_path / "a")
    stop = plain.record["outcome"]["steps"]
    real = AnswerCheck.leaking
    seen: list[float] = []

    def leaking_twice(self, model):  # the real decode, then item 2 reported twice
        seen.append(real(self, model)[1])
        return ([2], 1.0) if len(seen) <= 2 else ([], 0.0)

    monkeypatch.setattr(AnswerCheck, "leaking", leaking_twice)
    strict = run_job(
        spec_for(tiny_target, "simnpo", **level, stop_answers_leak=0.0), tmp_path / "b"
    )
    b = strict.record["outcome"]
    assert "holdout_leaking" in b["base"]  # chance, read once at step 0
    read = [e for e in b["evals"] if "forget_leaking" in e]
    assert [e["forget_leaking"] for e in read] == [1.0, 1.0, 0.0]
    assert read[0]["step"] == stop and b["stopped"] == "forgotten"
    assert b["steps"] == read[-1]["step"] > stop and b["final"]["forget_leaking"] == 0.0
    assert all(0.0 <= s <= 1.0 for s in seen)
    # checks under the level never decode: only those otherwise forgotten
    assert all(e["forget_prob"] <= 0.5 * b["base"]["forget_prob"] for e in read)
    # until the answers were clear, the forget batches drew on the leaking item alone
    assert [e.get("forget_pending") for e in read] == [1.0, 1.0, None]
    pushed = [c["step"] for c in b["curve"] if c["step"] > stop]
    assert pushed  # steps were taken after the level was reached


def test_a_landed_state_whose_answers_leak_trains_on_from_there(tiny_target, tmp_path, monkeypatch):
    """The landing brings the run back to its level; if the answers there still leak,
    the run goes on from the landed state (not from the overshoot), pushing only the
    leaking items, and lands only once."""
    from workers.ml.answers import AnswerCheck

    calls: list[int] = []

    def leaking_once(self, model):
        calls.append(1)
        return ([2], 1.0) if len(calls) == 1 else ([], 0.0)

    monkeypatch.setattr(AnswerCheck, "leaking", leaking_once)
    spec = spec_for(tiny_target, "simnpo", **LANDING, landing_probes=3, stop_answers_leak=0.0)
    b = run_job(spec, tmp_path / "b").record["outcome"]
    probes = [e for e in b["evals"] if "landing" in e]
    assert len(probes) == 3 and len({e["step"] for e in probes}) == 1  # one landing
    (landed,) = [e for e in probes if e["landed"] == 1.0]
    assert landed["forget_leaking"] == 1.0 and landed["forget_pending"] == 1.0
    assert b["stopped"] == "forgotten" and b["steps"] > landed["step"]
    assert b["final"]["forget_leaking"] == 0.0 and len(calls) == 2
    # the steps after the landing started from the landed state: the first check after
    # it is nearer the level than the overshoot the landing came back from
    overshoot = next(e for e in b["evals"] if e["step"] == landed["step"] and "landing" not in e)
    after = next(e for e in b["evals"] if e["step"] > landed["step"])
    assert overshoot["forget_prob"] < landed["forget_prob"]
    assert after["forget_prob"] > overshoot["forget_prob"], b["evals"]


def test_a_stop_that_changed_other_answers_repairs_them_first(tiny_target, tmp_path, monkeypatch):
    """`stop_answers_kept`: a state otherwise forgotten whose greedy retain answers no
    longer state values they stated at step 0 is not a stop: the broken ones join the
    repair focus, the forget push pauses (the forget side is at its level), and the run
    stops at the first check that finds them given again."""
    from workers.ml.answers import AnswerCheck

    said = [[0, 1, 2], [0, 1], [0, 1, 2]]  # step 0, the first stop, the next

    def stating(self, model):
        return said.pop(0) if len(said) > 1 else said[0]

    monkeypatch.setattr(AnswerCheck, "retain_stating", stating)
    level = {"max_steps": 60, "stop_target": "ratio", "stop_forget_ratio": 0.5}
    plain = run_job(spec_for(tiny_target, "simnpo", **level), tmp_path / "a")
    stop = plain.record["outcome"]["steps"]
    strict = run_job(
        spec_for(tiny_target, "simnpo", **level, stop_answers_kept=0.0), tmp_path / "b"
    )
    b = strict.record["outcome"]
    assert b["base"]["retain_answers_known"] == 3.0
    read = [e for e in b["evals"] if "retain_answers_kept" in e]
    assert [e["retain_answers_kept"] for e in read] == [pytest.approx(2 / 3), 1.0]
    assert read[0]["step"] == stop and b["stopped"] == "forgotten"
    assert b["steps"] == read[1]["step"] > stop
    # the steps between repaired only: the forget push paused, the retain focus on item 2
    between = [c for c in b["curve"] if stop < c["step"] <= b["steps"]]
    assert between and all(c.get("forget_paused") == 1.0 for c in between)


def test_general_questions_join_the_retain_data_answered_by_the_model_itself(tiny_target, tmp_path):
    without = spec_for(tiny_target, "simnpo", max_steps=2).model_copy(update={"retain": []})
    record = run_job(without, tmp_path / "off").record
    assert record["items"]["general_retain"] == 0
    assert "retain_nll" not in record["outcome"]["base"]  # nothing to keep was measured

    method = without.method.model_copy(update={"general_retain": 6})
    record = run_job(without.model_copy(update={"method": method}), tmp_path / "on").record
    assert record["items"]["general_retain"] == 6
    assert record["outcome"]["base"]["retain_nll"] > 0  # the scope check now measures them
    assert record["durations_s"]["general_answers"] > 0


def test_general_items_are_the_models_greedy_answers(tiny_target):
    model, tok = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    items = general.reference_items(model, tok, 5)
    asked = general.questions()[:5]
    answers = evaluate.greedy_answers(model, tok, asked, max_new_tokens=general.ANSWER_TOKENS)
    assert [i["prompt"] for i in items] == [q for q, a in zip(asked, answers, strict=True) if a]
    assert [i["completion"] for i in items] == [a for a in answers if a]
    assert general.reference_items(model, tok, 0) == []


def test_a_job_on_a_model_seen_before_reads_the_general_answers_from_the_cache(
    tiny_target, tmp_path
):
    cache = tmp_path / "models"
    spec = spec_for(tiny_target, "simnpo", max_steps=2, general_retain=6).model_copy(
        update={"model_cache": str(cache)}
    )
    first = run_job(spec, tmp_path / "first")
    second = run_job(spec, tmp_path / "second")
    assert first.record["environment"]["general_answers_cached"] is False
    assert second.record["environment"]["general_answers_cached"] is True
    assert second.record["items"]["general_retain"] == first.record["items"]["general_retain"]
    wa, wb = _adapter(first.adapter_dir), _adapter(second.adapter_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the same answers: the same run
    (saved,) = (cache / general.CACHE_FOLDER).glob("*.json")
    assert saved.stat().st_mode & 0o777 == 0o644  # readable by workers run as other users

    saved.write_text('{"answers": ["cut off')  # a torn or corrupt file: decoded again
    again = run_job(spec, tmp_path / "again")
    assert again.record["environment"]["general_answers_cached"] is False
    wc = _adapter(again.adapter_dir)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    assert general._read_answers(saved, 6) is not None  # and written back whole

    # the model as loaded differs (a chain's previous version): its own answers
    chained = spec.model_copy(update={"previous_adapter": str(first.adapter_dir)})
    v2 = run_job(chained, tmp_path / "v2").record
    assert v2["environment"]["general_answers_cached"] is False
    assert len(list((cache / general.CACHE_FOLDER).glob("*.json"))) == 2


def test_the_general_answers_cache_key_follows_the_model_and_the_questions(tiny_target, tmp_path):
    model, tok = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    identity = {"weights": "sha256:aa", "dtype": "torch.float32"}
    items, hit = general.cached_reference_items(model, tok, 5, tmp_path, lambda: identity)
    assert not hit and items == general.reference_items(model, tok, 5)  # the decode's own
    assert general.cached_reference_items(model, tok, 5, tmp_path, lambda: identity) == (
        items,
        True,
    )
    key = general.cache_key(identity, 5)
    assert key != general.cache_key({**identity, "dtype": "torch.bfloat16"}, 5)
    assert key != general.cache_key(identity, 4)
    assert general.cached_reference_items(model, tok, 0, tmp_path, lambda: identity) == ([], False)
    blocked = tmp_path / "a-file"  # a cache that cannot be written: decoded every time
    blocked.write_text("")
    assert general.cached_reference_items(model, tok, 5, blocked, lambda: identity) == (
        items,
        False,
    )
    assert general.cached_reference_items(model, tok, 5, blocked, lambda: identity) == (
        items,
        False,
    )


def test_general_items_add_one_row_to_each_retain_batch_and_stay_out_of_the_guard():
    from workers.ml.training import Datasets, general_order, retain_orders, spread

    item = ([1, 2], [-100, 2])
    spec = types.SimpleNamespace(seed=0, retain_focus=0.0)
    data = Datasets(forget=[], retain=[item] * 14, retain_eval=6, general=4)
    assert data.retain_indices() == spread(10, 6)  # the caller's 10 items only
    own, _ = retain_orders(spec, data, 4)
    rows = general_order(spec, data)
    seen = set()
    for k in range(8):
        assert all(i < 10 for i in own.batch(k))
        assert len(rows.batch(k)) == 1
        seen |= {10 + j for j in rows.batch(k)}
    assert seen == {10, 11, 12, 13}  # every general item takes its turn

    alone = Datasets(forget=[], retain=[item] * 4, retain_eval=6, general=4)
    assert general_order(spec, alone) is None  # they are the retain set: its order has them
    assert alone.retain_indices() == [0, 1, 2, 3]
    assert general_order(spec, Datasets(forget=[], retain=[item] * 10)) is None


def test_a_run_with_general_items_resumes_bit_for_bit_and_they_change_it(tiny_target, tmp_path):
    spec = spec_for(tiny_target, "simnpo", max_steps=12, general_retain=6)
    full = run_job(spec, tmp_path / "full")
    _resume_after_cut(spec, full, tmp_path / "cut", 7, 5)  # the answers are asked again
    plain = run_job(spec_for(tiny_target, "simnpo", max_steps=12), tmp_path / "plain")
    wa, wb = _adapter(full.adapter_dir), _adapter(plain.adapter_dir)
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)  # the retain term saw them
