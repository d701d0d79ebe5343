"""`dala train`: one model x one magnification; the TrainConfig fields people change, as flags."""

from __future__ import annotations

import argparse
import json

from pydantic import ValidationError

from dala_model.cli import UsageError
from dala_model.config import TrainConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train one model on one magnification (paper protocol by default)"
    )
    p.add_argument("root", help="storage root URL (local path, file://, s3://bucket/prefix)")
    p.add_argument("--magnification", type=int, required=True, help="40, 100, 200 or 400")
    p.add_argument("--model", default="dalaresnet50")
    p.add_argument("--scheme", default="patient", help="paper | patient | patient-kfold")
    p.add_argument("--fold", type=int, help="fold index for patient-kfold")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--imbalance", default="none", help="none | oversample | class_weight")
    p.add_argument("--monitor", default="val_accuracy", help="val_accuracy | val_gmean | val_loss")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA) | bf16 | fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--no-cache",
        dest="use_cache",
        action="store_false",
        help="decode PNGs instead of reading the decoded cache (slow)",
    )
    p.add_argument(
        "--pretrained",
        nargs="?",
        const=True,
        default=False,
        help="ImageNet weights (no value) or a weights path/URL",
    )
    p.add_argument(
        "--run-id", help="run folder name (default derived from model, magnification, scheme, seed)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last epoch"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dala_model.train import train

    fields = {
        k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None
    }
    try:
        config = TrainConfig(**fields)
    except ValidationError as exc:
        raise UsageError(_explain(exc)) from None
    result = train(config)
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


def _explain(exc: ValidationError) -> str:
    return "; ".join(
        f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}"
        for err in exc.errors()
    )
