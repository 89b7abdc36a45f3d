"""The study report: one self-contained HTML page rebuilt from the Optuna storage alone.

    python -m flows.report --study demo                       # -> studies/demo/report.html
    python -m flows.report --study cars --storage postgresql://user:pw@host/optuna --out cars.html

The page answers "what should I unfreeze, for how long, at what rate, on how much data": a
header (dataset, weights, device, time, data problems, the command that reproduces the
study), findings computed from the trials, the best trials, the best trial on the holdout
(confusion matrix, confused pairs, per-class scores), learning curves, the effect of each
searched dimension, Optuna's own plots and misclassified holdout images.

Everything comes from what ``study.py`` stores (see its module docstring); the only file read
besides the storage is the optional decode cache, for thumbnails. plotly.js is included once,
inline, so the page opens offline from ``file://`` and can be mailed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import optuna
import plotly.graph_objects as go
import plotly.offline
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots

from .metrics import normalize_rows, top_confused_pairs

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

log = logging.getLogger(__name__)

#: Best trials shown when the stored config has no ``report_top_k``.
DEFAULT_TOP_K = 5
#: Above this many classes the confusion matrix drops its tick labels and the per-class
#: report is collapsed; names stay available on hover.
MANY_CLASSES = 30
#: Misclassified holdout images shown, and their longest side in pixels (PNG, base64).
MAX_THUMBS = 24
THUMB_PX = 112
#: Searched dimensions with a dedicated effect plot, in display order.
CORE_DIMENSIONS = ("unfreeze_depth", "train_ratio", "lr", "epochs")
#: Colours of the top trials' learning curves (pruned ones are grey).
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
#: Blues with steep low stops, so that a 5% confusion stays visible next to a 90% diagonal.
CONFUSION_COLORS = [[0.0, "#ffffff"], [0.02, "#deebf7"], [0.1, "#9ecae1"], [0.3, "#4292c6"], [0.6, "#2171b5"], [1.0, "#08306b"]]


# --------------------------------------------------------------------------- loading


@dataclass
class StudyData:
    """What the report needs from one study, read once from the storage."""

    study: optuna.Study
    config: dict
    dataset: dict
    attrs: dict
    trials: list[FrozenTrial]
    top: list[FrozenTrial] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.study.study_name

    def of_state(self, *states: TrialState) -> list[FrozenTrial]:
        return [t for t in self.trials if t.state in states]

    @property
    def complete(self) -> list[FrozenTrial]:
        return [t for t in self.of_state(TrialState.COMPLETE) if t.value is not None and math.isfinite(t.value)]

    @property
    def objective(self) -> str:
        return self.config.get("study", {}).get("objective", "val_accuracy")

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.get("class_names") or [])

    def param(self, trial: FrozenTrial, key: str):
        """A trial's value of ``key``: searched, else the study's fixed ``[train]`` setting."""
        return trial.params.get(key, self.config.get("train", {}).get(key))

    def searched(self) -> list[str]:
        """Searched dimensions in study-file order (then any others the trials show)."""
        keys = list(self.config.get("search", {}))
        for t in self.trials:
            keys += [k for k in t.params if k not in keys]
        return keys


def open_study(storage_url: str, study_name: str) -> optuna.Study:
    """Load a study for reading.

    Raises:
        FileNotFoundError: a SQLite storage file does not exist (it would be created empty).
        ValueError: the storage has no study of that name (the message lists the ones it has).
    """
    if storage_url.startswith("sqlite:///") and storage_url != "sqlite:///:memory:":
        path = Path(storage_url.removeprefix("sqlite:///")).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no Optuna storage at {path} (from {storage_url})")
    try:
        return optuna.load_study(study_name=study_name, storage=storage_url)
    except KeyError:
        names = optuna.study.get_all_study_names(storage=storage_url)
        raise ValueError(f"no study {study_name!r} in {storage_url}; it has: {', '.join(names) or 'no studies'}") from None


def load_data(study: optuna.Study) -> StudyData:
    attrs = dict(study.user_attrs)
    data = StudyData(
        study=study,
        config=attrs.get("config") or {},
        dataset=attrs.get("dataset") or {},
        attrs=attrs,
        trials=study.get_trials(deepcopy=False),
    )
    k = int(data.config.get("study", {}).get("report_top_k") or DEFAULT_TOP_K)
    data.top = sorted(data.complete, key=lambda t: (-t.value, t.number))[:k]
    return data


def default_path(data: StudyData) -> Path:
    """``<config.study.output_dir>/<name>/report.html`` (``studies/`` when the config is missing)."""
    return Path(data.config.get("study", {}).get("output_dir") or "studies") / data.name / "report.html"


def build_report(storage_url: str, study_name: str, out: str | Path | None = None) -> Path:
    """Write the study's self-contained HTML report and return its path.

    Args:
        storage_url: any Optuna storage URL, e.g. ``sqlite:///studies/optuna.db``.
        study_name: the Optuna study name.
        out: where to write; default ``<output_dir>/<name>/report.html`` from the stored config.
    """
    data = load_data(open_study(storage_url, study_name))
    page = render(data, storage_url)
    path = Path(out) if out else default_path(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    log.info("report of study %r written to %s (%.1f MB)", study_name, path, len(page.encode()) / 1e6)
    return path


# --------------------------------------------------------------------------- formatting


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def fmt_pct(value) -> str:
    return "—" if missing(value) else f"{value:.1%}"


def fmt_num(value, digits: int = 4) -> str:
    return "—" if missing(value) else f"{value:.{digits}f}"


def fmt_param(value) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if abs(value) < 1e-2 and value != 0 else f"{value:.3g}"
    return "—" if value is None else str(value)


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


def figure(fig: go.Figure, name: str, height: int | None = None) -> str:
    """A plotly figure as a div (plotly.js is included once, at the top of the page)."""
    top = 90 if fig.layout.annotations else 50  # room for subplot titles under the figure title
    fig.update_layout(template="plotly_white", font={"size": 12}, margin={"l": 60, "r": 20, "t": top, "b": 50})
    if height:
        fig.update_layout(height=height)
    div = fig.to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG, div_id=f"fig-{name}")
    return f'<div class="figure" data-figure="{esc(name)}">{div}</div>'


def section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{esc(title)}</h2>\n{body}\n</section>'


# --------------------------------------------------------------------------- header


def trial_seconds(trial: FrozenTrial) -> float:
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return float(trial.user_attrs.get("train_seconds") or 0.0)


def study_time(data: StudyData) -> str:
    """Wall-clock span of all trials, and the summed time of the trials themselves."""
    starts = [t.datetime_start for t in data.trials if t.datetime_start]
    ends = [t.datetime_complete for t in data.trials if t.datetime_complete]
    if not starts or not ends:
        return "—"
    span = max(ends) - min(starts)
    summed = sum(trial_seconds(t) for t in data.trials)
    return f"{fmt_duration(span / timedelta(seconds=1))} wall clock; {fmt_duration(summed)} in trials"


def state_counts(data: StudyData) -> str:
    counts = {s: len(data.of_state(s)) for s in TrialState}
    parts = [f"{counts[TrialState.COMPLETE]} complete", f"{counts[TrialState.PRUNED]} pruned", f"{counts[TrialState.FAIL]} failed"]
    parts += [f"{n} {s.name.lower()}" for s, n in counts.items() if n and s in (TrialState.RUNNING, TrialState.WAITING)]
    return ", ".join(parts)


def weights_info(data: StudyData) -> tuple[str, str | None]:
    """(what the backbone held, a warning when it was not pretrained or had to fall back)."""
    w = data.attrs.get("weights") or {}
    used = w.get("used") or next((t.user_attrs["weights"] for t in data.trials if "weights" in t.user_attrs), None)
    used = used or data.config.get("train", {}).get("weights", "unknown")
    requested = w.get("requested") or data.config.get("train", {}).get("weights")
    text = f"{used}" + (f" (requested: {requested})" if requested and requested != used else "")
    warn = w.get("warning")
    if used == "none":
        warn = (warn + " " if warn else "") + (
            "The backbone was NOT pretrained (random initialisation): these results say nothing about "
            "transfer from ImageNet."
        )
    return text, warn


def devices(data: StudyData) -> str:
    seen = [r.get("device") for r in data.attrs.get("runs", [])] + [t.user_attrs.get("device") for t in data.trials]
    return ", ".join(dict.fromkeys(d for d in seen if d)) or "—"


def split_text(data: StudyData) -> str:
    ds = data.dataset
    text = f"{ds.get('num_images', '—')} images: pool {ds.get('pool_images', '—')} (train + validation), holdout {ds.get('holdout_images', '—')}"
    if data.top and data.top[0].user_attrs.get("split_sizes"):
        s = data.top[0].user_attrs["split_sizes"]
        text += f"; best trial: train {s.get('train')}, validation {s.get('val')}"
    return text


def problems_html(data: StudyData) -> str:
    problems = data.dataset.get("problems") or []
    notes = data.dataset.get("warnings") or []
    parts = [f'<p class="warn">{esc(w)}</p>' for w in notes]
    if not problems:
        return "".join(parts) + "<p>No problem files found at preparation.</p>"
    rows = [[cell(p[0]), cell(p[1])] for p in problems]
    opened = " open" if len(problems) <= 10 else ""
    parts.append(f"<details{opened}><summary>{len(problems)} file(s) skipped at preparation</summary>{table(['file', 'reason'], rows)}</details>")
    return "".join(parts)


def header_section(data: StudyData, storage_url: str) -> str:
    ds = data.dataset
    weights, weights_warning = weights_info(data)
    rows = [
        ("dataset", f"{ds.get('path', data.config.get('data', {}).get('path', '—'))} ({ds.get('source', '—')})"),
        ("classes", ds.get("num_classes", len(data.class_names) or "—")),
        ("images per split", split_text(data)),
        ("holdout protocol", ds.get("holdout_protocol", "—")),
        ("image size", f"{ds.get('image_size', '—')} px"),
        ("weights", weights),
        ("device", devices(data)),
        ("objective", f"maximise {data.objective} on the validation split"),
        ("total study time", study_time(data)),
        ("trials", state_counts(data)),
        ("runs", len(data.attrs.get("runs", []))),
    ]
    facts = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    warn = f'<p class="warn" id="weights-warning">{esc(weights_warning)}</p>' if weights_warning else ""
    command = data.attrs.get("command") or "(not recorded)"
    rebuild = f"python -m flows.report --study {data.name} --storage {storage_url}"
    body = (
        f'{warn}<table class="facts">{facts}</table>'
        f"<h3>Data problems found at preparation</h3>{problems_html(data)}"
        f"<h3>Reproduce</h3><p>The study:</p><pre><code>{esc(command)}</code></pre>"
        f"<p>This report:</p><pre><code>{esc(rebuild)}</code></pre>"
    )
    return section("header", f"Study {data.name}", body)


# --------------------------------------------------------------------------- best trials


def best_trials_section(data: StudyData) -> str:
    if not data.top:
        return section("best-trials", "Best trials", note("No complete trial yet."))
    params = [k for k in data.searched() if any(k in t.params for t in data.top)]
    holdout = data.attrs.get("holdout_top") or {}
    columns = ["rank", "trial", *params, "val acc", "val macro-F1", "holdout acc", "holdout macro-F1", "holdout top-5", "epochs run", "training time", "images/s"]
    rows = []
    for rank, t in enumerate(data.top, 1):
        h = holdout.get(str(t.number)) or {}
        ua = t.user_attrs
        rows.append([
            cell(rank), cell(t.number, f"#{t.number}"),
            *(cell(t.params.get(k), fmt_param(t.params.get(k))) for k in params),
            cell(ua.get("val_accuracy"), fmt_pct(ua.get("val_accuracy"))),
            cell(ua.get("val_macro_f1"), fmt_num(ua.get("val_macro_f1"))),
            cell(h.get("accuracy"), fmt_pct(h.get("accuracy"))),
            cell(h.get("macro_f1"), fmt_num(h.get("macro_f1"))),
            cell(h.get("top5"), fmt_pct(h.get("top5"))),
            cell(len(ua.get("history", []))),
            cell(ua.get("train_seconds"), fmt_duration(ua.get("train_seconds"))),
            cell(ua.get("images_per_s"), fmt_num(ua.get("images_per_s"), 0)),
        ])
    hint = "<p class=\"hint\">Click a column header to sort. Holdout scores exist for the trials whose checkpoints were kept.</p>"
    return section("best-trials", f"Best {len(data.top)} trials", hint + table(columns, rows))


# --------------------------------------------------------------------------- holdout


def names_for(data: StudyData, n: int) -> list[str]:
    names = data.class_names
    return names if len(names) == n else [f"class {i}" for i in range(n)]


def confusion_figure(confusion: np.ndarray, names: list[str]) -> go.Figure:
    """Row-normalised confusion matrix; names on hover, tick labels only for few classes."""
    n = len(names)
    z = np.round(normalize_rows(confusion), 3)
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=names, y=names, customdata=confusion.astype(int).tolist(),
        colorscale=CONFUSION_COLORS, zmin=0, zmax=1, colorbar={"title": {"text": "share", "side": "right"}, "tickformat": ".0%"},
        hovertemplate="true: %{y}<br>predicted: %{x}<br>%{z:.1%} of the true class (%{customdata} images)<extra></extra>",
    ))
    few = n <= MANY_CLASSES
    fig.update_xaxes(title="predicted class", showticklabels=few, tickangle=-45, constrain="domain")
    fig.update_yaxes(title="true class", showticklabels=few, autorange="reversed", scaleanchor="x", constrain="domain")
    fig.update_layout(title=f"Confusion matrix, row-normalised ({n} classes{'; hover for names' if not few else ''})")
    return fig


def f1_figure(f1: np.ndarray, names: list[str]) -> go.Figure:
    """Per-class F1: every class when few, else the worst and the best 20."""
    order = np.argsort(f1, kind="stable")
    groups = [("per-class F1", order)] if len(order) <= 40 else [("worst 20", order[:20]), ("best 20", order[-20:])]
    titles = [g[0] for g in groups] if len(groups) > 1 else None
    fig = make_subplots(rows=1, cols=len(groups), subplot_titles=titles, horizontal_spacing=0.3)
    for col, (_, idx) in enumerate(groups, 1):
        fig.add_trace(go.Bar(
            x=rounded(f1[idx], 3), y=[names[i] for i in idx], orientation="h", marker_color=PALETTE[col - 1],
            showlegend=False, hovertemplate="%{y}: F1 %{x:.3f}<extra></extra>",
        ), row=1, col=col)
        fig.update_xaxes(range=[0, 1], title="F1", row=1, col=col)
        fig.update_yaxes(automargin=True, tickfont={"size": 10}, row=1, col=col)
    fig.update_layout(title="Per-class F1 on the holdout", bargap=0.2)
    return fig


def class_report(holdout: dict, names: list[str]) -> str:
    rows = [
        [cell(name), cell(p, fmt_num(p, 3)), cell(r, fmt_num(r, 3)), cell(f, fmt_num(f, 3)), cell(int(s))]
        for name, p, r, f, s in zip(names, holdout["precision"], holdout["recall"], holdout["f1"], holdout["support"])
    ]
    tab = table(["class", "precision", "recall", "F1", "support"], rows, cls="compact")
    opened = "" if len(names) > MANY_CLASSES else " open"
    return f"<details{opened}><summary>Classification report: precision, recall, F1 and support of all {len(names)} classes</summary>{tab}</details>"


def confused_pairs_table(holdout: dict, confusion: np.ndarray, names: list[str]) -> str:
    pairs = holdout.get("confused_pairs") or top_confused_pairs(confusion, names, 20)
    if not pairs:
        return note("No confusions: every holdout image was classified correctly.")
    rows = [[cell(p["true"]), cell(p["predicted"]), cell(p["count"]), cell(p["share"], fmt_pct(p["share"]))] for p in pairs[:20]]
    return table(["true class", "predicted as", "images", "share of true class"], rows)


def holdout_section(data: StudyData) -> str:
    holdout = data.attrs.get("holdout")
    if not holdout or "confusion" not in holdout:
        return section("holdout", "Best trial on the holdout", note(
            "No holdout scores stored: the study has no holdout, or no checkpoint was kept to score."))
    confusion = np.asarray(holdout["confusion"], dtype=np.int64)
    names = names_for(data, len(confusion))
    summary = (
        f"<p>Trial <b>#{holdout.get('trial')}</b> scored on {int(confusion.sum())} holdout images: "
        f"accuracy <b>{fmt_pct(holdout.get('accuracy'))}</b>, top-5 {fmt_pct(holdout.get('top5'))}, "
        f"macro-F1 <b>{fmt_num(holdout.get('macro_f1'))}</b>, weighted F1 {fmt_num(holdout.get('weighted_f1'))}.</p>"
    )
    height = 700 if len(names) > MANY_CLASSES else max(420, 28 * len(names) + 180)
    f1 = np.asarray(holdout["f1"], dtype=float)
    body = (
        summary
        + figure(confusion_figure(confusion, names), "confusion", height)
        + "<h3>Most confused class pairs</h3>" + confused_pairs_table(holdout, confusion, names)
        + figure(f1_figure(f1, names), "per-class-f1", 22 * min(len(names), 40 if len(names) <= 40 else 20) + 140)
        + class_report(holdout, names)
    )
    return section("holdout", "Best trial on the holdout", body)


# --------------------------------------------------------------------------- learning curves


def curves_section(data: StudyData) -> str:
    pruned = [t for t in data.of_state(TrialState.PRUNED) if t.user_attrs.get("history")]
    shown = [t for t in data.top if t.user_attrs.get("history")]
    if not shown and not pruned:
        return section("curves", "Learning curves", note("No trial has an epoch history yet."))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "validation accuracy"))
    for t in pruned:
        add_curves(fig, t, color="#9e9e9e", opacity=0.35, group="pruned", label="pruned trials", first=t is pruned[0])
    for i, t in enumerate(shown):
        add_curves(fig, t, color=PALETTE[i % len(PALETTE)], opacity=1.0, group=f"t{t.number}",
                   label=f"#{t.number} (depth {data.param(t, 'unfreeze_depth')})", first=True)
    fig.update_xaxes(title="epoch", dtick=1)
    fig.update_yaxes(title="loss (log)", type="log", row=1, col=1)  # a diverging trial would flatten the rest
    fig.update_yaxes(title="accuracy", tickformat=".0%", range=[0, 1.02], row=1, col=2)
    fig.update_layout(title=f"Top {len(shown)} trials; {len(pruned)} pruned trial(s) in grey")
    return section("curves", "Learning curves", figure(fig, "learning-curves", 430))


def add_curves(fig: go.Figure, trial: FrozenTrial, color: str, opacity: float, group: str, label: str, first: bool) -> None:
    history = trial.user_attrs["history"]
    epochs = [h["epoch"] for h in history]
    for col, key in ((1, "train_loss"), (2, "val_acc")):
        fig.add_trace(go.Scatter(
            x=epochs, y=rounded([h.get(key) for h in history]), mode="lines+markers", name=label,
            legendgroup=group, showlegend=first and col == 1, opacity=opacity,
            line={"color": color, "width": 2 if opacity == 1 else 1}, marker={"size": 5},
            hovertemplate=f"trial #{trial.number}<br>epoch %{{x}}<br>{key} %{{y:.4f}}<extra></extra>",
        ), row=1, col=col)


# --------------------------------------------------------------------------- effects


def least_squares(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """(slope, intercept, R²) of a straight-line fit, or None with too few distinct points."""
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 0.0
    return float(slope), float(intercept), r2


def effects_section(data: StudyData) -> str:
    trials = data.complete
    if not trials:
        return section("effects", "Effects of each searched dimension", note("No complete trial yet."))
    fig = make_subplots(rows=2, cols=2, subplot_titles=[f"{data.objective} vs {d}" for d in CORE_DIMENSIONS],
                        vertical_spacing=0.15, horizontal_spacing=0.08)
    y = np.array([t.value for t in trials])
    for i, dim in enumerate(CORE_DIMENSIONS):
        row, col = divmod(i, 2)
        add_effect(fig, data, dim, trials, y, row + 1, col + 1)
    fig.update_yaxes(title=data.objective)
    fig.update_layout(showlegend=False, title=f"{len(trials)} complete trials (pruned trials have no final value)")
    return section("effects", "Effects of each searched dimension", figure(fig, "effects", 760))


def add_effect(fig: go.Figure, data: StudyData, dim: str, trials: list[FrozenTrial], y: np.ndarray, row: int, col: int) -> None:
    x = [data.param(t, dim) for t in trials]
    text = [f"#{t.number}" for t in trials]
    searched = any(dim in t.params for t in trials)
    hover = f"trial %{{text}}<br>{dim} %{{x}}<br>{data.objective} %{{y:.4f}}<extra></extra>"
    if dim in ("unfreeze_depth", "epochs"):
        fig.add_trace(go.Box(x=x, y=rounded(y), text=text, boxpoints="all", jitter=0.4, pointpos=0,
                             marker_color=PALETTE[0], hovertemplate=hover), row=row, col=col)
        order = sorted({v for v in x if v is not None})  # numeric order: 10 after 9
        fig.update_xaxes(type="category", categoryorder="array", categoryarray=order, row=row, col=col)
    else:
        fig.add_trace(go.Scatter(x=rounded(x, 6), y=rounded(y), text=text, mode="markers",
                                 marker={"color": PALETTE[0], "size": 8}, hovertemplate=hover), row=row, col=col)
    if dim == "lr":
        fig.update_xaxes(type="log", row=row, col=col)
    if dim == "train_ratio":
        add_trend(fig, np.array(x, dtype=float), y, row, col)
    fig.update_xaxes(title=dim + ("" if searched else " (not searched)"), row=row, col=col)


def add_trend(fig: go.Figure, x: np.ndarray, y: np.ndarray, row: int, col: int) -> None:
    keep = np.isfinite(x)
    x, y = x[keep], y[keep]
    fit = least_squares(x, y)
    if fit is None:
        return
    slope, intercept, r2 = fit
    xs = np.array([x.min(), x.max()])
    fig.add_trace(go.Scatter(
        x=rounded(xs), y=rounded(slope * xs + intercept), mode="lines", line={"color": PALETTE[1], "dash": "dash"},
        hovertemplate=f"least-squares trend: slope {slope:+.3f} per unit, R² {r2:.2f}<extra></extra>",
    ), row=row, col=col)


# --------------------------------------------------------------------------- optuna plots


def optuna_section(data: StudyData) -> str:
    from optuna import visualization as vis

    plots = [
        ("optimization-history", "optimisation history", lambda: vis.plot_optimization_history(data.study), 420),
        ("param-importances", "parameter importances", lambda: importances(data), 360),
        ("parallel-coordinates", "parallel coordinates", lambda: vis.plot_parallel_coordinate(data.study), 460),
        ("slice", "slice plot", lambda: vis.plot_slice(data.study), 420),
    ]
    parts = []
    for name, title, make, height in plots:
        try:
            fig = make()
        except Exception as exc:  # Optuna raises several kinds for thin or degenerate studies
            log.info("optuna %s not drawn: %s", title, exc)
            parts.append(note(f"Optuna's {title} could not be drawn: {type(exc).__name__}: {exc}"))
            continue
        parts.append(figure(fig, name, height))
    return section("optuna", "Optuna's view of the search", "".join(parts))


def importances(data: StudyData) -> go.Figure:
    if len(data.complete) < 2:
        raise ValueError(f"parameter importances need at least 2 complete trials (the study has {len(data.complete)})")
    from optuna import visualization as vis

    with warnings.catch_warnings():  # "importances will be equal" when the trials cannot separate them
        warnings.simplefilter("ignore", UserWarning)
        return vis.plot_param_importances(data.study)


# --------------------------------------------------------------------------- misclassified


def thumbnail(image: np.ndarray) -> str:
    """A base64 PNG data URI of one ``(S, S, 3)`` uint8 image, at most THUMB_PX on a side."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image))
    img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def open_cache(cache_dir: str | None) -> tuple[np.ndarray | None, list[str], str]:
    """(memory-mapped images, file paths, why not) of the decode cache."""
    if not cache_dir:
        return None, [], "the study did not record where its decode cache is"
    folder = Path(cache_dir)
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        return None, [], f"the decode cache {folder} is gone or unreadable ({type(exc).__name__})"
    try:
        paths = json.loads((folder / "meta.json").read_text()).get("paths", [])
    except (OSError, ValueError):
        paths = []
    return images, paths, ""


