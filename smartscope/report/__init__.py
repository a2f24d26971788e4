"""`write_report`: one self-contained HTML page about a run directory.

The page's template is ``template.html.j2`` beside this module; the run is
read with `smartscope.rundir.load_run`.
"""

from smartscope.report._report import render_report, thumbnail, write_report

__all__ = ["render_report", "thumbnail", "write_report"]
