"""The audit as a self-contained HTML page for people (a privacy officer, an auditor):
verdict first, then the criteria, before/after charts per metric, the membership-score
distributions of forget and holdout items, the robustness probes, the environment.
Inline CSS and SVG only: no scripts, fonts or images from anywhere."""

from __future__ import annotations

from html import escape
from typing import Any

CSS = " ".join(
    [
        "body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;",
        "max-width:980px;color:#1d2330;padding:0 1rem}",
        "h1{font-size:1.5rem;margin:.2rem 0}",
        "h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.2rem}",
        ".verdict{padding:1rem 1.2rem;border-radius:8px;margin:1rem 0;font-size:1.1rem}",
        ".pass{background:#e5f6ea;border:2px solid #2f9e55}",
        ".fail{background:#fdeaea;border:2px solid #c93c3c}.verdict b{font-size:1.35rem}",
        "table{border-collapse:collapse;width:100%;font-size:.9rem}",
        "td,th{border-bottom:1px solid #e6e8ef;padding:.3rem .5rem;text-align:left;",
        "vertical-align:top}th{background:#f4f5f9}",
        ".ok{color:#2f7d46;font-weight:600}.no{color:#b22b2b;font-weight:600}",
        ".charts{display:flex;flex-wrap:wrap;gap:1rem}",
        ".chart{border:1px solid #e6e8ef;border-radius:6px;padding:.5rem}.muted{color:#667}",
        ".legend span{display:inline-block;width:.8rem;height:.8rem;margin:0 .3rem 0 .8rem;",
        "vertical-align:middle}",
    ]
)
BEFORE, AFTER, FORGET, HOLDOUT = "#9aa5b8", "#3b6fd8", "#d2553f", "#3a9a6a"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return escape(str(value))


def _bar_chart(name: str, before: float | None, after: float | None) -> str:
    """Two horizontal bars (before, after) on a shared scale."""
    top = max(v for v in (before, after, 1e-9) if v is not None)
    scale = 1.0 if top <= 1.0 else top
    rows = []
    for k, (label, value, color) in enumerate(
        (("before", before, BEFORE), ("after", after, AFTER))
    ):
        width = 0 if value is None else max(1.0, 180 * value / scale)
        y = 22 + k * 24
        rows.append(
            f'<text x="0" y="{y + 13}" font-size="11">{label}</text>'
            f'<rect x="44" y="{y}" width="{width:.1f}" height="16" fill="{color}"/>'
            f'<text x="{48 + width:.1f}" y="{y + 13}" font-size="11">{_fmt(value)}</text>'
        )
    return (
        f'<div class="chart"><svg width="280" height="74" role="img" '
        f'aria-label="{escape(name)} before and after">'
        f'<text x="0" y="12" font-size="12" font-weight="600">{escape(name)}</text>'
        + "".join(rows)
        + "</svg></div>"
    )


def _histogram(title: str, forget: list[float], holdout: list[float], bins: int = 16) -> str:
    """Forget and holdout score distributions on one axis (member scores: higher = the
    model treats the item more like training data)."""
    values = forget + holdout
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0

    def counts(xs: list[float]) -> list[int]:
        c = [0] * bins
        for x in xs:
            c[min(bins - 1, int((x - lo) / span * bins))] += 1
        return c

    cf, ch = counts(forget), counts(holdout)
    peak = max(cf + ch + [1])
    w, h, bw = 300, 90, 300 / bins
    bars = []
    for i in range(bins):
        for k, (c, color) in enumerate(((cf[i], FORGET), (ch[i], HOLDOUT))):
            bh = h * c / peak
            bars.append(
                f'<rect x="{i * bw + k * bw / 2:.1f}" y="{16 + h - bh:.1f}" '
                f'width="{bw / 2 - 1:.1f}" height="{bh:.1f}" fill="{color}" opacity="0.85"/>'
            )
    return (
        f'<div class="chart"><svg width="{w}" height="{h + 34}" role="img" '
        f'aria-label="{escape(title)}"><text x="0" y="11" font-size="12" font-weight="600">'
        f"{escape(title)}</text>{''.join(bars)}"
        f'<text x="0" y="{h + 30}" font-size="10">{lo:.2f}</text>'
        f'<text x="{w - 40}" y="{h + 30}" font-size="10">{hi:.2f}</text></svg></div>'
    )