def misclassified_section(data: StudyData) -> str:
    title = "Misclassified holdout images"
    wrong = (data.attrs.get("holdout") or {}).get("misclassified")
    if wrong is None:
        return section("misclassified", title, note("No holdout scores stored, so no misclassified examples."))
    if not wrong:
        return section("misclassified", title, note("The best trial classified every holdout image correctly."))
    images, paths, why = open_cache(data.dataset.get("cache_dir"))
    if images is None:
        return section("misclassified", title, note(f"Thumbnails unavailable: {why}. Rebuild the cache by preparing the dataset again."))
    names = data.class_names
    chosen = sorted(wrong, key=lambda w: -w.get("p", 0.0))[:MAX_THUMBS]  # the most confident mistakes first
    tiles = [thumb_tile(images, paths, names, w) for w in chosen if 0 <= w["row"] < len(images)]
    intro = (
        f"<p>The {len(tiles)} most confident of the {len(wrong)} recorded mistakes of trial "
        f"#{data.attrs['holdout'].get('trial')}, as the network saw them (predicted-class probability in brackets).</p>"
    )
    return section("misclassified", title, intro + '<div class="thumbs">' + "".join(tiles) + "</div>")


def thumb_tile(images: np.ndarray, paths: list[str], names: list[str], wrong: dict) -> str:
    label = lambda i: names[i] if 0 <= i < len(names) else f"class {i}"  # noqa: E731
    row = wrong["row"]
    path = paths[row] if row < len(paths) else f"row {row}"
    prob = f" ({wrong['p']:.0%})" if "p" in wrong else ""
    return (
        f'<figure title="{esc(path)}"><img src="{thumbnail(images[row])}" alt="{esc(label(wrong["true"]))}">'
        f'<figcaption><span class="ok">true: {esc(label(wrong["true"]))}</span><br>'
        f'<span class="bad">predicted: {esc(label(wrong["pred"]))}{prob}</span></figcaption></figure>'
    )


