"""The report's sections, top to bottom: header (headed by the refit model's holdout score),
findings, model card, best trials, holdout, curves, effects, Optuna's plots, misclassified images."""

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
from .figures import add_curves, add_effect, confusion_figure, f1_figure, importances, interval_figure
from .html import (
    MANY_CLASSES,
    PALETTE,
    cell,
    esc,
    figure,
    fmt_duration,
    fmt_num,
    fmt_pct,
    missing,
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
    parts = [
        f"{counts[TrialState.COMPLETE]} complete",
        f"{counts[TrialState.PRUNED]} pruned",
        f"{counts[TrialState.FAIL]} failed",
    ]
    parts += [f"{n} {s.name.lower()}" for s, n in counts.items() if n and s in (TrialState.RUNNING, TrialState.WAITING)]
    return ", ".join(parts)


def weights_info(data: StudyData) -> tuple[str, str | None]:
    """(what the backbone held, a warning when it was not pretrained or had to fall back)."""
    w = data.attrs.get(stored.STUDY_WEIGHTS) or {}
    used = w.get("used") or next(
        (t.user_attrs[stored.TRIAL_WEIGHTS] for t in data.trials if stored.TRIAL_WEIGHTS in t.user_attrs), None
    )
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
    """The devices trials ran on and, when several processes ran them, each worker's trial count."""
    seen = [t.user_attrs.get(stored.TRIAL_DEVICE) for t in data.trials] or [
        r.get("device") for r in data.attrs.get(stored.STUDY_RUNS, [])
    ]
    text = ", ".join(dict.fromkeys(d for d in seen if d)) or "—"
    ran: dict[str, int] = {}
    for t in data.trials:
        who = t.user_attrs.get(stored.TRIAL_WORKER)
        if who:
            name = who.get("worker") or f"{who.get('host')}:{who.get('pid')}"
            ran[name] = ran.get(name, 0) + 1
    if len(ran) > 1:
        text += f"; {len(ran)} workers: " + ", ".join(f"{name} ({n} trials)" for name, n in sorted(ran.items()))
    return text


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
    parts.append(
        f"<details{opened}><summary>{len(problems)} file(s) skipped at preparation</summary>{table(['file', 'reason'], rows)}</details>"
    )
    return "".join(parts)


def facts_table(rows: list[tuple[str, object]]) -> str:
    """A two-column table of (label, value) rows; values are escaped."""
    facts = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="facts">{facts}</table>'


def accuracy_text(scores: dict) -> str:
    """``91.2% (95% CI 88.0–93.6%, 360 images)``."""
    lo, hi = scores.get("accuracy_ci95") or (None, None)
    interval = f"95% CI {fmt_pct(lo).rstrip('%')}–{fmt_pct(hi)}, " if not (missing(lo) or missing(hi)) else ""
    return f"{fmt_pct(scores.get('accuracy'))} ({interval}{scores.get('n', '—')} images)"


def refit_headline(data: StudyData) -> str:
    """The report's headline: the refit model's holdout score, the number to quote, beside the
    search's best validation score (the maximum over the trials, so optimistic); "" without a refit."""
    refit = data.attrs.get(stored.STUDY_REFIT)
    if not refit:
        return ""
    hold, tta = refit.get("holdout"), refit.get("holdout_tta")
    if hold:
        score = f"holdout accuracy <b>{esc(accuracy_text(hold))}</b>"
        score += f"; {fmt_pct(tta.get('accuracy'))} with flip TTA" if tta else ""
    else:
        score = "not scored (the study has no holdout)"
    search = refit.get("search") or {}
    return (
        f'<p class="headline" id="refit-headline">Refit model: {score} — trained on '
        f"{refit.get('train_samples', '—')} pool images; search validation best {fmt_pct(search.get('val_accuracy'))} "
        f"(trial #{refit.get('trial')}'s validation accuracy, the best of all trials: optimistic).</p>"
    )


def regime_text(data: StudyData) -> str:
    """The one training regime of the study, and where the trials' frozen activations lived."""
    regime = data.attrs.get(stored.STUDY_REGIME)
    if not regime:
        return "—"
    views = regime.get("views", 1)
    if regime.get("augment") and views > 1:
        lo, hi = regime.get("crop_scale", [0, 1])
        text = (
            f"{views} fixed views per image (centre, mirror, {max(0, views - 2)} seeded crops of area {lo:g}–{hi:g}); "
            f"epoch e trains on view (e-1) mod {views}"
        )
    else:
        text = "no augmentation: every epoch trains on the centre view"
    placed = {}
    for t in data.trials:
        cache = (t.user_attrs.get(stored.TRIAL_REGIME) or {}).get("cache")
        if cache:
            placed[cache] = placed.get(cache, 0) + 1
    where = ", ".join(f"{n} trial(s) {k}" for k, n in sorted(placed.items()))
    return text + "; the same inputs with or without the activation cache" + (f" (cache: {where})" if where else "")


def effective_text(data: StudyData) -> str:
    """Settings whose default depends on the weights actually used, with where each value came from."""
    values = data.attrs.get(stored.STUDY_EFFECTIVE_SETTINGS) or {}
    parts = [
        f"{k} = {fmt_param(v.get('value'))} ({v.get('source', '')})" for k, v in values.items() if isinstance(v, dict)
    ]
    return "; ".join(parts) or "—"


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
        ("training regime", regime_text(data)),
        ("pruning", data.attrs.get(stored.STUDY_PRUNING) or "—"),
        ("effective settings", effective_text(data)),
    ]
    warn = f'<p class="warn" id="weights-warning">{esc(weights_warning)}</p>' if weights_warning else ""
    command = data.attrs.get(stored.STUDY_COMMAND) or "(not recorded)"
    body = (
        f"{refit_headline(data)}{warn}{facts_table(rows)}"
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
    ranks = f"{data.objective} on common subset (ranks)" if data.on_common_subset else f"{data.objective} (ranks)"
    columns = [
        "rank",
        "trial",
        *params,
        ranks,
        "val acc",
        "val macro-F1",
        "holdout acc (never used to select)",
        "holdout macro-F1",
        "holdout top-5",
        "epochs run",
        "training time",
        "images/s",
    ]
    rows = []
    for rank, t in enumerate(data.top, 1):
        h = holdout.get(str(t.number)) or {}
        ua = t.user_attrs
        rows.append(
            [
                cell(rank),
                cell(t.number, f"#{t.number}"),
                *(cell(t.params.get(k), fmt_param(t.params.get(k))) for k in params),
                cell(data.rank_value(t), fmt_num(data.rank_value(t))),
                cell(ua.get(stored.TRIAL_VAL_ACCURACY), fmt_pct(ua.get(stored.TRIAL_VAL_ACCURACY))),
                cell(ua.get(stored.TRIAL_VAL_MACRO_F1), fmt_num(ua.get(stored.TRIAL_VAL_MACRO_F1))),
                cell(h.get("accuracy"), fmt_pct(h.get("accuracy"))),
                cell(h.get("macro_f1"), fmt_num(h.get("macro_f1"))),
                cell(h.get("top5"), fmt_pct(h.get("top5"))),
                cell(len(ua.get(stored.TRIAL_HISTORY, []))),
                cell(ua.get(stored.TRIAL_TRAIN_SECONDS), fmt_duration(ua.get(stored.TRIAL_TRAIN_SECONDS))),
                cell(ua.get(stored.TRIAL_IMAGES_PER_S), fmt_num(ua.get(stored.TRIAL_IMAGES_PER_S), 0)),
            ]
        )
    hint = (
        '<p class="hint">Click a column header to sort. Trials are ranked on validation; the holdout columns only '
        "report and never select anything. Holdout scores exist for the trials whose checkpoints were kept.</p>"
    ) + ranking_note(data)
    return section("best-trials", f"Best {len(data.top)} trials", hint + table(columns, rows))


def ranking_note(data: StudyData) -> str:
    """What the ranking column is: the common validation subset, or (older studies) each trial's own split."""
    common = data.attrs.get(stored.STUDY_COMMON_SUBSET) or {}
    if not data.on_common_subset:
        return note(
            "Ranked on each trial's own validation split: the study recorded no common-subset score for "
            "every trial, so trials with different train_ratio were judged on different images."
        )
    return (
        f'<p class="hint">Ranked on the common validation subset: the {common.get("rows", "—")} images of the validation '
        f"split at train_ratio {fmt_param(common.get('train_ratio'))} (the largest searched), inside every trial's own "
        "validation split, so every trial is judged on the same images. The val acc and val macro-F1 columns are each "
        "trial's own validation split.</p>"
    )


def confirmation_section(data: StudyData) -> str:
    """The confirmation stage (``study.confirm``): per depth (and per sweep ratio) the mean and 95%
    interval over seeds, and which ones the intervals cannot separate."""
    title = "Depth (confirmation)"
    summary = data.attrs.get(stored.STUDY_CONFIRM) or {}
    groups = sorted(summary.get("depths") or [], key=lambda g: g["depth"])
    if not groups:
        off = data.config.get("confirm", {}).get("enabled") is False
        why = "[confirm] enabled = false" if off else "no confirmation runs are stored (they run after the search)"
        return section(
            "confirmation",
            title,
            note(
                f"No confirmation: {why}. Without it no depth is named: a search trial is one selected run on its own split."
            ),
        )
    metric, seeds = summary.get("metric", data.objective), summary.get("seeds") or []
    intro = (
        f"<p>The best setting of each depth (its best complete search trial) was trained again with {len(seeds)} fresh "
        f"seeds ({', '.join(map(str, seeds))}) at train_ratio {fmt_param(summary.get('train_ratio'))}, the largest searched, "
        f"so every depth trained on the same images. Each run is scored on the common validation subset "
        f"({summary.get('common_rows', '—')} images: no run trained on them, but they helped pick these settings, so "
        f"these scores lean optimistic) and on the holdout ({summary.get('holdout_rows', '—')} images, never used to "
        "select). Large dots: mean and 95% t interval over seeds; small dots: single seeds.</p>"
    )
    verdict = (
        f'<p id="depth-verdict">On the common subset: {F.confirmation_verdict(groups, "depth")}. On the holdout: '
        f"{F.confirmation_verdict(groups, 'depth', 'holdout_accuracy')}.</p>"
    )
    runs = summary.get("runs") or {}
    missing_runs = runs.get("planned", 0) - runs.get("complete", 0)
    warn = (
        (
            f'<p class="warn">{missing_runs} of {runs.get("planned")} planned confirmation runs have no result yet '
            f"({runs.get('failed', 0)} failed); n counts the complete ones.</p>"
        )
        if missing_runs
        else ""
    )
    skipped = summary.get("missing_depths") or []
    warn += note(f"Not confirmed (no complete search trial): depth {', '.join(map(str, skipped))}.") if skipped else ""
    fig = interval_figure(
        groups, "depth", "unfreeze depth", metric, f"Best setting of each depth, {len(seeds)} seeds each"
    )
    body = intro + verdict + warn + figure(fig, "confirmation", 420) + confirmation_table(groups, "depth", metric)
    sweep = summary.get("sweep")
    if sweep:
        points = [{**point, "source_trial": sweep.get("source_trial")} for point in sweep.get("points") or []]
        curve = interval_figure(
            points,
            "train_ratio",
            "train_ratio",
            metric,
            f"Learning curve: trial #{sweep.get('source_trial')}'s setting (depth {sweep.get('depth')})",
        )
        body += (
            f"<h3>Learning curve</h3><p>{F.sweep_trend(sweep, metric)}</p>"
            + figure(curve, "confirmation-sweep", 420)
            + confirmation_table(points, "train_ratio", metric)
        )
    return section("confirmation", title, body)


def confirmation_table(groups: list[dict], label: str, metric: str) -> str:
    def interval(s: dict) -> list[str]:
        span = f"{fmt_num(s.get('lo'))} – {fmt_num(s.get('hi'))}" if s.get("lo") is not None else "— (one run)"
        return [cell(s.get("mean"), fmt_num(s.get("mean"))), cell(span), cell(s.get("n", 0))]

    rows = [
        [
            cell(g[label], fmt_param(g[label])),
            cell(g.get("source_trial"), f"#{g.get('source_trial')}"),
            *interval(g.get("metric") or {}),
            *interval(g.get("holdout_accuracy") or {}),
        ]
        for g in groups
    ]
    columns = [
        label,
        "search trial",
        f"{metric} (common subset)",
        "95% interval",
        "n",
        "holdout accuracy",
        "95% interval",
        "n",
    ]
    return table(columns, rows)


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
    return pairs_table(holdout.get("confused_pairs") or top_confused_pairs(confusion, names, 20))


def pairs_table(pairs: list[dict]) -> str:
    """Confused pairs (``metrics.top_confused_pairs``) as a table, at most 20 rows."""
    if not pairs:
        return note("No confusions: every holdout image was classified correctly.")
    rows = [
        [cell(p["true"]), cell(p["predicted"]), cell(p["count"]), cell(p["share"], fmt_pct(p["share"]))]
        for p in pairs[:20]
    ]
    return table(["true class", "predicted as", "images", "share of true class"], rows)


def holdout_section(data: StudyData) -> str:
    holdout = data.attrs.get(stored.STUDY_HOLDOUT)
    if not holdout or "confusion" not in holdout:
        return section(
            "holdout",
            "Best trial on the holdout",
            note("No holdout scores stored: the study has no holdout, or no checkpoint was kept to score."),
        )
    confusion = np.asarray(holdout["confusion"], dtype=np.int64)
    names = names_for(data, len(confusion))
    # Studies scored before copies of training images were left out record neither count.
    scored = holdout.get(stored.HOLDOUT_SCORED, int(confusion.sum()))
    copies = holdout.get(stored.HOLDOUT_COPIES, data.dataset.get(stored.HOLDOUT_COPIES))
    counts = f"{scored} holdout images scored" + (
        "" if copies is None else f", {copies} excluded as copies of training images"
    )
    summary = (
        f"<p>Trial <b>#{holdout.get('trial')}</b> on the holdout: accuracy <b>{fmt_pct(holdout.get('accuracy'))}</b> "
        f'(<span id="holdout-count">{esc(counts)}</span>), top-5 {fmt_pct(holdout.get("top5"))}, '
        f"macro-F1 <b>{fmt_num(holdout.get('macro_f1'))}</b>, weighted F1 {fmt_num(holdout.get('weighted_f1'))}. "
        "The holdout never selected anything: trials are ranked on validation.</p>"
    )
    files = data.dataset.get(stored.HOLDOUT_COPY_FILES) or []
    if files:
        shown = f"the first {len(files)} of {copies}" if copies and copies > len(files) else f"{len(files)}"
        rows = [[cell(h), cell(p)] for h, p in files]
        summary += (
            f"<details><summary>Not scored: {shown} holdout image(s) with the same bytes as a training image</summary>"
            f"{table(['holdout file', 'same bytes as training file'], rows)}</details>"
        )
    height = 700 if len(names) > MANY_CLASSES else max(420, 28 * len(names) + 180)
    f1 = np.asarray(holdout["f1"], dtype=float)
    body = (
        summary
        + figure(confusion_figure(confusion, names), "confusion", height)
        + "<h3>Most confused class pairs</h3>"
        + confused_pairs_table(holdout, confusion, names)
        + figure(f1_figure(f1, names), "per-class-f1", 22 * min(len(names), 40 if len(names) <= 40 else 20) + 140)
        + class_report(holdout, names)
    )
    return section("holdout", "Best trial on the holdout", body)


def model_card_section(data: StudyData) -> str:
    """The refit model (``study.refit``): what it is, what it learnt from, how well it does on the
    holdout, where it fails, and how to load its files."""
    title = "Model card"
    refit = data.attrs.get(stored.STUDY_REFIT)
    if not refit:
        off = data.config.get("refit", {}).get("enabled") is False
        why = (
            "[refit] enabled = false"
            if off
            else "no refit is stored (it runs once the search and its holdout scores are done)"
        )
        return section("model-card", title, note(f"No refit model: {why}."))
    body = (
        "<h3>What it is</h3>"
        + facts_table(card_model_rows(data, refit))
        + "<h3>What it was trained on</h3>"
        + facts_table(card_data_rows(data, refit))
        + "<h3>Holdout scores</h3>"
        + card_scores(data, refit)
        + "<h3>Known weaknesses</h3>"
        + card_weaknesses(refit)
        + "<h3>Files and how to use them</h3>"
        + card_usage(refit)
    )
    return section("model-card", title, body)


def card_model_rows(data: StudyData, refit: dict) -> list[tuple[str, object]]:
    pre = refit.get("preprocessing") or {}
    depth, trainable, frozen = refit.get("unfreeze_depth"), refit.get("trainable") or [], refit.get("frozen") or []
    size = pre.get("image_size", "—")
    resize = {
        "center_crop": "shorter side to the size, then centre crop",
        "stretch": "both sides to the size (aspect ratio not kept)",
    }
    params = ", ".join(f"{k} = {fmt_param(v)}" for k, v in (refit.get("params") or {}).items())
    return [
        ("architecture", f"ResNet-50 with a new {len(data.class_names) or '—'}-way linear head"),
        (
            "unfreeze depth",
            f"{depth}: trained {', '.join(trainable) or '—'}; frozen as pretrained, batch-norm statistics "
            f"included: {', '.join(frozen) or 'nothing'}",
        ),
        ("backbone weights", refit.get("weights", "—")),
        ("input", f"{size} x {size} px RGB, float32, (N, 3, {size}, {size})"),
        (
            "preprocessing",
            (
                f"resize: {resize.get(pre.get('resize_mode'), pre.get('resize_mode', '—'))}; scale to [0, 1]; "
                f"normalise with mean {pre.get('mean')} and std {pre.get('std')} (ImageNet)"
            ),
        ),
        ("configuration", f"trial #{refit.get('trial')}'s: {params}; train seed {refit.get('seed')}"),
    ]


def card_data_rows(data: StudyData, refit: dict) -> list[tuple[str, object]]:
    ds = data.dataset
    hold = refit.get("holdout") or {}
    copies = hold.get(stored.HOLDOUT_COPIES)
    left_out = f" ({copies} left out as copies of training images)" if copies else ""
    return [
        ("dataset", f"{ds.get('path', '—')} ({ds.get('source', '—')})"),
        ("classes", ds.get("num_classes", len(data.class_names) or "—")),
        (
            "training images",
            (
                f"{refit.get('train_samples')}: the whole non-holdout pool (the search's train + validation), "
                f"{refit.get('epochs')} epoch(s); no validation split, so no epoch was picked: the last epoch's network is the model"
            ),
        ),
        (
            "holdout",
            f"{hold.get('n', 0)} images scored{left_out}, once, after training; it selected nothing. "
            f"{ds.get('holdout_protocol', '')}",
        ),
        ("training time", fmt_duration(refit.get("train_seconds"))),
    ]


def card_scores(data: StudyData, refit: dict) -> str:
    hold, tta = refit.get("holdout"), refit.get("holdout_tta")
    if not hold:
        return note("Not scored: the study has no holdout (holdout_fraction = 0 and no test/ folder).")
    runs = [("holdout", hold)] + ([("with flip TTA (mean of image and mirror)", tta)] if tta else [])
    metrics = [
        ("accuracy", "accuracy", accuracy_text),
        ("top-5 accuracy", "top5", lambda s: fmt_pct(s.get("top5"))),
        ("macro-F1", "macro_f1", lambda s: fmt_num(s.get("macro_f1"))),
        ("weighted F1", "weighted_f1", lambda s: fmt_num(s.get("weighted_f1"))),
    ]
    rows = [[cell(name), *(cell(s.get(key), show(s)) for _, s in runs)] for name, key, show in metrics]
    search, trial_holdout = refit.get("search") or {}, data.attrs.get(stored.STUDY_HOLDOUT) or {}
    compare = (
        f"<p>For comparison: trial #{refit.get('trial')} reached {fmt_pct(search.get('val_accuracy'))} validation accuracy "
        f"in the search (the best of all trials on its own validation split, so optimistic)"
        + (
            f", and its own checkpoint, trained on {((search.get('split_sizes') or {}).get('train', '—'))} images, "
            f"{fmt_pct(trial_holdout.get('accuracy'))} on this holdout"
            if trial_holdout.get("trial") == refit.get("trial")
            else ""
        )
        + ". The interval is the 95% Wilson interval of the holdout accuracy.</p>"
    )
    check = refit.get("export_check")
    agree = (
        f"<p>The exported files agree: ONNX Runtime and PyTorch give the same top class for "
        f"{fmt_pct(check['top1_agreement'])} of {check['images']} holdout images (largest logit difference "
        f"{check['max_abs_logit_diff']:.2g}).</p>"
        if check
        else ""
    )
    return table(["metric", *(name for name, _ in runs)], rows, sortable=False) + compare + agree


def card_weaknesses(refit: dict) -> str:
    weakest = refit.get("weakest_classes") or []
    rows = [
        [
            cell(w["class"]),
            cell(w["recall"], fmt_pct(w["recall"])),
            cell(w["f1"], fmt_num(w["f1"], 3)),
            cell(w["support"]),
        ]
        for w in weakest
    ]
    classes = table(["class", "recall", "F1", "holdout images"], rows) if rows else ""
    return (
        "<p>The classes it mixes up most on the holdout (true class, what it said instead):</p>"
        + pairs_table(refit.get("confused_pairs") or [])
        + (f"<p>The {len(rows)} classes it recognises least often:</p>{classes}" if rows else "")
    )


def card_usage(refit: dict) -> str:
    files = "".join(f"<li><code>{esc(f)}</code></li>" for f in refit.get("files") or [])
    if not refit.get("exported"):
        path = (refit.get("files") or ["refit.pt"])[0]
        return (
            f'<p class="warn">{esc(refit.get("export_warning") or "not exported")}</p><ul>{files}</ul>'
            f"<pre><code>python -m transferstudy.predict {esc(path)} some.jpg</code></pre>"
        )
    folder = refit["model_dir"]
    names = refit.get("tensors") or {"input": "image", "output": "logits"}
    snippet = f"""import json
import numpy as np
import onnxruntime as ort
from transferstudy.images import decode_image  # or any resize as model.json's preprocessing says

card = json.load(open("{folder}/model.json"))  # class names, preprocessing, files
pre = card["preprocessing"]
img = decode_image("some.jpg", pre["image_size"], pre["resize_mode"])  # (S, S, 3) uint8 RGB
x = ((img / 255.0 - pre["mean"]) / pre["std"]).transpose(2, 0, 1)[None].astype(np.float32)
logits = ort.InferenceSession("{folder}/model.onnx").run(["{names["output"]}"], {{"{names["input"]}": x}})[0]
print(card["class_names"][int(logits.argmax())])"""
    return (
        f"<ul>{files}</ul><p>Top-5 predictions for image files or folders (ONNX Runtime when installed, else PyTorch):</p>"
        f"<pre><code>python -m transferstudy.predict {esc(folder)} some.jpg</code></pre>"
        f'<p>With ONNX Runtime alone (the same with PyTorch: <code>torch.export.load("{esc(folder)}/model.pt2").module()</code>'
        f" maps <code>torch.from_numpy(x)</code> to the logits):</p><pre><code>{esc(snippet)}</code></pre>"
    )


def curves_section(data: StudyData) -> str:
    pruned = [t for t in data.of_state(TrialState.PRUNED) if t.user_attrs.get(stored.TRIAL_HISTORY)]
    shown = [t for t in data.top if t.user_attrs.get(stored.TRIAL_HISTORY)]
    if not shown and not pruned:
        return section("curves", "Learning curves", note("No trial has an epoch history yet."))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "validation accuracy"))
    for t in pruned:
        add_curves(fig, t, color="#9e9e9e", opacity=0.35, group="pruned", label="pruned trials", first=t is pruned[0])
    for i, t in enumerate(shown):
        add_curves(
            fig,
            t,
            color=PALETTE[i % len(PALETTE)],
            opacity=1.0,
            group=f"t{t.number}",
            label=f"#{t.number} (depth {data.param(t, 'unfreeze_depth')})",
            first=True,
        )
    fig.update_xaxes(title="epoch", dtick=1)
    fig.update_yaxes(title="loss (log)", type="log", row=1, col=1)  # a diverging trial would flatten the rest
    fig.update_yaxes(title="accuracy", tickformat=".0%", range=[0, 1.02], row=1, col=2)
    fig.update_layout(title=f"Top {len(shown)} trials; {len(pruned)} pruned trial(s) in grey")
    return section("curves", "Learning curves", figure(fig, "learning-curves", 430))


