"""Fixtures for the reliability suite: small real datasets, both backends, a faulty S3 path.

Everything here is real: synthetic BreakHis PNGs written by ``dala_model.data.synth``, the moto S3
server from ``tests/conftest.py``, and :mod:`tests.reliability.faulty_proxy` in front of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import s3fs

from dala_model import storage
from dala_model.data.synth import generate
from tests.reliability.faulty_proxy import FaultyProxy, Schedule


@pytest.fixture(scope="session")
def good_files(tmp_path_factory) -> dict[str, bytes]:
    """Eight good BreakHis-named PNGs (2 patients x 4 magnifications), relpath -> bytes."""
    out = tmp_path_factory.mktemp("good")
    generate(str(out), patients=2, images_per_patient=1, seed=11, size=(64, 48))
    return {f.relpath: (out / f.relpath).read_bytes() for f in storage.list_file_infos(str(out))}


@pytest.fixture(scope="session")
def dataset_files(tmp_path_factory) -> dict[str, bytes]:
    """A larger archive for fault tests: 8 patients x 4 magnifications x 2 images (64 PNGs)."""
    out = tmp_path_factory.mktemp("dataset")
    generate(str(out), patients=8, images_per_patient=2, seed=5, size=(64, 48))
    return {f.relpath: (out / f.relpath).read_bytes() for f in storage.list_file_infos(str(out))}


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> str:
    """A base URL on each backend under which a test puts its source and root."""
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket")


def upload(base: str, files: dict[str, bytes]) -> None:
    for relpath, data in files.items():
        storage.write_bytes_atomic(f"{base.rstrip('/')}/{relpath}", data)


@pytest.fixture
def faulty_s3(s3_endpoint, monkeypatch) -> Iterator[Callable[[Schedule], FaultyProxy]]:
    """Route every new S3 client through a :class:`FaultyProxy` with the given schedule.

    Call it with a schedule; the AWS endpoint points at the proxy until the test ends, then back
    at moto. s3fs caches file-system instances (and their clients), so the cache is cleared on
    each switch.
    """
    proxies: list[FaultyProxy] = []

    def route(schedule: Schedule) -> FaultyProxy:
        proxy = FaultyProxy(s3_endpoint, schedule, lifetime_s=180).start()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        return proxy

    yield route
    for proxy in proxies:
        proxy.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def direct_s3(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point new S3 clients straight at moto again (after a faulty phase)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
