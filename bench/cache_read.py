"""cache-read: 224x224 training batches from the decoded cache vs decoding + resizing the PNGs.

Both sides produce the same thing, a uint8 (batch, 224, 224, 3) array per batch of a shuffled
epoch, in one thread. Page caches are warm on both sides (the warm-up epoch reads everything), so
the ratio is the cost of PNG decoding + resizing against a memory-mapped copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from bench.harness import Goal, entry, median, rates, repeat
from dala_model.data import cache


def decode_resize(path: str, size: int) -> np.ndarray:
    """The naive per-image path: PIL decode, RGB, bilinear resize."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def run(
    root: str, image_ids: list[str], paths: list[str], *, size: int, batch: int, reps: int
) -> dict[str, Any]:
    order = np.random.default_rng(0).permutation(len(image_ids))
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]

    def ours() -> None:
        for idx in batches:
            cache.load_images(root, [image_ids[i] for i in idx], size)

    def reference() -> None:
        for idx in batches:
            np.stack([decode_resize(paths[i], size) for i in idx])

    n = len(image_ids)
    ours_rates = rates(n, repeat(ours, reps))
    ref_rates = rates(n, repeat(reference, reps))
    whole = rates(n, repeat(lambda: cache.load_images(root, image_ids, size), reps))
    return entry(
        "cache-read",
        "images/s",
        median(ours_rates),
        median(ref_rates),
        goal=Goal("ratio", low=20),
        settings={
            "images": n,
            "size": size,
            "batch": batch,
            "reps": reps,
            "warmup": 1,
            "threads": 1,
            "ours": "cache.load_images per shuffled batch (mmap'd .npy shards)",
            "reference": "PIL open + convert RGB + bilinear resize per image, np.stack per batch",
        },
        reps={"ours": ours_rates, "reference": ref_rates},
        extra={
            "whole_split_images_per_s": median(whole),
            "whole_split_note": "one load_images call for all ids: what training does once per run",
        },
    )
