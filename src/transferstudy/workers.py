"""Study workers on one node: which device each worker gets, and how it is pinned to it.

``python -m flows.study --workers N`` (or ``--devices cuda:0,cuda:1`` / ``--devices all``) runs N
worker processes on one study. Each is pinned before CUDA initialises in it: its own
``CUDA_VISIBLE_DEVICES`` names one physical GPU, which the worker then sees as ``cuda:0``. CPU
workers share the cores (``OMP_NUM_THREADS``). Every worker gets ``1/N`` of the host-memory
budget for its caches, and a sampler seed of its own, so workers that start together do not
draw the same first trials.

This module only plans; ``flows.study`` starts the processes. Nothing here touches CUDA.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

#: Set in each worker's environment: ``<index>/<count> <device label>``; stored with its trials.
WORKER_ENV = "TRANSFERSTUDY_WORKER"

#: Sampler seeds of workers 1, 2, ... are the study's sampler_seed plus this many times the index.
SEED_STRIDE = 1000


def worker_seed(sampler_seed: int, index: int) -> int:
    """The sampler seed of worker ``index`` of a study seeded ``sampler_seed`` (worker 0 keeps it)."""
    return sampler_seed + SEED_STRIDE * index


@dataclass(frozen=True)
class WorkerSlot:
    """One worker of a fan-out.

    Attributes:
        index: 0..count-1.
        count: workers in the fan-out.
        device: the device the worker selects once pinned (``cuda:0`` on its one visible GPU, or ``cpu``).
        label: the device as the parent names it: ``cuda:<index among the parent's visible GPUs>`` or ``cpu``.
        env: environment set before the worker process starts.
    """

    index: int
    count: int
    device: str
    label: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def memory_share(self) -> float:
        """The share of the host-memory budget for caches this worker may use."""
        return 1.0 / self.count

    @property
    def name(self) -> str:
        return f"{self.index}/{self.count} {self.label}"


def visible_gpus(env: dict[str, str] | None = None, device_count: int | None = None) -> list[str]:
    """The physical ids of the GPUs this process may use, in torch's order (``cuda:i`` is entry i).

    ``CUDA_VISIBLE_DEVICES`` (ids or UUIDs) decides when set; otherwise ``device_count`` GPUs
    (torch's count, read without initialising CUDA) numbered 0...
    """
    env = os.environ if env is None else env
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = [x.strip() for x in listed.split(",") if x.strip()]
        return ids[:device_count] if device_count else []
    return [str(i) for i in range(device_count)]


def parse_devices(text: str, gpus: list[str]) -> list[str]:
    """``--devices``: ``all`` (every visible GPU) or a comma list of ``cuda:i`` / ``cpu`` entries.

    Raises:
        ValueError: an entry is not a device, names a GPU that is not visible, or ``all`` finds none.
    """
    text = text.strip()
    if text == "all":
        if not gpus:
            raise ValueError("--devices all: no CUDA device is visible (CUDA_VISIBLE_DEVICES, drivers)")
        return [f"cuda:{i}" for i in range(len(gpus))]
    devices = []
    for entry in (e.strip() for e in text.split(",")):
        if entry == "cpu":
            devices.append("cpu")
            continue
        index = entry.removeprefix("cuda:")
        if not (entry.startswith("cuda:") and index.isdigit()):
            raise ValueError(f"--devices: {entry!r} is not a device (use cuda:0,cuda:1,... or cpu or all)")
        if int(index) >= len(gpus):
            raise ValueError(f"--devices: {entry} is not visible ({len(gpus)} CUDA device(s) visible)")
        devices.append(f"cuda:{int(index)}")
    if not devices:
        raise ValueError("--devices: no device given")
    return devices


def plan_workers(
    workers: int | None,
    devices: str | None,
    study_device: str,
    gpus: list[str],
    cpu_count: int,
) -> list[WorkerSlot]:
    """The workers of a fan-out and their devices.

    Args:
        workers: how many (default: one per device of ``devices``, else 1).
        devices: ``--devices`` text, or None for the study's own ``device`` (``auto``: every
            visible GPU, else the CPU; ``cuda``: every visible GPU; ``cuda:k``; ``cpu``).
            Workers are dealt to the devices in turn (worker i on device i mod len).
        gpus: ``visible_gpus()``: the physical ids behind ``cuda:0``, ``cuda:1``, ...
        cpu_count: cores shared by the CPU workers.

    Raises:
        ValueError: a bad ``devices`` text, fewer than one worker, or a CUDA device that is not there.
    """
    if devices:
        targets = parse_devices(devices, gpus)
    elif study_device in ("auto", "cuda"):
        targets = [f"cuda:{i}" for i in range(len(gpus))] or (["cpu"] if study_device == "auto" else [])
        if not targets:
            raise ValueError("device = 'cuda' but no CUDA device is visible")
    elif study_device == "cpu":
        targets = ["cpu"]
    else:
        targets = parse_devices(study_device, gpus)
    count = len(targets) if workers is None else workers
    if count < 1:
        raise ValueError(f"--workers must be at least 1, got {count}")
    labels = [targets[i % len(targets)] for i in range(count)]
    cpu_workers = labels.count("cpu")
    slots = []
    for i, label in enumerate(labels):
        if label == "cpu":
            threads = str(max(1, cpu_count // cpu_workers))
            env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            slots.append(WorkerSlot(i, count, "cpu", "cpu", env))
        else:
            physical = gpus[int(label.removeprefix("cuda:"))]
            slots.append(WorkerSlot(i, count, "cuda:0", label, {"CUDA_VISIBLE_DEVICES": physical}))
    return slots


def identity() -> dict:
    """Who runs this trial: host, process id and, inside a fan-out, the worker (``WORKER_ENV``)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "worker": os.environ.get(WORKER_ENV)}
