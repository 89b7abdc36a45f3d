"""Run a transfer-learning study through Prefect: open -> decode -> study -> confirm -> refit -> report.

    python -m flows.study                                  # the demo study (embedded digits)
    python -m flows.study --config studies/stanford_cars.toml --data /data/stanford-cars
    python -m flows.study --set train.batch_size=128 --set search.epochs=[5,20]   # any study-file key
    python -m flows.study --n-trials 40 --storage postgresql://user:pw@host/optuna  # one worker of many
    python -m flows.study --serve --cron "0 3 * * *"       # a scheduled deployment (needs a Prefect server)

The flow's one parameter is the whole study configuration (``transferstudy.config.StudyConfig``):
the Prefect UI shows it as a form, and a scheduled run needs no study file on its machine.
Re-running the same command resumes the study up to ``n_trials`` finished trials in total.
"""

import argparse
import logging
import shlex
from datetime import timedelta
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NONE as NO_CACHE

from flows.common import artifact_key, engine_logging, run_cli, setup_logging
from transferstudy import config as config_mod
from transferstudy.config import StudyConfig
from transferstudy.datasets.base import DatasetIndex
from transferstudy.images.cache import cache_status

log = logging.getLogger("transferstudy.flows")

#: Short flags for the most used keys: flag -> (table, key). Their help is the key's own
#: documentation; every other key is reached with ``--set table.key=value``.
ALIASES: dict[str, tuple[str, str]] = {
    "--data": ("data", "path"),
    "--n-trials": ("study", "n_trials"),
    "--timeout": ("study", "timeout_s"),
    "--storage": ("study", "storage"),
    "--study-name": ("study", "name"),
    "--device": ("study", "device"),
    "--sampler-seed": ("study", "sampler_seed"),
}


@task(name="open-dataset", cache_policy=NO_CACHE)
def open_dataset(cfg: StudyConfig) -> DatasetIndex:
    """List the dataset's labelled files (no image is decoded)."""
    from transferstudy.study import open_index

    return open_index(cfg)


def _decode_key(context, parameters) -> str:
    """Prefect cache key of the decode task: the decode cache's own key (files + settings)."""
    return "decode-" + parameters["cache_key"]


@task(
    name="decode-images",
    cache_key_fn=_decode_key,
    cache_expiration=timedelta(days=30),
    persist_result=True,
    retries=1,
    retry_delay_seconds=5,
)
def decode_images(cfg: StudyConfig, index: DatasetIndex, cache_key: str) -> dict:
    """Decode every image once into the cache; an unchanged dataset is not decoded again.

    Args:
        cache_key: the decode cache's key (``images.cache.cache_status``), the task's cache key.
    """
    from transferstudy.study import decode_dataset

    summary = decode_dataset(cfg, index).summary(cfg)
    log.info(
        "dataset %s: %d classes, %d images (%d pool, %d holdout), %d skipped files",
        summary["path"],
        summary["num_classes"],
        summary["num_images"],
        summary["pool_images"],
        summary["holdout_images"],
        len(summary["problems"]),
    )
    return summary


@task(name="run-study", cache_policy=NO_CACHE)
def run_study(cfg: StudyConfig, index: DatasetIndex, command: str | None) -> dict:
    """Run or resume the Optuna study on the decoded images; then score its best trials on the holdout."""
    from transferstudy import study as study_mod

    dataset = study_mod.decode_dataset(cfg, index, show_progress=False)  # the cache decode-images left
    study = study_mod.run_study(cfg, dataset, command=command)
    study_mod.score_holdout(study, cfg, dataset)
    rows = study_mod.results_table(study, cfg.study.report_top_k)
    return {"name": study.study_name, "top": rows, "finished": study_mod.count_finished(study)}


@task(name="confirm", cache_policy=NO_CACHE)
def confirm(cfg: StudyConfig, index: DatasetIndex) -> dict | None:
    """Retrain the best setting of each depth with several seeds at one train_ratio (``[confirm]``);
    a resumed study trains only the runs it does not have yet."""
    from transferstudy import study as study_mod

    dataset = study_mod.decode_dataset(cfg, index, show_progress=False)  # the cache decode-images left
    summary = study_mod.confirm_study(study_mod.open_study(cfg), cfg, dataset)
    return (
        {
            "runs": summary["runs"],
            "depths": [{k: d[k] for k in ("depth", "metric", "holdout_accuracy")} for d in summary["depths"]],
        }
        if summary
        else None
    )


@task(name="refit-model", cache_policy=NO_CACHE)
def refit_model(cfg: StudyConfig, index: DatasetIndex) -> dict | None:
    """Train the best trial's configuration on the whole pool, score it on the holdout, export it
    (a resumed study with the same best trial keeps the model it has)."""
    from transferstudy import study as study_mod

    dataset = study_mod.decode_dataset(cfg, index, show_progress=False)  # the cache decode-images left
    refit = study_mod.refit_best(study_mod.open_study(cfg), cfg, dataset)
    return {k: refit[k] for k in ("trial", "train_samples", "holdout", "model_dir", "files")} if refit else None


