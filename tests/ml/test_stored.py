"""Frozen weights kept in bfloat16 and multiplied in float32 (workers/ml/stored.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.ml import tiny
from tests.ml.targets import FORGET, RETAIN, TINY_ANSWER_GUARD_OFF
from workers.ml import loading, stored
from workers.ml.run import run_job
from workers.ml.specs import JobSpec

STORED = loading.Placement(torch.device("cpu"), torch.float32, torch.bfloat16)
FLOAT32 = loading.Placement(torch.device("cpu"), torch.float32)


def rounded_copy(folder: Path, out: Path) -> Path:
    """`folder` with every linear and embedding weight rounded to bfloat16 once and
    saved in float32 again: the float32 model a stored model should compute exactly."""
    model, _ = loading.load(loading.resolve(str(folder)), FLOAT32)
    stored_names = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Embedding)
    }
    out.mkdir()
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    weights = load_file(folder / "model.safetensors")
    for key, value in weights.items():
        if key in stored_names:
            weights[key] = value.to(torch.bfloat16).to(torch.float32)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def lora_logits_and_grads(folder: Path, placement: loading.Placement):
    from workers.ml.data import collate, encode_all
    from workers.ml.run import _wrap_with_lora
    from workers.ml.specs import GA

    model, tok = loading.load(loading.resolve(str(folder)), placement)
    model = _wrap_with_lora(model, GA(), None)
    for name, p in model.named_parameters():  # move lora_B off zero: real gradients
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    batch = collate(encode_all(tok, FORGET + RETAIN, 64), [0, 3, 9, 12], tok.pad_token_id)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
    ).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return model, out.logits.detach(), grads


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_stored_weights_compute_a_float32_model_rounded_once_bit_for_bit(tmp_path, family):
    base = tiny.build(tmp_path / "base", family=family, seed=5)
    reference = rounded_copy(base, tmp_path / "rounded")
    model, logits, grads = lora_logits_and_grads(base, STORED)
    _, ref_logits, ref_grads = lora_logits_and_grads(reference, FLOAT32)
    assert stored.stored_modules(model) > 0
    assert logits.dtype == torch.float32
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert torch.equal(grad, ref_grads[name]), name


def test_a_weight_larger_than_a_slice_is_multiplied_in_slices(tmp_path, monkeypatch):
    """The tied head of a real vocabulary would add its float32 size for the product:
    in slices of output rows the logits and gradients stay those of one product."""
    base = tiny.build(tmp_path / "base", seed=5)
    _, whole, whole_grads = lora_logits_and_grads(base, STORED)
    monkeypatch.setattr(stored, "SLICE_ELEMENTS", 64 * 70)  # the head: 9 slices of 70 rows
    model, sliced, sliced_grads = lora_logits_and_grads(base, STORED)
    head = model.get_output_embeddings()
    assert len(stored._row_slices(head.weight)) > 1
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(sliced_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_stored_weights_take_half_the_memory_and_stay_tied(tiny_target):
    full, _ = loading.load(loading.resolve(tiny_target), FLOAT32)
    half, _ = loading.load(loading.resolve(tiny_target), STORED)
    linear_and_embedding = sum(
        m.weight.numel() * 4
        for m in {id(m.weight): m for m in full.modules() if hasattr(m, "weight")}.values()
        if isinstance(m, torch.nn.Linear | torch.nn.Embedding)
    )
    saved = loading.weights_bytes(full) - loading.weights_bytes(half)
    assert saved == linear_and_embedding // 2
    assert half.get_output_embeddings().weight is half.get_input_embeddings().weight
    assert half.get_output_embeddings().weight.dtype == torch.bfloat16
    norms = [p for n, p in half.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)


def test_a_stored_weight_is_never_trained(tiny_target):
    model, _ = loading.load(loading.resolve(tiny_target), STORED)
    model.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        stored.store_weights(model, torch.float32)


def test_a_cpu_job_in_float32_keeps_its_weights_in_bfloat16_unless_told(monkeypatch):
    monkeypatch.setattr(loading, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    job = loading.pick_placement(training=True)
    assert (job.dtype, job.weights_dtype, job.stores_weights) == (
        torch.float32,
        torch.bfloat16,
        True,
    )
    assert not loading.pick_placement(training=True, weights_dtype="float32").stores_weights
    assert not loading.pick_placement(dtype="float32", training=True).stores_weights  # forced
    assert not loading.pick_placement().stores_weights  # the audit, serving
    forced = loading.pick_placement(dtype="float32", training=True, weights_dtype="float16")
    assert forced.weights_dtype == torch.float16
    monkeypatch.setattr(loading, "cpu_bf16_native", lambda: True)
    native = loading.pick_placement(training=True)
    assert native.dtype == torch.bfloat16 and not native.stores_weights


def test_a_job_on_stored_weights_is_the_job_on_the_rounded_float32_model(tiny_target, tmp_path):
    """The whole engine on stored weights (shared prefix, checks, general answers, the
    in-place LoRA sum): the adapter of the float32 model rounded once, bit for bit, and
    one that plain PEFT loads on the float32 base."""
    from peft import PeftModel

    reference = rounded_copy(Path(tiny_target), tmp_path / "rounded")
    method = {"name": "npo", "max_steps": 6, "lr": 1e-3, **TINY_ANSWER_GUARD_OFF}

    def job(source: str, name: str, **kw):
        spec = JobSpec(
            model_source=source,
            forget=FORGET,
            retain=RETAIN,
            method=method,
            device="cpu",
            dtype="float32",
            model_cache=str(tmp_path / "cache"),
            **kw,
        )
        return run_job(spec, tmp_path / name)

    a = job(tiny_target, "stored", weights_dtype="bfloat16")
    b = job(str(reference), "rounded")
    env = a.record["environment"]
    assert (env["dtype"], env["weights_dtype"]) == ("float32", "bfloat16")
    assert b.record["environment"]["weights_dtype"] == "float32"
    assert env["lean_lora_layers"] == 0 and env["summed_lora_layers"] > 0
    assert a.record["outcome"]["steps"] == b.record["outcome"]["steps"] > 0
    weights = "adapter_model.safetensors"  # the config names each job's own base folder
    assert a.record["adapter_files"][weights] == b.record["adapter_files"][weights]
    timings = ("seconds", "check_seconds")
    same = [{k: v for k, v in r.record["outcome"].items() if k not in timings} for r in (a, b)]
    assert json.dumps(same[0], default=str) == json.dumps(same[1], default=str)

    base, _ = loading.load(loading.resolve(tiny_target), FLOAT32)
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    before = base(input_ids=ids).logits
    served = PeftModel.from_pretrained(base, str(a.adapter_dir))
    assert not torch.equal(served(input_ids=ids).logits, before)
