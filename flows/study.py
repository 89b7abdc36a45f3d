"""Run a transfer-learning study through Prefect: prepare -> study -> report.

    python -m flows.study                                  # the demo study (embedded digits)
    python -m flows.study --config studies/stanford_cars.toml --data /data/stanford-cars
    python -m flows.study --n-trials 40 --storage postgresql://user:pw@host/optuna   # one worker of many
    python -m flows.study --serve --cron "0 3 * * *"       # a scheduled deployment (needs a Prefect server)

Re-running the same command resumes the study up to ``n_trials`` finished trials in total.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import timedelta
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE

from flows.common import run_cli, setup_logging
from transferstudy import config as config_mod
from transferstudy.config import StudyConfig

log = logging.getLogger("transferstudy.flows")


def resolve_config(
    config: str = str(config_mod.DEFAULT_CONFIG),
    data: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    device: str | None = None,
    sampler_seed: int | None = None,
) -> StudyConfig:
    """The study file with command-line overrides applied (validated again)."""
    cfg = config_mod.load_config(config)
    return cfg.with_overrides(
        study={
            "n_trials": n_trials, "timeout_s": timeout, "storage": storage, "name": study_name, "device": device,
            "sampler_seed": sampler_seed,
        },
        data={"path": data, "format": "auto" if data else None},
    )


def _dataset_key(context, parameters) -> str:
    """Prefect cache key of the prepare task: the dataset fingerprint (files + resolution)."""
    from transferstudy.data import dataset_fingerprint
    from transferstudy.study import open_index

    cfg: StudyConfig = parameters["cfg"]
    index = open_index(cfg)
    return "prepare-" + dataset_fingerprint(index, cfg.data.image_size, cfg.data.resize_mode) + "-" + cfg.data.cache_dir


@task(
    name="prepare-data",
    cache_key_fn=_dataset_key,
    cache_expiration=timedelta(days=30),
    persist_result=True,
    retries=1,
    retry_delay_seconds=5,
)
def prepare_data(cfg: StudyConfig) -> dict:
    """Decode and validate the dataset once; an unchanged dataset is not prepared again."""
    from transferstudy.study import prepare_data as prepare

    summary = prepare(cfg).summary(cfg)
    log.info(
        "dataset %s: %d classes, %d images (%d pool, %d holdout), %d skipped files",
        summary["path"], summary["num_classes"], summary["num_images"], summary["pool_images"],
        summary["holdout_images"], len(summary["problems"]),
    )
    return summary


@task(name="run-study", cache_policy=NO_CACHE)
def run_study(cfg: StudyConfig) -> dict:
    """Run or resume the Optuna study; then score its best trials on the holdout."""
    from transferstudy import study as study_mod

    prepared = study_mod.prepare_data(cfg, show_progress=False)
    study = study_mod.run_study(cfg, prepared)
    study_mod.score_holdout(study, cfg, prepared)
    rows = study_mod.results_table(study, cfg.study.report_top_k)
    return {"name": study.study_name, "top": rows, "finished": study_mod.count_finished(study)}


@task(name="build-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def build_report(cfg: StudyConfig) -> str:
    """Write the self-contained HTML report from the study's storage."""
    from transferstudy.report import build_report as build

    return str(build(cfg.study.storage, cfg.study.name))


def _markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "No complete trial yet."
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _artifact_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "study"


@flow(name="transfer-study")
def study_flow(
    config: str = str(config_mod.DEFAULT_CONFIG),
    data: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    device: str | None = None,
    sampler_seed: int | None = None,
    report: bool = True,
) -> str | None:
    """Prepare the dataset, run (or resume) the study, write the report; returns the report path."""
    cfg = resolve_config(config, data, n_trials, timeout, storage, study_name, device, sampler_seed)
    prepare_data(cfg)
    outcome = run_study(cfg)
    key = _artifact_key(cfg.study.name)
    create_markdown_artifact(
        key=f"{key}-top-trials",
        markdown=f"# Study `{cfg.study.name}`: top trials\n\n{_markdown_table(outcome['top'])}\n",
        description=f"best trials of {cfg.study.name} ({outcome['finished']} finished)",
    )
    if not report:
        return None
    path = build_report(cfg)
    create_link_artifact(key=f"{key}-report", link=Path(path).resolve().as_uri(), link_text="study report", description=f"HTML report of {cfg.study.name}")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.study",
        description="Run (or resume) a transfer-learning study through Prefect: prepare -> study -> report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="study file keys:\n" + config_mod.describe_keys(),
    )
    p.add_argument("--config", default=str(config_mod.DEFAULT_CONFIG), help="study file (default: %(default)s)")
    p.add_argument("--data", help="use this dataset (folder, devkit or manifest) with the study file's settings")
    p.add_argument("--n-trials", type=int, help="finished trials the study should have in total")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--storage", help="Optuna storage URL (default: the study file's, sqlite:///studies/optuna.db)")
    p.add_argument("--study-name", help="Optuna study name (default: the study file's)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the study file's, auto)")
    p.add_argument("--sampler-seed", type=int, help="sampler seed (give workers that start together different seeds)")
    p.add_argument("--no-report", action="store_true", help="skip the report (extra workers of a shared study)")
    p.add_argument("--serve", action="store_true", help="serve a deployment of this flow (Prefect server needed)")
    p.add_argument("--cron", help="with --serve: schedule, e.g. \"0 3 * * *\"")
    p.add_argument("--interval", type=float, help="with --serve: run every this many seconds")
    p.add_argument("--name", default="transfer-study", help="with --serve: deployment name (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    # Validate before Prefect starts, so bad input is one line, not a failed flow run.
    cfg = resolve_config(
        args.config, args.data, args.n_trials, args.timeout, args.storage, args.study_name, args.device, args.sampler_seed
    )
    if not args.serve:
        from transferstudy.study import preflight

        preflight(cfg)
    params = {
        "config": args.config, "data": args.data, "n_trials": args.n_trials, "timeout": args.timeout,
        "storage": args.storage, "study_name": args.study_name, "device": args.device,
        "sampler_seed": args.sampler_seed, "report": not args.no_report,
    }
    if args.serve:
        if not (args.cron or args.interval):
            raise ValueError("--serve needs --cron or --interval")
        print(f"serving deployment 'transfer-study/{args.name}' (cron={args.cron}, interval={args.interval}); Ctrl-C stops it")
        study_flow.serve(name=args.name, cron=args.cron, interval=args.interval, parameters=params)
        return 0
    report = study_flow(**params)
    print(f"\nstudy {cfg.study.name!r} in {cfg.study.storage}")
    if report:
        print(f"report:    {report}")
    print(f"dashboard: optuna-dashboard {cfg.study.storage}")
    return 0


if __name__ == "__main__":
    run_cli(main)
