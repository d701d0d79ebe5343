"""`batch-inference` with ``dask_address`` on a real Dask cluster, under a real Prefect API.

The cluster is a ``distributed.LocalCluster`` of 2 worker processes (one thread each), reached
only through its scheduler address. Two tiny real models (40X and 100X, 32 px, one epoch) are
trained and promoted once; the drop is a labelled BreakHis-named set of new synthetic PNGs at
four magnifications (two without a model) plus a truncated file, scored in chunks of 2 so that
each magnification has several chunks (and the drop's ingest several ``check-drop`` partitions
on the workers). The Dask path's drop manifest, quarantine, duplicates, image rows, part keys,
case table and counts are compared with the default path's on the same drop. A lost
worker is a real SIGKILL of a worker process at a fixed point of a chunk's work (its part is
written, its result not yet returned), chosen by a log record rather than a timer, so the test
is deterministic.
"""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import dask
import distributed
import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch

from dala_model import storage
from dala_model.data import synth
from dala_model.data.ingest import ingest
from dala_model.data.splits import make_split
from dala_model.engine.config import TrainConfig
from dala_model.engine.inference import predict_proba
from dala_model.engine.train import train
from dala_model.models.checkpoint import load_model, read_model_config
from dala_model.serving import drop as drop_lib
from dala_model.serving import promotion, scoring
from dala_model.serving.outputs import (
    IMAGE_SCHEMA,
    ScoringLayout,
    read_case_predictions,
    read_image_predictions,
)
from flows.inference import inference_flow
from tests._dask_support import one_worker_killed_at_log, task_runs

MODEL, MAGS, SIZE = "dalaresnet50", (40, 100), 32
CHUNK = 2
SCORING = {"device": "cpu", "precision": "fp32", "batch_size": 8, "chunk_size": CHUNK}
# Per magnification, what two runs into two OUTs may differ in: where they wrote, and the
# measured memory format (a Dask worker runs torch on one thread, so it measures its own).
RUN_FIELDS = {"parts", "report", "report_uri", "tuning"}


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def registry(module_tmp) -> str:
    """A training root with 40X and 100X dalaresnet50 runs (one epoch, 32 px), both promoted."""
    base = module_tmp("dask-scoring")
    source, root = str(base / "source"), str(base / "root")
    synth.generate(source, patients=8, images_per_patient=2, seed=1, size=(128, 96))
    ingest(source, root, cache_size=SIZE)
    make_split(root, "patient", seed=0)
    for mag in MAGS:
        config = TrainConfig(
            root=root, magnification=mag, epochs=1, batch_size=8, image_size=SIZE, device="cpu"
        )
        train(config)
        promotion.promote(root, storage.join(root, "runs", config.resolved_run_id))
    return root


@pytest.fixture(scope="module")
def drop(module_tmp) -> str:
    """3 slides x 4 magnifications x 2 new PNGs (BreakHis names: labelled), and a truncated one."""
    drop = module_tmp("dask-scoring-drop") / "incoming"
    synth.generate(str(drop), patients=3, images_per_patient=2, seed=9, size=(96, 64))
    first = sorted(drop.rglob("*-40-*.png"))[0]
    first.with_name(first.name.replace(".png", "9.png")).write_bytes(first.read_bytes()[:150])
    return str(drop)


