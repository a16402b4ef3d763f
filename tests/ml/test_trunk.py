"""LoRA on the top blocks only, and the frozen trunk below them computed once per item:
the same logits and gradients as the plain forward, the same adapters as a run without
the trunk, resumable, continuable, and an adapter plain PEFT loads."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from tests.ml.targets import FORGET, RETAIN, cancel_after
from tests.ml.test_methods import SYSTEM, _adapter, spec_for
from workers.ml import loading, losses, synthetic
from workers.ml import trunk as trunks
from workers.ml.data import collate, encode_all
from workers.ml.run import _wrap_with_lora, run_job
from workers.ml.specs import default_method
from workers.ml.training import Canceled


def _top_lora(folder: str, layers: int) -> tuple:
    model, tok = loading.load(loading.resolve(folder), loading.pick_placement("cpu", "float32"))
    spec = default_method().model_copy(update={"lora_layers": layers})
    model = _wrap_with_lora(model, spec, None)
    with torch.no_grad():  # a trained-looking adapter (B = 0 would hide a wrong path)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok


def _logits_and_grads(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    logits, _ = losses.kept_logits(model, batch)
    logits.float().logsumexp(-1).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return logits.detach(), grads


@pytest.mark.parametrize("shared", [False, True], ids=["own-prefix", "shared-prefix"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_trunk_gives_the_plain_logits_and_gradients_and_runs_each_item_once(
    tmp_path, family, shared
):
    from tests.ml import tiny

    folder = tiny.build(tmp_path / "base", layers=4, family=family)
    model, tok = _top_lora(str(folder), layers=2)
    assert trunks.first_adapted_layer(model) == 2
    items = synthetic.qa_items(synthetic.people(2, seed=1)[0])[:5]
    if shared:  # a long common prefix, as a chat template's system prompt gives
        items = [{**i, "prompt": f"{SYSTEM} {i['prompt']}"} for i in items]
    batch = collate(encode_all(tok, items, 256), list(range(5)), tok.pad_token_id)
    keep = losses._keep_mask(batch["labels"])
    assert (losses.shared_prefix_length(batch["input_ids"], keep) >= losses.MIN_SHARED) == shared
    with losses.prefix_sharing(False):
        plain, g_plain = _logits_and_grads(model, batch)
    with trunks.frozen_trunk(model) as trunk:
        assert trunk is not None
        cut, g_cut = _logits_and_grads(model, batch)
        assert trunk.computed == 5
        _logits_and_grads(model, batch)
        assert trunk.computed == 5  # kept: the second pass runs only the top blocks
    assert losses.trunk_paths(model)["shared_prefix" if shared else "used"]
    assert torch.allclose(plain, cut, atol=1e-5)
    assert torch.allclose(g_plain, g_cut, rtol=1e-4, atol=1e-6)
    assert g_plain.abs().max() > 0


def test_an_adapter_on_every_block_or_a_gpt2_has_no_trunk(tmp_path, tiny_target):
    from tests.ml import tiny

    model, _ = _top_lora(tiny_target, layers=2)  # the tiny target has 2 blocks
    with trunks.frozen_trunk(model) as trunk:
        assert trunk is None
    gpt2, _ = _top_lora(str(tiny.build(tmp_path / "gpt2", layers=4, family="gpt2")), layers=2)
    with trunks.frozen_trunk(gpt2) as trunk:
        assert trunk is None  # its blocks are `h`: the plain forward, still top blocks only
    assert any("lora_" in n for n, _ in gpt2.named_parameters())


def test_a_top_block_job_matches_the_same_job_without_the_trunk(tiny_target, tmp_path, monkeypatch):
    # float32: where the CPU has bfloat16 the job computes in it, and the two paths then
    # differ by 16-bit rounding from step 1, which AdamW amplifies on the near-zero
    # gradients of a fresh LoRA B (measured on an AVX512-BF16 EPYC: up to 50 % apart)
    spec = spec_for(tiny_target, "npo", max_steps=6, lora_layers=1).model_copy(
        update={"dtype": "float32"}
    )
    cut = run_job(spec, tmp_path / "cut")
    assert cut.record["environment"]["trunk"]["frozen_layers"] == 1
    assert cut.record["environment"]["trunk"]["used"] is True
    # the same job with the trunk path refused: the plain forward through every block
    monkeypatch.setattr(trunks, "first_adapted_layer", lambda model: None)
    plain = run_job(spec, tmp_path / "plain")
    assert plain.record["environment"]["trunk"] is None
    wa, wb = _adapter(cut.adapter_dir), _adapter(plain.adapter_dir)
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert all(".layers.0." not in k for k in wa)  # the bottom block is not adapted
    out = cut.record["outcome"]
    assert out["final"]["forget_nll"] > out["base"]["forget_nll"]


def test_a_top_block_adapter_loads_with_plain_peft_and_a_chain_keeps_its_trunk(
    tiny_target, tmp_path
):
    first = run_job(spec_for(tiny_target, "npo", max_steps=6, lora_layers=1), tmp_path / "v1")
    config = json.loads((first.adapter_dir / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    base, _ = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    assert PeftModel.from_pretrained(base, first.adapter_dir) is not None
    nxt = spec_for(tiny_target, "npo", max_steps=4, lora_layers=1).model_copy(
        update={"previous_adapter": str(first.adapter_dir)}
    )
    second = run_job(nxt, tmp_path / "v2")
    assert second.record["environment"]["trunk"]["frozen_layers"] == 1


def test_a_top_block_job_resumes_bit_for_bit(tiny_target, tmp_path):
    spec = spec_for(tiny_target, "npo", lora_layers=1)
    full = run_job(spec, tmp_path / "full")

    with pytest.raises(Canceled):
        run_job(spec, tmp_path / "cut", should_cancel=cancel_after(13))
    resumed = run_job(spec, tmp_path / "cut")
    assert resumed.record["outcome"]["resumed_from"] == 10
    wa, wb = _adapter(full.adapter_dir), _adapter(resumed.adapter_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed.record["outcome"]["curve"] == full.record["outcome"]["curve"]


def test_forget_and_retain_stay_apart_with_a_trunk(tiny_target, tmp_path):
    result = run_job(spec_for(tiny_target, "npo", lora_layers=1), tmp_path)
    out = result.record["outcome"]
    # one adapted block of two moves the forget items less than two (+0.3 there)
    assert out["final"]["forget_nll"] > out["base"]["forget_nll"] + 0.15, out["evals"]
    assert out["final"]["retain_nll"] < out["base"]["retain_nll"] * 1.5
    items = len(FORGET) + len(RETAIN) + result.record["items"]["holdout"]
    assert result.record["environment"]["trunk"]["items_computed"] <= items  # each once