def render(audit: dict[str, Any], manifest: dict[str, Any]) -> str:
    verdict = audit["verdict"]
    passed = bool(verdict["passed"])
    title = f"Audit of {manifest['model']} adapter version {manifest['version']}"
    failed = "".join(f"<li>{escape(c['message'])}</li>" for c in verdict.get("failed", []))
    head = (
        f'<div class="verdict {"pass" if passed else "fail"}"><b>'
        f"{'PASSED' if passed else 'FAILED'}</b> — "
        + (
            "every criterion of the model's audit policy is met; the adapter is downloadable."
            if passed
            else f"quarantined, not downloadable. Failed criteria:<ul>{failed}</ul>"
        )
        + "</div>"
    )
    criteria = "".join(
        f"<tr><td>{escape(c['group'])}</td><td>{escape(c['name'])}</td><td>{_fmt(c['value'])}</td>"
        f'<td>{_fmt(c["threshold"])}</td><td class="{"ok" if c["passed"] else "no"}">'
        f"{'pass' if c['passed'] else 'FAIL'}</td><td>{escape(c['message'])}</td></tr>"
        for c in verdict["criteria"]
    )
    charts = "".join(
        _bar_chart(name, v.get("before"), v.get("after"))
        for name, v in audit["metrics"].items()
        if isinstance(v, dict) and isinstance(v.get("after"), float)
    )
    scores = audit.get("membership_scores", {})
    hists = "".join(
        _histogram(
            f"{score.removeprefix('mia_')} score, {when}",
            scores[when]["forget"][score],
            scores[when]["holdout"][score],
        )
        for score in ("mia_loss", "mia_min_k_pp")
        for when in ("before", "after")
        if when in scores
    )
    metrics = audit["metrics"]
    templates = audit["probes"]["paraphrase_templates"][1:]
    leak_p = metrics.get("paraphrase_value_leak", {}).get("per_template", [])
    rouge_p = metrics.get("paraphrase_rouge", {}).get("per_template", [])
    probe_rows = "".join(
        f"<tr><td>{escape(t)}</td><td>{_fmt(v)}</td>"
        f"<td>{_fmt(leak_p[k] if k < len(leak_p) else None)}</td></tr>"
        for k, (t, v) in enumerate(zip(templates, rouge_p, strict=False))
    )
    probe_rows += "".join(
        f"<tr><td>model quantized to {b} bits (per-group absmax)</td>"
        f"<td>{_fmt(metrics.get(f'quantized_{b}bit_rouge', {}).get('after'))}</td>"
        f"<td>{_fmt(metrics.get(f'quantized_{b}bit_value_leak', {}).get('after'))}</td></tr>"
        for b in audit["probes"]["quantization_bits"]
    )
    if "relearned_rouge" in metrics:
        probe_rows += (
            f"<tr><td>relearning attack ({audit['probes']['relearn_steps']} steps on half the "
            f"items)</td><td>{_fmt(metrics['relearned_rouge']['after'])}</td>"
            f"<td>{_fmt(metrics.get('relearned_value_leak', {}).get('after'))}</td></tr>"
        )
    env = "".join(
        f"<tr><th>{escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in audit["environment"].items()
    )
    info = (
        f'<p class="muted">Base model {escape(manifest["base_model"]["source"])} '
        f"(<code>{escape(manifest['base_model']['digest'])}</code>); compared with the "
        f"{escape(audit.get('before', 'base model'))}; holdout items "
        f"{escape(audit.get('holdout_source', ''))}; covered requests: "
        f"{len(manifest['covered_requests'])}; method "
        f"{escape(str(manifest['method'].get('name')))}; membership test "
        f"{escape(audit.get('membership_test', 'judged'))}.</p>"
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1>{info}{head}"
        "<h2>Criteria</h2><table><tr><th>group</th><th>criterion</th><th>value</th>"
        f"<th>threshold</th><th></th><th>meaning</th></tr>{criteria}</table>"
        f'<h2>Before and after</h2><p class="legend"><span style="background:{BEFORE}"></span>'
        f'before<span style="background:{AFTER}"></span>after</p><div class="charts">{charts}</div>'
        '<h2 id="membership">Membership-inference scores</h2><p class="legend">'
        f'<span style="background:{FORGET}"></span>forget items'
        f'<span style="background:{HOLDOUT}"></span>holdout items (never trained on). After a '
        "good erasure the two overlap.</p>"
        f'<div class="charts">{hists}</div>'
        "<h2>Robustness probes (the forgotten answers: ROUGE-L recall, and the share that "
        "states a specific value of the true answer)</h2>"
        "<table><tr><th>probe</th><th>ROUGE-L</th><th>value leak</th></tr>"
        f"{probe_rows}</table>"
        f"<h2>Environment</h2><table>{env}</table></body></html>"
    )
