"""`make run`: the whole pipeline on one machine through Prefect's local API.

synthetic BreakHis (when no data is given) -> ingest -> split -> parallel training of all four
magnifications -> promotion -> report -> batch inference of the root's manifest -> scoring of an
unlabelled drop of new images (case folders with scanner-style names, no labels, generated into
./data/<profile>/incoming) through the same ``batch-inference`` flow with ``source``, into
ROOT/scoring. Without ``PREFECT_API_URL`` Prefect
starts a temporary local server on the SQLite database in ``$PREFECT_HOME`` (the Makefile keeps it
in ./.prefect), so nothing but Python is needed; with it, the runs appear in that server's UI.

Profiles: ``quick`` (default) finishes in minutes on 2 CPU cores with 64 px images, a synthetic
set of 40 slide folders and 8 epochs, and learns what a user can see (test G-mean at the
validation threshold, patient-disjoint); ``paper`` trains under the paper's protocol
(``engine.config.PROTOCOLS["paper"]``: image-level 6:1:3 split, ImageNet weights, no BatchNorm
recalibration, fp32, 224 px, 50 epochs, batch 32, lr 1e-4). Its ImageNet weights must be in the
torch hub cache (the error names the file otherwise); ``--no-pretrained`` trains from scratch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from dala_model import storage
from dala_model.data import synth
from dala_model.layout import RootLayout
from dala_model.serving import promotion


class Profile(BaseModel):
    description: str  # one line the report's header shows (ROOT/profile.json)
    image_size: int
    epochs: int
    batch_size: int
    lr: float = 1e-4
    synthetic_patients: int
    synthetic_images_per_patient: int
    drop_cases: int = 4  # the unlabelled drop scored last: cases x 4 magnifications x 2 images
    protocol: str = "patient"  # engine.config.PROTOCOLS


PROFILES = {
    "quick": Profile(
        description=(
            "a demonstration of the pipeline, not a measure of the model: small synthetic images "
            "at 64 px and a few CPU epochs from random weights; the paper's protocol is "
            "`make run PROFILE=paper`"
        ),
        # Measured (2026-12-02, tuning on 40X and 400X, patient split): 12 patients x 4 images
        # and 2 epochs called every test image one class (G-mean 0); 40 x 6 at lr 1e-3 for 8
        # epochs reached test AUC 0.93-0.94 and G-mean 0.84-0.87 at the validation threshold.
        # Fewer patients leave a split with one benign case, whose G-mean is all or nothing.
        image_size=64,
        epochs=8,
        batch_size=16,
        lr=1e-3,
        synthetic_patients=40,
        synthetic_images_per_patient=6,
    ),
    "paper": Profile(
        description=(
            "the paper's protocol (image-level 6:1:3 split, 224 px, 50 epochs, batch 32, "
            "lr 1e-4, ImageNet weights unless --no-pretrained)"
        ),
        image_size=224,
        epochs=50,
        batch_size=32,
        synthetic_patients=82,
        synthetic_images_per_patient=24,
        protocol="paper",
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flows.main", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--data",
        help="BreakHis images to ingest (folder or s3://bucket/prefix); "
        "default: synthetic images generated into ./data/<profile>/synthetic-<folders>x<images>",
    )
    parser.add_argument(
        "--root", help="storage root for every output (default ./data/<profile>/root)"
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument(
        "--max-parallel",
        type=int,
        help="cap on concurrent trainings (default: one per device slot)",
    )
    parser.add_argument(
        "--no-pretrained",
        action="store_true",
        help="random initialisation, also under the paper profile (which asks for ImageNet weights)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from flows.inference import inference_flow
    from flows.train import train_flow

    args = parse_args(argv)
    profile = PROFILES[args.profile]
    # One folder per profile: a quick run's 2-epoch models must never stand in for the paper's.
    home = Path("data") / args.profile
    # Named by its size, so a profile whose data changes never reuses an older, smaller set.
    synthetic = home / (
        f"synthetic-{profile.synthetic_patients}x{profile.synthetic_images_per_patient}"
    )
    source = args.data or _synthetic_source(profile, synthetic)
    drop = _unlabelled_drop(profile, home / "incoming")
    root = args.root or str(home / "root")
    root = root if "://" in root else str(Path(root).resolve())
    _record_profile(root, args.profile, profile, synthetic=args.data is None, source=source)
    with local_api():
        return _run(
            train_flow,
            inference_flow,
            root,
            source,
            drop,
            profile,
            args.max_parallel,
            pretrained=False if args.no_pretrained else None,
        )


def _run(
    train_flow,
    inference_flow,
    root: str,
    source: str,
    drop: str,
    profile: Profile,
    max_parallel: int | None,
    pretrained: bool | None = None,
) -> int:
    state = train_flow(
        root=root,
        source=source,
        protocol=profile.protocol,
        pretrained=pretrained,
        image_size=profile.image_size,
        epochs=profile.epochs,
        batch_size=profile.batch_size,
        lr=profile.lr,
        max_parallel=max_parallel,
        return_state=True,
    )
    if not state.is_completed():
        print(f"train-breakhis ended {state.name}: {state.message}", file=sys.stderr)
    if not promotion.current_records(root):
        print("no model was promoted, so there is nothing to score", file=sys.stderr)
        return 1
    scored = inference_flow(root=root)  # every magnification with a current model
    layout = RootLayout(root)
    print(f"\nreport:      {storage.redact(layout.reports('report.html'))}")
    print(f"predictions: {storage.redact(layout.predictions('dalaresnet50'))}")
    counts = ", ".join(f"{r['magnification']}X {r['scored']} new" for r in scored)
    print(f"scored:      {counts}")
    # The product path: new images from a clinic, scored into their own root (docs/SCORING.md).
    new = inference_flow(root=root, source=drop)
    counts = ", ".join(f"{m['magnification']}X {m['scored']} new" for m in new["magnifications"])
    print(f"\nnew images:  {new['images']} in {drop} (case folders, no labels): {counts}")
    print(f"image-level: {storage.redact(new['images_uri'])}")
    print(f"case-level:  {storage.redact(new['cases_uri'])}")
    return 0 if state.is_completed() else 1


@contextlib.contextmanager
def local_api() -> Iterator[None]:
    """Make every process of this run share one local API server on the SQLite database.

    Prefect's ephemeral mode starts a server lazily per process; the training pool's processes
    would each start their own. Starting it once here and exporting its URL (which the process
    pool passes on) gives one server, one database and one UI for the whole run.
    """
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows._common import api_startup_timeout, waiting_notice

    if PREFECT_API_URL.value():
        yield
        return
    os.environ.setdefault(
        "PREFECT_SERVER_ANALYTICS_ENABLED", "false"
    )  # offline: no telemetry errors
    timeout = api_startup_timeout()  # a first start migrates the database: see flows/_common.py
    print(
        f"starting Prefect's local API (waiting up to {timeout} s; "
        "the first start creates its database)",
        flush=True,
    )
    server = SubprocessASGIServer()
    with waiting_notice("starting Prefect's local API"):
        server.start(timeout=timeout)
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            print(
                f"Prefect API (SQLite in {os.environ.get('PREFECT_HOME', '~/.prefect')}): {server.address}"
            )
            yield
    finally:
        APILogWorker.drain_all(timeout=5)  # send the last run logs while the server is still up
        server.stop()


def _record_profile(
    root: str, name: str, profile: Profile, *, synthetic: bool, source: str
) -> None:
    """``ROOT/profile.json``: what made this root, for the report's header (``RootLayout.profile``)."""
    record = {
        "profile": name,
        **profile.model_dump(),
        "data": (
            f"synthetic BreakHis ({profile.synthetic_patients} slide folders x "
            f"{profile.synthetic_images_per_patient} images per magnification, dala_model.data.synth)"
            if synthetic
            else storage.redact(source)
        ),
    }
    uri = RootLayout(root).profile()
    if storage.exists(uri):
        before = json.loads(storage.read_bytes(uri))
        changed = sorted(k for k in record if k != "description" and before.get(k) != record[k])
        if changed:  # its runs were trained otherwise: resuming them would refuse, or mix
            raise SystemExit(
                f"{storage.redact(root)} was made by another version of the {before.get('profile')!r} "
                f"profile (different {', '.join(changed)}): remove it (rm -r {storage.redact(root)}) "
                "or pass --root <new folder>"
            )
    storage.write_bytes_atomic(uri, json.dumps(record, indent=2, sort_keys=True).encode())


def _synthetic_source(profile: Profile, folder: Path) -> str:
    """Synthetic BreakHis-format PNGs in ``folder``, generated once and then reused."""
    out = folder.resolve()
    if out.exists() and any(out.rglob("*.png")):
        print(f"reusing synthetic data in {out}")
        return str(out)
    count = synth.generate(
        str(out),
        patients=profile.synthetic_patients,
        images_per_patient=profile.synthetic_images_per_patient,
        seed=0,
    )
    print(f"generated {count} synthetic BreakHis images in {out}")
    return str(out)


def _unlabelled_drop(profile: Profile, folder: Path) -> str:
    """A drop as a scanner sends it (``case-0042/40X/scan_17.png``), generated once, then reused."""
    out = folder.resolve()
    if out.exists() and any(out.rglob("*.png")):
        return str(out)
    files = synth.generate_cases(
        str(out), cases=profile.drop_cases, images_per_magnification=2, seed=1
    )
    print(f"generated an unlabelled drop of {len(files)} images in {out}")
    return str(out)


if __name__ == "__main__":
    sys.exit(main())
