"""The measurements behind the default method (docs/unlearning-defaults.md): several
method configurations, each unlearning one person from the 8-person target.

    .venv/bin/python -m benchmarks.sweep_defaults 'npo lr=1e-3 alpha=3' 'simnpo lr=1e-3' ...
"""

from __future__ import annotations

import json
import sys

from benchmarks.common import BENCH_DIR, target, unlearn_first_person
from benchmarks.unlearn_one_person import measure


def main() -> None:
    folder, people = target()
    print("before", json.dumps(measure(folder, None, people)), flush=True)
    for k, config in enumerate(sys.argv[1:]):
        name, *pairs = config.split()
        overrides = {a: json.loads(b) for a, b in (p.split("=", 1) for p in pairs)}
        result, row = unlearn_first_person(
            folder, people, {"name": name, **overrides}, BENCH_DIR / "sweep" / str(k)
        )
        row = {"config": config, **row}
        row |= measure(folder, result.adapter_dir, people)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
