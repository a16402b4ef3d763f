"""Process memory while a job runs: resident set size sampled by a background thread
(the CPU has no allocator counter like CUDA's), so a job's own peak can be told apart
from what the process held before it started; and the two settings of glibc's heap that
keep a job's peak near what it really uses (`tune_heap`, `trim_heap`). Where the worker
preloaded jemalloc instead (workers/allocator.py), its own decay gives freed pages back
and those two do nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from types import TracebackType


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def _jemalloc() -> ctypes.CDLL | None:
    """jemalloc when it serves this process's malloc (preloaded: workers/allocator.py);
    its `mallctl` is then in the global symbol scope."""
    try:
        with open("/proc/self/maps") as fh:
            if "libjemalloc" not in fh.read():
                return None
        lib = ctypes.CDLL(None)
    except OSError:
        return None
    return lib if hasattr(lib, "mallctl") else None


_JEMALLOC = _jemalloc()
_GLIBC = None if _JEMALLOC is not None else _glibc()  # its heap serves malloc
# glibc's heap settings and trim are on unless UNLEARN_HEAP_TUNING=0
_LIBC = _GLIBC if os.environ.get("UNLEARN_HEAP_TUNING", "1") != "0" else None


def allocator() -> str:
    """Which C allocator serves this process: "jemalloc <version>", "glibc" or "other"."""
    if _JEMALLOC is not None:
        version = ctypes.c_char_p()
        size = ctypes.c_size_t(ctypes.sizeof(version))
        _JEMALLOC.mallctl(b"version", ctypes.byref(version), ctypes.byref(size), None, 0)
        return f"jemalloc {(version.value or b'').decode().split('-')[0]}".strip()
    return "glibc" if _GLIBC is not None else "other"


def jemalloc_serves() -> bool:
    return _JEMALLOC is not None


M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20


def tune_heap() -> bool:
    """Serve blocks of 1 MiB and more (vocabulary-sized logits and their gradients) from
    their own mappings, given back the moment they are freed. glibc's default raises
    that threshold to the size of the largest block freed so far (up to 32 MiB), after
    which such blocks came from the heap and left holes the next pass could not reuse;
    a fixed threshold also keeps automatic trimming of the heap's top. An operator's
    MALLOC_MMAP_THRESHOLD_ wins. Returns whether it was set."""
    if _LIBC is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim_heap() -> None:
    """Give the C heap's free pages back to the system. glibc keeps the blocks of freed
    activations (a step's autograd graph) in its heap, and batches of other lengths
    fragment it, so a job's resident set grew by a step's activations and more;
    trimming before each step keeps it near what is in use (docs/engine.md, "Memory")."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


if _LIBC is not None and hasattr(_LIBC, "mallinfo2"):
    _LIBC.mallinfo2.restype = _MallInfo2  # once: ctypes otherwise reads an int


def _jemalloc_stat(name: str) -> int:
    value = ctypes.c_size_t()
    size = ctypes.c_size_t(ctypes.sizeof(value))
    assert _JEMALLOC is not None
    _JEMALLOC.mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0)
    return value.value


def heap_info() -> dict[str, int] | None:
    """The C heap, in bytes. glibc (`mallinfo2`): in use, free but kept, and served from
    their own mappings. jemalloc: in use, and resident in its pages (in use, free and
    metadata). None elsewhere (or with glibc's heap tuning off)."""
    if _JEMALLOC is not None:
        epoch = ctypes.c_uint64(1)  # stats are a snapshot refreshed by writing the epoch
        _JEMALLOC.mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch))
        return {
            "in_use": _jemalloc_stat("stats.allocated"),
            "resident": _jemalloc_stat("stats.resident"),
        }
    if _LIBC is None or not hasattr(_LIBC, "mallinfo2"):
        return None
    info = _LIBC.mallinfo2()
    return {"in_use": info.uordblks, "free": info.fordblks, "mapped": info.hblkhd}


class PeakRSS:
    """`with PeakRSS() as m: ...` then m.start and m.peak (bytes), and m.peak_at (seconds
    after entering: a peak at load time tells another story than one while training)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self.peak_at = 0.0
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _sample(self) -> None:
        now = rss_bytes()
        if now > self.peak:
            self.peak, self.peak_at = now, time.perf_counter() - self._t0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self._t0 = time.perf_counter()
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
