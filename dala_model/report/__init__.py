"""Reports: run folders read back into the paper's tables, figures, Markdown and HTML.

May import ``engine`` records, ``metrics``, ``evaluation``, ``paper``, ``data`` (the split and
manifest the reporting checklist counts) and the base modules; never the reverse.
"""

from dala_model.report.build import build_report

__all__ = ["build_report"]
