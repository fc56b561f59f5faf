"""Run directories: config.json and orbax checkpoints (local paths or gs://, via etils.epath).

Layout::

    workdir/config.json           the training ConfigDict as JSON (written once)
    workdir/checkpoints/<step>/   items "params", "ema_params", "opt_state" (pytrees) and
                                  "meta" (JSON: step, data_position, seed, ...); an
                                  inference-only run has no "opt_state"

Checkpoints are written by an orbax ``CheckpointManager`` (asynchronously; all processes call
it, and orbax decides which process writes what). Trees are saved as host numpy arrays, which
orbax treats as replicated and writes once, from process 0.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

__all__ = [
    "CHECKPOINT_SUBDIR",
    "CONFIG_FILE",
    "checkpoint_dir",
    "create_checkpoint_manager",
    "load_config",
    "resolve_workdir",
    "restore_ema_params",
    "restore_training_checkpoint",
    "save_config",
    "save_inference_run",
    "save_training_checkpoint",
]

PyTree = Any
CONFIG_FILE = "config.json"
CHECKPOINT_SUBDIR = "checkpoints"
TRAINING_ITEMS = ("params", "ema_params", "opt_state", "meta")


def resolve_workdir(workdir: str | epath.PathLike) -> epath.Path:
    """``workdir`` as an epath; a local path made absolute (orbax requires absolute paths)."""
    path = epath.Path(workdir)
    return path if "://" in str(workdir) else path.resolve()


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
    """``workdir/checkpoints`` (absolute for a local workdir)."""
    return resolve_workdir(workdir) / CHECKPOINT_SUBDIR


def save_config(workdir: str | epath.PathLike, config: ml_collections.ConfigDict) -> epath.Path:
    """Write ``config`` to ``workdir/config.json`` (creating workdir); return the path."""
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    out = path / CONFIG_FILE
    out.write_text(config.to_json(indent=2, sort_keys=True) + "\n")
    return out


def _tuples(node: Any) -> Any:
    # JSON has no tuples; the schema's sequences (ch_mult, attn_resolutions) are tuples.
    if isinstance(node, dict):
        return {k: _tuples(v) for k, v in node.items()}
    if isinstance(node, list):
        return tuple(_tuples(v) for v in node)
    return node


def load_config(workdir: str | epath.PathLike) -> ml_collections.ConfigDict:
    """The ConfigDict saved by :func:`save_config` (lists read back as tuples)."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {workdir}: not a diffjax run directory")
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


def create_checkpoint_manager(
    workdir: str | epath.PathLike,
    *,
    keep: int | None = None,
    read_only: bool = False,
    enable_async: bool = True,
) -> ocp.CheckpointManager:
    """An orbax CheckpointManager on ``workdir/checkpoints`` keeping the latest ``keep`` steps.

    Saving is decided by the caller (``save(..., force=True)``), not by an interval here.
    Use it as a context manager, or call ``close()``: pending asynchronous writes finish there.
    """
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else 1,
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=enable_async,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def _host(tree: PyTree) -> PyTree:
    """A host (numpy) copy of ``tree``: written once as replicated, and safe to write async."""
    return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


def save_training_checkpoint(
    manager: ocp.CheckpointManager,
    step: int,
    *,
    params: PyTree,
    ema_params: PyTree,
    opt_state: PyTree,
    meta: dict[str, Any],
) -> bool:
    """Start an (asynchronous) save of all training items at ``step``; call on every process.

    The trees must be unreplicated (one copy, no device axis). Returns whether orbax saved.
    """
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(_host(params)),
        ema_params=ocp.args.StandardSave(_host(ema_params)),
        opt_state=ocp.args.StandardSave(_host(opt_state)),
        meta=ocp.args.JsonSave(dict(meta, step=int(step))),
    )
    return manager.save(int(step), args=args, force=True)


def restore_training_checkpoint(
    manager: ocp.CheckpointManager,
    *,
    params: PyTree,
    ema_params: PyTree,
    opt_state: PyTree,
    step: int | None = None,
) -> tuple[dict[str, PyTree], dict[str, Any]] | None:
    """Restore ``step`` (default: the latest) into the structure of the given templates.

    :return: ({"params", "ema_params", "opt_state"} as host numpy trees, meta dict), or None
        when the directory has no checkpoint.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    if not (epath.Path(manager.directory) / str(step) / "opt_state").exists():
        raise ValueError(
            f"checkpoint {step} in {manager.directory} has no optimizer state (an inference-only "
            "run, e.g. converted weights): it cannot resume training; use another workdir"
        )
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(_host(params)),
        ema_params=ocp.args.StandardRestore(_host(ema_params)),
        opt_state=ocp.args.StandardRestore(_host(opt_state)),
        meta=ocp.args.JsonRestore(),
    )
    restored = manager.restore(step, args=args)
    trees = {name: restored[name] for name in ("params", "ema_params", "opt_state")}
    return trees, dict(restored["meta"])


def restore_ema_params(
    workdir: str | epath.PathLike, step: int | None = None
) -> tuple[PyTree, int]:
    """The EMA parameters of checkpoint ``step`` (default: the latest) of the run in ``workdir``.

    Works for training runs and for inference-only runs (:func:`save_inference_run`).

    :return: (ema_params as a nested dict of numpy float32 arrays, the step restored).
    :raises FileNotFoundError: when ``workdir/checkpoints`` holds no checkpoint (or not ``step``).
    """
    ckpt = checkpoint_dir(workdir)
    steps = sorted(ocp.utils.checkpoint_steps(ckpt)) if ckpt.exists() else []
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint in {ckpt}; train first with "
            f"`python train.py --config=configs/<name>.py --workdir={workdir}`"
        )
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint {step} in {ckpt}; steps there: {steps}")
    # Only the one item is read; the trees were saved as numpy, and come back as numpy.
    with ocp.StandardCheckpointer() as checkpointer:
        ema_params = checkpointer.restore(ckpt / str(step) / "ema_params")
    return ema_params, step


def save_inference_run(
    workdir: str | epath.PathLike,
    config: ml_collections.ConfigDict,
    params: PyTree,
    ema_params: PyTree,
    step: int,
) -> epath.Path:
    """Write a run that :func:`restore_ema_params` / ``diffjax.load_run`` can read.

    ``config.json`` plus one checkpoint at ``step`` with items params, ema_params and meta
    (no optimizer state: it cannot resume training). Used for converted weights. Returns the
    checkpoint directory.
    """
    save_config(workdir, config)
    with create_checkpoint_manager(workdir, enable_async=False) as manager:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(_host(params)),
            ema_params=ocp.args.StandardSave(_host(ema_params)),
            meta=ocp.args.JsonSave({"step": int(step), "inference_only": True}),
        )
        manager.save(int(step), args=args, force=True)
        manager.wait_until_finished()
    return checkpoint_dir(workdir) / str(int(step))
