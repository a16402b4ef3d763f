"""A free TCP port on the loopback interface (for services a process starts itself: the
demo's embedded service, the load benchmark, tests)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
