"""Table text shared by the report and the flows' artifacts: one number format, one Markdown table.

The report document, the Prefect table/markdown artifacts and the CLI all print metric values;
they print them the same way (3 digits, an em dash for a missing value) because they use these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

MISSING = "—"


def fmt(value: Any, digits: int = 3) -> str:
    """A metric value for a table: ``digits`` decimals, or an em dash when missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return MISSING
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; pipes inside cells are escaped."""

    def row(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([row(header), "|" + "---|" * len(header), *(row(r) for r in rows)])
