"""Thread-pool helpers shared by ingest and the decoded cache (private support).

Decoding and hashing release the GIL, so threads are the right pool for this I/O- and
codec-bound work; the window keeps memory flat however large the source is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


def default_workers() -> int:
    """Threads for read+decode: Pillow's decoders, resize and hashlib release the GIL."""
    return min(8, (os.cpu_count() or 1) + 2)


def bounded_map(pool: ThreadPoolExecutor, fn, items: Iterable, window: int) -> Iterator:
    """``pool.map`` in input order with at most ``window`` tasks in flight, so memory stays flat."""
    pending = []
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()
