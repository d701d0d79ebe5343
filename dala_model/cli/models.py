"""`dala models`: the model registry as a table, our parameter counts beside the paper's."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models", help="list the registry models: library, parameters vs the paper, weights"
    )
    p.set_defaults(func=models)
    sub = p.add_subparsers(dest="models_command", metavar="{current}")
    c = sub.add_parser(
        "current", help="show the served model of every (model, magnification) and its model card"
    )
    c.add_argument("root", help="storage root URL")
    c.add_argument(
        "--json",
        action="store_true",
        help="print the full registry records as JSON, each with its raw model card block "
        "(model_card; null when the checkpoint has none)",
    )
    c.set_defaults(func=current)


def current(args: argparse.Namespace) -> int:
    from dala_model.cli.registry import current as show_current

    return show_current(args)


def models(args: argparse.Namespace) -> int:
    # Imported here so `dala --help` does not pay for importing torch, torchvision and timm.
    from dala_model.models.registry import get_model_spec, list_models, parameter_count

    header = (
        "model",
        "source",
        "parameters",
        "paper (Table 7)",
        "match",
        "input",
        "pretrained weights",
    )
    rows, notes = [], []
    for name in list_models():
        spec = get_model_spec(name)
        ours = parameter_count(name)
        paper = spec.paper_params
        match = "-" if paper is None else ("yes" if ours == paper else "no")
        rows.append(
            (
                name,
                spec.source,
                f"{ours:,}",
                "-" if paper is None else f"{paper:,}",
                match,
                f"{spec.input_size}x{spec.input_size}",
                spec.weights.label if spec.weights else "-",
            )
        )
        if spec.note:
            notes.append(f"{name}: {spec.note}")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    numeric = {2, 3}
    for row in (header, *rows):
        cells = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
    print("\nparameters are counted with a 2-way head; 'match' compares with the paper's Table 7.")
    for note in notes:
        print(f"note: {note}")
    return 0
