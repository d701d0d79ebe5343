"""Serving: which model answers, and the predictions it wrote.

Owns the storage-backed promotion log (``promotion``; not to be confused with the model registry
in ``dala_model.models.registry``) and incremental batch predictions. May import ``engine``,
``models``, ``data`` and the base modules; nothing imports serving but the CLI and the flows.
"""
