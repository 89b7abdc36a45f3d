"""HTML building blocks and the page: formatting, tables, figures, sections, assets inlined."""

from __future__ import annotations

import functools
import html
import math

import plotly.graph_objects as go
import plotly.io as pio

#: Above this many classes the confusion matrix drops its tick labels and the per-class
#: report is collapsed; names stay available on hover.
MANY_CLASSES = 30
#: Colours of the top trials' learning curves (pruned ones are grey).
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
PLOT_CONFIG = {"displaylogo": False, "responsive": True}


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def fmt_pct(value) -> str:
    return "—" if missing(value) else f"{value:.1%}"


def fmt_num(value, digits: int = 4) -> str:
    return "—" if missing(value) else f"{value:.{digits}f}"


def fmt_duration(seconds: float | None) -> str:
    if missing(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def rounded(values, digits: int = 4) -> list:
    return [None if missing(v) else round(float(v), digits) for v in values]


def cell(value, text: str | None = None) -> str:
    """A table cell; numbers carry a ``data-sort`` key so the column sorts numerically."""
    shown = esc(text if text is not None else value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not missing(value):
        return f'<td data-sort="{value}">{shown}</td>'
    return f"<td>{shown}</td>"


def table(columns: list[str], rows: list[list[str]], sortable: bool = True, cls: str = "") -> str:
    """An HTML table from header labels and rows of ``cell()`` strings; click a header to sort."""
    classes = " ".join(c for c in ("sortable" if sortable else "", cls) if c)
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<table class="{classes}"><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{esc(title)}</h2>\n{body}\n</section>'


def figure(fig: go.Figure, name: str, height: int | None = None) -> str:
    """A plotly figure as a div (plotly.js is included once, at the top of the page)."""
    top = 90 if fig.layout.annotations else 50  # room for subplot titles under the figure title
    fig.update_layout(
        font={"size": 12}, margin={"l": 60, "r": 20, "t": top, "b": 50}, **({"height": height} if height else {})
    )
    spec = fig.to_plotly_json()
    spec["layout"]["template"] = _template()  # what template="plotly_white" writes, without validating it per figure
    div = pio.to_html(
        spec, validate=False, full_html=False, include_plotlyjs=False, config=PLOT_CONFIG, div_id=f"fig-{name}"
    )
    return f'<div class="figure" data-figure="{esc(name)}">{div}</div>'


@functools.cache
def _template() -> dict:
    return pio.templates["plotly_white"].to_plotly_json()
