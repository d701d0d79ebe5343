"""`dala promote` pins the model that batch inference serves; `dala models current` shows it.

``dala models current`` prints, under each served (model, magnification), its model card
(``dala_model.modelcard``: intended use, input/output spec, training data, test metrics with
intervals, threshold, limitations); ``--json`` gives the registry records with the raw card block
under ``model_card``. A checkpoint saved before cards shows "not recorded"; one that cannot be
read any more (its run folder removed) shows why, and the other records still print.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from dala_model import storage
from dala_model.cli import UsageError
from dala_model.data.breakhis import check_magnifications

if TYPE_CHECKING:
    from dala_model import modelcard
    from dala_model.serving import promotion

# The registry, the model card and the run records are imported by the commands that use them:
# promotion pulls in the metrics (scikit-learn), a second or more of every `dala` command's
# start-up, `dala --help` included, otherwise.


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "promote", help="make a completed run's best checkpoint the served model"
    )
    p.add_argument("root", help="storage root URL (local path, file://, s3://bucket/prefix)")
    p.add_argument("--model", required=True, help="registry model name, e.g. dalaresnet50")
    p.add_argument("--magnification", type=int, required=True, help="40, 100, 200 or 400")
    p.add_argument(
        "--run",
        dest="run_id",
        help="run id under ROOT/runs/ to pin (always promoted); default: the best complete run "
        "of this model and magnification, promoted only if it beats the current one",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow server to mirror the promotion into (default $MLFLOW_TRACKING_URI; "
        "docs/TRACKING.md)",
    )
    p.set_defaults(func=promote)


def promote(args: argparse.Namespace) -> int:
    from dala_model import runs
    from dala_model.serving import promotion

    try:
        check_magnifications([args.magnification], what="--magnification")
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.run_id:
        run = runs.run_folder(args.root, args.run_id)
        summary = runs.load_summary(run)  # None: promote() says the run is not complete
        if summary is not None and (summary.model, summary.magnification) != (
            args.model,
            args.magnification,
        ):
            raise UsageError(
                f"run {args.run_id} is {summary.model} at {summary.magnification}X, "
                f"not --model {args.model} --magnification {args.magnification}"
            )
        result = promotion.promote(
            args.root,
            run,
            force=True,
            reason="pinned by operator (dala promote --run)",
            tracking_uri=args.tracking_uri,
        )
    else:
        run = _best_run(args.root, args.model, args.magnification)
        result = promotion.promote(
            args.root, run, reason="dala promote: best complete run", tracking_uri=args.tracking_uri
        )
    record = result.current
    verb = "promoted" if result.promoted else "kept current"
    print(
        f"{verb} {record.model} {record.magnification}X: run {record.run_id}, "
        f"version {record.model_version[:12]} ({result.reason})"
    )
    return 0


def current(args: argparse.Namespace) -> int:
    from dala_model import modelcard
    from dala_model.serving import promotion

    if args.json:
        out = []
        for record in promotion.current_records(args.root):
            card, error = _card(record)
            entry = {**record.model_dump(), "model_card": modelcard.card_json(card)}
            if error:
                entry["model_card_error"] = error
            out.append(entry)
        print(json.dumps(out, indent=2, default=float))
        return 0
    print_current(args.root)
    return 0


def print_current(root: str) -> None:
    """One line per served (model, magnification): version, run, validation score, data/code
    version; then each one's model card summary."""
    from dala_model import modelcard
    from dala_model.serving import promotion

    records = promotion.current_records(root)
    if not records:
        print(
            f"no models promoted under {storage.redact(root)} yet (run train-breakhis or `dala promote`)"
        )
        return
    header = f"{'model':<16} {'mag':>5}  {'version':<12}  {'run':<36} {'monitor':<13} {'score':>6}  {'data':<16} {'code':<24} promoted_at"
    print(header)
    for r in records:
        print(
            f"{r.model:<16} {str(r.magnification) + 'X':>5}  {r.model_version[:12]:<12}  {r.run_id:<36} "
            f"{r.monitor:<13} {r.score:>6.3f}  {r.data_version:<16} {r.code_version:<24} {r.promoted_at}"
        )
    for r in records:
        card, error = _card(r)
        print(f"\n{r.model} {r.magnification}X ({r.model_version[:12]})")
        if error:
            print(f"model card: unreadable: {error}")
            continue
        for line in modelcard.summary_lines(card):
            print(line)


def _card(record: promotion.RegistryRecord) -> tuple[modelcard.ModelCard | None, str | None]:
    """The served checkpoint's card (None: not recorded), or the reason it cannot be read."""
    from dala_model import modelcard

    try:
        return modelcard.read_card(record.checkpoint_uri), None
    except (ValueError, FileNotFoundError, storage.StorageError) as exc:
        return None, str(exc)


def _best_run(root: str, model: str, magnification: int) -> str:
    """The complete run of (model, magnification) with the highest validation score."""
    from dala_model import runs
    from dala_model.serving import promotion

    try:
        folders = runs.list_runs(root)
    except FileNotFoundError:
        folders = []
    complete = [(f.record, f.uri) for f in folders if f.complete]
    candidates = [
        (promotion.ranking_score(summary), uri)
        for summary, uri in complete
        if summary.model == model and summary.magnification == magnification
    ]
    if not candidates:
        raise UsageError(
            f"no complete {model} run at {magnification}X under "
            f"{storage.redact(runs.runs_uri(root))}; train one first (`dala train` or train-breakhis)"
        )
    return max(candidates)[1]
