"""`dala explain`: Grad-CAM overlays of a run's test images, and DALAResNet50's channel weights.

The work is ``dala_model.report.explain.explain_run``; this module only parses flags and prints
where the files went. It needs the ``explain`` extra (``pip install -e '.[explain]'``, the
``grad-cam`` package); without it the command says so instead of failing in an import.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

from dala_model.cli import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain", help="Grad-CAM heatmaps of a run's test images (under runs/<id>/explain/)"
    )
    p.add_argument("root", help="storage root URL holding runs/")
    p.add_argument("--run", required=True, dest="run_id", help="run id (a folder under runs/)")
    p.add_argument(
        "--images",
        type=int,
        default=8,
        help="test images to explain, stratified over FP, FN, TP, TN (default 8)",
    )
    p.add_argument("--method", choices=("gradcam", "gradcam++"), default="gradcam")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N | auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        raise UsageError(
            "dala explain needs the grad-cam package: pip install -c constraints.txt -e '.[explain]'"
        )
    if args.images < 1:
        raise UsageError(f"--images must be at least 1, got {args.images}")
    from dala_model.report.explain import explain_run

    result = explain_run(args.root, args.run_id, args.images, args.method, args.device)
    counts = result.index["category"].value_counts().to_dict()
    print(
        json.dumps(
            {
                "folder": result.folder,
                "images": len(result.index),
                "categories": {k: int(v) for k, v in sorted(counts.items())},
                "attention_channels": result.channels is not None,
            },
            indent=2,
        )
    )
    return 0
