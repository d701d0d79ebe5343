"""Reports from real run folders (the exact layout train.py writes), locally and on S3."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dala_model import storage
from dala_model.cli import main
from dala_model.metrics import evaluate
from dala_model.report.build import build_report
from dala_model.report.tables import fmt, paper_metrics, table6_cells, table6_row

MODELS = {"dalaresnet50": (25_611_842, 0.9), "resnet50": (23_512_130, 0.75)}
MAGS = (40, 100)
SEEDS = (0, 1)
EPOCHS = 6


def _write_run(
    root: str,
    model: str,
    mag: int,
    seed: int,
    scheme: str = "patient",
    run_id: str | None = None,
    model_options: dict | None = None,
) -> dict:
    """One complete run folder: config.json, history.parquet, test_predictions.parquet, run.json."""
    run_id = run_id or f"{model}-{mag}x-{scheme}-s{seed}"
    folder = storage.join(root, "runs", run_id)
    params, skill = MODELS[model]
    rng = np.random.default_rng([list(MODELS).index(model), mag, seed])
    patients = np.repeat([f"B{i}" for i in range(4)] + [f"M{i}" for i in range(6)], 8)
    y_true = np.array([0 if p.startswith("B") else 1 for p in patients])
    noise = rng.normal(0.0, 0.25, y_true.size)
    prob = np.clip(np.where(y_true == 1, skill, 1 - skill) + noise, 0.0, 1.0)
    predictions = pd.DataFrame(
        {
            "image_id": [f"{run_id}-{i:03d}" for i in range(y_true.size)],
            "patient_id": patients,
            "magnification": mag,
            "y_true": y_true,
            "prob_malignant": prob,
            "y_pred": (prob >= 0.5).astype(np.int64),
        }
    )
    epochs = np.arange(EPOCHS)
    history = pd.DataFrame(
        {
            "epoch": epochs,
            "train_loss": 0.7 * np.exp(-epochs / 3) + rng.random(EPOCHS) * 0.02,
            "train_acc": 0.6 + 0.3 * (1 - np.exp(-epochs / 2)),
            "val_loss": 0.75 * np.exp(-epochs / 4) + rng.random(EPOCHS) * 0.05,
            "val_acc": 0.55 + 0.3 * (1 - np.exp(-epochs / 2)) + rng.random(EPOCHS) * 0.02,
            "val_gmean": 0.5 + 0.3 * (1 - np.exp(-epochs / 2)),
            "lr": np.full(EPOCHS, 1e-4),
            "images_per_s": 300 + rng.random(EPOCHS),
            "epoch_seconds": 10 + rng.random(EPOCHS),
        }
    )
    config = {
        "root": root,
        "model": model,
        "magnification": mag,
        "scheme": scheme,
        "seed": seed,
        "epochs": EPOCHS,
        "batch_size": 32,
        "lr": 1e-4,
        "fold": None,
        **({"model_options": model_options} if model_options else {}),
    }
    summary = {
        "status": "complete",
        "run_id": run_id,
        "model": model,
        "magnification": mag,
        "scheme": scheme,
        "fold": None,
        "seed": seed,
        "parameters": params,
        "train_seconds": float(history["epoch_seconds"].sum()),
        "epochs": EPOCHS,
        "best_epoch": int(history["val_acc"].idxmax()),
        "metrics": {
            "val": {
                "loss": 0.3,
                "accuracy": float(history["val_acc"].max()),
                "gmean": 0.8,
                "f1_weighted": 0.8,
            },
            "test": evaluate(y_true, prob, patient_ids=patients),
        },
        "data_version": "abc123",
        "code_version": "test",
        "config": config,
    }
    storage.write_bytes_atomic(
        storage.join(folder, "config.json"),
        json.dumps({"config": config, "run_id": run_id}).encode(),
    )
    storage.write_parquet_atomic(history, storage.join(folder, "history.parquet"))
    storage.write_parquet_atomic(predictions, storage.join(folder, "test_predictions.parquet"))
    storage.write_bytes_atomic(storage.join(folder, "run.json"), json.dumps(summary).encode())
    return summary


def _write_all(root: str) -> list[dict]:
    runs = [
        _write_run(root, model, mag, seed) for model in MODELS for mag in MAGS for seed in SEEDS
    ]
    # An interrupted run (config.json and history only) and a failed one: listed, not tabled.
    interrupted = storage.join(root, "runs", "dalaresnet50-200x-patient-s0")
    storage.write_bytes_atomic(
        storage.join(interrupted, "config.json"),
        json.dumps(
            {
                "config": {
                    "model": "dalaresnet50",
                    "magnification": 200,
                    "scheme": "patient",
                    "seed": 0,
                    "fold": None,
                }
            }
        ).encode(),
    )
    failed = storage.join(root, "runs", "resnet50-400x-patient-s0")
    storage.write_bytes_atomic(
        storage.join(failed, "run.json"),
        json.dumps(
            {
                "status": "failed",
                "run_id": "resnet50-400x-patient-s0",
                "model": "resnet50",
                "magnification": 400,
                "scheme": "patient",
                "seed": 0,
                "fold": None,
            }
        ).encode(),
    )
    return runs


def _png_ok(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.verify()
    return image.size


def test_report_from_real_run_folders(storage_root: str) -> None:
    runs = _write_all(storage_root)
    written = build_report(storage_root)

    reports = storage.join(storage_root, "reports")
    assert written["report.md"] == storage.join(reports, "report.md")
    listed = {url.rsplit("/", 1)[1] for url in storage.list_files(reports)}
    assert listed == set(written)
    pngs = sorted(name for name in written if name.endswith(".png"))
    assert {
        "table6_patient.png",
        "table7_patient.png",
        "confusion_patient.png",
        "roc_patient.png",
        "patient_patient.png",
        "ci_patient.png",
        "curves_patient_40X.png",
        "curves_patient_100X.png",
    } == set(pngs)
    for name in pngs:
        width, height = _png_ok(storage.read_bytes(written[name]))
        assert width > 300 and height > 150, name

    # metrics.json: mean and sample std across the two seeds, computed here by hand.
    summary = json.loads(storage.read_bytes(written["metrics.json"]))
    assert summary["schemes"] == ["patient"]
    assert len(summary["groups"]) == 4 and len(summary["runs"]) == 8
    for group in summary["groups"]:
        members = [
            r
            for r in runs
            if (r["model"], r["magnification"]) == (group["model"], group["magnification"])
        ]
        a, b = (r["metrics"]["test"]["image"]["accuracy"] for r in members)
        assert group["n_runs"] == 2 and group["seeds"] == [0, 1]
        assert group["test"]["accuracy"]["mean"] == pytest.approx((a + b) / 2)
        assert group["test"]["accuracy"]["std"] == pytest.approx(abs(a - b) / np.sqrt(2))
        pa, pb = (r["metrics"]["test"]["patient"]["gmean"] for r in members)
        assert group["patient"]["gmean"]["mean"] == pytest.approx((pa + pb) / 2)
        ta, tb = (r["train_seconds"] for r in members)
        assert group["train_seconds"]["mean"] == pytest.approx((ta + tb) / 2)
        assert (
            group["confusion_matrix"]
            == np.add(
                *(r["metrics"]["test"]["image"]["confusion_matrix"] for r in members)
            ).tolist()
        )
    dala40 = next(
        g for g in summary["groups"] if (g["model"], g["magnification"]) == ("dalaresnet50", 40)
    )
    assert dala40["paper"]["accuracy"] == 0.985 and dala40["paper"]["parameters"] == 25_611_842
    assert {r["run_id"]: r["status"] for r in summary["incomplete"]} == {
        "dalaresnet50-200x-patient-s0": "running or interrupted (no run.json)",
        "resnet50-400x-patient-s0": "failed",
    }

    md = storage.read_bytes(written["report.md"]).decode()
    assert (
        "| Model | 40X Accuracy | 40X F1 (minority/weighted) | 40X IBA | 40X G-mean | "
        "100X Accuracy |"
    ) in md
    acc = dala40["test"]["accuracy"]
    dala_row = next(line for line in md.splitlines() if line.startswith("| DALAResNet50 | "))
    assert f"{acc['mean']:.3f} ± {acc['std']:.3f} (paper 0.985)" in dala_row
    assert "(paper 0.970/0.985)" in dala_row  # F1 minority/weighted as published
    resnet_row = next(line for line in md.splitlines() if line.startswith("| ResNet50 | "))
    assert "(paper 0.927)" in resnet_row and "(paper 0.944)" in resnet_row
    assert "25,611,842 (paper 25,611,842)" in md and "(paper 2133.0)" in md
    assert "Split scheme `patient`" in md and "Warning" not in md
    assert "resnet50-400x-patient-s0" in md and "failed" in md
    for name in pngs:
        assert f"]({name})" in md

    page = storage.read_bytes(written["report.html"]).decode()
    assert not re.search(r"https?://", page), "the HTML must not reference network resources"
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(pngs)
    for data in embedded:
        _png_ok(base64.b64decode(data))
    assert "<th>40X Accuracy</th>" in page and "(paper 0.985)" in page


def test_paper_scheme_is_flagged_as_patient_leaking(tmp_path) -> None:
    root = str(tmp_path / "root")
    _write_run(root, "dalaresnet50", 40, 0, scheme="paper")
    out = str(tmp_path / "elsewhere")
    written = build_report(root, out=out)
    assert written["report.md"] == f"{out}/report.md"
    md = (tmp_path / "elsewhere" / "report.md").read_text()
    assert "Split scheme `paper`" in md
    assert "> **Warning:** The `paper` scheme splits images, not patients" in md
    # A single run has no spread: the cell shows the value alone.
    group = json.loads((tmp_path / "elsewhere" / "metrics.json").read_text())["groups"][0]
    assert group["test"]["accuracy"]["std"] is None
    assert f"| {group['test']['accuracy']['mean']:.3f} (paper 0.985) |" in md


def test_incomplete_run_files_are_reported_not_fatal(tmp_path) -> None:
    root = str(tmp_path / "root")
    _write_run(root, "resnet50", 100, 0)
    (tmp_path / "root" / "runs" / "resnet50-100x-patient-s0" / "history.parquet").unlink()
    written = build_report(root)
    md = (tmp_path / "root" / "reports" / "report.md").read_text()
    assert "`resnet50-100x-patient-s0` has no history.parquet" in md
    assert not any(name.startswith("curves_") for name in written)
    assert "roc_patient.png" in written


def test_broken_run_json_names_the_file(tmp_path) -> None:
    root = tmp_path / "root"
    bad = root / "runs" / "r1"
    bad.mkdir(parents=True)
    (bad / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"r1/run.json is not valid JSON"):
        build_report(str(root))
    (bad / "run.json").write_text(json.dumps({"status": "complete", "model": "resnet50"}))
    with pytest.raises(ValueError, match=r"r1/run.json says complete but lacks"):
        build_report(str(root))


def test_cli_report(tmp_path, capsys) -> None:
    root = str(tmp_path / "root")
    assert main(["report", root]) == 2
    assert "no runs under" in capsys.readouterr().err
    _write_run(root, "dalaresnet50", 400, 3)
    assert main(["report", root, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "out" / "report.html") in printed
    assert (tmp_path / "out" / "metrics.json").stat().st_size > 0


def test_only_incomplete_runs_give_a_report_without_tables(tmp_path) -> None:
    root = str(tmp_path / "root")
    interrupted = storage.join(root, "runs", "resnet50-40x-patient-s0")
    config = {"model": "resnet50", "magnification": 40, "scheme": "patient", "seed": 0, "fold": 2}
    storage.write_bytes_atomic(
        storage.join(interrupted, "config.json"), json.dumps({"config": config}).encode()
    )
    written = build_report(root)
    assert not any(name.endswith(".png") for name in written)
    assert json.loads(storage.read_bytes(written["metrics.json"]))["groups"] == []
    md = storage.read_bytes(written["report.md"]).decode()
    assert "No complete runs yet" in md and "Table 6" not in md
    assert (
        "| `resnet50-40x-patient-s0` | running or interrupted (no run.json) | resnet50 | 40 |" in md
    )


def test_table6_cells_for_ours_and_the_papers() -> None:
    """The one Table 6 builder: the paper's numbers under our metric names, ours alike."""
    assert table6_row(paper_metrics("dalaresnet50", 40)) == {
        "Accuracy": "0.985",
        "F1 (minority/weighted)": "0.970/0.985",
        "IBA": "0.980",
        "G-mean": "0.980",
    }

    def published(value: float | None) -> str | None:
        return None if value is None else fmt(value)

    # A cell the paper does not publish is None (left out of the report's "(paper ...)").
    assert table6_cells({"accuracy": 0.944}, published) == ["0.944", None, None, None]
    assert paper_metrics("not-in-the-paper", 40) == {}
    ours = {"accuracy": 0.5, "f1_minority": None, "f1_weighted": 0.25, "gmean": float("nan")}
    assert table6_cells(ours, sep=" / ") == ["0.500", "— / 0.250", "—", "—"]
    assert table6_row(ours, lambda v: fmt(v, missing="-"))["F1 (minority/weighted)"] == "-/0.250"


