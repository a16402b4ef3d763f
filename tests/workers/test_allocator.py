"""The worker's jobs run under jemalloc where it is installed (workers/allocator.py): the
environment a launcher gives its worker, and a process that re-executes itself under it.
The memory figures themselves are benchmarks (docs/engine.md, "Memory")."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from workers import allocator

INSTALLED = allocator.jemalloc_library() is not None
needs_jemalloc = pytest.mark.skipif(not INSTALLED, reason="Debian package libjemalloc2")


def _plain_env() -> dict[str, str]:
    drop = ("LD_PRELOAD", "MALLOC_CONF", allocator.SWITCH)
    return {k: v for k, v in os.environ.items() if k not in drop}


@needs_jemalloc
def test_a_worker_environment_preloads_jemalloc_with_its_settings():
    env = allocator.with_jemalloc({"PATH": "/bin"})
    assert "jemalloc" in env["LD_PRELOAD"]
    assert env["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    assert env["PATH"] == "/bin"


@needs_jemalloc
def test_what_the_operator_preloaded_or_configured_stays():
    env = allocator.with_jemalloc({"LD_PRELOAD": "/opt/libtrace.so", "MALLOC_CONF": "narenas:1"})
    first, second = env["LD_PRELOAD"].split(" ")
    assert first == "/opt/libtrace.so" and "jemalloc" in second
    assert env["MALLOC_CONF"] == "narenas:1"
    # already preloaded (by the operator or an earlier launcher): nothing added twice
    again = allocator.with_jemalloc(env)
    assert again == env


def test_switched_off_the_environment_is_left_as_it_is(monkeypatch):
    monkeypatch.setenv(allocator.SWITCH, "0")
    assert allocator.jemalloc_library() is None
    assert allocator.with_jemalloc({"PATH": "/bin"}) == {"PATH": "/bin"}


def _run(code: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


REPORT = (
    "from workers.allocator import reexec_under_jemalloc; reexec_under_jemalloc(); "
    "import os; from workers.ml import memwatch; "
    "print(memwatch.allocator(), os.environ.get('MALLOC_CONF'))"
)


@needs_jemalloc
def test_a_process_re_executes_itself_under_jemalloc_once():
    name, conf = _run(REPORT, _plain_env()).rsplit(" ", 1)
    assert name.startswith("jemalloc ")
    assert conf == allocator.JEMALLOC_CONF


def test_without_jemalloc_the_process_goes_on_as_it_started():
    name, conf = _run(REPORT, {**_plain_env(), allocator.SWITCH: "0"}).rsplit(" ", 1)
    assert not name.startswith("jemalloc")
    assert conf == "None"
