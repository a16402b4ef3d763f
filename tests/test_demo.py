"""`unlearn demo` end to end: fine-tune, the service in a child process, the erasure
through the REST API, the download, answers before and after (slow: minutes)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_forgets_one_customer_and_keeps_another(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "demo", "--customers", "12", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "verdict: PASSED" in out.stdout
    assert "downloaded and verified" in out.stdout
    assert list(tmp_path.glob("adapter-v*/adapter_model.safetensors"))
