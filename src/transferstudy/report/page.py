"""The whole page: sections in order, plotly.js and the page's own CSS/JS (``assets/``) inlined once,
so the report opens offline from ``file://`` and can be mailed."""

from __future__ import annotations

from functools import cache
from importlib import resources

import jinja2
import plotly.offline
from markupsafe import Markup

from .load import StudyData
from .sections import (
    best_trials_section,
    confirmation_section,
    curves_section,
    effects_section,
    findings_section,
    header_section,
    holdout_section,
    misclassified_section,
    model_card_section,
    optuna_section,
)


@cache
def asset(name: str) -> str:
    """The text of one file of ``report/assets/``."""
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


SECTIONS = (
    ("header", "Study"),
    ("findings", "Findings"),
    ("confirmation", "Depth (confirmation)"),
    ("model-card", "Model card"),
    ("best-trials", "Best trials"),
    ("holdout", "Holdout"),
    ("curves", "Learning curves"),
    ("effects", "Effects"),
    ("optuna", "Optuna plots"),
    ("misclassified", "Misclassified"),
)


def render(data: StudyData, rebuild_command: str | None = None) -> str:
    """The whole page as one string (``assets/page.html.j2``; sections are HTML built by ``sections``)."""
    sections = [
        header_section(data, rebuild_command),
        findings_section(data),
        confirmation_section(data),
        model_card_section(data),
        best_trials_section(data),
        holdout_section(data),
        curves_section(data),
        effects_section(data),
        optuna_section(data),
        misclassified_section(data),
    ]
    env = jinja2.Environment(autoescape=True, keep_trailing_newline=True)
    template = env.from_string(asset("page.html.j2"))
    return template.render(
        name=data.name,
        toc=SECTIONS,
        style=Markup(asset("style.css")),
        errors_js=Markup(asset("errors.js")),
        plotly_js=Markup(plotly.offline.get_plotlyjs()),
        sections=[Markup(s) for s in sections],
        sort_js=Markup(asset("sort.js")),
    )
