"""Run a transfer-learning study through Prefect: open -> decode -> study -> confirm -> refit -> report.

    python -m flows.study                                  # the demo study (embedded digits)
    python -m flows.study --config studies/stanford_cars.toml --data /data/stanford-cars
    python -m flows.study --set train.batch_size=128 --set search.epochs=[5,20]   # any study-file key
    python -m flows.study --n-trials 40 --storage postgresql://user:pw@host/optuna  # one worker of many
    python -m flows.study --workers 4                      # four worker processes, GPUs dealt out in turn
    python -m flows.study --devices all                    # one worker per visible GPU
    python -m flows.study --deploy --pool gpus             # register the study-worker deployment on a work pool
    python -m flows.study --pool gpus --workers 8          # eight worker runs there (prefect worker start --pool gpus)
    python -m flows.study --serve --cron "0 3 * * *"       # a scheduled deployment (needs a Prefect server)

The flow's one parameter is the whole study configuration (``transferstudy.config.StudyConfig``):
the Prefect UI shows it as a form, and a scheduled run needs no study file on its machine.
Re-running the same command resumes the study up to ``n_trials`` finished trials in total.
"""

import argparse
import logging
import os
import shlex
import time
from datetime import timedelta
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_progress_artifact, create_table_artifact
from prefect.cache_policies import NONE as NO_CACHE

from flows.common import artifact_key, engine_logging, run_cli, setup_logging
from transferstudy import config as config_mod
from transferstudy.config import StudyConfig
from transferstudy.datasets.base import DatasetIndex

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
def run_study(cfg: StudyConfig, index: DatasetIndex, command: str | None, progress_id) -> dict:
    """Run or resume the Optuna study on the decoded images in this process (one worker)."""
    from transferstudy import study as study_mod

    dataset = study_mod.decode_dataset(cfg, index, show_progress=False)  # the cache decode-images left
    study_mod.run_study(cfg, dataset, command=command, on_trial_end=lambda n: _progress(progress_id, n, cfg))
    return {"workers": 1}


@task(name="study-worker", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=1)
def study_worker(config_path: str, env: dict[str, str], name: str) -> None:
    """One worker process of a fan-out (``flows.worker``), pinned to its device by ``env``; its
    log lines become this task's. A worker that dies (killed, out of memory) is started once
    more: the trial it was running goes stale and is run again."""
    import os
    import subprocess
    import sys

    from prefect import get_run_logger

    from transferstudy.workers import WORKER_ENV

    logger = get_run_logger()
    root = str(Path(__file__).resolve().parents[1])  # flows/ importable whatever the working folder
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    proc_env = {**os.environ, **env, WORKER_ENV: name, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [sys.executable, "-m", "flows.worker", "--config", config_path],
        env=proc_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        logger.info("worker %s started (pid %d)", name, proc.pid)
        for line in proc.stdout:
            logger.info("%s", line.rstrip())
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"study worker {name} (pid {proc.pid}) exited with status {code}; its log is above")


@task(name="score-holdout", cache_policy=NO_CACHE)
def score_holdout(cfg: StudyConfig, index: DatasetIndex) -> dict:
    """Score the best trials on the holdout (once per study, after every worker has ended)."""
    from transferstudy import study as study_mod

    dataset = study_mod.decode_dataset(cfg, index, show_progress=False)
    study_mod.score_holdout(study_mod.open_study(cfg), cfg, dataset)
    return _results(cfg)


def _results(cfg: StudyConfig) -> dict:
    """The best trials as table rows (``report_top_k``) and the finished-trial count."""
    from transferstudy import study as study_mod

    study = study_mod.open_study(cfg)
    rows = study_mod.results_table(study, cfg.study.report_top_k)
    return {"top": rows, "finished": study_mod.count_finished(study)}


def _progress(progress_id, finished: int, cfg: StudyConfig) -> None:
    """The progress artifact: finished trials of ``n_trials``, in percent."""
    from prefect.artifacts import update_progress_artifact

    update_progress_artifact(progress_id, min(100.0, 100.0 * finished / cfg.study.n_trials))