@task(name="build-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def build_report(cfg: StudyConfig) -> str:
    """Write the self-contained HTML report from the study's storage."""
    from flows.report import rebuild_command
    from transferstudy.report import build_report as build

    return str(
        build(cfg.study.storage, cfg.study.name, rebuild_command=rebuild_command(cfg.study.name, cfg.study.storage))
    )


def reproduce_command(cfg: StudyConfig) -> str:
    """The command that runs this study again: its resolved study file, saved with the results."""
    return f"python -m flows.study --config {shlex.quote(str(cfg.result_dir / 'config.toml'))}"


@flow(name="transfer-study")
def study_flow(study: StudyConfig = StudyConfig(), report: bool = True) -> str | None:  # noqa: B008
    """Open and decode the dataset, run (or resume) the study, confirm the best setting of each
    depth, refit and export the chosen configuration, write the report; returns the report path.

    Args:
        study: the whole study configuration (a study file, resolved and validated).
        report: confirm, refit the model and write the HTML report (extra workers of a shared study
            skip all three: the once-per-study work is the parent's).
    """
    engine_logging()
    index = open_dataset(study)
    key, healthy = cache_status(index, study.data.image_size, study.data.cache_dir, study.data.resize_mode)
    decode_images.with_options(refresh_cache=not healthy)(study, index, key)  # a damaged cache is rebuilt
    outcome = run_study(study, index, reproduce_command(study))
    key = artifact_key(study.study.name)
    create_table_artifact(
        key=f"{key}-top-trials",
        table=outcome["top"] or [{"trial": "no complete trial yet"}],
        description=f"best trials of {study.study.name} ({outcome['finished']} finished)",
    )
    if not report:
        return None
    if study.confirm.enabled:
        confirm(study, index)
    if study.refit.enabled:
        refit_model(study, index)
    path = build_report(study)
    create_link_artifact(
        key=f"{key}-report",
        link=Path(path).resolve().as_uri(),
        link_text="study report",
        description=f"HTML report of {study.study.name}",
    )
    return path


def resolve_config(
    config: str | Path = config_mod.DEFAULT_CONFIG, overrides: list[str] | None = None, **aliases
) -> StudyConfig:
    """The study file with ``--set`` overrides and alias flags (``n_trials=5``...) applied."""
    cfg = config_mod.load_config(config)
    parsed = [config_mod.parse_override(text) for text in overrides or []]
    for flag, (section, key) in ALIASES.items():
        value = aliases.get(_dest(flag))
        if value is not None:
            parsed.append((section, key, value))
    return config_mod.apply_overrides(cfg, parsed) if parsed else cfg


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.study",
        description="Run (or resume) a transfer-learning study through Prefect: open -> decode -> study -> confirm -> refit -> report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="study file keys (each also settable with --set table.key=value):\n" + config_mod.describe_keys(),
    )
    p.add_argument("--config", default=str(config_mod.DEFAULT_CONFIG), help="study file (default: %(default)s)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="override any study-file key, e.g. --set train.batch_size=128 (repeatable)",
    )
    fields = {"study": config_mod.StudySection, "data": config_mod.DataSection}
    for flag, (section, key) in ALIASES.items():
        field = fields[section].model_fields[key]
        kind = field.annotation if field.annotation in (int, float) else str
        p.add_argument(flag, type=kind, help=f"= --set {section}.{key}=...: {field.description}")
    p.add_argument(
        "--no-report",
        action="store_true",
        help="skip the confirmation, the refit and the report (extra workers of a shared study)",
    )
    p.add_argument("--serve", action="store_true", help="serve a deployment of this flow (Prefect server needed)")
    p.add_argument("--cron", help='with --serve: schedule, e.g. "0 3 * * *"')
    p.add_argument("--interval", type=float, help="with --serve: run every this many seconds")
    p.add_argument("--name", default="transfer-study", help="with --serve: deployment name (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    # Validate before Prefect starts, so bad input is one line, not a failed flow run.
    cfg = resolve_config(args.config, args.overrides, **{_dest(f): getattr(args, _dest(f)) for f in ALIASES})
    if args.serve:
        if not (args.cron or args.interval):
            raise ValueError("--serve needs --cron or --interval")
        print(
            f"serving deployment 'transfer-study/{args.name}' (cron={args.cron}, interval={args.interval}); Ctrl-C stops it"
        )
        params = {"study": cfg.model_dump(mode="json"), "report": not args.no_report}
        study_flow.serve(name=args.name, cron=args.cron, interval=args.interval, parameters=params)
        return 0
    from transferstudy.study import preflight

    preflight(cfg)
    report = study_flow(study=cfg, report=not args.no_report)
    print(f"\nstudy {cfg.study.name!r} in {cfg.study.storage}")
    if report:
        print(f"report:    {report}")
    print(f"dashboard: optuna-dashboard {cfg.study.storage}")
    return 0


if __name__ == "__main__":
    run_cli(main)
