"""ingest: ``dala_model.data.ingest.ingest`` from an S3 endpoint (moto on 127.0.0.1) vs decode-only.

The reference is the practical limit of any ingest: decoding the same PNGs (already in memory)
with Pillow (``Image.load``), the same number of threads and nothing else (no reads, hashing,
verification, resizing, cache or manifest writes). Each ingest runs in a fresh subprocess
(``python -m bench.ingest SOURCE ROOT WORKERS``) that reports its own wall time and peak RSS
(``VmHWM``), measured at two dataset sizes to show that memory stays flat as the dataset grows.

Rounds are interleaved (reference, ingest, the same ingest with the fast decoder switched off,
i.e. Pillow only as before ``dala_model.data._decode``, and the same ingest from the PNGs in a
local folder), so each ratio is taken within a round and the decoder's own effect on ingest is
measured in the same run. The local-folder rate (``extra.local_folder_ratio``) is the embedded
default's, without the S3 server's CPU time on the same two cores; the headline stays the S3
one. The store alone is timed too (``extra.store_get_only_images_per_s``: a fresh process lists
and GETs the same PNGs with the same threads and decodes nothing). moto serves every GET in
Python on the same cores the ingest decodes on, so the two cannot overlap once both need every
core, and the local-folder time plus the store's time bounds what an S3 ingest can reach here
(``extra.serial_bound_ratio``, of the same round's reference); ``ours_cpu_utilisation`` is the
ingest process's CPU seconds per wall second (2.0 = both cores busy in that process alone).
The third entry, ingest-decoders, compares the PNG decoders ingest could use
(``bench.decoders``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from bench.decoders import compare_decoders
from bench.harness import Goal, entry, median, rates, repeat
from dala_model.data import _decode

BUCKET = "bench-ingest"


@contextlib.contextmanager
def moto_endpoint() -> Iterator[str]:
    """moto's standalone S3 server on a free 127.0.0.1 port, with the AWS environment pointing
    at it (inherited by ingest subprocesses) for the duration."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in [*env, "AWS_PROFILE"]}
    os.environ.update(env)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def upload(files: list[Path], base: Path, prefix: str) -> str:
    """Put ``files`` (relative to ``base``) under ``s3://BUCKET/prefix``; return that URL."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    remote = [f"{BUCKET}/{prefix}/{path.relative_to(base).as_posix()}" for path in files]
    fs.put([str(p) for p in files], remote)
    return f"s3://{BUCKET}/{prefix}"


def ingest_in_subprocess(
    source: str, root: Path, workers: int, decoder: str = "default"
) -> dict[str, Any]:
    """Run one ingest in a fresh interpreter; return its timing and memory report.

    ``decoder="pillow"`` switches the fast decoder off (what ingest did before it), for the
    comparison in the same run."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.ingest", source, str(root), str(workers), decoder],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"ingest of {source} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def decode_only(blobs: list[bytes], workers: int) -> None:
    def decode(blob: bytes) -> None:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(decode, blobs))