def fan_out(cfg: StudyConfig, index: DatasetIndex, slots: list, command: str, progress_id) -> dict:
    """Run the study in one worker process per slot (``transferstudy.workers``) and wait for
    them, keeping the progress artifact up to date from the storage.

    Raises:
        RuntimeError: a worker failed twice (the message names it); the others ran to the end.
    """
    from prefect.futures import wait

    from transferstudy import study as study_mod
    from transferstudy.workers import worker_seed

    dataset = study_mod.decode_dataset(cfg, index, show_progress=False)
    study = study_mod.start_study(cfg, dataset, len(slots), command)
    folder = cfg.result_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    futures = []
    for slot in slots:
        mine = {"device": slot.device, "sampler_seed": worker_seed(cfg.study.sampler_seed, slot.index)}
        train = {}
        if "feature_memory_fraction" not in cfg.search.space:  # 1/N of the budget each
            train["feature_memory_fraction"] = cfg.train.feature_memory_fraction * slot.memory_share
        path = folder / f"worker-{slot.index}.toml"
        path.write_text(cfg.with_overrides(study=mine, train=train).to_toml())
        name = f"study-worker-{slot.index} ({slot.label})"
        futures.append(study_worker.with_options(task_run_name=name).submit(str(path), slot.env, slot.name))
        log.info("worker %s: device %s (%s)", slot.name, slot.label, " ".join(f"{k}={v}" for k, v in slot.env.items()))
    while wait(futures, timeout=5).not_done:
        _progress(progress_id, study_mod.count_finished(study), cfg)
    _progress(progress_id, study_mod.count_finished(study), cfg)
    failed = [(slot, f) for slot, f in zip(slots, futures, strict=True) if not f.state.is_completed()]
    if failed:
        names = ", ".join(f"{slot.name} ({f.state.name}: {f.state.message})" for slot, f in failed)
        raise RuntimeError(f"{len(failed)} of {len(slots)} study workers failed: {names}")
    return {"workers": len(slots)}


#: The study-worker deployment on work pool NAME is ``study-worker/NAME`` (``deploy_worker``).
WORKER_FLOW = "study-worker"


def run_on_pool(cfg: StudyConfig, index: DatasetIndex, pool: str, count: int, command: str, progress_id) -> dict:
    """Run the study as ``count`` runs of the study-worker deployment on work pool ``pool``
    (``run_deployment``; child runs of this flow run) and wait for them, keeping the progress
    artifact up to date from the storage.

    Raises:
        RuntimeError: a worker run did not complete (``await_runs``).
    """
    from prefect.deployments import run_deployment

    from transferstudy import study as study_mod
    from transferstudy.workers import worker_seed

    dataset = study_mod.decode_dataset(cfg, index, show_progress=False)
    study = study_mod.start_study(cfg, dataset, count, command)
    runs = []
    for i in range(count):
        mine = cfg.with_overrides(study={"sampler_seed": worker_seed(cfg.study.sampler_seed, i)})
        name = f"{i}/{count} pool {pool}"
        run = run_deployment(
            f"{WORKER_FLOW}/{pool}",
            parameters={"study": mine.model_dump(mode="json"), "worker": name, "workdir": os.getcwd()},
            flow_run_name=f"study-worker-{i} ({cfg.study.name})",
            timeout=0,  # started, not awaited: the N runs go side by side
        )
        log.info("worker %s: flow run %s on work pool %r", name, run.id, pool)
        runs.append((name, run.id))
    await_runs(runs, pool, on_poll=lambda: _progress(progress_id, study_mod.count_finished(study), cfg))
    _progress(progress_id, study_mod.count_finished(study), cfg)
    return {"workers": count}


def await_runs(
    runs: list[tuple[str, object]], pool: str, poll_s: float = 2.0, on_poll=None, nudge_s: float = 60
) -> None:
    """Wait until every flow run of ``runs`` (name, id) has ended.

    Raises:
        RuntimeError: some did not complete (failed, crashed, cancelled); the message names each,
            with its state, after all have ended. Trials they finished stay in the storage.
    """
    from prefect.client.orchestration import get_client

    waiting, ended, since, nudged = dict(runs), {}, time.monotonic(), False
    with get_client(sync_client=True) as client:
        while waiting:
            states = {name: client.read_flow_run(run_id).state for name, run_id in waiting.items()}
            for name, state in states.items():
                if state is not None and state.is_final():
                    ended[name] = state
                    del waiting[name]
            if on_poll is not None:
                on_poll()
            unstarted = all(states[n] is None or states[n].is_scheduled() or states[n].is_pending() for n in waiting)
            if waiting and unstarted and not nudged and time.monotonic() - since > nudge_s:
                log.warning(
                    "no worker of work pool %r has started a run in %.0f s; start one per GPU with "
                    "`prefect worker start --pool %s --limit 1`",
                    pool,
                    nudge_s,
                    pool,
                )
                nudged = True
            if waiting:
                time.sleep(poll_s)
    failed = {name: state for name, state in ended.items() if not state.is_completed()}
    if failed:
        names = "; ".join(f"{name} ({state.name}: {state.message or 'see its logs'})" for name, state in failed.items())
        raise RuntimeError(
            f"{len(failed)} of {len(runs)} study-worker runs on work pool {pool!r} did not complete: {names}. "
            "Their logs are in the Prefect UI; the trials they finished are kept in the storage."
        )


