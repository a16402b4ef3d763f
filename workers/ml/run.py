"""The engine's one entry point: `run_job(spec, workdir)` -> adapter folder + record.

No Celery, SQLAlchemy or FastAPI here: callable from a task, a test or a notebook.
Re-running with the same work folder resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from workers.ml import adapters, general, loading, losses, methods, stand_ins
from workers.ml.answers import AnswerCheck
from workers.ml.data import encode_all, rare_token_weights, value_token_weights
from workers.ml.lean_lora import keep_inputs_16bit, sum_in_place
from workers.ml.memwatch import PeakRSS, allocator, tune_heap
from workers.ml.specs import JobSpec, for_batched_job
from workers.ml.training import CancelFn, Datasets, ProgressFn, runs, train
from workers.ml.trunk import frozen_trunk, trunk_record
from workers.ml.values import neighbours

ENGINE_VERSION = "1"


@dataclass
class JobResult:
    adapter_dir: Path
    record: dict[str, Any]


def _wrap_with_lora(model: Any, spec: Any, previous: str | None) -> Any:
    if previous:
        # Continue the chain: train the previous version's weights further.
        return PeftModel.from_pretrained(model, previous, is_trainable=True)
    torch.manual_seed(spec.seed)  # LoRA A matrices are random: seed them
    config = LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=0.0,  # dropout would make resumed runs differ
        task_type="CAUSAL_LM",
        **lora_target_args(model, spec.lora_layers, spec.lora_targets),
    )
    return get_peft_model(model, config)


def model_identity(
    resolved: loading.ResolvedModel, placement: Any, model: Any, previous: str | None
) -> dict[str, Any]:
    """What decides the greedy answers of `model` as this run loaded it: the files (the
    base's weights and tokenizer, the previous adapter's) and how it computes (device,
    dtype, kernel, CPU, threads, libraries: each may round differently)."""
    device = placement.device
    return {
        "weights": resolved.digest,
        "companions": loading.companion_digest(resolved.path),
        "previous_adapter": adapters.folder_digests(Path(previous)) if previous else None,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(placement.dtype),
        "attention": loading.attention_of(model),
        "cpu": loading.cpu_description(),
        "threads": torch.get_num_threads(),
        "libraries": [torch.__version__, transformers.__version__, peft.__version__],
    }


def lora_target_args(model: Any, count: int | None, targets: str | list[str]) -> dict[str, Any]:
    """PEFT's target arguments, restricted to the top `count` blocks when given."""
    total = getattr(model.config, "num_hidden_layers", None)
    if count is None or total is None or count >= total:
        return {"target_modules": targets}
    return {
        "target_modules": _targets(model, targets),
        "layers_to_transform": list(range(total - count, total)),
    }


def _targets(model: Any, targets: str | list[str]) -> str | list[str]:
    """PEFT takes layers_to_transform only with module names: "all-linear" spelled out
    (every linear layer's name inside the blocks; the output head is never adapted)."""
    if targets != "all-linear":
        return targets
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output
    }
    return sorted(names)


def guard_masks(tok: Any, data: Datasets, retain: list[dict[str, str]]) -> list[list[float]]:
    """The per-token masks of the answer guard's sample (`data.retain_sample()`): the
    specific values of each sampled retain answer (`retain`: data.retain before encoding)."""
    idx = data.retain_indices()
    return value_token_weights(
        tok, [retain[i] for i in idx], [data.retain[i] for i in idx], other=0.0
    )