# ---------------------------------------------------------------- names that reach the report

PAYLOAD = "<img src=x onerror=alert(1)>"
INCOMPLETE_PAYLOAD = "<svg onload=alert(2)>"


def write_planted_root(root: str) -> dict:
    """Runs whose run id, model option and image ids (the source file names the gallery lists)
    carry live-looking markup, an explained one among them, and an incomplete run named
    likewise. Returns the planted run's summary."""
    from dala_model.report.explain import EXPLAIN, INDEX, INDEX_COLUMNS

    summary = _write_run(
        root, "dalaresnet50", 40, 0, run_id=PAYLOAD, model_options={"note": PAYLOAD}
    )
    _write_run(root, "resnet50", 40, 0)
    folder = storage.join(root, "runs", PAYLOAD)
    storage.remove(storage.join(folder, "history.parquet"))  # a problem line naming the run
    predictions = storage.read_parquet(storage.join(folder, "test_predictions.parquet"))
    tiles = predictions.head(3).assign(
        rank=range(3),
        category=["FP", "FN", "TP"],
        confidence=0.9,
        cam_class=1,
        method="gradcam",
        file=[f"{i:02d}-tile.png" for i in range(3)],
    )
    for i, name in enumerate(tiles["file"]):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(buffer, format="PNG")
        storage.write_bytes_atomic(storage.join(folder, EXPLAIN, name), buffer.getvalue())
    storage.write_parquet_atomic(tiles[list(INDEX_COLUMNS)], storage.join(folder, EXPLAIN, INDEX))
    storage.write_bytes_atomic(
        storage.join(root, "runs", INCOMPLETE_PAYLOAD, "config.json"),
        json.dumps({"config": {"model": "resnet50", "magnification": 100}}).encode(),
    )
    return summary


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append((tag, dict(attrs)))