@flow(name="study-worker")
def worker_flow(study: StudyConfig, worker: str = "pool", workdir: str | None = None) -> int:
    """One worker of a study on a work pool: run its trials until the study has ``n_trials``
    finished trials; returns that count.

    Args:
        study: the study configuration (the parent's, with this worker's sampler seed).
        worker: the worker's name, stored with each trial it runs.
        workdir: the parent's working folder: relative paths of the study (storage, data, results)
            are read from there when this machine has it (the same machine, or a shared mount).
    """
    from transferstudy.workers import WORKER_ENV

    engine_logging()
    if workdir and Path(workdir).is_dir():
        os.chdir(workdir)
    elif workdir:
        log.warning(
            "working folder %s is not on this machine; relative study paths are read from %s", workdir, os.getcwd()
        )
    os.environ[WORKER_ENV] = worker  # recorded with every trial of this run (``workers.identity``)
    from flows.worker import work

    return work(study)


def deploy_worker(pool: str, image: str | None = None):
    """Register the study-worker deployment ``study-worker/<pool>`` on work pool ``pool``; create
    a process work pool of that name when there is none. Returns the deployment id.

    The flow is named by its module (``flows.study.worker_flow``): a Prefect worker runs it
    wherever this project is installed (``pip install``), or from ``image`` on a container pool.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.types.entrypoint import EntrypointType

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            log.info("created process work pool %r", pool)
    from flows import PREFECT_ENV

    return worker_flow.deploy(
        name=pool,
        work_pool_name=pool,
        # A run's process reads Prefect's settings before it imports ``flows``: give it them first.
        job_variables={"env": PREFECT_ENV},
        image=image,
        build=False,
        push=False,
        entrypoint_type=EntrypointType.MODULE_PATH,
        print_next_steps=False,
    )


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
    """Write the self-contained HTML report from the study's storage; store it with the study's
    artifacts too."""
    from flows.report import rebuild_command
    from transferstudy.report import build_report as build
    from transferstudy.study import artifacts, open_study

    path = build(cfg.study.storage, cfg.study.name, rebuild_command=rebuild_command(cfg.study.name, cfg.study.storage))
    artifacts.put_study_files(open_study(cfg), cfg, [path])
    return str(path)


def reproduce_command(cfg: StudyConfig) -> str:
    """The command that runs this study again: its resolved study file, saved with the results."""
    return f"python -m flows.study --config {shlex.quote(str(cfg.result_dir / 'config.toml'))}"


@flow(name="transfer-study")
def study_flow(
    study: StudyConfig = StudyConfig(),  # noqa: B008
    report: bool = True,
    workers: int | None = None,
    devices: str | None = None,
    pool: str | None = None,
) -> str | None:
    """Open and decode the dataset, run (or resume) the study, confirm the best setting of each
    depth, refit and export the chosen configuration, write the report; returns the report path.

    Args:
        study: the whole study configuration (a study file, resolved and validated).
        report: confirm, refit the model and write the HTML report (extra workers of a shared study
            skip all three: the once-per-study work is the parent's).
        workers: run the trials in this many worker processes of this node (``study-worker``
            tasks), each pinned to one device; unset with ``devices`` unset: in this process.
        devices: the workers' devices: ``all`` (every visible GPU) or ``cuda:0,cuda:1,...``;
            unset: the study's ``device``.
        pool: run the trials as ``workers`` (default 1) runs of the study-worker deployment on
            this Prefect work pool (``--deploy --pool``) instead, on whatever machines its workers are.
    """
    engine_logging()
    index = open_dataset(study)
    from transferstudy.images.cache import cache_status  # (torch: imported once a run starts, not for --help)

    key, healthy = cache_status(index, study.data.image_size, study.data.cache_dir, study.data.resize_mode)
    decode_images.with_options(refresh_cache=not healthy)(study, index, key)  # a damaged cache is rebuilt
    key = artifact_key(study.study.name)
    progress_id = create_progress_artifact(
        0.0, key=f"{key}-progress", description=f"finished trials of {study.study.name} (of {study.study.n_trials})"
    )
    if pool:
        run_on_pool(study, index, pool, workers or 1, reproduce_command(study), progress_id)
    elif workers is None and devices is None:
        run_study(study, index, reproduce_command(study), progress_id)
    else:
        fan_out(study, index, plan(study, workers, devices), reproduce_command(study), progress_id)
    # The holdout is the parent's once-per-study work; an extra worker of a shared study leaves it.
    outcome = score_holdout(study, index) if report else _results(study)
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


def plan(cfg: StudyConfig, workers: int | None, devices: str | None) -> list:
    """The worker slots of ``--workers`` / ``--devices`` on this node (``transferstudy.workers``).

    Raises:
        ValueError: a bad ``devices`` text or worker count (one line).
    """
    from transferstudy.workers import plan_workers, visible_gpus

    return plan_workers(workers, devices, cfg.study.device, visible_gpus(), os.cpu_count() or 1)


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
    p.add_argument(
        "--workers",
        type=int,
        help="run the trials in N worker processes of this node, each pinned to one device "
        "(the study's device; several GPUs are dealt out in turn); the holdout, confirmation, refit "
        "and report run once, after them",
    )
    p.add_argument(
        "--devices",
        help='the workers\' devices: "all" (every visible GPU, one worker each) or "cuda:0,cuda:1,..."',
    )
    p.add_argument(
        "--pool",
        help="run the trials as --workers N runs of the study-worker deployment on this Prefect work pool "
        "(register it first with --deploy --pool NAME; start `prefect worker start --pool NAME --limit 1` per GPU)",
    )
    p.add_argument(
        "--deploy",
        action="store_true",
        help="register the study-worker deployment on --pool NAME (a process work pool is created if there "
        "is none), then exit",
    )
    p.add_argument("--image", help="with --deploy: container image of a Docker or Kubernetes work pool")
    p.add_argument("--serve", action="store_true", help="serve a deployment of this flow (Prefect server needed)")
    p.add_argument("--cron", help='with --serve: schedule, e.g. "0 3 * * *"')
    p.add_argument("--interval", type=float, help="with --serve: run every this many seconds")
    p.add_argument("--name", default="transfer-study", help="with --serve: deployment name (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)
    # Validate before Prefect starts, so bad input is one line, not a failed flow run.
    cfg = resolve_config(args.config, args.overrides, **{_dest(f): getattr(args, _dest(f)) for f in ALIASES})
    if (args.deploy or args.pool) and not _api_url():
        raise ValueError(
            "--deploy and --pool need a Prefect server that the pool's workers also use: "
            "start one (prefect server start) and set PREFECT_API_URL"
        )
    if args.deploy:
        if not args.pool:
            raise ValueError("--deploy needs --pool NAME (the work pool to register the study-worker deployment on)")
        deployment = deploy_worker(args.pool, args.image)
        print(
            f"deployment '{WORKER_FLOW}/{args.pool}' ({deployment}) on work pool {args.pool!r}\n"
            f"start a worker per GPU slot:  prefect worker start --pool {args.pool} --limit 1\n"
            f"run a study there:            python -m flows.study --config FILE --pool {args.pool} --workers N"
        )
        return 0
    if args.pool and args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.pool and args.devices:
        raise ValueError("--pool and --devices: a work pool's devices are its workers' (CUDA_VISIBLE_DEVICES of each)")
    fan = {"workers": args.workers, "devices": args.devices, "pool": args.pool}
    if args.pool is None and (args.workers is not None or args.devices is not None):
        plan(cfg, args.workers, args.devices)  # a bad device list is one line, before Prefect starts
    if args.serve:
        if not (args.cron or args.interval):
            raise ValueError("--serve needs --cron or --interval")
        print(
            f"serving deployment 'transfer-study/{args.name}' (cron={args.cron}, interval={args.interval}); Ctrl-C stops it"
        )
        params = {"study": cfg.model_dump(mode="json"), "report": not args.no_report, **fan}
        study_flow.serve(name=args.name, cron=args.cron, interval=args.interval, parameters=params)
        return 0
    from transferstudy.study import preflight

    preflight(cfg)
    report = study_flow(study=cfg, report=not args.no_report, **fan)
    print(f"\nstudy {cfg.study.name!r} in {cfg.study.storage}")
    if report:
        print(f"report:    {report}")
    from transferstudy.study.artifacts import store_location

    where = store_location(cfg)
    files = "" if where.startswith("s3://") else f" --artifact-dir {shlex.quote(where)}"
    print(f"dashboard: optuna-dashboard {cfg.study.storage}{files}")
    return 0


if __name__ == "__main__":
    run_cli(main)
