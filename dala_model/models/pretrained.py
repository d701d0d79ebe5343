"""Pretrained backbone weights: where they come from, where they are cached, how they are loaded.

Weights are data (:class:`WeightsSource`): a download URL, a file name in torch's hub cache
(``$TORCH_HOME/hub/checkpoints``, the cache torchvision itself uses, so weights fetched by either
are shared) and whether the file name carries a SHA-256 prefix to verify. One cache for every
model means one place to pre-seed weights on an offline machine.

"Pretrained" initialises the *backbone* only: keys of the modules a model adds or resizes (the
attention block, the 2-way head) are dropped from the file and those modules keep their fresh
initialisation, as in the paper's transfer learning. Everything else must fit exactly, so a file
for another architecture fails loudly instead of half-loading.

Nothing is ever unpickled: ``.safetensors`` files are read with safetensors, ``.pt``/``.pth``/
``.bin`` with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn
from torchvision.models import WeightsEnum

from dala_model import storage

OFFLINE_ENV = ("DALA_OFFLINE", "HF_HUB_OFFLINE")
# A stalled connection must end in a clear error, not a hang; large files still stream fine
# because the timeout bounds each socket operation, not the whole download.
DOWNLOAD_TIMEOUT_S = 20.0
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights are neither cached nor downloadable; the message says how to supply them."""


@dataclass(frozen=True)
class WeightsSource:
    """One published set of ImageNet weights for a backbone.

    ``key_rewrites`` are ``(regex, replacement)`` pairs applied to every key of a loaded file,
    for publishers whose files predate their own module names (torchvision's DenseNet).
    """

    label: str
    url: str
    file_name: str
    check_hash: bool = False
    key_rewrites: tuple[tuple[str, str], ...] = ()

    @classmethod
    def torchvision(
        cls, weights: WeightsEnum, key_rewrites: tuple[tuple[str, str], ...] = ()
    ) -> WeightsSource:
        """torchvision's own entry; its file names embed a SHA-256 prefix, which is verified."""
        return cls(
            label=f"torchvision {type(weights).__name__}.{weights.name}",
            url=weights.url,
            file_name=weights.url.rsplit("/", 1)[-1],
            check_hash=True,
            key_rewrites=key_rewrites,
        )

    @classmethod
    def hf_hub(cls, repo_id: str) -> WeightsSource:
        """A timm model repository on the Hugging Face Hub, fetched as its safetensors file."""
        return cls(
            label=f"{repo_id} (Hugging Face Hub)",
            url=f"https://huggingface.co/{repo_id}/resolve/main/model.safetensors",
            file_name=f"{repo_id.replace('/', '--')}.safetensors",
        )

    @property
    def cache_path(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / self.file_name


def offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in OFFLINE_ENV)


def weights_file(source: WeightsSource) -> Path:
    """The cached file for ``source``, downloading it first unless offline; never hangs."""
    path = source.cache_path
    if path.is_file():
        return path
    how = (
        f"Download {source.url} to {path} (for example `curl -L -o '{path}' '{source.url}'`), "
        "set TORCH_HOME to a folder whose hub/checkpoints holds it, or pass the file itself as "
        "pretrained='<local path or fsspec URL>'."
    )
    if offline():
        flags = ", ".join(
            f"{name}={os.environ[name]}" for name in OFFLINE_ENV if name in os.environ
        )
        raise PretrainedWeightsUnavailable(
            f"{source.label} weights are not cached at {path} and downloads are off ({flags}). {how}"
        )
    hash_prefix = None
    if source.check_hash:
        found = torch.hub.HASH_REGEX.search(source.file_name)
        hash_prefix = found.group(1) if found else None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(source.url, str(path), hash_prefix, progress=False)
    except (OSError, RuntimeError) as exc:  # URLError and timeouts are OSErrors
        raise PretrainedWeightsUnavailable(
            f"{source.label} weights are not cached at {path} and downloading them failed "
            f"({type(exc).__name__}: {exc}). {how}"
        ) from None
    return path


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound torch.hub's download, which opens its URL without a timeout of its own."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def read_state_dict(uri: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a local path or fsspec URL, without unpickling objects."""
    uri = str(uri)
    name = uri.lower()
    data = storage.read_bytes(uri)
    try:
        if name.endswith(".safetensors"):
            state = safetensors.torch.load(data)
        elif name.endswith(TORCH_SUFFIXES):
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"suffix must be .safetensors or one of {TORCH_SUFFIXES}")
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot read weights from {storage.redact(uri)} ({first_line}). Give a .safetensors "
            "file, or a .pt/.pth state dict that torch.load(weights_only=True) accepts"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{storage.redact(uri)} is not a flat state dict of tensors (name -> tensor); "
            "save one with model.state_dict()"
        )
    return state


def load_backbone(
    model: nn.Module,
    pretrained: bool | str,
    source: WeightsSource | None,
    fresh: tuple[str, ...],
    model_name: str,
    unused: tuple[str, ...] = (),
) -> None:
    """Load backbone weights into ``model`` in place; modules under ``fresh`` keep their init.

    ``pretrained=True`` uses ``source`` (the published ImageNet weights); a string is a path or
    fsspec URL of a state dict for the same architecture. Keys under ``unused`` (parts of the
    published network that this architecture leaves out) are dropped from the file first.
    """
    if pretrained is True:
        if source is None:
            raise ValueError(f"model {model_name!r} has no published weights; pass a file instead")
        origin = str(weights_file(source))
    elif isinstance(pretrained, str) and pretrained:
        origin = pretrained
    else:
        raise ValueError(
            f"pretrained must be False, True or a path/URL of a weights file, got {pretrained!r}"
        )
    state = read_state_dict(origin)
    for pattern, replacement in source.key_rewrites if source else ():
        state = {re.sub(pattern, replacement, key): value for key, value in state.items()}

    def under(key: str, prefixes: tuple[str, ...]) -> bool:
        return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)

    def is_fresh(key: str) -> bool:
        return under(key, fresh)

    backbone = {key: value for key, value in state.items() if not under(key, fresh + unused)}
    where = storage.redact(origin)
    try:
        result = model.load_state_dict(backbone, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"weights at {where} do not fit model {model_name!r}: {exc}") from None
    missing = [key for key in result.missing_keys if not is_fresh(key)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights at {where} do not fit model {model_name!r}: "
            f"missing {missing[:5]} ({len(missing)} in all), "
            f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)} in all)"
        )
