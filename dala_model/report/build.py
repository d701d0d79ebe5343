"""Reports across training runs: the paper's tables with ours beside them, plus the honest numbers.

``build_report(root)`` reads every run folder under ``ROOT/runs/`` (layout in
docs/ARCHITECTURE.md) and writes, next to each other under ``ROOT/reports/``:

* ``metrics.json``: per experiment (``config_hash``: one scheme, setting, model and
  magnification), the mean and sample standard deviation (``ddof=1``; ``None`` for a single run)
  of every test metric across seeds/folds, with the setting, thresholds, calibration, subtypes
  and a k-fold sweep's patient-pooled intervals; and every run's own record;
* ``report.md`` and ``report.html`` (self-contained: inline CSS, PNGs as base64 data URIs, so
  it opens offline and can be mailed as one file);
* the PNG figures both documents show.

The paper's Table 6 compares on an image-level split that leaks patients between train and
test; the report therefore names the split scheme of every table and warns under ``paper``.
Only runs whose ``run.json`` says ``complete`` enter the tables; the others are listed.

The steps live in their own modules, in the order they run: ``collect`` (run folders into
``Run`` records), ``aggregate`` (one record per ``config_hash``, with ``pooled``), ``document``
(the report as ``blocks``, one section per scheme and setting, with ``tables``, ``figures``,
``evaluation`` and ``checklist``), ``render`` (Markdown and HTML).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from dala_model import storage
from dala_model.layout import RootLayout
from dala_model.report.aggregate import aggregate
from dala_model.report.blocks import figure_files
from dala_model.report.collect import collect, run_row
from dala_model.report.document import document
from dala_model.report.render import to_html, to_markdown

log = logging.getLogger(__name__)


def build_report(root: str, out: str | None = None) -> dict[str, str]:
    """Write the report for every run under ``root``; return ``{file name: URL}`` of what was written."""
    out = out or RootLayout(root).reports()
    runs, incomplete, problems = collect(root)
    groups, pooling_problems = aggregate(runs)
    problems = problems + pooling_problems
    blocks = document(root, runs, incomplete, problems, groups)
    files = {
        "metrics.json": json.dumps(
            {
                "root": storage.redact(root),
                "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "schemes": sorted({g["scheme"] for g in groups}),
                "groups": groups,
                "runs": [run_row(run) for run in runs],
                "incomplete": incomplete,
                "problems": problems,
            },
            indent=2,
        ).encode(),
        "report.md": to_markdown(blocks).encode(),
        "report.html": to_html(blocks).encode(),
        **figure_files(blocks),
    }
    written = {}
    for name, data in files.items():
        url = storage.join(out, name)
        storage.write_bytes_atomic(url, data)
        written[name] = url
    log.info("report for %d complete runs written to %s", len(runs), storage.redact(out))
    return written
