"""Load: ingest memory against dataset size, and split/manifest operations on 1,000,000 rows.

Each measurement runs in a fresh child process, so its peak RSS (``ru_maxrss``) is its own and
not the test runner's. Sizes are kept small enough for CI on two cores; docs/RELIABILITY.md
records the numbers and what the paper-sized 8,000-image ingest needs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from dala_model.data.synth import generate

_INGEST = textwrap.dedent(
    """
    import json, resource, sys, time
    from dala_model.data.ingest import ingest
    started = time.perf_counter()
    result = ingest(sys.argv[1], sys.argv[2], workers=2, cache_size=64)
    print(json.dumps({"images": result.images, "seconds": time.perf_counter() - started,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
)


def _child(code: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_ingest_memory_stays_flat_as_the_dataset_grows(tmp_path):
    """Peak RSS at 200 and 800 images (350x230 PNGs): growth must stay well below one decoded image
    per extra image (350*230*3 = 241 KB), i.e. nothing is held per image but its manifest row
    and its 64px cache entry (12 KB)."""
    measured = {}
    for images_per_patient in (5, 20):  # 10 patients x 4 magnifications x n = 200, 800 images
        source = tmp_path / f"source{images_per_patient}"
        count = generate(
            str(source),
            patients=10,
            images_per_patient=images_per_patient,
            seed=1,
            size=(350, 230),
            workers=2,
        )
        measured[count] = _child(_INGEST, str(source), str(tmp_path / f"root{images_per_patient}"))
        assert measured[count]["images"] == count
    small, large = measured[200], measured[800]
    per_image_kb = (large["peak_rss_mb"] - small["peak_rss_mb"]) * 1024 / 600
    print(f"ingest load: {json.dumps(measured)}; growth {per_image_kb:.1f} KB/image")
    assert per_image_kb < 100, measured


_MILLION = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np, pandas as pd
    from dala_model import storage
    from dala_model.data.manifest import MANIFEST_SCHEMA, data_version
    from dala_model.data.splits import check_patient_disjoint, split_frame
    n, rng = 1_000_000, np.random.default_rng(0)
    patients = rng.integers(0, 5_000, n)
    ids = pd.Series(rng.integers(0, 2**63, n, dtype=np.int64)).map("{:016x}".format)
    frame = pd.DataFrame({
        "image_id": ids, "uri": "s3://bucket/source/" + ids + ".png", "relpath": ids + ".png",
        "sha256": ids + ids + ids + ids, "bytes": np.int64(400_000), "width": np.int32(700),
        "height": np.int32(460), "format": "PNG", "mode": "RGB",
        "label": np.where(patients % 3 == 0, "benign", "malignant"),
        "label_id": (patients % 3 != 0).astype(np.int8), "subtype": "adenosis", "subtype_code": "A",
        "patient_id": pd.Series(patients).map("14-{}".format),
        "slide_id": pd.Series(patients).map("14-{}".format),
        "magnification": np.array([40, 100, 200, 400], np.int16)[rng.integers(0, 4, n)],
        "seq": np.arange(n, dtype=np.int32), "procedure": "SOB", "source_version": "x",
        "ingested_at": pd.Timestamp("2026-01-01", tz="UTC"),
    })
    times = {}
    def timed(name, fn):
        started = time.perf_counter(); out = fn(); times[name] = round(time.perf_counter() - started, 2)
        return out
    url = sys.argv[1] + "/manifests/manifest.parquet"
    timed("write_manifest", lambda: storage.write_parquet_atomic(frame, url, schema=MANIFEST_SCHEMA))
    back = timed("read_manifest", lambda: storage.read_parquet(url))
    timed("data_version", lambda: data_version(back))
    paper = timed("split_paper", lambda: split_frame(back, "paper", seed=0))
    patient = timed("split_patient", lambda: split_frame(back, "patient", seed=0))
    timed("check_patient_disjoint", lambda: check_patient_disjoint(patient, back))
    assert len(paper) == len(patient) == n
    print(json.dumps({"times_s": times, "rows": n,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
)


@pytest.mark.slow
def test_split_and_manifest_operations_on_a_million_rows(tmp_path):
    result = _child(_MILLION, str(tmp_path))
    print(f"1M-row manifest: {json.dumps(result)}")
    assert result["rows"] == 1_000_000
    assert sum(result["times_s"].values()) < 60, result
    assert result["peak_rss_mb"] < 4096, result
