"""What a process pays at start-up: the heavy libraries load where they are used, not on import.

Every `dala` command, flow run, DDP rank and training pool process is a fresh interpreter, so an
import-time dependency is paid once per process: imbalanced-learn alone (it pulls in
scikit-learn's estimator machinery and test helpers) cost each one over a second, timm half a
second. Each check runs a fresh interpreter and reads its ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "sklearn", "imblearn", "timm", "matplotlib", "prefect")


def loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_command_line_parses_without_the_heavy_libraries():
    # `dala --help` and argument errors answer in about a second: no torch, no scikit-learn.
    assert loaded_after("from dala_model.cli import build_parser\nbuild_parser()") == set()


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        # Training needs torch, torchvision's ResNet50 and scikit-learn's metrics; it needs
        # imbalanced-learn only to oversample or compute G-mean/IBA, and timm only for a timm
        # baseline.
        ("dala_model.engine.train", {"torch", "torchvision", "sklearn"}),
        ("dala_model.data.splits", set()),
        ("dala_model.metrics", {"sklearn"}),
    ],
)
def test_heavy_libraries_load_on_first_use(module, allowed):
    assert loaded_after(f"import {module}") <= allowed


def test_the_lazily_imported_paths_still_work():
    # The same functions, called: G-mean/IBA (imbalanced-learn), oversampling, a timm baseline.
    code = (
        "import numpy as np\n"
        "from dala_model.metrics import classification_metrics\n"
        "from dala_model.engine.sampling import epoch_order\n"
        "from dala_model.models.registry import build_model\n"
        "m = classification_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0])\n"
        "assert abs(m['gmean'] - (0.5 * 2 / 3) ** 0.5) < 1e-9, m\n"
        "order = epoch_order(np.array([0, 1, 1, 1]), seed=0, epoch=0, imbalance='oversample')\n"
        "assert len(order) == 6, order\n"
        "build_model('seresnet50', num_classes=2)\n"
    )
    assert {"imblearn", "timm"} <= loaded_after(code)
