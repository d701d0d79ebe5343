"""Device slots of the training fan-out: GPU groups, machine-wide locks per GPU, CPU shares.

No GPU here: the plans for GPU machines are made with torch's device count patched (the only
mock), while the locks are real ``fcntl`` locks on real files.
"""

from __future__ import annotations

import os

import pytest
import torch

from flows import _slots as slots
from flows._slots import SlotPlan, plan_slots


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` CUDA devices (call the returned function with n)."""

    def make(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    return make


def test_gpus_are_grouped_per_training(gpus, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    gpus(8)
    plan = plan_slots(jobs=4, gpus_per_training=2)
    assert plan.kind == "gpu" and plan.processes == 2
    assert plan.slots == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert plan.threads == 4  # 32 cores over 8 processes
    assert plan_slots(jobs=4).slots == [[str(i)] for i in range(8)]
    assert plan_slots(jobs=4, max_parallel=1, gpus_per_training=4).slots == [["0", "1", "2", "3"]]


def test_visible_devices_are_honoured_and_leftovers_named(gpus, monkeypatch):
    gpus(8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    plan = plan_slots(jobs=4, gpus_per_training=2)
    assert plan.slots == [["3", "5"]] and plan.idle == ["6"]
    assert plan_slots(jobs=4).idle == []


def test_more_gpus_per_training_than_the_machine_has_is_refused(gpus):
    gpus(2)
    with pytest.raises(ValueError, match="gpus_per_training=4, but this machine has 2 visible GPU"):
        plan_slots(jobs=1, gpus_per_training=4)


def test_cpu_slots_split_the_cores_among_processes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    plan = plan_slots(jobs=4, gpus_per_training=2)
    assert plan.kind == "cpu" and plan.slots == [["0"], ["1"], ["2"], ["3"]]
    assert (plan.processes, plan.threads) == (2, 1)
    assert plan_slots(jobs=1, gpus_per_training=2).threads == 4
    with pytest.raises(ValueError, match="gpus_per_training must be >= 1"):
        plan_slots(jobs=1, gpus_per_training=0)


def test_a_gpu_is_held_by_one_slot_across_groupings(tmp_path):
    """A two-GPU slot and single-GPU slots from another flow run never share a GPU."""
    pair = slots._lock_all(tmp_path, "gpu", ["0", "1"])
    assert pair is not None
    assert slots._lock_all(tmp_path, "gpu", ["1"]) is None
    assert slots._lock_all(tmp_path, "gpu", ["1", "2"]) is None
    third = slots._lock_all(tmp_path, "gpu", ["2"])
    assert third is not None, "a failed group claim must release what it took"
    for handle in pair:
        handle.close()
    single = slots._lock_all(tmp_path, "gpu", ["1"])
    assert single is not None
    for handle in third + single:
        handle.close()


def test_pinned_group_is_what_the_ranks_see(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(slots, "_claimed", {})
    plan = SlotPlan(kind="gpu", slots=[["2", "3"]], processes=2, threads=3, lock_dir=str(tmp_path))
    slots.claim_slot(plan)
    threads = torch.get_num_threads()
    try:
        pinned = slots.pin_process()
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
        assert (pinned.label, pinned.processes, pinned.threads) == ("gpu 2,3", 2, 3)
        assert (tmp_path / "gpu-3.lock").read_text().strip() == str(os.getpid())
    finally:
        torch.set_num_threads(threads)
        for handle in slots._claimed["handles"]:
            handle.close()
