"""Reports: Markdown tables and matplotlib plots, written atomically."""

from .markdown import markdown_table, write_demo_report
from .plots import save_figure

__all__ = ["markdown_table", "save_figure", "write_demo_report"]
