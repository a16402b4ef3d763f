"""No second copy of the model during training: every live tensor is tallied (unique
storages) at each step, and the total must stay well below two copies of the weights."""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys

import pytest
import torch

from tests.ml.targets import FORGET, RETAIN
from workers.ml import loading
from workers.ml.run import run_job
from workers.ml.specs import JobSpec


def live_tensor_bytes() -> int:
    # unreachable tensors of earlier tests would otherwise count until a collection
    # happens to run between two readings (then "after" reads less than "before")
    gc.collect()
    seen: set[tuple[int, int]] = set()
    total = 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
        except Exception:  # some objects raise on isinstance or have no storage
            continue
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and storage.nbytes() >= 1024:
            seen.add(key)
            total += storage.nbytes()
    return total


def test_the_probe_sees_a_deep_copy(tiny_target):
    model, _ = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    weights = loading.weights_bytes(model)
    before = live_tensor_bytes()
    twin = copy.deepcopy(model)
    assert live_tensor_bytes() - before >= 0.9 * weights
    del twin


def test_training_holds_one_copy_of_the_weights(tiny_target, tmp_path):
    for name in ("npo", "idk", "rmu", "graddiff"):
        peaks: list[int] = []
        baseline = live_tensor_bytes()  # the test session's own tensors
        spec = JobSpec(
            model_source=tiny_target,
            forget=FORGET,
            retain=RETAIN,
            method={"name": name, "max_steps": 4, "lr": 1e-3, "retain_loss": "kl"}
            if name in ("npo", "graddiff")
            else {"name": name, "max_steps": 4, "lr": 1e-3},
        )

        def probe(_fraction: float, _losses: dict, peaks=peaks, baseline=baseline) -> None:
            peaks.append(live_tensor_bytes() - baseline)

        result = run_job(spec, tmp_path / name, progress=probe)
        weights = result.record["base_model"]["weights_bytes"]
        trainable = result.record["trainable_parameters"] * 4
        # weights once + adapter, its grads, two Adam moments and the best-state copy
        budget = 1.5 * weights + 5 * trainable
        assert max(peaks) < budget, (name, max(peaks), weights, trainable)


@pytest.mark.parametrize(
    ("variable", "engine_value"),
    [("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16"), ("LRU_CACHE_CAPACITY", "64")],
)
def test_the_engine_bounds_the_kernel_caches_unless_the_operator_did(variable, engine_value):
    """Set on import, before any product runs (oneDNN and ideep read them once); an
    explicit value in the environment is left alone."""
    code = f"import os, workers.ml; print(os.environ['{variable}'])"
    plain = {k: v for k, v in os.environ.items() if k != variable}
    assert _python(code, plain) == engine_value
    assert _python(code, {**plain, variable: "256"}) == "256"


def _python(code: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_the_heap_threshold_is_set_unless_the_operator_set_one_or_switched_tuning_off():
    code = "from workers.ml import memwatch; print(memwatch.tune_heap())"
    plain = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MALLOC_MMAP_THRESHOLD_", "UNLEARN_HEAP_TUNING")
    }
    glibc = _python("from workers.ml import memwatch; print(memwatch._LIBC is not None)", plain)
    assert _python(code, plain) == glibc  # set wherever the C library is glibc
    assert _python(code, {**plain, "MALLOC_MMAP_THRESHOLD_": "65536"}) == "False"
    assert _python(code, {**plain, "UNLEARN_HEAP_TUNING": "0"}) == "False"


def test_trimming_the_heap_gives_freed_memory_back():
    """glibc keeps freed blocks in its heap; trim_heap hands their pages back (where the
    C library is glibc: elsewhere it does nothing and there is nothing to check)."""
    from workers.ml import memwatch

    if memwatch._LIBC is None:
        return
    blocks = [bytearray(60_000) for _ in range(4000)]  # ~240 MB of heap blocks (< mmap size)
    pin = bytearray(60_000)  # above them: the heap's top cannot shrink on its own
    for b in blocks:
        b[::4096] = b"x" * len(b[::4096])  # touch every page
    full = memwatch.rss_bytes()
    del blocks
    kept = memwatch.rss_bytes()
    memwatch.trim_heap()
    assert kept > full - 50 * 2**20  # freed, but still resident: what a job's heap did
    assert memwatch.rss_bytes() < full - 150 * 2**20
    del pin


