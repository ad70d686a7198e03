"""The HTML report of a monitor run (the drift report): one self-contained page rendered on the
server, in the manner of the A/B test report (``app.experiments.report``, whose helpers it
uses): charts as inline SVG written here, no script, nothing fetched, so it opens anywhere,
prints, and can be archived as one file.

It shows the dataset drift verdict, a table of every column's test, then per column the
reference and current distributions side by side (grouped bars per histogram bin or per
category), the prediction drift the same way, drift per segment, and the performance of the
window (measured with intervals, estimated by CBPE, and the two side by side). A run over a
thousand columns stays readable: the table lists them all, but only the drifted columns and the
first others get a plot, and the page says how many were left out. Every string that came from
a user or the data (endpoint, column names, categories, segment values, errors) is escaped."""

from __future__ import annotations

from html import escape
from typing import Any

from app.experiments.report import PALETTE, _chart, _num, _table

__all__ = ["render", "MAX_OTHER_PLOTS", "MAX_DRIFTED_PLOTS"]

MAX_OTHER_PLOTS = 50  # plots of columns that did not drift (the first in column order)
MAX_DRIFTED_PLOTS = 200  # plots of drifted columns (all of them, up to this)
_MAX_BARS = 40  # categories per plot: the largest by either share; the rest are named in a note
_REF, _CUR = PALETTE[0], PALETTE[4]
_W, _H = 720, 230
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 55, 20, 34, 58
_DRIFT_COLOURS = {True: "#d62728", False: "#2ca02c", None: "#7f7f7f"}


def _text(value: Any) -> str:
    return escape("" if value is None else str(value))


