"""No second copy of the model during training: every live tensor is tallied (unique
storages) at each step, and the total must stay well below two copies of the weights."""

from __future__ import annotations

import copy
import gc

import torch

from tests.ml.targets import FORGET, RETAIN
from workers.ml import loading
from workers.ml.run import run_job
from workers.ml.specs import JobSpec


def live_tensor_bytes() -> int:
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


def test_the_engine_bounds_onednns_primitive_cache_unless_the_operator_did():
    """Set on import, before any product runs (oneDNN reads it once); an explicit value
    in the environment is left alone."""
    import os
    import subprocess
    import sys

    code = "import os, workers.ml; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"

    def capacity(env: dict[str, str]) -> str:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()

    plain = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    assert capacity(plain) == "16"
    assert capacity({**plain, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256"}) == "256"
