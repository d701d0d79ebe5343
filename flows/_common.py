"""What the flow modules share: I/O retry options, config-derived parameter types, the API wait.

Retries belong only on tasks whose failures are transient I/O (Prefect's examples do the same):
object-store reads and writes fail transiently (throttling, dropped connections), and every such
task here is incremental with atomic writes, so retrying the whole call is safe and cheap.

The local API's first start creates and migrates its SQLite database (``$PREFECT_HOME/prefect.db``):
about 24 s on 2 shared CPU cores, longer on a slow disk, where Prefect waits 20 s by default and
then fails with "Timed out while attempting to connect to ephemeral Prefect API server". The
Makefile migrates the database at install time, and every start of the local API (``make run``,
the test harness) waits ``API_STARTUP_TIMEOUT_S`` or the configured timeout, whichever is longer.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

from prefect.tasks import exponential_backoff
from pydantic import BaseModel, Field

IO_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
}

API_STARTUP_TIMEOUT_S = 600


def api_startup_timeout() -> int:
    """Seconds to wait for a local API to answer: the configured value, but never under 600."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    return max(API_STARTUP_TIMEOUT_S, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())


@contextlib.contextmanager
def waiting_notice(what: str, every_s: float = 15.0) -> Iterator[None]:
    """Print a line every ``every_s`` seconds while the block runs, so a slow wait shows progress."""
    done = threading.Event()
    started = time.monotonic()

    def tick() -> None:
        while not done.wait(every_s):
            print(f"  still {what} ({time.monotonic() - started:.0f} s)", flush=True)

    thread = threading.Thread(target=tick, name="waiting-notice", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def field_annotation(model: type[BaseModel], name: str, description: str | None = None) -> Any:
    """``model``'s type and bounds of field ``name`` as a flow parameter annotation.

    A flow parameter that feeds a config field takes its type and constraints from the field, so
    the bounds live in the config alone and the flow's parameter schema cannot drift from them."""
    info = model.model_fields[name]
    description = description or info.description
    metadata = [*info.metadata, *([Field(description=description)] if description else [])]
    return Annotated[(info.annotation, *metadata)] if metadata else info.annotation