def _short(label: str, limit: int = 14) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _bars(title: str, plot: dict[str, Any]) -> str:
    """Grouped bars of the reference and current shares per bin (histogram: the bins between
    ``edges``) or per category, as an ``<svg class="dist">``."""
    kind = plot.get("type")
    ref = [float(v or 0.0) for v in plot.get("reference") or []]
    cur = [float(v or 0.0) for v in plot.get("current") or []]
    if kind == "histogram":
        edges = plot.get("edges") or []
        labels = [f"{_num(float(edges[i]), 3)}" for i in range(len(edges))] if edges else []
    else:
        labels = [str(x) for x in plot.get("labels") or []]
    n = min(len(ref), len(cur))
    note = ""
    order = list(range(n))
    if kind != "histogram" and n > _MAX_BARS:
        order = sorted(range(n), key=lambda i: -max(ref[i], cur[i]))[:_MAX_BARS]
        order.sort()
        note = f"{n - _MAX_BARS} smaller categories not shown"
    parts = [f'<svg class="dist" xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
             f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{escape(title)}">',
             f'<text x="{_PAD_L}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>']
    plot_w, plot_h = _W - _PAD_L - _PAD_R, _H - _PAD_T - _PAD_B
    parts.append(f'<rect x="{_PAD_L}" y="{_PAD_T}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>')
    for k, (name, colour) in enumerate((("reference", _REF), ("current", _CUR))):
        lx = _W - _PAD_R - 170 + 90 * k
        parts.append(f'<rect x="{lx}" y="8" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{lx + 14}" y="17" font-size="11">{name}</text>')
    if not order:
        parts.append(f'<text x="{_PAD_L + 10}" y="{_PAD_T + plot_h / 2}" font-size="13" fill="#777">no data</text></svg>')
        return "".join(parts)
    top = max(max(ref[i], cur[i]) for i in order) or 1.0
    top *= 1.08

    def y(v: float) -> float:
        return _PAD_T + plot_h * (1 - v / top)

    for k in range(5):
        v = top * k / 4
        parts.append(f'<line x1="{_PAD_L - 4}" x2="{_PAD_L + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>'
                     f'<text x="{_PAD_L - 6}" y="{y(v) + 4:.1f}" font-size="10" text-anchor="end">{v:.0%}</text>')
    slot = plot_w / len(order)
    bar = max(1.0, slot * 0.4)
    for j, i in enumerate(order):
        x0 = _PAD_L + slot * j + slot * 0.1
        for k, (share, colour, name) in enumerate(((ref[i], _REF, "reference"), (cur[i], _CUR, "current"))):
            parts.append(f'<rect class="{name}" x="{x0 + k * bar:.1f}" y="{y(share):.1f}" width="{bar:.1f}" '
                         f'height="{max(0.0, _PAD_T + plot_h - y(share)):.1f}" fill="{colour}">'
                         f'<title>{escape(labels[i] if i < len(labels) else str(i))}: {name} {share:.2%}</title></rect>')
    base = _PAD_T + plot_h
    if kind == "histogram" and labels:
        step = max(1, len(labels) // 8)
        for i in range(0, len(labels) - 1, step):
            x = _PAD_L + slot * i
            parts.append(f'<text x="{x:.1f}" y="{base + 14}" font-size="10" text-anchor="middle">{labels[i]}</text>')
        parts.append(f'<text x="{_PAD_L + plot_w:.1f}" y="{base + 14}" font-size="10" text-anchor="end">'
                     f'{labels[-1]}</text>')
    else:
        step = max(1, len(order) // 20)
        for j in range(0, len(order), step):
            i = order[j]
            x = _PAD_L + slot * (j + 0.5)
            label = labels[i] if i < len(labels) else str(i)
            parts.append(f'<text x="{x:.1f}" y="{base + 12}" font-size="10" text-anchor="end" '
                         f'transform="rotate(-35 {x:.1f} {base + 12})">{escape(_short(label))}</text>')
    if note:
        parts.append(f'<text x="{_PAD_L + plot_w}" y="{_H - 4}" font-size="10" text-anchor="end" fill="#777">'
                     f'{escape(note)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _verdict(drifted: Any) -> str:
    if drifted is None:
        return '<span class="muted">–</span>'
    return '<b class="bad">drift</b>' if drifted else '<span class="good">ok</span>'


def _column_row(name: str, col: dict[str, Any], anchor: str | None) -> str:
    label = f'<a href="#{anchor}">{escape(name)}</a>' if anchor else escape(name)
    verdict = _verdict(col.get("drifted")) if "error" not in col else f'<span class="muted">{_text(col["error"])}</span>'
    cells = [label, _text(col.get("kind")), _text(col.get("test")), _num(col.get("statistic")),
             _num(col.get("p_value"), 3), _num(col.get("p_adjusted"), 3), _num(col.get("threshold"), 3),
             _num(col.get("current_rows")), _num(col.get("current_missing")), verdict]
    css = ' class="drifted"' if col.get("drifted") else ""
    return f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _columns_block(drift: dict[str, Any]) -> tuple[str, str]:
    """(the table of every column, the plots of the chosen ones with the note of those left out)."""
    columns = drift.get("columns") or {}
    drifted = [n for n, c in columns.items() if c.get("drifted") and c.get("plot")]
    others = [n for n, c in columns.items() if not c.get("drifted") and c.get("plot")]
    plotted = drifted[:MAX_DRIFTED_PLOTS] + others[:MAX_OTHER_PLOTS]
    anchors = {name: f"col-{i}" for i, name in enumerate(plotted)}
    headers = ["column", "kind", "test", "statistic", "p-value", "p adjusted", "threshold", "current rows", "missing",
               "verdict"]
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(_column_row(name, col, anchors.get(name)) for name, col in columns.items())
    table = f'<table class="columns"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    plots = []
    for name in plotted:
        col = columns[name]
        title = f"{name} — {col.get('test', '')} {_num(col.get('statistic'))}" + (" (drift)" if col.get("drifted") else "")
        plots.append(f'<section class="feature" id="{anchors[name]}">{_bars(title, col["plot"])}</section>')
    left_out = len(drifted) + len(others) - len(plotted)
    unplottable = len(columns) - len(drifted) - len(others)
    notes = []
    if left_out:
        notes.append(f"{left_out:,} of {len(drifted) + len(others):,} columns have no plot here (the report plots every "
                     f"drifted column up to {MAX_DRIFTED_PLOTS} and the first {MAX_OTHER_PLOTS} others); the table lists "
                     "them all")
    if unplottable:
        notes.append(f"{unplottable:,} column(s) without a distribution to plot (see the table)")
    note = "".join(f'<p class="note" id="plots-left-out">{escape(n)}.</p>' for n in notes[:1])
    note += "".join(f'<p class="note">{escape(n)}.</p>' for n in notes[1:])
    return table, note + "".join(plots)


def _dataset_header(drift: dict[str, Any] | None) -> str:
    if not drift:
        return '<p><span id="dataset-drift" class="verdict" style="background:#7f7f7f">no drift result</span></p>'
    d = drift.get("dataset_drift") or {}
    detected = d.get("detected")
    words = "dataset drift detected" if detected else "no dataset drift"
    return (f'<p><span id="dataset-drift" class="verdict" data-detected="{"true" if detected else "false"}" '
            f'style="background:{_DRIFT_COLOURS.get(bool(detected))}">{words}</span> '
            f'<span class="share">{_num(d.get("drifted"))} of {_num(d.get("columns"))} columns drifted: share '
            f'{_num(d.get("share"), 3)} (threshold {_num(d.get("threshold"), 3)})</span> · correction '
            f'{_text(drift.get("correction", "none"))}</p>')


def _prediction_block(prediction: dict[str, Any] | None) -> str:
    if not prediction:
        return ""
    out = "<h2>Prediction drift</h2>" + _table(
        ["test", "statistic", "p-value", "p adjusted", "threshold", "verdict"],
        [[_text(prediction.get("test")), _num(prediction.get("statistic")), _num(prediction.get("p_value"), 3),
          _num(prediction.get("p_adjusted"), 3), _num(prediction.get("threshold"), 3),
          _verdict(prediction.get("drifted")) if "error" not in prediction else _text(prediction["error"])]],
        "prediction")
    if prediction.get("plot"):
        out += f'<section class="feature" id="prediction">{_bars("prediction", prediction["plot"])}</section>'
    return out


def _segments_block(segments: dict[str, Any]) -> str:
    rows = []
    for column, values in (segments or {}).items():
        for value, result in (values or {}).items():
            d = (result or {}).get("dataset_drift") or {}
            cols = (result or {}).get("columns") or {}
            names = ", ".join(n for n, c in cols.items() if c.get("drifted"))
            rows.append([escape(str(column)), escape(str(value)), _verdict(d.get("detected")), _num(d.get("share"), 3),
                         f'{_num(d.get("drifted"))} / {_num(d.get("columns"))}', escape(_short(names, 120))])
    if not rows:
        return ""
    return "<h2>Drift per segment</h2>" + _table(["segment", "value", "dataset drift", "share", "drifted",
                                                  "drifted columns"], rows, "segments")


def _metric_rows(metrics: dict[str, Any]) -> list[list[str]]:
    return [[escape(name), _num(m.get("value")), f'{_num((m.get("ci") or [None, None])[0])} .. '
             f'{_num((m.get("ci") or [None, None])[1])}', _num(m.get("n"))] for name, m in (metrics or {}).items()]


def _slices_table(header: str, slices: dict[str, Any], css_class: str) -> str:
    """One row per slice (variant, segment value): its rows, labelled rows and each metric with
    its interval; "–" where the slice had too few labels."""
    names: list[str] = []
    for s in slices.values():
        names += [k for k in (s.get("metrics") or {}) if k not in names]
    rows = []
    for value, s in slices.items():
        m = s.get("metrics") or {}
        rows.append([escape(str(value)), _num(s.get("rows")), _num(s.get("labelled_rows"))]
                    + [f'{_num(m[k].get("value"))} ({_num((m[k].get("ci") or [None, None])[0])} .. '
                       f'{_num((m[k].get("ci") or [None, None])[1])})' if k in m else "–" for k in names])
    return _table([header, "rows", "labelled", *names], rows, css_class)


def _performance_block(perf: dict[str, Any] | None) -> str:
    if not perf:
        return ""
    level = f'{float(perf.get("confidence", 0.95)):.0%}'
    parts = [f'<h2 id="performance">Performance</h2><p class="meta">{_num(perf.get("rows"))} predictions, '
             f'{_num(perf.get("labelled_rows"))} labelled</p>']
    overall = perf.get("overall") or {}
    if overall:
        parts.append("<h3>Measured (labelled rows)</h3>" + _table(["metric", "value", f"CI ({level})", "n"],
                                                                  _metric_rows(overall), "perf-overall"))
    else:
        parts.append("<p>No labelled rows yet: nothing measured.</p>")
    estimated = perf.get("estimated")
    if estimated:
        rows = [[escape(name), _num(m.get("value")), f'{_num(m["ci"][0])} .. {_num(m["ci"][1])}' if m.get("ci") else "–"]
                for name, m in estimated.items()]
        parts.append("<h3>Estimated by CBPE (all rows, labelled or not)</h3>"
                     + _table(["metric", "estimate", f"CI ({level})"], rows, "perf-estimated"))
    elif perf.get("estimated_error"):
        parts.append(f'<p class="note">No estimate: {_text(perf["estimated_error"])}</p>')
    comparison = perf.get("comparison") or {}
    if comparison:
        rows = [[escape(name), _num(c.get("estimated")), _num(c.get("measured")), _num(c.get("abs_error")), _num(c.get("n"))]
                for name, c in comparison.items()]
        parts.append("<h3>Estimated vs measured (labelled rows)</h3>"
                     + _table(["metric", "estimated", "measured", "|error|", "n"], rows, "perf-comparison"))
    if perf.get("variants"):
        parts.append("<h3>Per variant</h3>" + _slices_table("variant", perf["variants"], "perf-variants"))
    for column, values in (perf.get("segments") or {}).items():
        parts.append(f"<h3>Per {escape(str(column))}</h3>" + _slices_table(str(column), values, "perf-segments"))
    buckets = perf.get("buckets") or []
    if buckets:
        labels = [str(b.get("start", "")) for b in buckets]
        first = next((m for b in buckets for m in (b.get("metrics") or {})), None)
        metric = "accuracy" if any("accuracy" in (b.get("metrics") or {}) or "accuracy" in (b.get("estimated") or {})
                                   for b in buckets) else first
        if metric:
            def pick(source: str, field: str, index: int | None = None) -> list[Any]:
                out = []
                for b in buckets:
                    m = (b.get(source) or {}).get(metric) or {}
                    v = m.get(field)
                    out.append(v[index] if index is not None and v else v)
                return out

            series = {"measured": pick("metrics", "value")}
            bands = {"measured": (pick("metrics", "ci", 0), pick("metrics", "ci", 1))}
            if any(b.get("estimated") for b in buckets):
                series["estimated (CBPE)"] = pick("estimated", "value")
                bands["estimated (CBPE)"] = (pick("estimated", "ci", 0), pick("estimated", "ci", 1))
            parts.append(_chart(f"{metric} over time ({level} intervals)", labels, series, bands=bands,
                                css_class="chart perf"))
    return "".join(parts)


def render(run: dict[str, Any]) -> str:
    """The page of one monitor run: ``run`` holds ``id``, ``endpoint``, ``model``,
    ``model_version``, ``status``, ``created_at``, ``finished_at``, ``window`` (since, until,
    rows), ``drift`` (the drift result, or None), ``prediction_drift`` (one column's result),
    ``segments`` (column -> value -> drift result), ``performance``
    (``app.monitoring.performance.performance_report``) and ``error``."""
    drift = run.get("drift")
    window = run.get("window") or {}
    title = f"Drift report: {run.get('endpoint', '')}"
    table, plots = _columns_block(drift) if drift else ("", "")
    error = f'<p class="error" id="run-error">{_text(run["error"])}</p>' if run.get("error") else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: right; font-size: 13px; }}
th:first-child, td:first-child {{ text-align: left; }}
tr.drifted td {{ background: #fde8e8; }}
.verdict {{ display: inline-block; padding: .3em .8em; color: #fff; border-radius: 4px; font-weight: bold; }}
.meta, .note {{ color: #555; font-size: 13px; }}
.bad {{ color: #d62728; }} .good {{ color: #2ca02c; }} .muted {{ color: #777; }}
.error {{ color: #d62728; font-weight: bold; }}
svg {{ display: block; margin: .6em 0; }}
</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="meta">run {_text(run.get('id'))} · {_text(run.get('status'))} · model {_text(run.get('model'))}
version {_text(run.get('model_version'))} · window {_text(window.get('since'))} .. {_text(window.get('until'))}
({_num(window.get('rows'))} rows) · created {_text(run.get('created_at'))} · finished {_text(run.get('finished_at'))}</p>
{error}
{_dataset_header(drift)}
<h2>Columns</h2>
{table or '<p>No drift result.</p>'}
<h2>Distributions: reference vs current</h2>
{plots or '<p>No distributions to show.</p>'}
{_prediction_block(run.get('prediction_drift'))}
{_segments_block(run.get('segments') or {})}
{_performance_block(run.get('performance'))}
</body></html>
"""
