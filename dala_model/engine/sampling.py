"""Every random choice of a training epoch, derived from ``(seed, epoch)`` alone.

Resumability rests on this: the order, the oversampling and the augmentation of an epoch are pure
functions of the run's seed and the epoch index (never of the RNG state left by earlier epochs),
so a run resumed after epoch k replays exactly the epochs an uninterrupted one would have run.
The global RNG that dropout uses is the one thing not derived here; the checkpoint carries it.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from dala_model.engine.config import TrainConfig

ORDER_SALT = 0
AUGMENT_SALT = 1


def epoch_order(labels: np.ndarray, seed: int, epoch: int, imbalance: str) -> np.ndarray:
    """The training index order for one epoch, a pure function of (seed, epoch) for exact resume."""
    rng = np.random.default_rng(epoch_seed(seed, epoch, salt=ORDER_SALT))
    index = np.arange(len(labels))
    if imbalance == "oversample" and len(np.unique(labels)) > 1:
        # imbalanced-learn and scikit-learn are imported where they are used: over a second of
        # every training process's start-up otherwise, for runs that never oversample.
        from imblearn.over_sampling import RandomOverSampler

        sampler = RandomOverSampler(random_state=int(rng.integers(2**31 - 1)))
        index, _ = sampler.fit_resample(index.reshape(-1, 1), labels)
        index = index.ravel()
    return rng.permutation(index)


def epoch_seed(seed: int, epoch: int, salt: int) -> int:
    """A 32-bit seed for one use (``salt``) in one epoch, independent of every other epoch's."""
    return int(np.random.SeedSequence([seed, epoch, salt]).generate_state(1)[0])


def class_weights(
    config: TrainConfig, labels: np.ndarray, device: torch.device
) -> torch.Tensor | None:
    """Balanced loss weights for ``imbalance="class_weight"``; None (plain loss) otherwise."""
    if config.imbalance != "class_weight":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    return torch.tensor(weights, dtype=torch.float32, device=device)


def seed_everything(seed: int) -> None:
    """Seed the global RNGs: model initialisation and dropout draw from them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