def live_tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    """Every element the page really has, as a browser's tokenizer sees its tags."""
    parser = _Tags()
    parser.feed(page)
    return parser.tags


def test_names_that_reach_the_report_are_escaped(tmp_path) -> None:
    root = str(tmp_path / "root")
    summary = write_planted_root(root)
    written = build_report(root)
    page = storage.read_bytes(written["report.html"]).decode()
    md = storage.read_bytes(written["report.md"]).decode()
    escaped = html.escape(PAYLOAD)

    # The names do reach the page, as text: the run id in the runs table and the problems,
    # the model option in every row label, an image id in the gallery's tile key.
    assert f"<td><code>{escaped}</code></td>" in page
    assert f"<li><code>{escaped}</code> has no history.parquet" in page
    assert f"DALAResNet50 [note=&quot;{escaped}&quot;]" in page
    image_id = summary["run_id"] + "-000"
    assert f"<td><code>{html.escape(image_id)}</code></td>" in page
    assert f"<td><code>{html.escape(INCOMPLETE_PAYLOAD)}</code></td>" in page
    # ... and never as markup: the only images are the figures, no element has a handler.
    tags = live_tags(page)
    images = [attrs for tag, attrs in tags if tag == "img"]
    assert len(images) == sum(name.endswith(".png") for name in written)
    assert all((a["src"] or "").startswith("data:image/png;base64,") for a in images)
    assert not [tag for tag, _ in tags if tag in ("script", "svg", "iframe", "object")]
    assert not [(t, a) for t, a in tags for name in a if name.startswith("on")]
    assert "gallery_40x.png" in written

    # Markdown: the names stay in code spans or have their "<" escaped, never raw HTML.
    outside_code = re.sub(r"`[^`\n]+`", "", md)
    assert "<img" not in outside_code and "<svg" not in outside_code
    assert '[note="&lt;img src=x onerror=alert(1)>"]' in md
    assert f"| `{image_id}` |" in md


def test_markdown_text_keeps_code_and_neutralises_the_rest() -> None:
    from dala_model.report.tables import markdown_table, markdown_text

    assert markdown_text("run `a<b>` failed <b>") == "run `a<b>` failed &lt;b>"
    assert markdown_text("[x](javascript:alert(1))") == "\\[x]\\(javascript:alert(1))"
    assert markdown_text("a\nb | c") == "a b | c"  # one line, whatever the text held
    assert markdown_text("lone ` tick \\") == "lone \\` tick \\\\"
    assert markdown_text("[0.61, 0.93] 10 patients", line_start=False) == (
        "[0.61, 0.93] 10 patients"
    )
    assert markdown_table(["a|b"], [["`x|y`"]]).splitlines()[2] == "| `x\\|y` |"


def test_report_link_is_a_browsable_redacted_url(tmp_path) -> None:
    from flows.report import report_link

    local = tmp_path / "a (b)" / "report.html"
    assert report_link(str(local)) == local.as_uri()
    assert report_link(str(local)).startswith("file:///") and "(" not in report_link(str(local))
    assert report_link("s3://key:secret@bucket/r t/report.html") == (
        "s3://***@bucket/r%20t/report.html"
    )
