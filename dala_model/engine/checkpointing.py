"""What a run saves as it trains: the per-epoch checkpoint (for exact resume) and the model card.

The checkpoint holds everything an epoch's random choices are not derived from (see
``sampling``): weights, the optimiser's state, the global CPU and CUDA RNG states that dropout
draws from, and the loop's small state (epochs done, history, best so far, seconds trained). It is
written atomically at each epoch's end, so a crash leaves the previous epoch's checkpoint, and a
resumed run replays exactly the epochs an uninterrupted one would have run.
"""

from __future__ import annotations

import copy
import io
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from dala_model import storage
from dala_model.engine.config import TrainConfig
from dala_model.provenance import code_version


class CheckpointWriter:
    """Serialises and stores the per-epoch checkpoint on a background thread.

    DALAResNet50 with its Adam state is about 300 MB: writing that synchronously costs about as
    much as a whole BreakHis epoch on a modern GPU. The snapshot (a CPU copy of every tensor, and
    of the small state dict) is taken synchronously, so training may move on at once; one write is
    in flight at a time, so checkpoints land in epoch order, and ``close`` waits for the last one
    and raises its error, if any. Each write is atomic, so a crash leaves the previous checkpoint.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def submit(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        payload = {
            "model": to_cpu(model.state_dict()),
            "optimizer": to_cpu(optimizer.state_dict()),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "state": copy.deepcopy(state),
        }
        self._wait()
        self._pending = self._pool.submit(self._write, payload)

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write(self, payload: dict) -> None:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        storage.write_bytes_atomic(self.uri, buffer.getvalue())


def to_cpu(obj):
    """A CPU copy of every tensor in a (nested) state dict, so later steps cannot change it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(value) for value in obj)
    return obj


def restore(uri: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load a checkpoint into ``model``, ``optimizer`` and the global RNGs; return the loop state."""
    payload = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng_cpu"])
    if payload["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng_cuda"])
    return payload["state"]


def model_card(config: TrainConfig, data_version: str, epoch: int, val: dict) -> dict:
    """The card saved with the best model: which run, data and code made it, and how it scored."""
    return {
        "run_id": config.resolved_run_id,
        "magnification": config.magnification,
        "scheme": config.scheme,
        "fold": config.fold,
        "seed": config.seed,
        "epoch": epoch,
        "val_metrics": val,
        "data_version": data_version,
        "code_version": code_version(),
        "train_config": config.model_dump(mode="json"),
    }
