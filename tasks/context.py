"""What a stage's body is given and what stops it: imported by the lifecycle (tasks/stage.py), the launcher
(tasks/launch.py) and the workers of a launched stage (tasks/worker.py), and importing none of them."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from tasks.store import Store

if TYPE_CHECKING:
    from tasks.tracking import Tracker

STOP = threading.Event()  # set on Ctrl-C / SIGTERM: training stages stop at their next step, marked KILLED


@dataclass
class StageContext:
    tracker: "Tracker"
    store: Store
    parent_run_id: str
    log: Callable[[str], None] = print
