"""The report's plotly figures (each a function of plain data)."""

from __future__ import annotations

import warnings

import numpy as np
import plotly.graph_objects as go
from optuna.trial import FrozenTrial
from plotly.subplots import make_subplots

from ..metrics import normalize_rows
from ..study import attrs as stored
from .html import MANY_CLASSES, PALETTE, rounded
from .load import StudyData

#: Blues with steep low stops, so that a 5% confusion stays visible next to a 90% diagonal.
CONFUSION_COLORS = [
    [0.0, "#ffffff"],
    [0.02, "#deebf7"],
    [0.1, "#9ecae1"],
    [0.3, "#4292c6"],
    [0.6, "#2171b5"],
    [1.0, "#08306b"],
]


def confusion_figure(confusion: np.ndarray, names: list[str]) -> go.Figure:
    """Row-normalised confusion matrix; names on hover, tick labels only for few classes."""
    n = len(names)
    z = np.round(normalize_rows(confusion), 3)
    fig = go.Figure(
        go.Heatmap(
            z=z.tolist(),
            x=names,
            y=names,
            customdata=confusion.astype(int).tolist(),
            colorscale=CONFUSION_COLORS,
            zmin=0,
            zmax=1,
            colorbar={"title": {"text": "share", "side": "right"}, "tickformat": ".0%"},
            hovertemplate="true: %{y}<br>predicted: %{x}<br>%{z:.1%} of the true class (%{customdata} images)<extra></extra>",
        )
    )
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
        fig.add_trace(
            go.Bar(
                x=rounded(f1[idx], 3),
                y=[names[i] for i in idx],
                orientation="h",
                marker_color=PALETTE[col - 1],
                showlegend=False,
                hovertemplate="%{y}: F1 %{x:.3f}<extra></extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(range=[0, 1], title="F1", row=1, col=col)
        fig.update_yaxes(automargin=True, tickfont={"size": 10}, row=1, col=col)
    fig.update_layout(title="Per-class F1 on the holdout", bargap=0.2)
    return fig


def add_curves(
    fig: go.Figure, trial: FrozenTrial, color: str, opacity: float, group: str, label: str, first: bool
) -> None:
    history = trial.user_attrs[stored.TRIAL_HISTORY]
    epochs = [h["epoch"] for h in history]
    for col, key in ((1, "train_loss"), (2, "val_acc")):
        fig.add_trace(
            go.Scatter(
                x=epochs,
                y=rounded([h.get(key) for h in history]),
                mode="lines+markers",
                name=label,
                legendgroup=group,
                showlegend=first and col == 1,
                opacity=opacity,
                line={"color": color, "width": 2 if opacity == 1 else 1},
                marker={"size": 5},
                hovertemplate=f"trial #{trial.number}<br>epoch %{{x}}<br>{key} %{{y:.4f}}<extra></extra>",
            ),
            row=1,
            col=col,
        )


def add_effect(
    fig: go.Figure, data: StudyData, dim: str, trials: list[FrozenTrial], y: np.ndarray, row: int, col: int
) -> None:
    x = [data.param(t, dim) for t in trials]
    text = [f"#{t.number}" for t in trials]
    searched = any(dim in t.params for t in trials)
    hover = f"trial %{{text}}<br>{dim} %{{x}}<br>{data.objective} %{{y:.4f}}<extra></extra>"
    if dim in ("unfreeze_depth", "epochs"):
        fig.add_trace(
            go.Box(
                x=x,
                y=rounded(y),
                text=text,
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                marker_color=PALETTE[0],
                hovertemplate=hover,
            ),
            row=row,
            col=col,
        )
        order = sorted({v for v in x if v is not None})  # numeric order: 10 after 9
        fig.update_xaxes(type="category", categoryorder="array", categoryarray=order, row=row, col=col)
    else:
        fig.add_trace(
            go.Scatter(
                x=rounded(x, 6),
                y=rounded(y),
                text=text,
                mode="markers",
                marker={"color": PALETTE[0], "size": 8},
                hovertemplate=hover,
            ),
            row=row,
            col=col,
        )
    if dim == "lr":
        fig.update_xaxes(type="log", row=row, col=col)
    fig.update_xaxes(title=dim + ("" if searched else " (not searched)"), row=row, col=col)


def interval_figure(groups: list[dict], x_key: str, x_title: str, metric: str, title: str) -> go.Figure:
    """Confirmation runs per group (a depth, a train_ratio): the mean and its 95% interval of the
    common-subset metric and of the holdout accuracy, with each seed's value beside them."""
    fig = go.Figure()
    series = (
        ("metric", f"{metric} (common validation subset)", PALETTE[0], -0.08),
        ("holdout_accuracy", "holdout accuracy (never selects)", PALETTE[1], 0.08),
    )
    for key, name, color, shift in series:
        shown = [g for g in groups if (g.get(key) or {}).get("mean") is not None]
        if not shown:
            continue
        x = np.array([float(g[x_key]) for g in shown])
        offset = shift * (np.ptp(x) / max(len(x) - 1, 1) if len(x) > 1 else 1.0)
        means = [g[key]["mean"] for g in shown]
        plus = [g[key]["hi"] - g[key]["mean"] if g[key]["hi"] is not None else 0.0 for g in shown]
        minus = [g[key]["mean"] - g[key]["lo"] if g[key]["lo"] is not None else 0.0 for g in shown]
        fig.add_trace(
            go.Scatter(
                x=rounded(x + offset),
                y=rounded(means),
                mode="markers",
                name=name,
                marker={"color": color, "size": 10},
                error_y={"type": "data", "symmetric": False, "array": rounded(plus), "arrayminus": rounded(minus)},
                customdata=[[g[key]["n"]] for g in shown],
                hovertemplate=f"{x_title} %{{x:.2f}}<br>mean %{{y:.4f}} (n=%{{customdata[0]}})<extra>{name}</extra>",
            )
        )
        seeds = [(xi + offset, v) for xi, g in zip(x, shown) for v in g[key].get("values") or []]
        fig.add_trace(
            go.Scatter(
                x=rounded([a for a, _ in seeds]),
                y=rounded([b for _, b in seeds]),
                mode="markers",
                showlegend=False,
                marker={"color": color, "size": 5, "opacity": 0.4},
                hovertemplate="one seed: %{y:.4f}<extra></extra>",
            )
        )
    fig.update_xaxes(title=x_title, tickvals=sorted({float(g[x_key]) for g in groups}))
    fig.update_yaxes(title="score (mean and 95% interval over seeds)")
    fig.update_layout(title=title, legend={"orientation": "h", "y": -0.2})
    return fig


def importances(data: StudyData) -> go.Figure:
    if len(data.complete) < 2:
        raise ValueError(f"parameter importances need at least 2 complete trials (the study has {len(data.complete)})")
    from optuna import visualization as vis

    with warnings.catch_warnings():  # "importances will be equal" when the trials cannot separate them
        warnings.simplefilter("ignore", UserWarning)
        return vis.plot_param_importances(data.study)
