"""`dala synth`, `dala ingest`, `dala cache`, `dala split`: the data commands."""

from __future__ import annotations

import argparse

from dala_model.cli import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    synth = subparsers.add_parser(
        "synth", help="write a synthetic BreakHis tree (PNGs, archive layout)"
    )
    synth.add_argument("out", help="output URL: local path, file://, s3://bucket/prefix")
    synth.add_argument("--patients", type=int, default=24)
    synth.add_argument("--images-per-patient", type=int, default=4, help="per magnification")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, nargs=2, default=(700, 460), metavar=("WIDTH", "HEIGHT"))
    synth.set_defaults(func=_synth)

    ingest = subparsers.add_parser(
        "ingest", help="verify images under SOURCE and write the manifests"
    )
    ingest.add_argument("source", help="URL holding BreakHis-named images (any depth)")
    ingest.add_argument("--out", required=True, help="storage root URL")
    ingest.add_argument("--workers", type=int, default=None)
    ingest.add_argument(
        "--cache-size", type=int, default=224, help="decoded cache size; 0 skips it"
    )
    ingest.set_defaults(func=_ingest)

    cache = subparsers.add_parser("cache", help="decode manifest images missing from the cache")
    cache.add_argument("root", help="storage root URL")
    cache.add_argument("--size", type=int, default=224)
    cache.add_argument("--workers", type=int, default=None)
    cache.set_defaults(func=_cache)

    split = subparsers.add_parser("split", help="write ROOT/splits/<scheme>.parquet")
    split.add_argument("root", help="storage root URL")
    split.add_argument("--scheme", required=True, choices=("paper", "patient", "patient-kfold"))
    split.add_argument("--seed", type=int, default=0)
    split.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        default=(0.6, 0.1, 0.3),
        metavar=("TRAIN", "VAL", "TEST"),
    )
    split.add_argument("--folds", type=int, default=5)
    split.add_argument(
        "--group-by",
        choices=("patient", "slide"),
        default="patient",
        help="patient (default): a case's lettered slides (14-22549AB/CD/G) stay together; "
        "slide: group by slide folder only, to reproduce folder-level splits (cases may straddle)",
    )
    split.set_defaults(func=_split)


def _synth(args: argparse.Namespace) -> int:
    from dala_model.data.synth import generate

    if args.patients < 2 or args.images_per_patient < 1:
        raise UsageError("--patients must be >= 2 and --images-per-patient >= 1")
    count = generate(
        args.out, args.patients, args.images_per_patient, args.seed, size=tuple(args.size)
    )
    print(f"wrote {count} images under {args.out}")
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from dala_model.data.ingest import ingest

    result = ingest(args.source, args.out, workers=args.workers, cache_size=args.cache_size or None)
    print(
        f"{result.images} images in the manifest ({result.read} read, {result.reused} unchanged, "
        f"{result.removed} removed), {result.quarantined} quarantined, {result.duplicates} duplicates, "
        f"{result.ignored} ignored, {result.cached} cached; {result.images_per_s:.1f} images/s; "
        f"data version {result.manifest_version}"
    )
    return 0


def _cache(args: argparse.Namespace) -> int:
    from dala_model.data.cache import build_cache

    added = build_cache(args.root, args.size, workers=args.workers)
    print(f"cached {added} new images at {args.size}px")
    return 0


def _split(args: argparse.Namespace) -> int:
    from dala_model.data.splits import make_split, split_identity, split_report

    uri = make_split(
        args.root,
        args.scheme,
        seed=args.seed,
        fractions=args.fractions,
        folds=args.folds,
        group_by=args.group_by,
    )
    identity = split_identity(args.root, args.scheme)
    print(f"wrote {uri}")
    print(
        f"split {identity['hash']}: scheme {identity['scheme']}, seed {identity['seed']}, "
        f"grouped by {identity['group_by']}, from manifest {identity['manifest_version']}"
    )
    print(split_report(args.root, args.scheme).to_string())
    return 0
