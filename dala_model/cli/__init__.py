"""The `dala` command line.

Each module in this package owns one group of subcommands and exposes
``register(subparsers)``; this file only assembles them, so a new command never
touches another's code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand modules, in the order their commands appear in `dala --help`.
COMMAND_MODULES = ("models", "data", "train", "explain", "registry", "predict", "ops")


class UsageError(Exception):
    """A bad argument or input the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dala", description="DALAResNet50 on BreakHis: data, training, inference, reports."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"dala {args.command}: error: {message}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what to fix; anything else keeps its traceback.

    The pretrained-weights error is looked up only when its module was loaded (it pulls in torch,
    which data commands such as `dala ingest` never need).
    """
    from dala_model.storage import StorageError

    errors: list[type[BaseException]] = [
        UsageError,
        ValueError,
        KeyError,
        FileNotFoundError,
        StorageError,
    ]
    pretrained = sys.modules.get("dala_model.models.pretrained")
    if pretrained is not None:
        errors.append(pretrained.PretrainedWeightsUnavailable)
    return tuple(errors)
