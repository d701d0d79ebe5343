"""Data: from files in any fsspec store to the arrays a training reads.

Owns the BreakHis name parser, ingest (manifest, quarantine, duplicates), the decoded-image cache,
splits, the synthetic generator and the in-memory split arrays a training uses. May import
``dala_model.storage`` and the base modules (``paper``, ``provenance``) only: never torch, models,
the engine, serving or reports, so an ingest worker's memory stays at the size of its images.
"""
