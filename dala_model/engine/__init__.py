"""Engine: the training loop, its configuration, DDP, the torchrun launcher and batch scoring.

Owns ``TrainConfig``, ``train`` (the loop as named steps), per-epoch checkpoints and resume,
distributed data parallel, and ``predict_proba``. May import ``data``, ``models`` and the base
modules; never ``serving`` or ``report``, which sit above it.
"""
