"""The JSON record of a run's evaluation at one step: ``RUN/eval/step_<step>.json``.

One file per checkpoint step, written by ``diffjax evaluate`` and by evaluation during training
(``diffjax.training.evaluation``) alike::

    {"step": 2000, "workdir": "...", "params": "ema", "versions": {"jax": ..., ...},
     "metrics": {"bpd": {...}, "digits_fd": {...}, ...}}

Each metric's entry is what its function returned (``diffjax.evaluation.run_metrics``), with how
it was made; a later evaluation of the same step replaces the metrics it computed and keeps the
others (:func:`merge_record`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from etils import epath

__all__ = ["merge_record", "record_path", "versions"]


def versions() -> dict[str, str]:
    """The versions of the packages that computed the metrics."""
    import flax
    import jax
    import numpy as np
    import scipy

    import diffjax

    return dict(diffjax=diffjax.__version__, jax=jax.__version__, flax=flax.__version__,
                numpy=np.__version__, scipy=scipy.__version__)  # fmt: skip


def record_path(workdir: str | os.PathLike, step: int) -> epath.Path:
    """``workdir/eval/step_<step>.json`` (the step without zero padding)."""
    return epath.Path(workdir) / "eval" / f"step_{int(step)}.json"


def merge_record(
    path: str | os.PathLike,
    *,
    step: int,
    workdir: str,
    results: Mapping[str, Mapping[str, Any]],
    params: str = "ema",
) -> epath.Path:
    """Merge ``results`` ({metric: entry}) into the record at ``path`` (created if absent).

    Sets ``step``, ``workdir``, ``params`` (the parameters the metrics used) and ``versions``;
    ``metrics.<name>`` is replaced for every name in ``results``, other metrics are kept.
    :return: the path written.
    """
    path = epath.Path(path)
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(step=int(step), workdir=str(workdir), params=params, versions=versions())
    record.setdefault("metrics", {}).update({k: dict(v) for k, v in results.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path
