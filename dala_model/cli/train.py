"""`dala train`: one model x one magnification; the TrainConfig fields people change, as flags.

``--config FILE`` starts from a whole TrainConfig in JSON (a run folder's ``config.json`` works
too), so a recorded run is reproduced exactly; flags given beside it override its fields.
``--protocol`` (``engine.config.PROTOCOLS``) fills in only what neither the file nor a flag sets. The
flow's multi-GPU trainings launch ``torchrun ... dala train --config`` the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import ValidationError

from dala_model.cli import UsageError
from dala_model.engine.config import PROTOCOLS, TrainConfig, apply_protocol
from dala_model.runs import RunConfigRecord


def register(subparsers: argparse._SubParsersAction) -> None:
    # Defaults are None: TrainConfig holds the defaults (the paper's protocol), so a flag left out
    # never overrides a value read from --config.
    p = subparsers.add_parser(
        "train", help="train one model on one magnification (paper protocol by default)"
    )
    p.add_argument(
        "root", nargs="?", help="storage root URL (local path, file://, s3://bucket/prefix)"
    )
    p.add_argument(
        "--config",
        type=Path,
        help="a TrainConfig as JSON, or a run folder's config.json; flags override its fields",
    )
    p.add_argument("--magnification", type=int, help="40, 100, 200 or 400 (required)")
    p.add_argument("--model", help="default dalaresnet50")
    p.add_argument("--scheme", help="paper | patient (default) | patient-kfold")
    p.add_argument("--fold", type=int, help="fold index for patient-kfold")
    p.add_argument("--epochs", type=int, help="default 50")
    p.add_argument("--batch-size", type=int, help="the global batch; default 32")
    p.add_argument("--image-size", type=int, help="default 224")
    p.add_argument("--lr", type=float, help="default 1e-4")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--imbalance", help="none (default) | oversample | class_weight")
    p.add_argument("--monitor", help="val_accuracy (default) | val_gmean | val_loss")
    p.add_argument("--device", help="auto (default) | cpu | cuda | cuda:N")
    p.add_argument(
        "--tracking-uri",
        help="MLflow server to mirror the run into (default $MLFLOW_TRACKING_URI; docs/TRACKING.md)",
    )
    p.add_argument(
        "--precision",
        help="auto (default: measured on first use on this machine, with the memory format) | bf16 | fp32",
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model"
    )
    p.add_argument(
        "--cache",
        dest="use_cache",
        action=argparse.BooleanOptionalAction,
        help="read the decoded cache (default); --no-cache decodes the PNGs instead (slow)",
    )
    p.add_argument(
        "--protocol",
        choices=sorted(PROTOCOLS),
        default="patient",
        help="patient (default: TrainConfig's defaults) | paper (the published protocol: "
        "image-level 6:1:3 split, ImageNet weights, no BatchNorm recalibration, fp32, batch 32, "
        "50 epochs, lr 1e-4, head dropout 0.25, best on val accuracy); flags override its fields",
    )
    p.add_argument(
        "--pretrained",
        nargs="?",
        const=True,
        help="ImageNet weights (no value) or a weights path/URL",
    )
    p.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_const",
        const=False,
        help="random initialisation, also under --protocol paper (which asks for ImageNet weights)",
    )
    p.add_argument(
        "--run-id", help="run folder name (default derived from model, magnification, scheme, seed)"
    )
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        help="continue an interrupted run from its last epoch",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dala_model.engine.train import train

    result = train(config_from_args(args))
    print(
        json.dumps(
            {
                "run": result.run_uri,
                "status": result.status,
                "best_epoch": result.best_epoch,
                "test": result.metrics["test"]["image"],
            },
            indent=2,
            default=float,
        )
    )
    return 0


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The protocol's fields, overridden by the file's (if any), overridden by every flag given."""
    fields = _read_config(args.config) if args.config else {}
    fields.update(
        (k, v) for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None
    )
    try:
        return TrainConfig(**apply_protocol(fields, getattr(args, "protocol", "patient")))
    except ValidationError as exc:
        raise UsageError(_explain(exc)) from None


def _read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"--config {path}: cannot read a JSON TrainConfig ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        # a run folder's config.json: its TrainConfig is recorded under "config"
        try:
            data = RunConfigRecord.parse(data, str(path)).config
        except ValueError as exc:
            raise UsageError(f"--config {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a JSON object of TrainConfig fields")
    # A recorded tracking URI has its credentials removed, so replaying it could only fail:
    # where a run is mirrored is this invocation's choice (--tracking-uri, $MLFLOW_TRACKING_URI).
    data.pop("tracking_uri", None)
    return data


def _explain(exc: ValidationError) -> str:
    return "; ".join(f"{_flag(err['loc'])}: {err['msg']}" for err in exc.errors())


def _flag(loc: tuple) -> str:
    if loc == ("root",):
        return "ROOT (or --config)"
    return f"--{'-'.join(str(p) for p in loc).replace('_', '-')}"
