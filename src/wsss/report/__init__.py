"""A self-contained HTML report of a run (`html.py`)."""

from wsss.report.html import write_report

__all__ = ["write_report"]
