"""Typed training configuration whose defaults are the paper's protocol.

One pydantic model serves the CLI, the Prefect flow parameters and the run folder's
``config.json``, so a run is reproduced from its recorded config alone. Invalid values are
rejected before any work starts, with a message naming the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dala_model.data.breakhis import check_magnifications


class TrainConfig(BaseModel):
    """One model x one magnification x one split (or fold).

    Defaults reproduce the paper: Adam, lr 1e-4, batch 32, 50 epochs, 224x224, [-1, 1]
    normalisation ("paper" preset), random rotation + horizontal flip, dropout 0.25 (built into
    ``dalaresnet50``), best checkpoint chosen on the validation split. The paper used ImageNet
    weights; ``pretrained`` stays False by default because those weights cannot be fetched
    offline — pass ``pretrained=True`` (torchvision cache) or a weights URL to match it.
    """

    model_config = ConfigDict(extra="forbid")

    root: str = Field(description="storage root URL holding manifests/, cache/, splits/, runs/")
    magnification: int = Field(description="40, 100, 200 or 400")
    model: str = "dalaresnet50"
    scheme: Literal["paper", "patient", "patient-kfold"] = "patient"
    fold: int | None = Field(default=None, ge=0, description="fold index for patient-kfold")
    epochs: int = Field(default=50, gt=0)
    batch_size: int = Field(default=32, gt=0)
    image_size: int = Field(default=224, ge=32, le=1024)
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    seed: int = 0
    imbalance: Literal["none", "oversample", "class_weight"] = "none"
    monitor: Literal["val_accuracy", "val_gmean", "val_loss"] = "val_accuracy"
    recalibrate_bn: bool = Field(
        default=True,
        description="recompute BatchNorm statistics on the training images before each validation",
    )
    preset: Literal["paper", "imagenet"] = "paper"
    rotation_degrees: float = Field(default=20.0, ge=0, le=180)
    pretrained: bool | str = False
    model_options: dict[str, float | int | str] = Field(default_factory=dict)
    device: str = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # None: measured on first use on this machine (engine.autotune), with precision "auto".
    channels_last: bool | None = None
    compile: bool = False
    use_cache: bool = True
    workers: int | None = Field(default=None, ge=0, description="loader workers (PNG path)")
    resume: bool = False
    run_id: str | None = None
    # Where to mirror the run (dala_model.tracking); None: $MLFLOW_TRACKING_URI, else no mirror.
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking server to mirror the run into (optional)"
    )

    @field_validator("magnification")
    @classmethod
    def _known_magnification(cls, value: int) -> int:
        check_magnifications([value])
        return value

    @field_validator("model")
    @classmethod
    def _registered_model(cls, value: str) -> str:
        from dala_model.models.registry import list_models

        if value not in list_models():
            raise ValueError(f"unknown model {value!r}; choose one of {list_models()}")
        return value

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError(f"run_id may hold letters, digits, '.', '_' and '-' only: {value!r}")
        return value

    @model_validator(mode="after")
    def _fold_matches_scheme(self) -> TrainConfig:
        if self.scheme == "patient-kfold" and self.fold is None:
            raise ValueError("fold is required with scheme 'patient-kfold' (e.g. fold=0)")
        if self.scheme != "patient-kfold" and self.fold is not None:
            raise ValueError(
                f"fold is only meaningful with scheme 'patient-kfold', not {self.scheme!r}"
            )
        return self

    @property
    def resolved_run_id(self) -> str:
        """Stable name so a rerun of the same training finds (and resumes) its own folder."""
        if self.run_id:
            return self.run_id
        fold = f"-fold{self.fold}" if self.fold is not None else ""
        return f"{self.model}-{self.magnification}x-{self.scheme}{fold}-seed{self.seed}"


# Fields that say how or where a run executed, not what experiment it is: runs that differ only
# in these (and in seed/fold, the replicates a table averages over) may be pooled in a report.
NOT_THE_EXPERIMENT = frozenset(
    {
        "root",
        "seed",
        "fold",
        "run_id",
        "resume",
        "device",
        "precision",
        "channels_last",
        "compile",
        "use_cache",
        "workers",
        "tracking_uri",
    }
)


def config_hash(config: TrainConfig | dict, group_by: str | None = None) -> str:
    """Hash of everything that defines the experiment: the full config minus ``NOT_THE_EXPERIMENT``,
    plus the split's grouping (patient or slide). Equal hashes may be averaged; others never are.

    ``config`` may be a TrainConfig or a recorded ``config.json``'s ``config`` dict (old runs)."""
    data = config.model_dump(mode="json") if isinstance(config, TrainConfig) else dict(config)
    kept = {key: value for key, value in sorted(data.items()) if key not in NOT_THE_EXPERIMENT}
    kept["split_group_by"] = group_by
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


# What one report section holds fixed while its rows vary: the network and its magnification.
NOT_THE_SETTING = frozenset({"model", "magnification", "model_options"})


def setting_hash(config: TrainConfig | dict, group_by: str | None = None) -> str:
    """Hash of the training setting: what ``config_hash`` hashes minus the model, its options and
    the magnification. Runs with one setting hash were trained the same way (epochs, lr, batch,
    image size, pretrained weights, imbalance handling, monitor, ...) on the same grouping of the
    same split scheme, so a report may set their models side by side in one table; only equal
    ``config_hash`` values are ever averaged."""
    data = config.model_dump(mode="json") if isinstance(config, TrainConfig) else dict(config)
    return config_hash({k: v for k, v in data.items() if k not in NOT_THE_SETTING}, group_by)


# Named training protocols, as data: the TrainConfig fields each one fixes. ``patient`` (the
# default) is TrainConfig's own defaults. ``paper`` is the paper's protocol as published: an
# image-level 6:1:3 split, ImageNet weights, no BatchNorm recalibration, fp32, batch 32, 50
# epochs, lr 1e-4, dropout 0.25 in the head, best on validation accuracy. Where the paper is
# silent (optimizer, loss, rotation range) see ``dala_model.paper.PAPER_ASSUMPTIONS``.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "patient": {},
    "paper": {
        "scheme": "paper",
        "pretrained": True,
        "recalibrate_bn": False,
        "precision": "fp32",
        "batch_size": 32,
        "epochs": 50,
        "lr": 1e-4,
        "monitor": "val_accuracy",
        "model_options": {"dropout": 0.25},
    },
}


def apply_protocol(fields: dict[str, Any], protocol: str = "patient") -> dict[str, Any]:
    """``fields`` (the values a caller chose) over ``protocol``'s, ready for ``TrainConfig(**...)``.

    What the caller set wins, so ``--protocol paper --epochs 2`` is the paper's protocol for two
    epochs; ``model_options`` merge the same way, option by option. A protocol's value applies only
    where the model has it: ``pretrained`` only to a model with published weights (the paper's
    ViT has none and trains from scratch), a model option only to a model whose builder takes it
    (``dropout``: dalaresnet50, seresnet50_paper, vgginnet and vit_paper; the library baselines
    keep their own heads).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    from dala_model.models.registry import get_model_spec

    spec = get_model_spec(fields.get("model", TrainConfig.model_fields["model"].default))
    preset = dict(PROTOCOLS[protocol])
    options = {k: v for k, v in preset.pop("model_options", {}).items() if k in spec.options}
    if spec.weights is None:
        preset.pop("pretrained", None)
    merged = {**preset, **fields}
    if options or "model_options" in fields:
        merged["model_options"] = {**options, **(fields.get("model_options") or {})}
    return merged
