"""Guarded calls to one MLflow server: a failure is logged and queued, never raised.

MLflow mirrors what the run folder and the storage registry already hold, so an MLflow outage
must cost a training nothing but the mirror. Every call goes through :meth:`Mirror.call`:

- a refusal that retrying cannot fix (MLflow answered with a client error: a bad value, a name
  that exists) is logged and dropped;
- anything else (connection refused, timeout, 5xx, a bug on our side) is logged once, the call
  is queued, and the mirror goes *offline*: later calls are queued without being attempted, so
  a dead server costs one bounded attempt, not one per epoch;
- :meth:`Mirror.retry` replays the queue once, in order (the run is created before its metrics
  are logged), and stops at the first failure: what follows usually depends on it. The run
  finishes either way; what was not mirrored is named in the log.

MLflow's own HTTP client retries 7 times with exponential backoff (minutes on a dead port).
While a call runs, :func:`client_settings` lowers that to 2 retries and a 60 s timeout unless
the user set those variables. Messages pass through ``storage.redact``: a tracking URI may carry
credentials (``https://user:token@host``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from dala_model import storage

log = logging.getLogger("dala_model.tracking")

# MLflow's defaults are 7 retries, backoff factor 2, 120 s: minutes per call on a dead server.
# It also prints the run's URL (host and any credentials in it) to stdout and draws progress bars
# into the training log; we log a redacted line instead.
CLIENT_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
# Error codes with which MLflow says "not now" rather than "never": the call is worth a retry.
TRANSIENT_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)


_settings_lock = threading.Lock()
_settings_users = 0
_settings_added: list[str] = []
_fluent_lock = threading.RLock()


@contextmanager
def client_settings() -> Iterator[None]:
    """MLflow's HTTP retries bounded, its URL printing and progress bars off, for the duration
    (variables the user set win). Nested and concurrent uses share one setting."""
    global _settings_users
    with _settings_lock:
        if _settings_users == 0:
            _settings_added[:] = [name for name in CLIENT_SETTINGS if name not in os.environ]
            for name in _settings_added:
                os.environ[name] = CLIENT_SETTINGS[name]
        _settings_users += 1
    try:
        yield
    finally:
        with _settings_lock:
            _settings_users -= 1
            if _settings_users == 0:
                for name in _settings_added:
                    os.environ.pop(name, None)
                _settings_added.clear()


@contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` for the duration, then restored.

    ``Model.log``, ``download_artifacts`` and ``pyfunc.load_model`` resolve the server through
    that global rather than a client argument; a lock keeps two threads from swapping it under
    each other."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    with _fluent_lock:
        # The global alone (``is_tracking_uri_set`` also counts the environment variable, and
        # restoring that value as the global would pin it past later changes of the variable).
        before = getattr(utils, "_tracking_uri", None)
        env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before)
            if env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env


class NoTarget(RuntimeError):
    """The call needs something an earlier call failed to make (the run): never retried alone."""


def is_permanent(exc: BaseException) -> bool:
    """MLflow answered and refused (or the call has no target): retrying cannot succeed."""
    if isinstance(exc, NoTarget):
        return True
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - the mirror is only built with mlflow present
        return False
    return isinstance(exc, MlflowException) and exc.error_code not in TRANSIENT_CODES


def describe(exc: BaseException, limit: int = 300) -> str:
    """One redacted line: MLflow's messages carry the request URL and can run to pages."""
    text = " ".join(storage.redact(f"{type(exc).__name__}: {exc}").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Mirror:
    """The guarded, queued calls of one run (or one promotion) against one MLflow server."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.where = storage.redact(uri)
        self.pending: list[tuple[str, Callable[[], Any]]] = []
        self.offline = False
        self.failed: list[str] = []  # what was never mirrored (after the retry)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None (logged, and queued when worth a retry) if it fails."""
        if self.offline:
            self.pending.append((what, fn))
            return None
        try:
            with client_settings():
                return fn()
        except Exception as exc:  # noqa: BLE001 - the mirror never fails the caller
            if is_permanent(exc):
                log.warning("MLflow at %s refused %s: %s; skipped", self.where, what, describe(exc))
                self.failed.append(what)
                return None
            self.offline = True
            self.pending.append((what, fn))
            log.warning(
                "MLflow at %s is unreachable (%s while %s); the run goes on and the MLflow calls "
                "are retried once at its end",
                self.where,
                describe(exc),
                what,
            )
            return None

    def retry(self) -> bool:
        """Replay the queued calls once, in order; True when nothing is left unmirrored."""
        queue, self.pending, self.offline = self.pending, [], False
        if queue:
            log.info("retrying %d MLflow call(s) at %s", len(queue), self.where)
        for index, (what, fn) in enumerate(queue):
            try:
                with client_settings():
                    fn()
            except Exception as exc:  # noqa: BLE001
                if is_permanent(exc):
                    log.warning("MLflow at %s refused %s: %s", self.where, what, describe(exc))
                    self.failed.append(what)
                    continue
                lost = [name for name, _ in queue[index:]]
                self.failed.extend(lost)
                log.warning(
                    "MLflow at %s is still unreachable (%s): %d call(s) not mirrored (%s); "
                    "the run folder and the storage registry hold everything",
                    self.where,
                    describe(exc),
                    len(lost),
                    ", ".join(dict.fromkeys(lost)),
                )
                return False
        return not self.failed