def run(
    small: list[Path], large: list[Path], base: Path, work: Path, *, reps: int, workers: int
) -> list[dict[str, Any]]:
    """``small`` is a prefix set of ``large`` in ``base``'s layout: small/... and extra/...."""
    small_bytes = sum(p.stat().st_size for p in small)
    blobs = [p.read_bytes() for p in small]
    ref_rates: list[float] = []
    small_runs: list[dict[str, Any]] = []
    pillow_runs: list[dict[str, Any]] = []
    local_runs: list[dict[str, Any]] = []  # the same PNGs from a local folder (make run's case)
    get_runs: list[dict[str, Any]] = []  # only the store: list and GET, nothing decoded
    with moto_endpoint():
        upload(large, base, "data")
        small_url = f"s3://{BUCKET}/data/small"
        large_url = f"s3://{BUCKET}/data"
        for k in range(reps):  # interleaved rounds: each ratio is taken within one round
            ref_rates += rates(len(small), repeat(lambda: decode_only(blobs, workers), 1))
            small_runs.append(ingest_in_subprocess(small_url, work / f"small-{k}", workers))
            pillow_runs.append(
                ingest_in_subprocess(small_url, work / f"pillow-{k}", workers, decoder="pillow")
            )
            local_runs.append(
                ingest_in_subprocess(str(base / "small"), work / f"local-{k}", workers)
            )
            get_runs.append(
                ingest_in_subprocess(small_url, work / f"get-{k}", workers, decoder="get-only")
            )
        large_run = ingest_in_subprocess(large_url, work / "large", workers)
    for report, expected in [
        *((r, len(small)) for r in small_runs + pillow_runs + local_runs + get_runs),
        (large_run, len(large)),
    ]:
        if report["images"] != expected:
            raise RuntimeError(
                f"ingest produced {report['images']} manifest rows, expected {expected}"
            )
    ours_rates = [len(small) / r["seconds"] for r in small_runs]
    pillow_rates = [len(small) / r["seconds"] for r in pillow_runs]
    local_rates = [len(small) / r["seconds"] for r in local_runs]
    get_rates = [len(small) / r["seconds"] for r in get_runs]
    # Fetching from a store on the same cores and the local-folder ingest's work cannot overlap
    # once both need every core: their summed times bound the S3 ingest (see the docstring).
    serial_rates = [
        len(small) / (g["seconds"] + loc["seconds"])
        for g, loc in zip(get_runs, local_runs, strict=True)
    ]
    ours, reference = median(ours_rates), median(ref_rates)
    per_round = lambda a, b: median([x / y for x, y in zip(a, b, strict=True)])  # noqa: E731
    settings = {
        "images": len(small),
        "mb": round(small_bytes / 1e6, 1),
        "workers": workers,
        "reps": reps,
        "source": "s3 (moto ThreadedMotoServer on 127.0.0.1) via s3fs",
        "root": "local folder",
        "cache_size": 224,
        "ours": "dala_model.data.ingest.ingest in a fresh subprocess: list, read, sha256, verify, "
        "decode, resize, cache shards, manifests",
        "reference": f"PIL decode (Image.load) of the same PNGs from memory, {workers} threads",
        "warmup": "none for ours (each rep a fresh process and root); 1 for the reference",
        "decoder": _decode.fast_decoder() or "Pillow only",
        "rounds": "interleaved: reference, ours, ours with Pillow only, ours from a local "
        "folder, the store alone (list + GET, nothing decoded); ratios per round",
    }
    small_peak = median([r["peak_rss_mb"] for r in small_runs])
    decoder_entry = compare_decoders(small, work, reps=reps, workers=workers)
    return [
        entry(
            "ingest",
            "images/s",
            ours,
            reference,
            ratio=per_round(ours_rates, ref_rates),
            ratio_means="ours / decode-only limit",
            goal=Goal("ratio", low=0.8),
            settings=settings,
            reps={
                "ours": ours_rates,
                "reference": ref_rates,
                "pillow_only": pillow_rates,
                "local_folder": local_rates,
                "store_get_only": get_rates,
            },
            extra={
                # No S3 server on the same cores: the embedded default's (make run's) ingest.
                "local_folder_images_per_s": median(local_rates),
                "local_folder_ratio": per_round(local_rates, ref_rates),
                "store_get_only_images_per_s": median(get_rates),
                "store_get_only_cpu_s_per_image": median(
                    [r["cpu_seconds"] / len(small) for r in get_runs]
                ),
                "serial_bound_ratio": per_round(serial_rates, ref_rates),
                "ours_cpu_utilisation": median(
                    [r["cpu_seconds"] / r["seconds"] for r in small_runs]
                ),
                "pillow_only_images_per_s": median(pillow_rates),
                "pillow_only_ratio": per_round(pillow_rates, ref_rates),
                "speedup_over_pillow_only_ingest": per_round(ours_rates, pillow_rates),
                "ours_mb_per_s": median([small_bytes / 1e6 / r["seconds"] for r in small_runs]),
                "reference_mb_per_s": reference * small_bytes / 1e6 / len(small),
                "read_decode_images_per_s": median([r["read_images_per_s"] for r in small_runs]),
                f"images_per_s_at_{len(large)}": len(large) / large_run["seconds"],
            },
        ),
        entry(
            "ingest-memory",
            "MB peak RSS",
            large_run["peak_rss_mb"],
            small_peak,
            ratio=large_run["peak_rss_mb"] / small_peak,
            ratio_means=f"peak RSS ingesting {len(large)} images / ingesting {len(small)}",
            goal=Goal("ratio", high=1.25),
            settings={
                "sizes": [len(small), len(large)],
                "workers": workers,
                "measure": "VmHWM (peak RSS) of the ingest subprocess, including the "
                "interpreter and imports (reported as baseline_rss_mb)",
            },
            reps={
                "ours": [large_run["peak_rss_mb"]],
                "reference": [r["peak_rss_mb"] for r in small_runs],
            },
            extra={
                "baseline_rss_mb": large_run["baseline_rss_mb"],
                "growth_mb_small": median(
                    [r["peak_rss_mb"] - r["baseline_rss_mb"] for r in small_runs]
                ),
                "growth_mb_large": large_run["peak_rss_mb"] - large_run["baseline_rss_mb"],
            },
        ),
        decoder_entry,
    ]


def _peak_rss_mb() -> float:
    """This process's peak RSS since exec (Linux ``VmHWM``).

    Not ``ru_maxrss``: Linux carries it over from the parent across fork + exec, so a child of a
    large benchmark process would report the parent's size.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def _child(source: str, root: str, workers: int, decoder: str) -> None:
    """One timed run in this fresh interpreter: an ingest (``decoder`` "default" or "pillow"),
    or with ``decoder="get-only"`` only what the store costs: list ``source`` and read every PNG
    with the same threads (client set-up included, as an ingest pays it), nothing decoded."""
    import time

    from dala_model import storage
    from dala_model.data.ingest import ingest

    if decoder == "pillow":
        _decode._spng_decode = None

    baseline = _peak_rss_mb()
    cpu_started, started = time.process_time(), time.perf_counter()
    if decoder == "get-only":
        files = storage.list_file_infos(source, (".png",))
        with ThreadPoolExecutor(workers) as pool:
            images = sum(1 for _ in pool.map(lambda f: storage.read_bytes(f.url), files))
        read_rate = 0.0
    else:
        result = ingest(source, root, workers=workers)
        images, read_rate = result.images, result.images_per_s
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "images": images,
                "seconds": seconds,
                "cpu_seconds": time.process_time() - cpu_started,
                "read_images_per_s": read_rate,
                "baseline_rss_mb": baseline,
                "peak_rss_mb": _peak_rss_mb(),
            }
        )
    )


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
