"""The live window: qtpy + superqt (``pip install "smartscope[gui]"``).

Imported only when used (``smartscope gui``, ``bench loop --gui``);
``import smartscope`` never imports Qt.
"""

import os

# pymmcore-plus switches its cores' signals to Qt ones when a QApplication is
# running; smartscope's acquisition callbacks must stay direct psygnal calls on
# the acquisition thread, so cores created from now on keep psygnal.
os.environ.setdefault("PYMM_SIGNALS_BACKEND", "psygnal")

from smartscope.gui._frame_view import FrameView
from smartscope.gui._panels import (
    ApprovalPanel,
    DecisionLog,
    PolicyEditor,
    UpcomingTable,
)
from smartscope.gui._stage_map import StageMap
from smartscope.gui._window import (
    MainWindow,
    attach_window,
    ensure_app,
    run_gui,
)

__all__ = [
    "ApprovalPanel",
    "DecisionLog",
    "FrameView",
    "MainWindow",
    "PolicyEditor",
    "StageMap",
    "UpcomingTable",
    "attach_window",
    "ensure_app",
    "run_gui",
]
