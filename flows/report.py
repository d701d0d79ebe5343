"""`report-breakhis`: rebuild the comparison report from every stored run under a root.

It publishes two artifacts: a Markdown summary (``breakhis-report``: the runs' Table 6 cells)
and a link to the full HTML report (``breakhis-report-link``), so the Prefect UI leads to it.
A local report is linked as a ``file://`` URL of the machine the flow ran on, an object-store
one by its URL; either way credentials are redacted, and the URL is percent-encoded so it stays
one Markdown link (Prefect shows a link artifact as ``[text](url)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from pydantic import Field

from dala_model import storage
from dala_model.report import build_report
from dala_model.report.tables import markdown_table, markdown_text, table6_cells
from flows._common import IO_RETRIES


@task(name="build-report", **IO_RETRIES)
def report_task(root: str) -> dict[str, str]:
    """Write ROOT/reports/ (markdown, HTML, metrics.json, figures); return {file name: URL}."""
    return build_report(root)


LINK_KEY = "breakhis-report-link"
_URL_SAFE = "/:@*%=&?#~+,;!$'"  # kept as they are; spaces, parentheses and <> are encoded


def report_link(url: str) -> str:
    """The URL a browser can open for a stored report: ``file://`` for a local one, redacted."""
    if "://" not in url:
        return Path(url).resolve().as_uri()
    scheme, rest = storage.redact(url).split("://", 1)
    return f"{scheme}://{quote(rest, safe=_URL_SAFE)}"


def publish_report_link(files: dict[str, str]) -> str:
    """Link artifact to report.html; returns the artifact id."""
    return str(
        create_link_artifact(
            link=report_link(files["report.html"]),
            link_text="report.html",
            key=LINK_KEY,
            description="the full report: tables, figures, checklist (self-contained HTML)",
        )
    )


def _md(text: str) -> str:
    """A URL or run id as inert Markdown text, credentials redacted."""
    return markdown_text(storage.redact(text), line_start=False)


def publish_report(files: dict[str, str], root: str) -> str:
    """Markdown artifact: the report's summary table plus where the full HTML report is stored."""
    metrics = json.loads(storage.read_bytes(files["metrics.json"]))
    lines = [
        f"## BreakHis report for {_md(root)}",
        "",
        f"Full report (figures, Table 6/7 layouts, per-epoch curves): **{_md(files['report.html'])}**",
        f"(markdown: {_md(files['report.md'])})",
        "",
        markdown_table(
            [
                "run",
                "model",
                "magnification",
                "scheme",
                "accuracy",
                "F1 minority / weighted",
                "IBA",
                "G-mean",
            ],
            [
                [run["run_id"], run["model"], f"{run['magnification']}X", run["scheme"]]
                + table6_cells(run["test"], sep=" / ")
                for run in metrics["runs"]
            ],
        ),
    ]
    if metrics["incomplete"]:
        lines += [
            "",
            "Incomplete runs: "
            + ", ".join(_md(f"{r['run_id']} ({r['status']})") for r in metrics["incomplete"]),
        ]
    return str(
        create_markdown_artifact(
            markdown="\n".join(lines),
            key="breakhis-report",
            description=f"report at {storage.redact(files['report.html'])}",
        )
    )


@flow(name="report-breakhis", log_prints=True)
def report_flow(
    root: Annotated[str, Field(description="storage root URL holding runs/")],
) -> dict[str, str]:
    """Rebuild ROOT/reports/ from ROOT/runs/*/run.json and publish its summary."""
    files = report_task(root)
    publish_report(files, root)
    publish_report_link(files)
    print(f"report: {storage.redact(files['report.html'])}")
    return files
