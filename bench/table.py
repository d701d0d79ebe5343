"""Print a results JSON as the Markdown table used in bench/RESULTS.md.

``python -m bench.table bench/results/latest.json`` (or ``gpu.json``), so the document is filled
from the measured file rather than retyped.
"""

from __future__ import annotations

import json
import sys


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def markdown(payload: dict) -> str:
    lines = [
        "| benchmark | unit | ours | reference | ratio | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in payload["entries"]:
        met = {True: "**met**", False: "not met", None: "-"}[e["met"]]
        lines.append(
            f"| {e['name']} ({e['settings'].get('ours', '')}) | {e['unit']} | {_fmt(e['ours'])} | "
            f"{_fmt(e['reference'])} | {_fmt(e['ratio'])} ({e['ratio_means']}) | {_fmt(e['goal'])} | {met} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        print(markdown(json.load(handle)))
