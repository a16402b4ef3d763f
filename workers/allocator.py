"""The C allocator a worker runs its jobs under: jemalloc where it is installed.

A job allocates and frees thousands of tensors of 0.1-1 MiB a step (a bfloat16 hidden
state of 144 tokens is 166 KiB). glibc serves those from its heap and keeps their pages
when they are freed, fragmented, so a job's resident set held a step's activations and
several hundred MiB of free heap besides (docs/engine.md, "Memory"). jemalloc, which
PyTorch's CPU tuning guide recommends for the same reason, keeps size classes apart and
gives freed pages back after a short decay: on the built-in model the default job's
peak and its time both went down (docs/engine.md, "Memory": "The allocator").

An allocator is chosen when a process starts (`LD_PRELOAD`), so the worker's launchers
put it in the environment of the process they start: `unlearn up` for its worker child,
`unlearn worker` by executing itself once more. Jobs run in the worker's forked
children and inherit it. `UNLEARN_JEMALLOC=0` keeps glibc; where the library is not
installed (Debian: `libjemalloc2`) nothing changes.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping

# Freed pages go back within about a second (jemalloc's default keeps them ten, and
# holds the peak 10-15 MB higher); purging at every step as well gained nothing.
# No background threads: the worker forks its job processes.
JEMALLOC_CONF = "dirty_decay_ms:1000,muzzy_decay_ms:0"
SWITCH = "UNLEARN_JEMALLOC"


def jemalloc_library() -> str | None:
    """The shared library's name for LD_PRELOAD, or None (not installed, or switched off)."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    return ctypes.util.find_library("jemalloc")


def with_jemalloc(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a process that should run under jemalloc: the library preloaded (after
    anything already preloaded) and its settings, unless the operator gave their own."""
    out = dict(env)
    library = jemalloc_library()
    if library is None or "jemalloc" in out.get("LD_PRELOAD", ""):
        return out
    out["LD_PRELOAD"] = " ".join(p for p in (out.get("LD_PRELOAD", ""), library) if p)
    out.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return out


def reexec_under_jemalloc() -> None:
    """Replace this process with itself under jemalloc, once, when jemalloc is installed
    and not already loaded; otherwise return. Call it first thing in a command that runs
    jobs in this process or its forks."""
    from workers.ml.memwatch import jemalloc_serves  # cheap: no torch

    env = with_jemalloc(os.environ)
    if env.get("LD_PRELOAD") == os.environ.get("LD_PRELOAD") or jemalloc_serves():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
