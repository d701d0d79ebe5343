"""Every input and output location is an fsspec URL; this module is the only place that touches one.

URLs may be ``s3://bucket/prefix`` (s3fs), ``file://...`` or a plain local path (the embedded
default) and ``memory://...`` (tests). For S3, s3fs/aiobotocore take the endpoint, credentials and
region from the standard AWS environment and config files, ``AWS_ENDPOINT_URL`` included (checked
against a moto server with botocore 1.43), so nothing here handles secrets or endpoints itself.

Atomic writes (a reader never sees a half-written file, a crash never leaves a partial one under
the final name):

- local files: write ``<target>.tmp-<uuid>`` beside the target, then ``os.replace`` it (via
  ``fs.mv``), which is atomic within one file system. A crash can leave a ``.tmp-`` file next to
  the target, never a partial target.
- object stores (S3 and anything else without rename): one PUT of the final key. S3 makes an
  object visible only once its upload completes (single PUT or a completed multipart upload), so
  this is already atomic, and unlike temp-key-then-copy it costs one request and leaves no temp
  object behind when the writer dies.

Messages built here pass URLs through :func:`redact`, so credentials embedded in a URL
(``scheme://user:secret@host``) or present in the AWS environment never reach logs or errors.

Transient object-store faults (HTTP 500/503, throttling, dropped or reset connections, timeouts)
are retried by botocore itself, configured here once for every S3 file system: the "standard"
retry mode (exponential backoff with jitter, capped at 20 s, and a retry quota so an outage does
not turn into a retry storm), ``S3_MAX_ATTEMPTS`` attempts in all unless ``AWS_MAX_ATTEMPTS`` /
``AWS_RETRY_MODE`` say otherwise, and bounded connect/read timeouts. s3fs wraps its own retry
loop around botocore's, which would multiply the attempts (25 by default, 43 s against a dead
endpoint); it is cut to ``S3FS_RETRIES`` so it only adds a second pass for a body cut off
mid-read, which botocore cannot retry. When the retries are spent, :class:`StorageError` names the
URL (redacted) and the cause, and the original exception is not chained, so no client internals
(which may hold request headers) reach a log.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
S3_MAX_ATTEMPTS = 5  # botocore attempts per request, the first included
S3FS_RETRIES = 2  # s3fs passes around botocore's attempts (1 = no extra pass)
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 60


class StorageError(OSError):
    """The store failed in a way retries did not fix (unreachable, 5xx, refused): try again later."""


@dataclass(frozen=True)
class StoredFile:
    """One listed file: its URL (in the caller's URL form), size, and a change token.

    ``version`` is the S3 ETag or the local modification time: it changes when the content
    may have changed, which is what incremental ingest needs to skip re-reading a file.
    """

    url: str
    relpath: str
    size: int
    version: str


def redact(text: str) -> str:
    """Remove URL user-info and any AWS secret from the environment out of ``text``."""
    text = _USERINFO.sub(r"\g<scheme>***@", str(text))
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec file system for ``url`` and the path inside it."""
    if not url:
        raise ValueError("empty storage URL: give a local path, file://, s3:// or memory:// URL")
    try:
        protocol = fsspec.core.split_protocol(url)[0]
        s3 = protocol in ("s3", "s3a")
        fs, path = fsspec.core.url_to_fs(url, **(_s3_options() if s3 else {}))
    except (ImportError, ValueError) as exc:
        raise ValueError(f"cannot open storage URL {redact(url)}: {redact(exc)}") from None
    if s3:
        fs.retries = S3FS_RETRIES  # a class attribute in s3fs, not a constructor argument
    return fs, path


def _s3_options() -> dict:
    """s3fs/botocore retry and timeout settings (see the module docstring)."""
    return {
        "config_kwargs": {
            "retries": {
                "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", S3_MAX_ATTEMPTS)),
            },
            "connect_timeout": S3_CONNECT_TIMEOUT_S,
            "read_timeout": S3_READ_TIMEOUT_S,
        },
    }


def _store_error_types() -> tuple[type[BaseException], ...]:
    """What a failing store raises. botocore and aiohttp are looked up only once s3fs has loaded
    them, so local-only use (and the GPU benchmark host) never needs them installed."""
    types: list[type[BaseException]] = [OSError, TimeoutError]
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        types += [botocore.BotoCoreError, botocore.ClientError]
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        types.append(aiohttp.ClientError)
    return tuple(types)


