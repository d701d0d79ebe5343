"""What produced an artifact: code version and environment, recorded beside models and reports."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

import dala_model


def code_version() -> str:
    """The git commit of the checkout (with ``+dirty`` for local edits), else the package version."""
    try:
        sha = _git("rev-parse", "--short=12", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return dala_model.__version__
    return f"{dala_model.__version__}+g{sha}{'.dirty' if dirty else ''}"


def _git(*args: str) -> str:
    repo = Path(__file__).resolve().parents[1]
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=5, check=True
    ).stdout.strip()


def environment(device: torch.device | None = None) -> dict[str, str | int]:
    env: dict[str, str | int] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device is not None and device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env
