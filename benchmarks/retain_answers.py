"""How many of the demo's kept customers' answers an adapter breaks, read the way the
engine's answer guard reads them (every value token the top choice, teacher-forced;
`training.retain_state`) on the guard's strided samples and on the whole retain set.

    .venv/bin/python -m benchmarks.retain_answers ADAPTER [--samples 24 32 110]

Round 0 of an erasure guards 24 retain items and the audit's retry 32
(`workers.pipeline.method_for_round`): this shows what each sample sees of the same
adapter (docs/unlearning-defaults.md, "Eighth round").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from service import demo
from workers.ml import loading
from workers.ml.data import encode_all
from workers.ml.run import guard_masks
from workers.ml.training import Datasets, kept_share, retain_state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("adapter", type=Path)
    ap.add_argument("--assistant", default="var/demo/assistant-e6-lr0.0002")
    ap.add_argument("--samples", type=int, nargs="+", default=[24, 32, 110])
    args = ap.parse_args()

    from peft import PeftModel

    people = demo.customers(12)
    retain = [i for p in people[1:] for i in demo.customer_items(p)]  # as demo_erasure
    placement = loading.pick_placement("cpu", "float32")
    base, tok = loading.load(loading.resolve(args.assistant), placement)
    encoded = encode_all(tok, retain, 256)
    model = PeftModel.from_pretrained(base, str(args.adapter)).eval()
    for n in args.samples:
        data = Datasets(forget=[], retain=encoded, retain_eval=n)
        data.retain_sample_masks = guard_masks(tok, data, retain)
        idx = data.retain_indices()
        with model.disable_adapter():
            nll_before, intact = retain_state(model, data, tok.pad_token_id)
        nll_after, given = retain_state(model, data, tok.pad_token_id)
        broken = [retain[i]["prompt"] for i, a, b in zip(idx, intact, given, strict=True) if a > b]
        print(
            f"{len(idx)} items: retain NLL {nll_before:.3f} -> {nll_after:.3f}; "
            f"{sum(intact)} answers given word for word before, kept "
            f"{kept_share(intact, given):.3f}; broken: {broken}",
            flush=True,
        )


if __name__ == "__main__":
    main()