# --------------------------------------------------------------------------- findings


def depth_finding(data: StudyData) -> str:
    best: dict = {}
    for t in data.complete:
        d = data.param(t, "unfreeze_depth")
        best[d] = max(best.get(d, -math.inf), t.value)
    if not best:
        return "Unfreeze depth: no complete trial yet."
    ranked = sorted(best.items(), key=lambda kv: -kv[1])
    counts = {d: sum(1 for t in data.complete if data.param(t, "unfreeze_depth") == d) for d in best}
    if len(ranked) == 1:
        d, v = ranked[0]
        return f"Unfreeze depth: only depth {d} has complete trials ({counts[d]}, best {data.objective} {v:.4f}); no comparison possible."
    (d1, v1), (d2, v2) = ranked[:2]
    if v1 == v2:
        tied = [str(d) for d, v in ranked if v == v1]
        return f"Unfreeze depth: depths {', '.join(tied)} tied at {data.objective} {v1:.4f}; the trials do not separate them."
    return (
        f"Unfreeze depth: depth <b>{d1}</b> did best ({data.objective} {v1:.4f}, best of {counts[d1]} trial(s)), "
        f"{v1 - v2:+.4f} ({(v1 - v2) * 100:+.1f} points) over the runner-up depth {d2} ({v2:.4f}, best of {counts[d2]})."
    )


