"""The report's blocks as Markdown and as one self-contained HTML page.

The HTML page inlines its CSS and its PNGs (base64 data URIs), so it opens offline and can be
mailed as one file; it references no network resource. Markdown tables come from
``tables.markdown_table``, the same writer the flows' artifacts use.

Escaping is by construction, not by care at each call site: run ids, file names, model options
and exception messages reach the blocks as plain text, and every text a renderer writes passes
through one function per format. In HTML that is ``_escape`` (``html.escape``, quotes
included), and ``_inline`` is the only place that adds markup (``<code>``), to text it has
already escaped; in Markdown it is ``tables.markdown_text``. A block never carries markup of
its own, only the report's one inline convention, `backticks` for code.

Why no Jinja2 template (issue 17, item 6; decided by reading both): the document model stays
either way, because one list of blocks feeds both the Markdown and the HTML report and keeps
them from drifting apart. A template would replace only ``to_html`` and ``_html_block`` (about
thirty lines) with a template of about as many lines, plus a dispatch on block type that Jinja2
cannot do by ``isinstance``, a loader and package data in pyproject, and a dependency we would
have to declare (Prefect installs Jinja2, but ``dala_model`` never imports Prefect's world and
does not declare it). Its autoescape would not remove the one escape function either: the
backtick-to-``<code>`` filter must return ``Markup``, which is exactly ``_inline``. Nor would it
help Markdown, which Jinja2 does not escape. So the page stays five ``isinstance`` branches
here. Likewise ``markdown_table`` stays ours: ``tabulate`` (which pandas' ``to_markdown``
needs) is not a dependency of ours, and its GitHub format escapes neither pipes nor HTML, which
``markdown_table`` must do anyway.
"""

from __future__ import annotations

import base64
import html

from dala_model.report.blocks import Block, Heading, Image, Table, Text
from dala_model.report.tables import CODE_SPAN, markdown_table, markdown_text

TITLE = "DALAResNet50 on BreakHis: run report"


def _level(block: Heading) -> int:
    return min(max(int(block.level), 1), 6)


def to_markdown(blocks: list[Block]) -> str:
    """The report as Markdown; images are referenced by file name, next to report.md."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * _level(block) + " " + markdown_text(block.text), ""]
        elif isinstance(block, Text):
            lines += [("> **Warning:** " if block.warning else "") + markdown_text(block.text), ""]
        elif isinstance(block, Table):
            lines += [markdown_table(block.header, block.rows), ""]
        elif isinstance(block, Image):
            lines += [f"![{markdown_text(block.caption)}]({block.name})", ""]
        else:
            lines += [f"- {markdown_text(item)}" for item in block.items] + [""]
    return "\n".join(lines)


def _escape(text: object) -> str:
    """The one escape of every text the HTML page shows, in element content or an attribute."""
    return html.escape(str(text), quote=True)


def _inline(text: object) -> str:
    """Escaped text with its `code` spans as ``<code>``: the only markup a text gains."""
    return CODE_SPAN.sub(r"<code>\1</code>", _escape(text))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; padding: 0 1rem;
       max-width: 1400px; color: #222; }
h1, h2, h3 { color: #1f3b63; }
h1, h2, h3, p, li, figcaption { overflow-wrap: anywhere; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccd; padding: 0.25rem 0.5rem; text-align: center; }
th { background: #e8eef6; }
tr:nth-child(even) td { background: #f7f9fc; }
.scroll { overflow-x: auto; max-width: 100%; }
.warning { background: #fff4e5; border-left: 4px solid #e69500; padding: 0.5rem 1rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85rem; color: #555; }
code { background: #f0f0f0; padding: 0 0.2rem; }
"""


def to_html(blocks: list[Block]) -> str:
    """The report as one HTML page with inline CSS and the figures embedded."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_escape(TITLE)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
    ]
    parts += [_html_block(block) for block in blocks]
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h{_level(block)}>{_inline(block.text)}</h{_level(block)}>"
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
            f'<figure><img alt="{_escape(block.caption)}" '
            f'src="data:image/png;base64,{data}"><figcaption>'
            f"{_inline(block.caption)}</figcaption></figure>"
        )
    return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>"
