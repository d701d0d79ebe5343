"""The benchmark scripts stay runnable: real (tiny) runs of the GPU script's CPU smoke mode and of
one CPU benchmark, checked for the results-file shape that bench/RESULTS.md is built from."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import Goal, entry

REPO = Path(__file__).resolve().parents[1]
ENTRY_KEYS = {
    "name",
    "unit",
    "ours",
    "reference",
    "ratio",
    "ratio_means",
    "goal",
    "met",
    "settings",
    "reps",
    "extra",
}
# Installed here but neither on the bare GPU machine nor among the wheels carried to it (.whl/,
# see bench/RESULTS.md): bench.gpu must import without them.
NOT_ON_GPU_MACHINE = ("prefect", "s3fs", "moto", "boto3", "aiobotocore", "aiohttp", "pytest")


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _check_entry(result: dict) -> None:
    assert set(result) == ENTRY_KEYS
    assert math.isfinite(result["ours"]) and result["ours"] > 0, result
    assert result["reference"] > 0 and result["ratio"] > 0, result
    assert result["reps"] and all(v > 0 for values in result["reps"].values() for v in values), (
        result
    )
    assert result["met"] is None if result["goal"] is None else isinstance(result["met"], bool)


def test_gpu_script_smoke_mode_writes_every_measurement(tmp_path):
    out = tmp_path / "gpu.json"
    _run(["-m", "bench.gpu", "--smoke", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["complete"] is True and payload["smoke"] is True
    assert payload["machine"]["cpu_model"] and payload["machine"]["torch"]
    assert payload["data"]["images"] > 0 and all(
        n > 0 for n in payload["data"]["split_sizes"].values()
    )
    names = [e["name"] for e in payload["entries"]]
    assert names == ["train-gpu", "train-gpu-b4", "infer-gpu", "protocol-1-epochs"]
    for result in payload["entries"]:
        _check_entry(result)
    assert set(payload["variants"]) == {
        "train/fp32-nchw/eager/b4",
        "train/fp32-channels_last/eager/b4",
        "infer/fp32-nchw/eager/b4",
        "infer/fp32-channels_last/eager/b8",
    }
    assert all(v["images_per_s"] > 0 for v in payload["variants"].values())
    protocol = payload["entries"][-1]
    assert (
        protocol["extra"]["sum_epoch_seconds"] <= protocol["ours"]
    )  # epochs happen inside the wall time


def test_gpu_script_imports_only_what_the_gpu_machine_has():
    blocker = (
        "import sys\n"
        f"BLOCKED = {set(NOT_ON_GPU_MACHINE)!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is not installed on the GPU machine')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import bench.gpu\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_cpu_suite_quick_cache_read(tmp_path):
    out = tmp_path / "latest.json"
    _run(["-m", "bench.run", "--quick", "--only", "cache-read", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["mode"] == "quick" and payload["machine"]["logical_cores"] >= 1
    (result,) = payload["entries"]
    _check_entry(result)
    assert result["name"] == "cache-read"
    assert (
        result["ratio"] > 1
    )  # a memory-mapped uint8 copy beats PNG decode + resize, whatever the load


def test_cpu_suite_quick_inference_entries_use_the_autotuned_choice(tmp_path):
    out = tmp_path / "latest.json"
    args = ["--quick", "--only", "infer-cpu,infer-cpu-int8", "--size", "64", "--out", str(out)]
    _run(["-m", "bench.run", *args], 600)
    payload = json.loads(out.read_text())
    peaks = payload["machine"]["matmul_peak_gflops"]
    assert set(peaks) == {"fp32", "bf16"} and all(v > 0 for v in peaks.values())
    infer, scaling, int8 = payload["entries"]
    assert [infer["name"], scaling["name"], int8["name"]] == [
        "infer-cpu",
        "scaling",
        "infer-cpu-int8",
    ]
    for result in (infer, int8):
        _check_entry(result)

    # infer-cpu: "ours" is what the autotuner chose on first use, against the hardware's peak.
    choice = infer["extra"]["autotune"]
    assert not choice["cached"] and choice["measured_seconds"] > 0 and choice["images_per_s"]
    assert infer["settings"]["ours"] == choice["label"]
    assert infer["extra"]["cpu_capability"] == payload["machine"]["cpu_capability"]
    assert infer["extra"]["matmul_peak_gflops"] == peaks
    fraction = infer["extra"]["fraction_of_matmul_peak"]
    assert 0 < fraction < 1.5, fraction  # measured, and not off by orders of magnitude
    if not payload["machine"]["native_bf16"]:
        assert not any(k.startswith("bf16") for k in infer["extra"]["variants_images_per_s"])

    # infer-cpu-int8: against the same float choice, with agreement and ROC-AUC difference.
    extra = int8["extra"]
    assert int8["goal"] == "ratio >= 2" and extra["agreement_goal"] == 0.99
    assert extra["float_autotune"]["cached"]  # the choice infer-cpu made in this run
    assert extra["float_autotune"]["label"] == choice["label"]
    assert choice["label"] in int8["settings"]["reference"]
    assert 0 <= extra["agreement"] <= 1 and 0 <= extra["float_predicted_malignant_fraction"] <= 1
    assert (extra["roc_auc_difference"] is None) == (extra["roc_auc"]["float"] is None)


def test_cpu_suite_quick_predict_cpu_scores_pngs_to_parquet(tmp_path):
    out = tmp_path / "latest.json"
    args = ["--quick", "--only", "predict-cpu", "--size", "64", "--out", str(out)]
    _run(["-m", "bench.run", *args], 600)
    payload = json.loads(out.read_text())
    (result,) = payload["entries"]
    _check_entry(result)
    assert result["name"] == "predict-cpu" and result["goal"] == "ratio >= 0.8"
    assert set(result["reps"]) == {"ours", "infer", "naive", "no-handoff"}
    assert result["ratio"] == pytest.approx(result["ours"] / result["reference"])
    assert result["settings"]["images"] == payload["sizes"]["predict_images"]
    extra = result["extra"]
    assert extra["naive_images_per_s"] > 0 and extra["speedup_vs_naive"] == pytest.approx(
        result["ours"] / extra["naive_images_per_s"]
    )
    assert extra["no_handoff_images_per_s"] > 0 and extra["handoff_speedup"] == pytest.approx(
        result["ours"] / extra["no_handoff_images_per_s"]
    )
    assert extra["tuning"]["label"] in result["settings"]["reference"]  # same choice both sides
    assert extra["cpu_capability"] == payload["machine"]["cpu_capability"]


@pytest.mark.parametrize(
    ("goal", "value", "met", "text"),
    [
        (Goal("ratio", low=20), 25.0, True, "ratio >= 20"),
        (Goal("ratio", low=20), 19.9, False, "ratio >= 20"),
        (Goal("ours", high=60), 61.0, False, "ours <= 60"),
        (Goal("ours", low=0.9, high=1.1), 1.05, True, "0.9 <= ours <= 1.1"),
        (Goal("ours", low=0.9, high=1.1), 1.2, False, "0.9 <= ours <= 1.1"),
    ],
)
def test_goal_checks_the_named_quantity(goal, value, met, text):
    ours, ratio = (value, 1.0) if goal.on == "ours" else (1.0, value)
    result = entry(
        "x",
        "u",
        ours,
        1.0,
        ratio=ratio,
        ratio_means="",
        goal=goal,
        settings={},
        reps={"ours": [ours]},
    )
    assert (result["goal"], result["met"]) == (text, met)
