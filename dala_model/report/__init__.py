"""Reports: run folders read back into the paper's tables, figures, Markdown and HTML.

May import ``engine`` records, ``metrics``, ``paper`` and the base modules; never the reverse.
"""

from dala_model.report.build import build_report

__all__ = ["build_report"]