@contextlib.contextmanager
def _store_errors(url: str, action: str) -> Iterator[None]:
    """Turn a failure of the store (not a missing file) into a :class:`StorageError` naming ``url``."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, StorageError):
        raise  # about the path, not the store: callers name it themselves
    except _store_error_types() as exc:
        client_error = getattr(sys.modules.get("botocore.exceptions"), "ClientError", ())
        cause = exc.__cause__ if isinstance(exc.__cause__, client_error) else exc
        if isinstance(cause, client_error):  # s3fs keeps the S3 error code and status here
            error = cause.response.get("Error", {})
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            reason = f"HTTP {status} {error.get('Code', '')}: {error.get('Message', '')}"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        raise StorageError(
            f"cannot {action} {redact(url)}: {redact(reason)}; "
            "check that the store is reachable and writable (AWS_ENDPOINT_URL, credentials), "
            "then rerun: completed work is kept"
        ) from None


def check_writable(root: str) -> None:
    """Raise :class:`StorageError` unless a file can be written under ``root`` (and removed).

    Called before any long work, so a read-only or missing root fails in a second, not after an
    hour of decoding. The probe is a tiny file with a unique name, removed straight away.
    """
    probe = join(root, f".write-probe-{uuid.uuid4().hex}")
    try:
        write_bytes_atomic(probe, b"")
        remove(probe)
    except OSError as exc:  # StorageError, a missing bucket or parent, permissions
        raise StorageError(
            f"storage root {redact(root)} is not writable ({type(exc).__name__}: {redact(exc)}); "
            "give a root you can write to, or fix its permissions or credentials"
        ) from None


def check_relative_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise ``ValueError``.

    Outputs must stay under the configured root, so absolute keys, URLs, backslashes and any
    ``..`` segment are refused rather than normalised (normalising would hide the problem).
    """
    if not key or key.startswith(("/", "\\")) or "://" in key or "\\" in key:
        raise ValueError(f"unsafe storage key {key!r}: must be a relative key like 'a/b.png'")
    if any(part in ("..", ".") for part in key.split("/")):
        raise ValueError(f"unsafe storage key {key!r}: '.' and '..' segments are not allowed")
    return key


def join(root: str, *parts: str) -> str:
    """Join relative keys onto a root URL with ``/``, refusing keys that could escape it."""
    keys = [check_relative_key(part.rstrip("/")) for part in parts if part]
    return "/".join([root.rstrip("/"), *keys]) if keys else root


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    with _store_errors(url, "check"):
        return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        with _store_errors(url, "read"):
            return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{redact(url)} does not exist") from None


def remove(url: str) -> None:
    """Delete one file (a missing file is fine: removal is idempotent)."""
    fs, path = filesystem(url)
    with _store_errors(url, "remove"):
        if fs.exists(path):
            fs.rm_file(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that readers see either the old file or all of the new one."""
    fs, path = filesystem(url)
    with _store_errors(url, "write"):
        if not isinstance(fs, LocalFileSystem):
            fs.pipe_file(path, data)
            return
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            fs.mv(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def list_file_infos(url: str, suffixes: Iterable[str] | None = None) -> list[StoredFile]:
    """Every file under ``url`` (recursive), sorted by relative path.

    ``suffixes`` filters by lower-cased file extension (``(".png", ".jpg")``). Raises
    ``FileNotFoundError`` when ``url`` does not exist (a missing bucket or folder); an existing
    but empty prefix gives an empty list.
    """
    fs, base = filesystem(url)
    base = base.rstrip("/")
    fs.invalidate_cache(base)  # another process may have written since this fs was cached
    wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    with _store_errors(url, "list"):
        try:
            found = fs.find(base, detail=True)
        except FileNotFoundError:
            found = {}
        if not found and not fs.exists(base):
            raise FileNotFoundError(f"{redact(url)} does not exist: check the URL and credentials")
        is_file = fs.isfile(base)
    if is_file:
        raise ValueError(f"{redact(url)} is a file; give the folder or prefix that holds it")
    files = []
    for name, info in found.items():
        if info.get("type") != "file":
            continue
        relpath = name[len(base) + 1 :]
        if wanted is not None and not relpath.lower().endswith(wanted):
            continue
        version = info.get("ETag") or info.get("mtime") or info.get("created") or ""
        files.append(
            StoredFile(
                url=f"{url.rstrip('/')}/{relpath}",
                relpath=relpath,
                size=int(info.get("size") or 0),
                version=str(version).strip('"'),
            )
        )
    return sorted(files, key=lambda f: f.relpath)


def list_files(url: str, suffixes: Iterable[str] | None = None) -> list[str]:
    """URLs of every file under ``url`` (recursive, sorted); see :func:`list_file_infos`."""
    return [f.url for f in list_file_infos(url, suffixes)]


def write_parquet_atomic(
    data: pa.Table | pd.DataFrame,
    url: str,
    *,
    schema: pa.Schema | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a table (or DataFrame, cast to ``schema`` if given) atomically, adding ``metadata``.

    ``metadata`` lands in the Parquet file's key-value metadata, which is where the manifest
    keeps its schema version and the split files keep their seed and scheme.
    """
    if isinstance(data, pd.DataFrame):
        table = pa.Table.from_pandas(data, schema=schema, preserve_index=False)
    else:
        table = data.cast(schema) if schema is not None else data
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): str(v).encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(url, buffer.getvalue())


def read_parquet(url: str) -> pd.DataFrame:
    """Read a Parquet file as a DataFrame; its key-value metadata (str -> str) is in ``.attrs``."""
    table = pq.read_table(io.BytesIO(read_bytes(url)))
    frame = table.to_pandas()
    frame.attrs = {
        k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k != b"pandas"
    }
    return frame


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """Yield a local path holding ``url``'s content: the file itself when it is already local."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        if not fs.exists(path):
            raise FileNotFoundError(f"{redact(url)} does not exist")
        yield path
        return
    tmpdir = tempfile.mkdtemp(prefix="dala-")
    try:
        target = os.path.join(tmpdir, posixpath.basename(path.rstrip("/")) or "data")
        try:
            with _store_errors(url, "download"):
                fs.get_file(path, target)
        except FileNotFoundError:
            raise FileNotFoundError(f"{redact(url)} does not exist") from None
        yield target
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
