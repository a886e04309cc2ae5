"""Reports of arena results: one entry per cell group, mean ± std over seeds, relative to the
dataset's baseline, as a rich table, CSV, JSON, Markdown or one self-contained HTML page."""

from nnarena.bench.report.formats import FORMATS, render, write_report
from nnarena.bench.report.summary import summarize

__all__ = ["FORMATS", "render", "summarize", "write_report"]
