"""`report-breakhis`: rebuild the comparison report from every stored run under a root."""

from __future__ import annotations

import json
from typing import Annotated

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from dala_model import storage
from dala_model.report.build import build_report
from flows.ingest import IO_RETRIES


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
        "| run | model | magnification | scheme | accuracy | F1 minority / weighted | IBA | G-mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in metrics["runs"]:
        test = run["test"]
        lines.append(
            f"| {run['run_id']} | {run['model']} | {run['magnification']}X | {run['scheme']} | "
            f"{_num(test.get('accuracy'))} | {_num(test.get('f1_minority'))} / {_num(test.get('f1_weighted'))} | "
            f"{_num(test.get('iba_unsquared'))} | {_num(test.get('gmean'))} |"
        )
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


def _num(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


@flow(name="report-breakhis", log_prints=True)
def report_flow(
    root: Annotated[str, Field(description="storage root URL holding runs/")],
) -> dict[str, str]:
    """Rebuild ROOT/reports/ from ROOT/runs/*/run.json and publish its summary."""
    files = report_task(root)
    publish_report(files, root)
    print(f"report: {storage.redact(files['report.html'])}")
    return files
