"""Process memory while a job runs: resident set size sampled by a background thread
(the CPU has no allocator counter like CUDA's), so a job's own peak can be told apart
from what the process held before it started."""

from __future__ import annotations

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
