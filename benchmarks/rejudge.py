"""Judge stored audit reports again under the current criteria code (no model, no
measurement): what a change of a criterion does to verdicts already on disk.

    .venv/bin/python -m benchmarks.rejudge \
        var/bench/quality/service/artifacts/adapters/*/v*/audit.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from workers.audit.run import judge_report


def _names(criteria: list[dict[str, Any]]) -> list[str]:
    return sorted(c["name"] for c in criteria if not c["passed"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", nargs="+", type=Path)
    for path in ap.parse_args().reports:
        report = json.loads(path.read_text())
        then = _names(report["verdict"]["failed"])
        now = _names(judge_report(report))
        print(f"{path}: failed then {then or 'nothing'}; now {now or 'nothing'}")


if __name__ == "__main__":
    main()
