"""`report-breakhis`: rebuild the comparison report from every stored run under a root."""

from __future__ import annotations

import json
from typing import Annotated

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from dala_model import storage
from dala_model.report import build_report
from dala_model.report.tables import markdown_table, table6_cells
from flows._common import IO_RETRIES


@task(name="build-report", **IO_RETRIES)
def report_task(root: str) -> dict[str, str]:
    """Write ROOT/reports/ (markdown, HTML, metrics.json, figures); return {file name: URL}."""
    return build_report(root)


def publish_report(files: dict[str, str], root: str) -> str:
    """Markdown artifact: the report's summary table plus where the full HTML report is stored."""
    metrics = json.loads(storage.read_bytes(files["metrics.json"]))
    lines = [
        f"## BreakHis report for {storage.redact(root)}",
        "",
        f"Full report (figures, Table 6/7 layouts, per-epoch curves): **{storage.redact(files['report.html'])}**",
        f"(markdown: {storage.redact(files['report.md'])})",
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
            + ", ".join(f"{r['run_id']} ({r['status']})" for r in metrics["incomplete"]),
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
    print(f"report: {storage.redact(files['report.html'])}")
    return files