@pytest.fixture(scope="module")
def default_run(prefect_api, registry, drop, module_tmp) -> tuple[str, dict]:
    out = str(module_tmp("default") / "scored")
    state = inference_flow(root=registry, source=drop, out=out, **SCORING, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    scored = {m["magnification"]: m["scored"] for m in result["magnifications"]}
    assert scored == {40: 6, 100: 6, 200: 0, 400: 0} and result["quarantined"] == {"truncated": 1}
    return out, result


@pytest.fixture(scope="module")
def tolerance(registry, default_run) -> float:
    """How far these images' fp32 probabilities move with the CPU kernels alone, doubled.

    A Dask worker runs torch on one thread, measures its own memory format and scores a chunk
    (CHUNK images) per batch; the default path uses every thread and batches of 8. Each of
    those changes the order of the sums, and by how much depends on the CPU (AVX-512 and AVX2
    kernels differ), so the tolerance is measured here: the widest spread of each image's
    probability over 1 and all threads x NCHW and channels_last x both batch sizes, with the
    promoted models and the scorer's own decode, doubled (floor 1e-5)."""
    out, _ = default_run
    rows = read_image_predictions(out, MODEL)
    threads, spread = torch.get_num_threads(), 0.0
    try:
        for mag, group in rows.groupby("magnification"):
            record = promotion.current_record(registry, MODEL, int(mag))
            model = load_model(record.checkpoint_uri)
            preset = read_model_config(record.checkpoint_uri)["preset"]
            pixels, ok = scoring._pixels(group, SIZE)
            assert ok.all()
            probs = []
            for n, channels_last, batch in itertools.product(
                sorted({1, threads}), (False, True), (CHUNK, SCORING["batch_size"])
            ):
                torch.set_num_threads(n)
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                probs.append(
                    predict_proba(
                        model.to(memory_format=fmt),
                        pixels,
                        preset=preset,
                        device=torch.device("cpu"),
                        batch_size=batch,
                        channels_last=channels_last,
                    )
                )
            stacked = np.stack(probs)
            spread = max(spread, float((stacked.max(0) - stacked.min(0)).max()))
    finally:
        torch.set_num_threads(threads)
    return max(1e-5, 2 * spread)


def expected_chunks(result: dict) -> int:
    return sum(-(-m["scored"] // CHUNK) for m in result["magnifications"])


def raw_rows(out: str) -> pd.DataFrame:
    """Every row of every part file under OUT, not deduplicated as the readers do."""
    folder = ScoringLayout(out).images(MODEL)
    return pads.dataset(folder, format="parquet", schema=IMAGE_SCHEMA).to_table().to_pandas()


def part_names(result: dict) -> list[str]:
    return sorted(Path(p).name for m in result["magnifications"] for p in m["parts"])


def assert_same_scoring(
    out: str, result: dict, default_out: str, default: dict, tolerance: float
) -> None:
    """The default path's manifest, quarantine, rows, parts, cases and counts; no row twice.

    Probabilities agree within ``tolerance`` (the fixture: the kernels' own spread), and so do
    labels, except an image whose probability lies that close to its threshold."""
    got_layout, want_layout = ScoringLayout(out), ScoringLayout(default_out)
    for uri in ("manifest", "quarantine", "duplicates"):
        got = storage.read_parquet(getattr(got_layout, uri)())
        want = storage.read_parquet(getattr(want_layout, uri)())
        stamps = [c for c in ("ingested_at", "quarantined_at") if c in got.columns]
        pd.testing.assert_frame_equal(got.drop(columns=stamps), want.drop(columns=stamps))

    got, want = read_image_predictions(out, MODEL), read_image_predictions(default_out, MODEL)
    assert len(got) == len(want) == 12 and got["sha256"].is_unique
    got, want = got.set_index("sha256").sort_index(), want.set_index("sha256").sort_index()
    assert got.index.tolist() == want.index.tolist()
    same = ["image_id", "uri", "case_id", "magnification", "threshold"]
    pd.testing.assert_frame_equal(got[same], want[same])
    np.testing.assert_allclose(
        got["prob_malignant"], want["prob_malignant"], rtol=0, atol=tolerance
    )
    decided = (want["prob_malignant"] - want["threshold"]).abs() > tolerance
    assert decided.any()
    pd.testing.assert_series_equal(got.loc[decided, "pred_label"], want.loc[decided, "pred_label"])
    raw = raw_rows(out)  # one row per image in the files themselves, not only after dedupe
    assert len(raw) == len(want) and raw["sha256"].is_unique

    assert part_names(result) == part_names(default) and len(part_names(result)) == 6
    on_disk = sorted(p.name for p in Path(got_layout.images(MODEL)).rglob("*.parquet"))
    assert on_disk == part_names(default)

    cases, want_cases = read_case_predictions(out, MODEL), read_case_predictions(default_out, MODEL)
    keys = ["case_id", "magnification", "n_images", "threshold", "model_version"]
    pd.testing.assert_frame_equal(cases[keys], want_cases[keys])
    np.testing.assert_allclose(
        cases["prob_malignant"], want_cases["prob_malignant"], rtol=0, atol=tolerance
    )
    decided = (want_cases["prob_malignant"] - want_cases["threshold"]).abs() > tolerance
    assert decided.any()
    pd.testing.assert_series_equal(
        cases.loc[decided, "pred_label"], want_cases.loc[decided, "pred_label"]
    )
    assert len(cases) == 3 * 3  # each slide at 40X, at 100X, and across the two

    for got_mag, want_mag in zip(result["magnifications"], default["magnifications"], strict=True):
        assert {k: v for k, v in got_mag.items() if k not in RUN_FIELDS} == {
            k: v for k, v in want_mag.items() if k not in RUN_FIELDS
        }
        # Labelled, never-seen images: both paths evaluated the same images to the same calls
        # (the threshold metrics; ranking ones could swap two saturated probabilities).
        got_report, want_report = got_mag["report"] or {}, want_mag["report"] or {}
        for key in ("labelled", "evaluated", "excluded"):
            assert got_report.get(key) == want_report.get(key)
        if want_report:
            got_image, want_image = got_report["metrics"]["image"], want_report["metrics"]["image"]
            for key in ("n", "confusion_matrix", "accuracy", "gmean"):
                assert got_image[key] == want_image[key]
    assert [m["report"]["evaluated"] for m in result["magnifications"][:2]] == [6, 6]


def expected_run_names(result: dict) -> list[str]:
    return sorted(
        f"score-chunk-{m['magnification']}x-{k}"
        for m in result["magnifications"]
        for k in range(-(-m["scored"] // CHUNK))
    )


def test_dask_path_gives_the_default_predictions(
    cluster, registry, drop, default_run, tolerance, tmp_path
):
    default_out, default = default_run
    out = str(tmp_path / "scored")
    with distributed.Client(cluster, set_as_default=False) as client:
        before = client.run(lambda dask_worker: dask_worker.state.executed_count)
        models_before = client.run(scoring.tools_cache_info)

        state = inference_flow(
            root=registry,
            source=drop,
            out=out,
            dask_address=cluster.scheduler_address,
            **SCORING,
            return_state=True,
        )

        after = client.run(lambda dask_worker: dask_worker.state.executed_count)
        models_after = client.run(scoring.tools_cache_info)
    assert state.is_completed(), state.message
    result = state.result()
    assert_same_scoring(out, result, default_out, default, tolerance)
    # The drop's ingest ran on the workers: one check-drop task per partition of CHUNK files
    # (all 25 files are new), each completed; its records are the default path's (above).
    files = len(list(Path(drop).rglob("*.png")))
    partitions = -(-files // CHUNK)
    assert files == 25 and partitions == 13
    checks = task_runs(state, "check-drop-", partitions)
    assert sorted(run.name for run in checks) == sorted(
        f"check-drop-{k}" for k in range(partitions)
    )
    assert all(run.state.is_completed() for run in checks)
    # One Prefect task run per chunk, run by the cluster's worker processes.
    chunks = expected_chunks(default)
    assert chunks == 6
    runs = task_runs(state, "score-chunk-", chunks)
    assert sorted(run.name for run in runs) == expected_run_names(default)
    assert all(run.state.is_completed() for run in runs)
    # Every partition check and every chunk was executed by a worker, none in this process.
    assert sum(after.values()) - sum(before.values()) == partitions + chunks
    # Each worker loaded each magnification's model at most once, however many chunks it ran.
    loads = sum(models_after[w]["loads"] - models_before[w]["loads"] for w in models_after)
    hits = sum(models_after[w]["hits"] - models_before[w]["hits"] for w in models_after)
    assert loads + hits == chunks and loads <= len(models_after) * len(MAGS)
    assert hits >= chunks - len(models_after) * len(MAGS) > 0

    # A rerun over the same drop reuses every recorded file: the cluster re-checks only the
    # quarantined one (as the default path re-reads it), and nothing is pending to score.
    with distributed.Client(cluster, set_as_default=False) as client:
        again = inference_flow(
            root=registry,
            source=drop,
            out=out,
            dask_address=cluster.scheduler_address,
            **SCORING,
            return_state=True,
        )
        rerun_count = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert sum(rerun_count.values()) - sum(after.values()) == 1
    assert again.is_completed(), again.message
    assert [run.name for run in task_runs(again, "check-drop-", 1)] == ["check-drop-0"]
    assert task_runs(again, "score-chunk-", 0) == []
    rerun = again.result()["magnifications"]
    assert [(m["scored"], m["skipped"]) for m in rerun] == [(0, 6), (0, 6), (0, 0), (0, 0)]
    assert len(raw_rows(out)) == 12


def test_a_worker_lost_mid_run_loses_and_duplicates_nothing(
    cluster, registry, drop, default_run, tolerance, tmp_path
):
    default_out, default = default_run
    out, marker = str(tmp_path / "scored"), tmp_path / "killed-pid"
    with one_worker_killed_at_log(cluster, marker, "dala_model.serving.scoring", "scored "):
        state = inference_flow(
            root=registry,
            source=drop,
            out=out,
            dask_address=cluster.scheduler_address,
            **SCORING,
            return_state=True,
        )
    assert state.is_completed(), state.message
    # The killed chunk ran again elsewhere and rewrote its own part: every image once, every
    # case complete, the counts the default path's (nothing counted twice).
    assert_same_scoring(out, state.result(), default_out, default, tolerance)
    chunks = expected_chunks(default)
    runs = task_runs(state, "score-chunk-", chunks)
    assert len(runs) == chunks == len({run.name for run in runs})
    assert all(run.state.is_completed() for run in runs)


def test_unreachable_cluster_fails_before_the_drop_is_read(prefect_api, drop, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once closed
    out = tmp_path / "scored"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        state = inference_flow(
            root=str(tmp_path / "no-registry"),
            source=drop,
            out=str(out),
            dask_address=address,
            return_state=True,
        )
    assert state.is_failed()
    assert f"dask_address={address}: no Dask scheduler answered" in state.message, state.message
    assert not out.exists()  # not even the drop's manifest: the address was checked first

    no_source = inference_flow(root=str(tmp_path), dask_address=address, return_state=True)
    assert no_source.is_failed() and "dask_address scores a source drop" in no_source.message


def test_chunk_attempts_write_the_same_part_and_finish_adds_up_once(
    registry, drop, default_run, tmp_path
):
    """The library steps alone: a chunk run twice (as after a lost worker) rewrites its own
    part; the finish refuses results out of plan order, and run again (a retry) counts the
    chunks once."""
    default_out, default = default_run
    out = str(tmp_path / "scored")
    plan = scoring.plan_scoring(
        drop, registry, out, device="cpu", precision="fp32", batch_size=8, chunk_size=CHUNK
    )
    assert [(c.magnification, c.index) for c in plan.chunks] == [
        (m, k) for m in MAGS for k in range(3)
    ]
    assert sorted(f"part-{c.key}.parquet" for c in plan.chunks) == part_names(default)
    first = scoring.run_chunk(plan.chunks[0])
    written = storage.read_parquet(first.part)
    again = scoring.run_chunk(plan.chunks[0])
    assert again.part == first.part and (first.scored, again.scored) == (CHUNK, CHUNK)
    assert len(raw_rows(out)) == CHUNK  # the second attempt replaced the first's rows
    assert storage.read_parquet(first.part)["scored_at"].min() > written["scored_at"].max()

    results = [again] + [scoring.run_chunk(c) for c in plan.chunks[1:]]
    with pytest.raises(ValueError, match="chunk result 0 .* is not chunk 0 of this plan"):
        scoring.finish_scoring(plan, [results[1], results[0], *results[2:]])
    once, retried = scoring.finish_scoring(plan, results), scoring.finish_scoring(plan, results)
    for result in (once, retried):
        assert [(m.scored, m.skipped, len(m.parts)) for m in result.magnifications] == [
            (m["scored"], m["skipped"], len(m["parts"])) for m in default["magnifications"]
        ]
    assert len(raw_rows(out)) == 12 and raw_rows(out)["sha256"].is_unique


def test_drop_partitions_commit_to_the_default_records_in_plan_order(drop, default_run, tmp_path):
    """The drop's ingest steps alone: partitions checked apart (one twice, as after a lost
    worker) commit to the default path's records; results out of plan order are refused."""
    default_out, _ = default_run
    layout = ScoringLayout(str(tmp_path / "scored"))
    plan = drop_lib.plan_drop(drop, layout, partition_files=CHUNK)
    assert len(plan.partitions) == 13 and plan.read == 25 and plan.reused.empty
    checked = [drop_lib.check_partition(p, workers=1) for p in plan.partitions]
    assert not storage.exists(layout.manifest())  # checking writes nothing
    again = drop_lib.check_partition(plan.partitions[0], workers=1)
    assert again.rows == checked[0].rows and again.quarantined == checked[0].quarantined
    with pytest.raises(ValueError, match=r"checked\[0\] is partition 1 .* not partition 0"):
        drop_lib.commit_drop(plan, [checked[1], checked[0], *checked[2:]])
    with pytest.raises(ValueError, match="one checked partition per partition"):
        drop_lib.commit_drop(plan, checked[:-1])
    result = drop_lib.commit_drop(plan, checked)
    assert (result.read, result.reused, len(result.current)) == (25, 0, 24)
    for uri in ("manifest", "quarantine", "duplicates"):
        got = storage.read_parquet(getattr(layout, uri)())
        want = storage.read_parquet(getattr(ScoringLayout(default_out), uri)())
        stamps = [c for c in ("ingested_at", "quarantined_at") if c in got.columns]
        pd.testing.assert_frame_equal(got.drop(columns=stamps), want.drop(columns=stamps))
    # A second plan reuses every recorded file and re-reads only the quarantined one.
    replan = drop_lib.plan_drop(drop, layout, partition_files=CHUNK)
    assert (replan.read, len(replan.reused), len(replan.partitions)) == (1, 24, 1)