JEMALLOC_HEAP = """
from workers.ml import memwatch
assert memwatch.allocator().startswith("jemalloc"), memwatch.allocator()
before = memwatch.heap_info()["in_use"]
blocks = [bytearray(60_000) for _ in range(4000)]
held = memwatch.heap_info()["in_use"]
del blocks
memwatch.trim_heap()  # glibc's trim: nothing to do under jemalloc
print(before, held, memwatch.heap_info()["in_use"], memwatch.tune_heap())
"""


def test_under_jemalloc_the_heap_figures_are_jemallocs_own():
    """A worker's jobs run under jemalloc where it is installed (workers/allocator.py):
    the heap figures a benchmark prints then come from jemalloc's statistics, and glibc's
    tuning stays off (its heap serves nothing)."""
    from workers.allocator import with_jemalloc

    env = with_jemalloc(os.environ)
    if "jemalloc" not in env.get("LD_PRELOAD", ""):
        pytest.skip("Debian package libjemalloc2")
    before, held, after, tuned = _python(JEMALLOC_HEAP, env).split()
    assert int(held) - int(before) > 230 * 2**20  # 4000 blocks of 60 kB, counted in use
    assert int(after) < int(before) + 20 * 2**20
    assert tuned == "False"


def _saved_bytes(fn) -> int:
    """Bytes of the storages autograd saves for the backward pass while `fn` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _plain_kl(logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    cur = torch.nn.functional.log_softmax(logits.float(), dim=-1)
    return (cur.exp() * (cur - ref)).sum(dim=-1)


def test_the_lean_kl_gives_autograds_numbers_bit_for_bit_and_keeps_only_its_inputs():
    from workers.ml.losses import KL_ROWS, _RowKL

    g = torch.Generator().manual_seed(0)
    rows = 2 * KL_ROWS + 5  # several chunks and a ragged last one
    ref = torch.log_softmax(torch.randn(rows, 300, generator=g) * 3, dim=-1)
    weights = torch.rand(rows, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        base = (torch.randn(rows, 300, generator=g) * 3).to(dtype)
        lean, plain = base.clone().requires_grad_(), base.clone().requires_grad_()
        kl_lean, kl_plain = _RowKL.apply(lean, ref), _plain_kl(plain, ref)
        assert torch.equal(kl_lean, kl_plain)
        (kl_lean * weights).sum().backward()
        (kl_plain * weights).sum().backward()
        assert lean.grad is not None and plain.grad is not None
        assert lean.grad.dtype == dtype and torch.equal(lean.grad, plain.grad)

    # bfloat16 logits, as a job computes them: autograd's graph keeps three float32
    # tensors of their size (log p, p, log p - ref), the lean one its inputs alone
    logits = torch.randn(rows, 300, generator=g).to(torch.bfloat16).requires_grad_()
    assert _saved_bytes(lambda: _RowKL.apply(logits, ref)) == logits.numel() * 2 + ref.numel() * 4
    assert _saved_bytes(lambda: _plain_kl(logits, ref)) >= 3 * logits.numel() * 4


def test_lora_on_16bit_weights_keeps_16bit_inputs_with_the_same_numbers(tiny_target):
    """keep_inputs_16bit: the same logits and LoRA gradients bit for bit, and less kept
    for the backward pass (no float32 copy of each adapted layer's input)."""
    from workers.ml import losses
    from workers.ml.data import collate, encode_all
    from workers.ml.lean_lora import keep_inputs_16bit
    from workers.ml.run import _wrap_with_lora
    from workers.ml.specs import GA

    def run(lean: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        model, tok = loading.load(
            loading.resolve(tiny_target), loading.pick_placement("cpu", "bfloat16")
        )
        model = _wrap_with_lora(model, GA(), None)
        for name, p in model.named_parameters():  # move lora_B off zero: real gradients
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
        switched = keep_inputs_16bit(model) if lean else 0
        batch = collate(encode_all(tok, FORGET + RETAIN, 64), [0, 3, 9, 12], tok.pad_token_id)
        stats: list[torch.Tensor] = []
        saved = _saved_bytes(lambda: stats.extend(losses.sequence_stats(model, batch)))
        stats[1].mean().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return stats[0].detach(), grads, saved, switched

    logp_a, grads_a, saved_a, _ = run(False)
    logp_b, grads_b, saved_b, switched = run(True)
    assert switched > 0
    assert torch.equal(logp_a, logp_b) and torch.equal(grads_a, grads_b)
    assert saved_b < saved_a


def test_lora_on_float32_weights_keeps_peft_s_own_path(tiny_target):
    from workers.ml.lean_lora import keep_inputs_16bit
    from workers.ml.run import _wrap_with_lora
    from workers.ml.specs import GA

    model, _ = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu", "float32"))
    assert keep_inputs_16bit(_wrap_with_lora(model, GA(), None)) == 0


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_read_one_tensor_at_a_time_equal_transformers_own_load(tmp_path, family, dtype):
    from transformers import AutoModelForCausalLM

    from tests.ml import tiny

    folder = tiny.build(tmp_path / family, family=family)
    (folder / "generation_config.json").write_text('{"max_new_tokens": 7}')
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    lean = loading.read_weights(folder, dtype)
    assert lean is not None and type(lean) is type(plain)
    assert lean.state_dict().keys() == plain.state_dict().keys()
    for name, tensor in plain.state_dict().items():
        assert lean.state_dict()[name].dtype == dtype
        assert torch.equal(lean.state_dict()[name], tensor), name
    tied = plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    assert (lean.get_output_embeddings().weight is lean.get_input_embeddings().weight) == tied
    assert lean.generation_config.max_new_tokens == 7
    assert lean.config.to_dict() == plain.config.to_dict()
    assert lean.name_or_path == plain.name_or_path


def test_reading_the_weights_falls_back_where_it_cannot_apply(tmp_path):
    from tests.ml import tiny

    folder = tiny.build(tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "consolidated.safetensors")
    assert loading.read_weights(folder, torch.float32) is None  # not transformers' file


def test_a_checkpoint_the_lazy_read_refuses_still_loads_the_usual_way(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from tests.ml import tiny

    folder = tiny.build(tmp_path / "m")
    real = LlamaForCausalLM.from_pretrained.__func__

    def refuse_lazy(cls, path, *args, **kwargs):
        if path is None:
            raise ValueError("a layout this path does not handle")
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", classmethod(refuse_lazy))
    assert loading.read_weights(folder, torch.float32) is None
    model, _ = loading.load(loading.resolve(str(folder)), loading.pick_placement("cpu"))
    assert isinstance(model, LlamaForCausalLM)


def test_a_sharded_checkpoint_is_read_from_its_index(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.ml import tiny

    folder = tiny.build(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="100KB")
    assert len(loading._safetensors_checkpoint(folder)) > 1
    lean = loading.read_weights(folder, torch.float32)
    assert lean is not None
    for name, tensor in model.state_dict().items():
        assert torch.equal(lean.state_dict()[name], tensor), name


def test_converting_a_float32_file_to_bfloat16_keeps_one_copy_resident(tmp_path):
    """Read through transformers' memory map, a float32 file's pages stay resident while
    its bfloat16 copy is made (the highest point of a whole job on SmolLM2); read a
    tensor at a time, the peak is the bfloat16 model and a float32 tensor or two."""
    from tests.ml import tiny

    folder = tiny.build(tmp_path / "m", layers=4, hidden=1024)  # ~150 MB in float32
    size = (folder / "model.safetensors").stat().st_size

    def peak(load: str) -> int:
        code = (
            "import pathlib, torch, transformers\n"
            "from workers.ml import loading\n"
            "from workers.ml.memwatch import PeakRSS\n"
            f"folder = pathlib.Path({str(folder)!r})\n"
            "transformers.LlamaForCausalLM  # its module imported before the count starts\n"
            f"with PeakRSS(interval=0.002) as m: {load}\n"
            "print(m.peak - m.start)"
        )
        return int(_python(code, dict(os.environ)))

    mapped = peak("transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)")
    read = peak("loading.read_weights(folder, torch.bfloat16)")
    # measured: 1.55x and 0.72x the file (the bfloat16 model is 0.5x, the rest is
    # transformers' own working memory in both)
    assert mapped > 1.3 * size  # the file's pages and the bfloat16 copy
    assert read < mapped - 0.6 * size  # the file's pages are not among them


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("alpha", [16.0, 12.0])  # scaling 2 (folded into lora_B) and 1.5
def test_lora_summed_in_place_gives_peft_s_numbers_bit_for_bit(tiny_target, dtype, alpha):
    """sum_in_place: the same logits and LoRA gradients as PEFT's own forward, in either
    dtype, with a scaling folded into lora_B's weight or multiplied in place; the
    disabled adapter (the reference model) is still the base model."""
    from workers.ml import losses
    from workers.ml.data import collate, encode_all
    from workers.ml.lean_lora import keep_inputs_16bit, sum_in_place
    from workers.ml.run import _wrap_with_lora
    from workers.ml.specs import GA

    def run(summed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        placement = loading.pick_placement("cpu", dtype)
        model, tok = loading.load(loading.resolve(tiny_target), placement)
        model = _wrap_with_lora(model, GA(lora_alpha=alpha), None)
        for name, p in model.named_parameters():  # move lora_B off zero: real gradients
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
        keep_inputs_16bit(model)
        switched = sum_in_place(model) if summed else 0
        batch = collate(encode_all(tok, FORGET + RETAIN, 64), [0, 3, 9, 12], tok.pad_token_id)
        logp, nll = losses.sequence_stats(model, batch)
        nll.mean().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        with torch.no_grad(), model.disable_adapter():
            reference = losses.sequence_stats(model, batch)[0]
        return logp.detach(), grads, reference, switched

    logp_a, grads_a, ref_a, _ = run(False)
    logp_b, grads_b, ref_b, switched = run(True)
    assert switched > 0
    assert torch.equal(logp_a, logp_b) and torch.equal(grads_a, grads_b)
    assert torch.equal(ref_a, ref_b) and not torch.equal(ref_b, logp_b)


@pytest.mark.parametrize("rows", [6, 1])
def test_the_output_head_runs_its_rows_as_one_product_so_a_frozen_model_copies_no_weight(
    tiny_target, rows
):
    """With logits_to_keep the head gets a slice of the last positions; under a frozen
    weight PyTorch's matmul would expand the head's weight to one copy per row for it
    (1.3 GiB and 2.3 s for 24 rows of SmolLM2; 57 MB and 0.1 s for the one row of a
    shared prefix's pass). The loader's head flattens its input to [rows, hidden]: the
    same logits, one plain product (6 rows: a decode's first pass; 1: a prefix's)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from workers.ml.data import prompt_ids
    from workers.ml.run import _wrap_with_lora
    from workers.ml.specs import GA

    model, tok = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    model = _wrap_with_lora(model, GA(), None)  # the base frozen, as in every job and audit
    model.eval()
    prompts = [prompt_ids(tok, item["prompt"]) for item in FORGET[:rows]]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in prompts])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in prompts])

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    for grad in (False, True):  # a check's pass, and a training step's prefix pass
        with torch.set_grad_enabled(grad), Ops() as ops:
            last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        assert not any("bmm" in name for name in ops.names)  # no expanded weight
        with torch.no_grad():
            every = model(input_ids=ids, attention_mask=mask).logits
        assert last.shape == (rows, 1, every.shape[-1])
        assert torch.allclose(last[:, -1], every[:, -1], atol=1e-5, rtol=1e-5)


def test_a_copy_of_a_loaded_model_computes_its_head_with_its_own_weight(tiny_target):
    """The flattening head is a class (`loading.FlatHead`), not a forward bound to one
    instance: a deep copy's head reads the copy's weight, and the model still pickles."""
    import pickle

    model, _ = loading.load(loading.resolve(tiny_target), loading.pick_placement("cpu"))
    twin = copy.deepcopy(model)
    head, twin_head = model.get_output_embeddings(), twin.get_output_embeddings()
    assert isinstance(head, loading.FlatHead) and isinstance(twin_head, loading.FlatHead)
    x = torch.randn(2, 1, head.in_features)
    with torch.no_grad():
        before = head(x)
        twin_head.weight.mul_(2)
        assert torch.equal(head(x), before) and not torch.equal(twin_head(x), before)
    assert isinstance(pickle.loads(pickle.dumps(twin)).get_output_embeddings(), loading.FlatHead)
