"""Shared fixtures: tiny generated class-folder datasets, written with PIL into ``tmp_path``.

Every image is a noisy background with a class-coloured rectangle at a random place, so a
randomly initialised ResNet-50 can learn the classes in a few CPU seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:  # torch is imported where a fixture needs it: the controller of -n N never does
    import torch

#: Rectangle colour of each generated class (up to eight classes).
CLASS_COLOURS = [
    (220, 30, 30),
    (30, 200, 30),
    (30, 30, 220),
    (230, 210, 20),
    (200, 30, 200),
    (20, 200, 210),
    (250, 140, 0),
    (120, 120, 120),
]


def make_image(label: int, size: int, rng: np.random.Generator, width: int | None = None) -> Image.Image:
    """A ``width x size`` RGB image: dark noise plus a rectangle in the class's colour."""
    width = width or size
    pixels = rng.integers(0, 60, size=(size, width, 3), dtype=np.uint8)
    h, w = rng.integers(size // 2, size + 1), rng.integers(width // 2, width + 1)
    top, left = rng.integers(0, size - h + 1), rng.integers(0, width - w + 1)
    colour = np.array(CLASS_COLOURS[label % len(CLASS_COLOURS)], dtype=np.int16)
    patch = colour + rng.integers(-20, 21, size=(h, w, 3))
    pixels[top : top + h, left : left + w] = np.clip(patch, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def write_class_folders(
    root: str | Path,
    num_classes: int = 3,
    per_class: int = 6,
    test_per_class: int | None = 2,
    size: int = 16,
    seed: int = 0,
    suffix: str = ".png",
) -> Path:
    """Write a tiny class-folder dataset and return its root.

    Args:
        test_per_class: images per class under ``test/`` (layout ``root/train/<class>`` +
            ``root/test/<class>``); None = one pool ``root/<class>``.
        suffix: ".png" (lossless) or ".jpg".
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = [f"class_{c}" for c in range(num_classes)]
    plan = [("train", per_class), ("test", test_per_class)] if test_per_class is not None else [(None, per_class)]
    for split, count in plan:
        for label, name in enumerate(names):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_image(label, size, rng).save(folder / f"img_{i:03d}{suffix}")
    return root


#: The longest test files, run first: ``make test`` runs each file in one of two processes (in
#: collection order: --no-loadscope-reorder), and a long file handed out last would finish alone
#: while the other process idles (measured with ``--durations=0``). The three files that start
#: processes of their own (flows, pool, serve) are spread out: together they would starve each other.
SLOW_FIRST = (
    "test_flows.py",
    "test_benchmarks.py",
    "test_study.py",
    "test_pool.py",
    "test_refit.py",
    "test_regime.py",
    "test_serve.py",
    "test_report_browser.py",
    "test_export.py",
    "test_features.py",
    "test_report.py",
    "test_confirm.py",
    "test_model.py",
    "test_train.py",
    "test_study_design.py",
)


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: the rest keep their order


@pytest.fixture
def make_dataset(tmp_path):
    """Factory: ``make_dataset(name, **kwargs)`` writes ``write_class_folders`` under tmp_path."""

    def make(name: str = "data", **kwargs) -> Path:
        return write_class_folders(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def split_dataset(make_dataset) -> Path:
    """3 classes, 6 train + 2 test images each, 16 px PNG, in ``train/`` + ``test/``."""
    return make_dataset("split")


@pytest.fixture
def pool_dataset(make_dataset) -> Path:
    """3 classes, 10 images each, 16 px PNG, as one pool ``root/<class>/``."""
    return make_dataset("pool", per_class=10, test_per_class=None)


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cpu() -> torch.device:
    import torch

    return torch.device("cpu")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread: results then do not depend on the machine's core count, and a
    busy CI machine cannot stall every OpenMP barrier on a descheduled second thread
    (which made a 15 s training test take minutes)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: Set by the controller of a ``pytest -n N`` run to the API of the one Prefect server it started
#: for all its worker processes.
SHARED_SERVER_ENV = "TRANSFERSTUDY_TEST_PREFECT_API"


#: Server services no test needs: no schedules are due, no runs go late, pause or get cancelled,
#: and there are no automations. The task-run recorder stays (task runs are read back).
UNUSED_SERVER_SERVICES = (
    "SCHEDULER",
    "LATE_RUNS",
    "FOREMAN",
    "PAUSE_EXPIRATIONS",
    "CANCELLATION_CLEANUP",
    "REPOSSESSOR",
    "TRIGGERS",
    "EVENT_PERSISTER",
)


def _start_prefect_server(home: Path):
    """``prefect server start`` on a free loopback port with its own home: (process, API URL)."""
    import os
    import subprocess
    import sys

    from helpers import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false")
    for service in UNUSED_SERVER_SERVICES:  # each polls the database every few seconds
        env[f"PREFECT_SERVER_SERVICES_{service}_ENABLED"] = "false"
    with open(home / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return server, f"http://127.0.0.1:{port}/api"


def pytest_configure(config):
    """The controller of ``pytest -n N`` starts one Prefect server for every worker process, at
    once, so it boots while the first tests run (workers inherit its URL)."""
    import os
    import tempfile

    if (
        hasattr(config, "workerinput")
        or not config.getoption("numprocesses", None)
        or os.environ.get(SHARED_SERVER_ENV)
    ):
        return
    from helpers import stop

    server, api = _start_prefect_server(Path(tempfile.mkdtemp(prefix="prefect-home-")))
    os.environ[SHARED_SERVER_ENV] = api
    config.add_cleanup(lambda: stop(server))


def pytest_unconfigure(config):
    """A worker process of ``pytest -n N`` is about to exit: freezing the objects it holds lets
    the interpreter's teardown skip collecting them (seconds, with torch and Prefect loaded,
    while the controller waits for every worker to end)."""
    if hasattr(config, "workerinput"):
        import gc

        gc.freeze()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real ``prefect server start`` on loopback for the whole session: flows, served
    deployments and flow CLIs all talk to it (PREFECT_API_URL), instead of each starting a
    temporary server of its own. Under ``pytest -n N``, the controller's one server."""
    import os

    from helpers import stop, wait_http

    shared = os.environ.get(SHARED_SERVER_ENV)
    server, api = (None, shared) if shared else _start_prefect_server(tmp_path_factory.mktemp("prefect-home"))
    try:
        wait_http(f"{api}/health", server, 240)
        yield api
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)  # flow-run logs of this process go before their server does
        if server is not None:
            stop(server)


@pytest.fixture
def tiny(make_dataset, cache_dir, cpu):
    """3 classes x 8 images at 16 px, decoded; (cache, its images on the CPU, every row as the pool)."""
    from transferstudy.datasets import scan_folders
    from transferstudy.images import DeviceData, load_cache
    from transferstudy.splits import holdout_indices

    cache = load_cache(
        scan_folders(make_dataset(num_classes=3, per_class=8, size=16)), 16, cache_dir, show_progress=False
    )
    pool, _ = holdout_indices(cache, 0.0, 0)
    return cache, DeviceData(cache, cpu), pool
