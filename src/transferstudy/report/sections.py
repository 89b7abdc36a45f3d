"""The report's sections, top to bottom: header, findings, best trials, holdout, curves, effects,
Optuna's plots, misclassified images."""

from __future__ import annotations

import base64
import io
import logging
from datetime import timedelta

import numpy as np
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots

from ..images.cache import open_cache_folder
from ..metrics import top_confused_pairs
from ..study import attrs as stored
from ..study.attrs import fmt_param
from . import findings as F
from .figures import add_curves, add_effect, confusion_figure, f1_figure, importances
from .html import (
    MANY_CLASSES,
    PALETTE,
    cell,
    esc,
    figure,
    fmt_duration,
    fmt_num,
    fmt_pct,
    note,
    section,
    table,
)
from .load import StudyData

log = logging.getLogger(__name__)

#: Searched dimensions with a dedicated effect plot, in display order.
CORE_DIMENSIONS = ("unfreeze_depth", "train_ratio", "lr", "epochs")
#: Misclassified holdout images shown, and their longest side in pixels (PNG, base64).
MAX_THUMBS = 24
THUMB_PX = 112

def trial_seconds(trial: FrozenTrial) -> float:
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return float(trial.user_attrs.get(stored.TRIAL_TRAIN_SECONDS) or 0.0)


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
    w = data.attrs.get(stored.STUDY_WEIGHTS) or {}
    used = w.get("used") or next((t.user_attrs[stored.TRIAL_WEIGHTS] for t in data.trials if stored.TRIAL_WEIGHTS in t.user_attrs), None)
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
    seen = [r.get("device") for r in data.attrs.get(stored.STUDY_RUNS, [])] + [t.user_attrs.get(stored.TRIAL_DEVICE) for t in data.trials]
    return ", ".join(dict.fromkeys(d for d in seen if d)) or "—"


def split_text(data: StudyData) -> str:
    ds = data.dataset
    text = f"{ds.get('num_images', '—')} images: pool {ds.get('pool_images', '—')} (train + validation), holdout {ds.get('holdout_images', '—')}"
    if data.top and data.top[0].user_attrs.get(stored.TRIAL_SPLIT_SIZES):
        s = data.top[0].user_attrs[stored.TRIAL_SPLIT_SIZES]
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


def header_section(data: StudyData, rebuild_command: str | None = None) -> str:
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
        ("runs", len(data.attrs.get(stored.STUDY_RUNS, []))),
    ]
    facts = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    warn = f'<p class="warn" id="weights-warning">{esc(weights_warning)}</p>' if weights_warning else ""
    command = data.attrs.get(stored.STUDY_COMMAND) or "(not recorded)"
    body = (
        f'{warn}<table class="facts">{facts}</table>'
        f"<h3>Data problems found at preparation</h3>{problems_html(data)}"
        f"<h3>Reproduce</h3><p>The study:</p><pre><code>{esc(command)}</code></pre>"
        + (f"<p>This report:</p><pre><code>{esc(rebuild_command)}</code></pre>" if rebuild_command else "")
    )
    return section("header", f"Study {data.name}", body)


def best_trials_section(data: StudyData) -> str:
    if not data.top:
        return section("best-trials", "Best trials", note("No complete trial yet."))
    params = [k for k in data.searched() if any(k in t.params for t in data.top)]
    holdout = data.attrs.get(stored.STUDY_HOLDOUT_TOP) or {}
    columns = ["rank", "trial", *params, "val acc", "val macro-F1", "holdout acc", "holdout macro-F1", "holdout top-5", "epochs run", "training time", "images/s"]
    rows = []
    for rank, t in enumerate(data.top, 1):
        h = holdout.get(str(t.number)) or {}
        ua = t.user_attrs
        rows.append([
            cell(rank), cell(t.number, f"#{t.number}"),
            *(cell(t.params.get(k), fmt_param(t.params.get(k))) for k in params),
            cell(ua.get(stored.TRIAL_VAL_ACCURACY), fmt_pct(ua.get(stored.TRIAL_VAL_ACCURACY))),
            cell(ua.get(stored.TRIAL_VAL_MACRO_F1), fmt_num(ua.get(stored.TRIAL_VAL_MACRO_F1))),
            cell(h.get("accuracy"), fmt_pct(h.get("accuracy"))),
            cell(h.get("macro_f1"), fmt_num(h.get("macro_f1"))),
            cell(h.get("top5"), fmt_pct(h.get("top5"))),
            cell(len(ua.get(stored.TRIAL_HISTORY, []))),
            cell(ua.get(stored.TRIAL_TRAIN_SECONDS), fmt_duration(ua.get(stored.TRIAL_TRAIN_SECONDS))),
            cell(ua.get(stored.TRIAL_IMAGES_PER_S), fmt_num(ua.get(stored.TRIAL_IMAGES_PER_S), 0)),
        ])
    hint = "<p class=\"hint\">Click a column header to sort. Holdout scores exist for the trials whose checkpoints were kept.</p>"
    return section("best-trials", f"Best {len(data.top)} trials", hint + table(columns, rows))


def names_for(data: StudyData, n: int) -> list[str]:
    names = data.class_names
    return names if len(names) == n else [f"class {i}" for i in range(n)]


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
    holdout = data.attrs.get(stored.STUDY_HOLDOUT)
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


def curves_section(data: StudyData) -> str:
    pruned = [t for t in data.of_state(TrialState.PRUNED) if t.user_attrs.get(stored.TRIAL_HISTORY)]
    shown = [t for t in data.top if t.user_attrs.get(stored.TRIAL_HISTORY)]
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




def thumbnail(image: np.ndarray) -> str:
    """A base64 PNG data URI of one ``(S, S, 3)`` uint8 image, at most THUMB_PX on a side."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(image))
    img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def misclassified_section(data: StudyData) -> str:
    title = "Misclassified holdout images"
    wrong = (data.attrs.get(stored.STUDY_HOLDOUT) or {}).get("misclassified")
    if wrong is None:
        return section("misclassified", title, note("No holdout scores stored, so no misclassified examples."))
    if not wrong:
        return section("misclassified", title, note("The best trial classified every holdout image correctly."))
    images, paths, why = open_cache_folder(data.dataset.get("cache_dir"))
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


def findings_section(data: StudyData) -> str:
    items = [F.best_finding(data), F.depth_finding(data), F.data_finding(data), F.rate_finding(data), F.epochs_finding(data),
             F.pruning_finding(data), F.holdout_finding(data)]
    # Findings are built from numbers and trial data only, so the little markup they carry is ours.
    body = "<ul class=\"findings\">" + "".join(f"<li>{i}</li>" for i in items if i) + "</ul>"
    return section("findings", "Findings", body)
