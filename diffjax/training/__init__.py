"""Training: the loop (``loop.train_and_evaluate``), one update (``step``), its state
(``state``), checkpoints (``checkpointing``), graceful stops (``preemption``), the run directory
(``workdir``), metrics (``metrics``) and the hang detector (``watchdog``)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"train_and_evaluate": "diffjax.training.loop"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffjax.training' has no attribute {name!r}")
