"""The HTML report of an A/B test (``GET /v1/abtests/{id}/report.html``): one self-contained
page rendered on the server, charts as inline SVG written here (no plotting dependency, no
script, nothing fetched), so it opens anywhere, prints, and can be archived as one file.

It shows the verdict and its reasons, the primary metric of each arm over the test's time
(cumulative), each treatment's mSPRT confidence sequence for the effect narrowing around the
truth as samples accrue, and the tables of the analysis. Every string that came from a user
(names, variants, reasons quoting them) is escaped."""

from __future__ import annotations

import math
from html import escape
from typing import Any

__all__ = ["render"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
VERDICT_COLOURS = {
    "treatment_wins": "#2ca02c", "control_wins": "#1f77b4", "guardrail_failed": "#d62728",
    "unreliable_srm": "#d62728", "insufficient_data": "#7f7f7f", "no_difference_yet": "#7f7f7f",
}
_W, _H = 720, 280
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 70, 150, 30, 40


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return escape(str(value))


def _short_time(iso: str) -> str:
    return iso[5:16].replace("T", " ") if len(iso) >= 16 else iso


def _chart(title: str, labels: list[str], series: dict[str, list[Any]], *, bands: dict[str, tuple[list, list]] | None = None,
           zero: bool = False, css_class: str = "chart") -> str:
    """A line chart as an SVG element: one polyline per series over the x labels (time buckets),
    optional shaded bands (low, high) per series and a dashed line at 0."""
    bands = bands or {}
    values = [v for s in series.values() for v in s if v is not None]
    values += [v for low, high in bands.values() for v in (*low, *high) if v is not None]
    if zero:
        values.append(0.0)
    parts = [f'<svg class="{css_class}" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
             f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(title)}">',
             f'<text x="{_PAD_L}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']
    plot_w, plot_h = _W - _PAD_L - _PAD_R, _H - _PAD_T - _PAD_B
    parts.append(f'<rect x="{_PAD_L}" y="{_PAD_T}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>')
    if not values or not labels:
        parts.append(f'<text x="{_PAD_L + 10}" y="{_PAD_T + plot_h / 2}" font-size="13" fill="#777">no data yet</text>')
        parts.append("</svg>")
        return "".join(parts)
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - (abs(lo) or 1.0) * 0.1, hi + (abs(hi) or 1.0) * 0.1
    margin = (hi - lo) * 0.05
    lo, hi = lo - margin, hi + margin
    n = len(labels)

    def x(i: int) -> float:
        return _PAD_L + (plot_w * (i + 0.5) / n)

    def y(v: float) -> float:
        return _PAD_T + plot_h * (1 - (v - lo) / (hi - lo))

    for k in range(5):  # y ticks
        v = lo + (hi - lo) * k / 4
        parts.append(f'<line x1="{_PAD_L - 4}" x2="{_PAD_L + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{_PAD_L - 6}" y="{y(v) + 4:.1f}" font-size="10" text-anchor="end">{_num(v, 3)}</text>')
    for i in sorted({0, n // 2, n - 1}):  # x ticks
        parts.append(f'<text x="{x(i):.1f}" y="{_PAD_T + plot_h + 16}" font-size="10" text-anchor="middle">'
                     f'{escape(_short_time(labels[i]))}</text>')
    if zero and lo < 0 < hi:
        parts.append(f'<line class="zero" x1="{_PAD_L}" x2="{_PAD_L + plot_w}" y1="{y(0):.1f}" y2="{y(0):.1f}" '
                     'stroke="#333" stroke-dasharray="4 3"/>')
    names = list(series)
    for k, name in enumerate(names):
        colour = PALETTE[k % len(PALETTE)]
        if name in bands:
            low, high = bands[name]
            pts = [(i, lv, hv) for i, (lv, hv) in enumerate(zip(low, high)) if lv is not None and hv is not None]
            if pts:
                outline = [f"{x(i):.1f},{y(hv):.1f}" for i, _, hv in pts]
                outline += [f"{x(i):.1f},{y(lv):.1f}" for i, lv, _ in reversed(pts)]
                parts.append(f'<polygon class="band" data-series="{escape(name)}" points="{" ".join(outline)}" '
                             f'fill="{colour}" fill-opacity="0.18" stroke="{colour}" stroke-opacity="0.4"/>')
        pts = [f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(series[name]) if v is not None]
        if pts:
            parts.append(f'<polyline class="series" data-series="{escape(name)}" points="{" ".join(pts)}" fill="none" '
                         f'stroke="{colour}" stroke-width="2"/>')
        ly = _PAD_T + 14 + 18 * k
        parts.append(f'<rect x="{_PAD_L + plot_w + 12}" y="{ly - 9}" width="12" height="3" fill="{colour}"/>')
        parts.append(f'<text x="{_PAD_L + plot_w + 30}" y="{ly - 4}" font-size="11">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(headers: list[str], rows: list[list[str]], css_class: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _arms_table(analysis: dict[str, Any]) -> str:
    rows = []
    rmse = analysis.get("metric") == "rmse"
    for arm, s in (analysis.get("arms") or {}).items():
        role = "control" if arm == analysis.get("control") else "treatment"
        row = [escape(arm), role, _num(s.get("n")), _num(s.get("mean")),
               f"{_num(s.get('ci_low'))} .. {_num(s.get('ci_high'))}"]
        if rmse:
            row.append(_num(s.get("rmse")))
        rows.append(row)
    headers = ["variant", "role", "n", "mean", f"CI ({1 - float(analysis.get('alpha', 0.05)):.0%})"]
    return _table(headers + (["rmse"] if rmse else []), rows, "arms")


def _comparisons_table(analysis: dict[str, Any]) -> str:
    rows = []
    for c in analysis.get("comparisons") or []:
        r = c.get("result") or {}
        outcome = "failed" if c.get("failed") else ("significant" if c.get("significant") else "–")
        rows.append([
            escape(str(c.get("treatment"))), escape(str(c.get("role"))), escape(str(c.get("metric"))),
            escape(str(c.get("method"))), _num(r.get("effect")), f"{_num(r.get('ci_low'))} .. {_num(r.get('ci_high'))}",
            _num(r.get("p_value"), 3), _num(c.get("p_adjusted"), 3), outcome if "error" not in r else escape(str(r["error"])),
        ])
    if not rows:
        return ""
    return "<h2>Comparisons (treatment − control)</h2>" + _table(
        ["treatment", "role", "metric", "method", "effect", "CI", "p", "p (Holm)", "outcome"], rows, "comparisons")


def _bayes_table(analysis: dict[str, Any]) -> str:
    bayes = analysis.get("bayes")
    if not bayes:
        return ""
    if "error" in bayes:
        return f"<h2>Bayesian</h2><p>{escape(str(bayes['error']))}</p>"
    rows = [[escape(arm), _num(p, 4), _num((bayes.get("expected_loss") or {}).get(arm))]
            for arm, p in (bayes.get("prob_best") or {}).items()]
    return "<h2>Bayesian</h2>" + _table(["variant", "P(best)", "expected loss"], rows, "bayes")


def _srm_block(analysis: dict[str, Any]) -> str:
    srm = analysis.get("srm")
    if not srm:
        return "<h2>Sample ratio</h2><p>No requests logged yet.</p>"
    rows = [[escape(v), _num(n), _num((srm.get("expected") or {}).get(v), 5)] for v, n in (srm.get("observed") or {}).items()]
    status = "mismatch: unreliable" if srm.get("mismatch") else "as planned"
    return (f"<h2>Sample ratio</h2><p>chi-square p = {_num(srm.get('p_value'), 3)} ({escape(status)})</p>"
            + _table(["variant", "requests", "expected"], rows, "srm"))


def _sample_size_block(analysis: dict[str, Any]) -> str:
    size = analysis.get("sample_size")
    if not size:
        return ""
    return ("<h2>Sample size</h2><p>"
            f"{_num(size.get('required_per_arm'))} per arm to detect {_num(size.get('mde'))} at alpha "
            f"{_num(size.get('alpha'), 3)} with power {_num(size.get('power'), 3)} (baseline {_num(size.get('baseline'))}, "
            f"from {escape(str(size.get('baseline_from')))}).</p>")


def render(test: dict[str, Any], analysis: dict[str, Any], series: dict[str, Any]) -> str:
    """The page for ``test`` (its row), ``analysis`` (``ABTestService.analysis``) and ``series``
    (:func:`app.experiments.analysis.timeline`)."""
    verdict = str(analysis.get("verdict", ""))
    colour = VERDICT_COLOURS.get(verdict, "#7f7f7f")
    winner = analysis.get("winner")
    labels = series.get("buckets") or []
    metric = str(analysis.get("metric", ""))
    arms_chart = _chart(f"{metric} per variant (cumulative)", labels,
                        {arm: s.get("mean") or [] for arm, s in (series.get("arms") or {}).items()}, css_class="chart metric")
    seq_series = {f"{t} − {series.get('control')}": s.get("effect") or [] for t, s in (series.get("sequences") or {}).items()}
    seq_bands = {f"{t} − {series.get('control')}": (s.get("ci_low") or [], s.get("ci_high") or [])
                 for t, s in (series.get("sequences") or {}).items()}
    seq_chart = _chart(f"effect on {metric} with its mSPRT confidence sequence ({1 - float(analysis.get('alpha', 0.05)):.0%})",
                       labels, seq_series, bands=seq_bands, zero=True, css_class="chart sequence")
    reasons = "".join(f"<li>{escape(str(r))}</li>" for r in analysis.get("reasons") or [])
    title = f"A/B test {test.get('name', '')} on {test.get('endpoint', '')}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 960px; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; font-size: 13px; }}
th:first-child, td:first-child {{ text-align: left; }}
.verdict {{ display: inline-block; padding: .3em .8em; color: #fff; border-radius: 4px; font-weight: bold; }}
.meta {{ color: #555; font-size: 13px; }}
svg {{ display: block; margin: 1em 0; }}
</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="meta">id {escape(str(test.get('id', '')))} · {escape(str(test.get('status', '')))} · metric {escape(metric)} ·
method {escape(str(analysis.get('method', '')))} · alpha {_num(analysis.get('alpha'), 3)} ·
window {escape(str((analysis.get('window') or {}).get('since', '')))} .. {escape(str((analysis.get('window') or {}).get('until', '')))}</p>
<p><span id="verdict" class="verdict" style="background:{colour}">{escape(verdict)}</span>
{('winner: <b id="winner">' + escape(str(winner)) + '</b>') if winner else ''}
{'' if analysis.get('reliable', True) else ' <b>unreliable</b>'}</p>
<ul class="reasons">{reasons}</ul>
{arms_chart}
{seq_chart}
<h2>Arms</h2>
{_arms_table(analysis)}
{_comparisons_table(analysis)}
{_bayes_table(analysis)}
{_srm_block(analysis)}
{_sample_size_block(analysis)}
</body></html>
"""