def run_job(
    spec: JobSpec,
    workdir: Path,
    *,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> JobResult:
    tune_heap()  # once per process would do; it is cheap
    with PeakRSS() as memory:
        return _run(spec, workdir, memory, progress, should_cancel)


def _run(
    spec: JobSpec,
    workdir: Path,
    memory: PeakRSS,
    progress: ProgressFn | None,
    should_cancel: CancelFn | None,
) -> JobResult:
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    requests = len(spec.forget_groups or [None])
    m = for_batched_job(spec.method, requests)  # the record keeps these settings
    resolved = loading.resolve(
        spec.model_source, Path(spec.model_cache) if spec.model_cache else None
    )
    placement = loading.pick_placement(spec.device, spec.dtype, training=True)
    base_model, tok = loading.load(resolved, placement)
    base_bytes = loading.weights_bytes(base_model)
    if m.gradient_checkpointing:
        base_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        base_model.enable_input_require_grads()  # LoRA: the embeddings are frozen
    model = _wrap_with_lora(base_model, m, spec.previous_adapter)
    lean_layers = keep_inputs_16bit(model)  # the same numbers, a third less kept per pass
    summed_layers = sum_in_place(model)  # the same numbers, two passes fewer per layer
    method = methods.build(m)
    method.prepare(model)

    forget = [i.plain() for i in spec.forget]
    t_general = time.perf_counter()
    # After the caller's retain items, so their indices (neighbours, the guard) stay.
    general_items, general_cached = general.cached_reference_items(
        model,
        tok,
        m.general_retain,
        Path(spec.model_cache) if spec.model_cache else loading.DEFAULT_CACHE,
        lambda: model_identity(resolved, placement, model, spec.previous_adapter),
    )
    retain = [i.plain() for i in spec.retain] + general_items
    general_s = time.perf_counter() - t_general
    # The stop rule and SimNPO's delta="holdout" compare with data the model never saw:
    # without holdout items from the caller, the person's values replaced by stand-ins.
    holdout = [i.plain() for i in spec.holdout] or stand_ins.synthesize(forget, seed=m.seed)
    data = Datasets(
        forget=encode_all(tok, forget, m.max_length),
        retain=encode_all(tok, retain, m.max_length),
        holdout=encode_all(tok, holdout, m.max_length),
        retain_eval=m.retain_eval_items,
        general=len(general_items),
    )
    if spec.forget_groups is not None:
        data.forget_groups = runs(spec.forget_groups, len(forget))
    if spec.holdout_groups is not None:
        data.holdout_groups = runs(spec.holdout_groups, len(holdout))
    if m.retain_focus > 0:
        data.neighbours = neighbours(forget, retain)
    if m.retain_answers_tolerance is not None:  # only the guard's sample needs its masks
        data.retain_sample_masks = guard_masks(tok, data, retain)
    if m.stop_values_stated is not None:
        data.forget_value_masks = value_token_weights(tok, forget, data.forget, other=0.0)
    if m.stop_answers_leak is not None or m.stop_answers_kept is not None:
        data.answer_check = AnswerCheck.build(tok, (forget, data.forget), (holdout, data.holdout))
    if m.stop_answers_kept is not None and data.answer_check is not None and retain:
        idx = data.retain_indices()
        data.answer_check.with_retain([retain[i] for i in idx], [data.retain[i] for i in idx], idx)
    if m.forget_weighting == "rare":
        data.forget_weights = rare_token_weights(data.forget, data.retain)
    elif m.forget_weighting == "values":
        data.forget_weights = value_token_weights(tok, forget, data.forget)
    substitutes = method.substitutes(forget)
    if substitutes is not None:
        data.per_item = len(substitutes[0])
        data.substitutes = encode_all(tok, [s for per in substitutes for s in per], m.max_length)
    t_loaded = time.perf_counter()
    with frozen_trunk(model) as trunk:
        outcome = train(
            model,
            method,
            m,
            data,
            tok.pad_token_id,
            workdir,
            progress=progress,
            should_cancel=should_cancel,
            continues_chain=spec.previous_adapter is not None,
        )
    digests = adapters.save(model, workdir / "adapter", base_name=spec.model_source)
    if progress is not None:
        progress(1.0, {"step": outcome.steps})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record = {
        "engine_version": ENGINE_VERSION,
        "method": m.model_dump(),
        "base_model": {
            "source": spec.model_source,
            "digest": resolved.digest,
            "weights_bytes": base_bytes,
        },
        "previous_adapter": spec.previous_adapter,
        "batched_requests": requests,
        "items": {
            "forget": len(spec.forget),
            "retain": len(spec.retain),
            "general_retain": len(general_items),
            "holdout": len(holdout),
            "holdout_source": "caller" if spec.holdout else "synthesized",
        },
        "outcome": asdict(outcome),
        "adapter_files": digests,
        "trainable_parameters": trainable,
        "environment": {
            "device": str(placement.device),
            "dtype": str(placement.dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu": loading.cpu_description(),
            "allocator": allocator(),  # glibc or jemalloc: moves the peak (workers/allocator.py)
            "attention": loading.attention_of(model),
            "shared_prefix": losses.shared_prefix_used(model),
            "lean_lora_layers": lean_layers,
            "summed_lora_layers": summed_layers,
            "trunk": trunk_record(trunk, losses.trunk_paths(model)),
            # the general items' answers read from the model cache, or decoded here
            "general_answers_cached": general_cached,
        },
        "durations_s": {
            "load": t_loaded - t0,  # of it, the general items' answers:
            "general_answers": general_s,
            "train": outcome.seconds,
            "total": time.perf_counter() - t0,
        },
        # Resident memory the job added to the process (sampled), and its peak in total.
        "job_peak_rss_bytes": memory.peak - memory.start,
        "peak_rss_bytes": memory.peak,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
    (workdir / "record.json").write_text(json.dumps(record, indent=2, default=str))
    return JobResult(workdir / "adapter", record)
