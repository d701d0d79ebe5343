"""The source paper's published numbers, as data, so reports and `dala models` can cite them.

Liu, Achuthan et al., "Dual-Activated Lightweight Attention ResNet50 for Automatic
Histopathology Breast Cancer Image Classification", IEEE Access, 2024. Keys are our model
registry names; magnifications are the integers 40, 100, 200, 400. Values are copied from the
paper's Tables 6 and 7 (restated in ``shared/paper-facts.md``); nothing here is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

from dala_model.data.breakhis import MAGNIFICATIONS

PAPER_CITATION = (
    "Liu, Achuthan et al., Dual-Activated Lightweight Attention ResNet50 for Automatic "
    "Histopathology Breast Cancer Image Classification, IEEE Access, 2024"
)
# The paper's protocol: image-level shuffled 60/10/30 split, 50 epochs on one RTX A4000.
PAPER_EPOCHS = 50
PAPER_HARDWARE = "NVIDIA RTX A4000 (16 GB)"

# How the paper names each model in its tables, in the order its Table 6 lists them.
PAPER_NAMES: dict[str, str] = {
    "dalaresnet50": "DALAResNet50",
    "resnet50": "ResNet50",
    "vgg16inception": "VGG16Inception",
    "seresnet50": "SEResNet50",
    "vgg16": "VGG16",
    "swin_b": "Swin-Transformer",
    "dinov2_vitb14": "Dinov2_Vitb14",
    "vit_b_16": "ViT",
    "densenet121": "DenseNet121",
}

# Table 7. The "ResNet50" count equals torchvision resnet34 with a 1000-way head, an
# inconsistency in the paper; it is kept as published.
PAPER_PARAMS: dict[str, int] = {
    "dalaresnet50": 25_611_842,
    "resnet50": 21_797_672,
    "vgg16inception": 38_139_938,
    "seresnet50": 27_073_090,
    "vgg16": 134_268_738,
    "swin_b": 86_745_274,
    "dinov2_vitb14": 86_582_018,
    "vit_b_16": 51_375_106,
    "densenet121": 9_028_970,
}


@dataclass(frozen=True)
class PaperResult:
    """One cell group of Table 6; the paper gives the F1/IBA/G-mean only for DALAResNet50."""

    accuracy: float
    f1_minority: float | None = None
    f1_weighted: float | None = None
    iba: float | None = None
    gmean: float | None = None


def _accuracies(*values: float) -> dict[int, PaperResult]:
    return {
        mag: PaperResult(accuracy=value) for mag, value in zip(MAGNIFICATIONS, values, strict=True)
    }


# Table 6, test set, per model and magnification.
PAPER_RESULTS: dict[str, dict[int, PaperResult]] = {
    "dalaresnet50": {
        40: PaperResult(0.985, f1_minority=0.970, f1_weighted=0.985, iba=0.980, gmean=0.980),
        100: PaperResult(0.987, f1_minority=0.974, f1_weighted=0.987, iba=0.985, gmean=0.985),
        200: PaperResult(0.979, f1_minority=0.958, f1_weighted=0.979, iba=0.98, gmean=0.98),
        400: PaperResult(0.943, f1_minority=0.891, f1_weighted=0.944, iba=0.945, gmean=0.945),
    },
    "resnet50": _accuracies(0.927, 0.944, 0.960, 0.925),
    "vgg16inception": _accuracies(0.977, 0.971, 0.954, 0.889),
    "seresnet50": _accuracies(0.883, 0.850, 0.906, 0.876),
    "vgg16": _accuracies(0.902, 0.850, 0.851, 0.848),
    "swin_b": _accuracies(0.843, 0.877, 0.876, 0.846),
    "dinov2_vitb14": _accuracies(0.873, 0.869, 0.853, 0.885),
    "vit_b_16": _accuracies(0.835, 0.834, 0.841, 0.832),
    "densenet121": _accuracies(0.801, 0.811, 0.812, 0.779),
}

# Table 7: seconds to train 50 epochs on the RTX A4000. Per magnification only for DALAResNet50.
PAPER_CONVERGENCE_SECONDS: dict[str, dict[int, float]] = {
    "dalaresnet50": {40: 2133.02, 100: 2319.50, 200: 1990.58, 400: 1896.82},
}
PAPER_MEAN_CONVERGENCE_SECONDS: dict[str, float] = {
    "dalaresnet50": 2084.98,
    "resnet50": 2564.77,
}


def paper_name(model: str) -> str:
    """The paper's display name for a registry model, or the registry name if it is not in the paper."""
    return PAPER_NAMES.get(model, model)
