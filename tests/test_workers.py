"""Planning a fan-out on one node: which device each worker gets and how it is pinned (fake device lists)."""

import pytest

from transferstudy.workers import WORKER_ENV, identity, parse_devices, plan_workers, visible_gpus

EIGHT = [str(i) for i in range(8)]


def test_devices_all_is_one_worker_per_gpu_each_seeing_only_its_own():
    slots = plan_workers(None, "all", "auto", ["0", "1", "2"], cpu_count=32)
    assert [s.label for s in slots] == ["cuda:0", "cuda:1", "cuda:2"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "2"]
    assert {s.device for s in slots} == {"cuda:0"}  # pinned: each worker's one visible GPU
    assert [s.memory_share for s in slots] == [1 / 3] * 3 and slots[2].name == "2/3 cuda:2"


def test_pinning_follows_the_parents_own_visible_devices():
    gpus = visible_gpus({"CUDA_VISIBLE_DEVICES": "4,6"}, device_count=2)
    assert gpus == ["4", "6"]  # the parent's cuda:1 is physical GPU 6
    slots = plan_workers(None, "cuda:1", "auto", gpus, cpu_count=8)
    assert [(s.label, s.env["CUDA_VISIBLE_DEVICES"]) for s in slots] == [("cuda:1", "6")]
    assert visible_gpus({}, device_count=3) == ["0", "1", "2"] and visible_gpus({}, device_count=0) == []


def test_more_workers_than_gpus_are_dealt_out_in_turn():
    slots = plan_workers(5, None, "cuda", ["0", "1"], cpu_count=8)
    assert [s.label for s in slots] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert plan_workers(2, None, "cuda:1", EIGHT, 8)[1].env == {"CUDA_VISIBLE_DEVICES": "1"}


def test_cpu_workers_share_the_cores_and_see_no_gpu():
    slots = plan_workers(2, None, "cpu", EIGHT, cpu_count=16)
    assert [s.device for s in slots] == ["cpu", "cpu"]
    assert slots[0].env == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"}
    assert plan_workers(3, None, "cpu", [], cpu_count=2)[0].env["OMP_NUM_THREADS"] == "1"
    assert [s.device for s in plan_workers(2, None, "auto", [], cpu_count=2)] == ["cpu", "cpu"]  # no GPU: the CPU


@pytest.mark.parametrize(
    "workers, devices, device, gpus, message",
    [
        (None, "all", "auto", [], "no CUDA device is visible"),
        (None, "cuda:2", "auto", ["0", "1"], "cuda:2 is not visible"),
        (None, "gpu0", "auto", ["0"], "'gpu0' is not a device"),
        (0, None, "cpu", [], "at least 1"),
        (2, None, "cuda", [], "no CUDA device is visible"),
    ],
)
def test_bad_plans_are_one_clear_error(workers, devices, device, gpus, message):
    with pytest.raises(ValueError, match=message):
        plan_workers(workers, devices, device, gpus, cpu_count=4)


def test_devices_list_keeps_its_order_and_accepts_the_cpu():
    assert parse_devices("cuda:1, cuda:0,cpu", ["0", "1"]) == ["cuda:1", "cuda:0", "cpu"]


def test_identity_names_the_worker_of_a_fan_out(monkeypatch):
    monkeypatch.setenv(WORKER_ENV, "1/2 cuda:1")
    who = identity()
    assert who["worker"] == "1/2 cuda:1" and who["pid"] > 0 and who["host"]