def data_finding(data: StudyData) -> str:
    trials = data.complete
    x = np.array([data.param(t, "train_ratio") or np.nan for t in trials], dtype=float)
    y = np.array([t.value for t in trials], dtype=float)
    keep = np.isfinite(x)
    fit = least_squares(x[keep], y[keep])
    if fit is None:
        return f"Training data: not enough complete trials with different train_ratio to fit a trend ({int(keep.sum())})."
    slope, _, r2 = fit
    verdict = "made no measurable difference" if abs(slope) < 0.005 else ("helped" if slope > 0 else "did not help")
    strength = "weak evidence" if r2 < 0.1 else ("moderate evidence" if r2 < 0.5 else "clear trend")
    return (
        f"Training data: more training data <b>{verdict}</b>: the least-squares slope of {data.objective} over "
        f"train_ratio is {slope:+.3f} per unit, i.e. {slope * 10:+.1f} points per +0.1 of the pool "
        f"({int(keep.sum())} trials, R² {r2:.2f}: {strength}). A larger train_ratio also leaves a smaller, noisier validation split."
    )


def rate_finding(data: StudyData) -> str:
    ranked = sorted(data.complete, key=lambda t: -t.value)
    rates = [data.param(t, "lr") for t in ranked[: max(1, len(ranked) // 4)]]
    rates = [r for r in rates if isinstance(r, (int, float))]
    if not rates:
        return "Learning rate: no complete trial yet."
    return f"Learning rate: the best {len(rates)} trial(s) used lr between {min(rates):.2e} and {max(rates):.2e} (best trial: {rates[0]:.2e})."


def epochs_finding(data: StudyData) -> str:
    if not data.top:
        return "Epochs: no complete trial yet."
    t = data.top[0]
    planned, run = data.param(t, "epochs"), len(t.user_attrs.get("history", []))
    best_epoch = t.user_attrs.get("best_epoch")
    peak = f"; its validation score peaked at epoch {best_epoch}" if best_epoch else ""
    hint = " (later epochs did not improve it: fewer epochs would do)" if best_epoch and best_epoch < run else ""
    return f"Epochs: the best trial trained {run} of {planned} planned epoch(s){peak}{hint}."


def pruning_finding(data: StudyData) -> str:
    """Time saved by pruning: (planned - run) epochs x that trial's mean epoch time, summed."""
    total = sum(float(t.user_attrs.get("train_seconds") or 0.0) for t in data.trials)
    saved, count = 0.0, 0
    for t in data.of_state(TrialState.PRUNED):
        history = t.user_attrs.get("history") or []
        planned = data.param(t, "epochs")
        if not history or not isinstance(planned, int):
            continue
        per_epoch = float(np.mean([h.get("seconds", 0.0) for h in history]))
        saved += max(0, planned - len(history)) * per_epoch
        count += 1
    if count == 0:
        return f"Pruning: no trial was pruned ({fmt_duration(total)} of training in all)."
    share = saved / total if total else 0.0
    return (
        f"Pruning: {count} pruned trial(s) saved an estimated <b>{fmt_duration(saved)}</b> of training, "
        f"against {fmt_duration(total)} actually spent ({share:.0%} more time without pruning)."
    )


def holdout_finding(data: StudyData) -> str | None:
    holdout = data.attrs.get("holdout")
    if not holdout:
        return None
    trial = next((t for t in data.trials if t.number == holdout.get("trial")), None)
    val = trial.user_attrs.get("val_accuracy") if trial else None
    if missing(val) or missing(holdout.get("accuracy")):
        return None
    gap = holdout["accuracy"] - val
    return f"Holdout: trial #{trial.number} reached {fmt_pct(holdout['accuracy'])} holdout accuracy vs {fmt_pct(val)} on validation ({gap * 100:+.1f} points)."


def best_finding(data: StudyData) -> str:
    if not data.top:
        return "Best setting: no complete trial yet."
    t = data.top[0]
    params = ", ".join(f"{k} = {fmt_param(v)}" for k, v in t.params.items())
    return f"Best setting: trial #{t.number} with {params} reached {data.objective} <b>{t.value:.4f}</b>."


def findings_section(data: StudyData) -> str:
    items = [best_finding(data), depth_finding(data), data_finding(data), rate_finding(data), epochs_finding(data),
             pruning_finding(data), holdout_finding(data)]
    # Findings are built from numbers and trial data only, so the little markup they carry is ours.
    body = "<ul class=\"findings\">" + "".join(f"<li>{i}</li>" for i in items if i) + "</ul>"
    return section("findings", "Findings", body)


# --------------------------------------------------------------------------- page


SECTIONS = (
    ("header", "Study"), ("findings", "Findings"), ("best-trials", "Best trials"), ("holdout", "Holdout"),
    ("curves", "Learning curves"), ("effects", "Effects"), ("optuna", "Optuna plots"), ("misclassified", "Misclassified"),
)

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa;line-height:1.45}
main{max-width:1250px;margin:0 auto;padding:0 24px 60px}
nav{position:sticky;top:0;background:#263238;padding:8px 24px;z-index:10}
nav a{color:#eceff1;margin-right:18px;text-decoration:none;font-size:14px}
nav a:hover{text-decoration:underline}
h1{margin:24px 0 4px} h2{border-bottom:2px solid #cfd8dc;padding-bottom:4px;margin-top:40px} h3{margin-top:24px}
section{background:#fff;padding:4px 20px 16px;margin-top:20px;border-radius:6px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{padding:4px 10px;border-bottom:1px solid #e0e0e0;text-align:left;vertical-align:top}
table.sortable th{cursor:pointer;background:#eceff1;user-select:none}
table.sortable th[data-dir=asc]::after{content:" \\25B2"} table.sortable th[data-dir=desc]::after{content:" \\25BC"}
table.compact td,table.compact th{padding:2px 8px;font-size:13px}
table.facts th{background:none;width:170px;color:#555}
td[data-sort]{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:nth-child(even){background:#f7f9fa}
pre{background:#263238;color:#eceff1;padding:10px;border-radius:4px;overflow-x:auto}
.warn{background:#fff3e0;border-left:4px solid #ef6c00;padding:8px 12px}
.note{color:#555;font-style:italic}
.hint{color:#777;font-size:13px}
.findings li{margin:6px 0}
.thumbs{display:flex;flex-wrap:wrap;gap:12px}
.thumbs figure{margin:0;width:132px;font-size:12px}
.thumbs img{width:112px;height:112px;object-fit:contain;image-rendering:pixelated;border:1px solid #ccc;background:#eee}
.ok{color:#2e7d32} .bad{color:#c62828}
details summary{cursor:pointer;margin:8px 0;font-weight:600}
"""

#: Records script errors into a hidden element, so a headless browser's DOM dump shows them.
ERROR_HOOK = """
(function(){
  var box = document.getElementById('js-errors');
  function record(msg){ box.textContent += msg + '\\n'; box.setAttribute('data-count', (+box.getAttribute('data-count') || 0) + 1); }
  window.addEventListener('error', function(e){ record('error: ' + e.message + ' at ' + (e.filename || '') + ':' + (e.lineno || '')); });
  window.addEventListener('unhandledrejection', function(e){ record('unhandled rejection: ' + (e.reason && (e.reason.stack || e.reason))); });
  var original = console.error;
  console.error = function(){ record('console.error: ' + Array.prototype.join.call(arguments, ' ')); original.apply(console, arguments); };
})();
"""

SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function(th){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0], i = th.cellIndex;
    var dir = th.getAttribute('data-dir') === 'desc' ? 'asc' : 'desc';
    table.querySelectorAll('th').forEach(function(h){ h.removeAttribute('data-dir'); });
    th.setAttribute('data-dir', dir);
    function key(td){ var s = td.getAttribute('data-sort'); return s === null ? td.textContent.toLowerCase() : parseFloat(s); }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = key(a.cells[i]), y = key(b.cells[i]);
      var c = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1);
      return dir === 'asc' ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def render(data: StudyData, storage_url: str) -> str:
    """The whole page as one string."""
    body = [
        header_section(data, storage_url), findings_section(data), best_trials_section(data), holdout_section(data),
        curves_section(data), effects_section(data), optuna_section(data), misclassified_section(data),
    ]
    toc = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in SECTIONS)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Study report: {esc(data.name)}</title><style>{STYLE}</style></head><body>\n"
        f'<pre id="js-errors" hidden></pre><script>{ERROR_HOOK}</script>\n'
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>\n'
        f'<nav id="toc">{toc}</nav><main><h1>Transfer-learning study <code>{esc(data.name)}</code></h1>\n'
        + "\n".join(body)
        + f"\n</main><script>{SORT_SCRIPT}</script></body></html>\n"
    )
