"""Operations commands: `dala report` (one small handler per subcommand)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="tables, curves and metrics.json for every run under ROOT/runs"
    )
    p.add_argument("root", help="storage root URL (local path, file://, s3://bucket/prefix)")
    p.add_argument("--out", help="where to write the report (default ROOT/reports)")
    p.set_defaults(func=report)


def report(args: argparse.Namespace) -> int:
    from dala_model.report.build import build_report
    from dala_model.storage import redact

    written = build_report(args.root, out=args.out)
    print(redact(written["report.html"]))
    print(f"{len(written)} files written next to it: " + ", ".join(sorted(written)))
    return 0
