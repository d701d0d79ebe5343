"""The report's blocks as Markdown and as one self-contained HTML page.

The HTML page inlines its CSS and its PNGs (base64 data URIs), so it opens offline and can be
mailed as one file; it references no network resource. Markdown tables come from
``tables.markdown_table``, the same writer the flows' artifacts use.
"""

from __future__ import annotations

import base64
import html
import re

from dala_model.report.blocks import Block, Heading, Image, Table, Text
from dala_model.report.tables import markdown_table


def to_markdown(blocks: list[Block]) -> str:
    """The report as Markdown; images are referenced by file name, next to report.md."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Text):
            lines += [("> **Warning:** " if block.warning else "") + block.text, ""]
        elif isinstance(block, Table):
            lines += [markdown_table(block.header, block.rows), ""]
        elif isinstance(block, Image):
            lines += [f"![{block.caption}]({block.name})", ""]
        else:
            lines += [f"- {item}" for item in block.items] + [""]
    return "\n".join(lines)


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1400px; color: #222; }
h1, h2, h3 { color: #1f3b63; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccd; padding: 0.25rem 0.5rem; text-align: center; }
th { background: #e8eef6; }
tr:nth-child(even) td { background: #f7f9fc; }
.scroll { overflow-x: auto; }
.warning { background: #fff4e5; border-left: 4px solid #e69500; padding: 0.5rem 1rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; }
figcaption { font-size: 0.85rem; color: #555; }
code { background: #f0f0f0; padding: 0 0.2rem; }
"""


def to_html(blocks: list[Block]) -> str:
    """The report as one HTML page with inline CSS and the figures embedded."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>DALAResNet50 on BreakHis: run report</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
    ]
    parts += [_html_block(block) for block in blocks]
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{_inline(block.text)}</h{block.level}>"
    if isinstance(block, Text):
        css = ' class="warning"' if block.warning else ""
        prefix = "<strong>Warning:</strong> " if block.warning else ""
        return f"<p{css}>{prefix}{_inline(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{_inline(c)}</th>" for c in block.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows
        )
        return (
            f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>"
        )
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode()
        return (
            f'<figure><img alt="{html.escape(block.caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>'
            f"{html.escape(block.caption)}</figcaption></figure>"
        )
    return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>"