def effects_section(data: StudyData) -> str:
    trials = data.complete
    if not trials:
        return section("effects", "Effects of each searched dimension", note("No complete trial yet."))
    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=[f"{data.objective} vs {d}" for d in CORE_DIMENSIONS],
        vertical_spacing=0.15,
        horizontal_spacing=0.08,
    )
    y = np.array([data.rank_value(t) for t in trials])  # the common subset when recorded: the same images for all
    for i, dim in enumerate(CORE_DIMENSIONS):
        row, col = divmod(i, 2)
        add_effect(fig, data, dim, trials, y, row + 1, col + 1)
    fig.update_yaxes(title=data.objective + (" (common subset)" if data.on_common_subset else ""))
    fig.update_layout(showlegend=False, title=f"{len(trials)} complete trials (pruned trials have no final value)")
    hint = note(
        "Single runs, each point one trial: what each dimension's effect is, adjusted for the others, is in "
        "the findings (a regression with intervals) and the confirmation section."
    )
    return section("effects", "Effects of each searched dimension", figure(fig, "effects", 760) + hint)


def optuna_section(data: StudyData) -> str:
    from optuna import visualization as vis

    plots = [
        ("optimization-history", "optimisation history", lambda: vis.plot_optimization_history(data.study), 420),
        ("param-importances", "parameter importances", lambda: importances(data), 360),
        ("parallel-coordinates", "parallel coordinates", lambda: vis.plot_parallel_coordinate(data.study), 460),
        ("slice", "slice plot", lambda: vis.plot_slice(data.study), 420),
        ("timeline", "timeline (when each trial ran, and how it ended)", lambda: vis.plot_timeline(data.study), 420),
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
        return section(
            "misclassified",
            title,
            note(f"Thumbnails unavailable: {why}. Rebuild the cache by preparing the dataset again."),
        )
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
    items = [
        F.best_finding(data),
        F.depth_finding(data),
        F.data_finding(data),
        F.rate_finding(data),
        F.epochs_finding(data),
        F.pruning_finding(data),
        F.holdout_finding(data),
    ]
    # Findings are built from numbers and trial data only, so the little markup they carry is ours.
    body = '<ul class="findings">' + "".join(f"<li>{i}</li>" for i in items if i) + "</ul>"
    return section("findings", "Findings", body)
