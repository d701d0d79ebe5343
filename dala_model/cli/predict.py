"""`dala predict`: score a drop of new images with the promoted models, writing under OUT.

``--explain`` also writes Grad-CAM overlays of the images called malignant or uncertain (see
``dala_model.serving.scoring``); it needs the ``explain`` extra, checked here so the command says
so before any image is read.
"""

from __future__ import annotations

import argparse
import importlib.util

from dala_model.cli import UsageError
from dala_model.data.breakhis import MAGNIFICATIONS

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # dala_model.serving.scorer.PRECISIONS
EXPLAIN_METHODS = ("gradcam", "gradcam++")  # dala_model.serving.scoring.EXPLAIN_METHODS
UNCERTAIN_BAND = 0.1  # dala_model.serving.scoring.DEFAULT_UNCERTAIN_BAND


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="score new images (case folders, metadata.csv, BreakHis) under OUT"
    )
    p.add_argument(
        "source",
        help="the drop: SOURCE/<case_id>/<m>X/<name>.png, SOURCE/metadata.csv|.parquet "
        "(path, case_id, magnification[, label]) or BreakHis-named files; any fsspec URL",
    )
    p.add_argument("--registry", required=True, help="root URL holding the promoted models")
    p.add_argument("--out", required=True, help="scoring root URL (its own manifest, predictions)")
    p.add_argument("--model", default="dalaresnet50", help="registry model name")
    p.add_argument(
        "--magnification",
        type=int,
        choices=MAGNIFICATIONS,
        help="for images whose magnification cannot be known (else they are quarantined)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="call malignant at prob >= T (default: the model card's threshold, else 0.5)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: measured once per machine (fp32/bf16, memory format, CPU batch); int8: the "
        "CPU int8 model, quantized on first use from the model's validation images and saved "
        "beside it (not on CUDA)",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: measured on CPU (int8: 16)"
    )
    p.add_argument("--workers", type=int, default=None, help="read/decode threads")
    p.add_argument(
        "--explain",
        action="store_true",
        help="write a Grad-CAM overlay of each newly scored image called malignant or within "
        "--uncertain-band of the threshold under OUT/explain/, named in heatmap_uri (needs the "
        "explain extra; images scored by earlier runs are not re-explained)",
    )
    p.add_argument("--explain-method", choices=EXPLAIN_METHODS, default="gradcam")
    p.add_argument(
        "--uncertain-band",
        type=float,
        default=UNCERTAIN_BAND,
        help=f"with --explain: also explain calls with |prob - threshold| <= B "
        f"(default {UNCERTAIN_BAND})",
    )
    p.set_defaults(func=predict)


def predict(args: argparse.Namespace) -> int:
    from dala_model.serving.scorer import UnsupportedPrecision
    from dala_model.serving.scoring import score_source

    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise UsageError(f"--threshold must lie strictly between 0 and 1, got {args.threshold}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.uncertain_band < 1.0:
        raise UsageError(f"--uncertain-band must lie in [0, 1), got {args.uncertain_band}")
    if args.explain and importlib.util.find_spec("pytorch_grad_cam") is None:
        raise UsageError(
            "--explain needs the grad-cam package: pip install -c constraints.txt -e '.[explain]'"
        )
    try:
        result = _score(args, score_source)
    except LookupError as error:  # no promoted model: say how to get one
        raise UsageError(str(error)) from None
    except UnsupportedPrecision as error:  # e.g. int8 asked for on a CUDA device
        raise UsageError(str(error)) from None
    _print(result)
    return 0


def _score(args: argparse.Namespace, score_source):
    return score_source(
        args.source,
        args.registry,
        args.out,
        model=args.model,
        magnification=args.magnification,
        threshold=args.threshold,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        workers=args.workers,
        flow_run_id="cli",
        explain=args.explain,
        explain_method=args.explain_method,
        uncertain_band=args.uncertain_band,
    )


def _print(result) -> None:
    quarantined = ", ".join(f"{k} {v}" for k, v in result.quarantined.items()) or "none"
    print(
        f"{result.images} images ({result.layout}), {result.duplicates} duplicates, "
        f"quarantined: {quarantined}"
    )
    for m in result.magnifications:
        model = "no promoted model"
        if m.threshold is not None:
            model = (
                f"model {m.model_version[:12]} at threshold {m.threshold:g} ({m.threshold_from})"
            )
        elif m.model_version:
            model = f"model {m.model_version[:12]}"
        if m.precision is not None:
            model += f", {m.tuning.get('label', m.precision)}"
        print(
            f"{m.magnification}X: {m.scored} scored, {m.skipped} already scored, "
            f"{m.unscored} unscored, {m.quarantined} quarantined; " + model
        )
        if m.explain is not None:
            why = m.explain.get("not_explained")
            print(
                f"  heatmaps: {m.explained} written" + (f" (none possible: {why})" if why else "")
            )
        if m.report is not None:
            metrics = (m.report["metrics"] or {}).get("image", {})
            print(
                f"  labelled {m.report['labelled']}, evaluated {m.report['evaluated']} "
                f"(excluded {m.report['excluded']}): accuracy {metrics.get('accuracy')}"
            )
    print(f"image predictions: {result.images_uri}")
    print(f"case predictions:  {result.cases_uri}")
    if any(m.explain is not None for m in result.magnifications):
        print(f"heatmaps:          {result.heatmaps_uri}")
