"""Training: the loop (``loop.train_and_evaluate``), one update (``step``), its state
(``state``), checkpoints (``checkpointing``), graceful stops (``preemption``, and the loop's side
in ``stopping``), the run directory (``workdir``), metrics (``metrics``), the hang detector
(``watchdog``), multi-host start-up (``multihost``); the pieces of the loop: its state between
steps (``bookkeeping``), non-finite steps (``nonfinite``), throughput (``throughput``), periodic
actions (``periodic``), the outputs they write (``actions``) and evaluation during training
(``evaluation``, with the fixed-noise eval loss in ``eval_loss``)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"train_and_evaluate": "diffjax.training.loop"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffjax.training' has no attribute {name!r}")
