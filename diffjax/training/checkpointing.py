"""Run directories: config.json and orbax checkpoints (local paths or gs://, via etils.epath).

Layout::

    workdir/config.json           the training ConfigDict as JSON (written once)
    workdir/checkpoints/<step>/   items "params", "ema_params", "opt_state" (pytrees) and
                                  "meta" (JSON: step, data_position, seed, ...); an
                                  inference-only run has no "opt_state"

Checkpoints are written by an orbax ``CheckpointManager`` (asynchronously; all processes call
it, and orbax decides which process writes what). Trees are saved as host numpy arrays, which
orbax treats as replicated and writes once, from process 0.

Crash safety. orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to
``<step>`` when every item is written (on gs://, where renames are not atomic, it writes
``<step>/commit_success.txt`` last instead); unfinished steps are never listed, and the
manager created here deletes them when it starts. So a process killed at any moment (even
``kill -9`` during a save) resumes from the last complete checkpoint. A complete checkpoint that
cannot be read back (damaged storage, a partial copy) is moved to ``workdir/corrupt_checkpoints``
with a warning and the previous one is used; a checkpoint whose shapes do not fit the config is
an error, never a silent re-initialisation.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from diffjax.errors import ReportableError

__all__ = [
    "CHECKPOINT_SUBDIR",
    "CONFIG_FILE",
    "CORRUPT_SUBDIR",
    "CheckpointMismatchError",
    "checkpoint_dir",
    "checkpoint_mismatches",
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
CORRUPT_SUBDIR = "corrupt_checkpoints"
TREE_ITEMS = ("params", "ema_params", "opt_state")
TRAINING_ITEMS = (*TREE_ITEMS, "meta")
_MAX_LISTED_MISMATCHES = 5


class CheckpointMismatchError(ReportableError, ValueError):
    """A checkpoint that cannot resume this config (other shapes, or no optimizer state)."""


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
    text = config.to_json(indent=2, sort_keys=True) + "\n"
    if "://" in str(path):
        out.write_text(text)  # an object store writes an object whole or not at all
    else:
        # Written aside, then renamed: a crash never leaves a truncated config.json.
        tmp = path / f".{CONFIG_FILE}.tmp"
        tmp.write_text(text)
        tmp.replace(out)
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
    A writable manager deletes the unfinished (temporary) step directories left by a killed
    process when it starts.
    """
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else 1,
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=enable_async,
        cleanup_tmp_directories=not read_only,
    )
    # Handlers known up front, so that item_metadata() can describe a step before restoring.
    handlers = {name: ocp.StandardCheckpointHandler() for name in TREE_ITEMS}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


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


def _leaf_name(path: tuple[Any, ...]) -> str:
    """'down_0_block_0/conv1/kernel' for a pytree key path (dict keys, indices, attributes)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _leaf_specs(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        _leaf_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in leaves
    }


def checkpoint_mismatches(
    manager: ocp.CheckpointManager, step: int, templates: dict[str, PyTree]
) -> list[str]:
    """Leaves of checkpoint ``step`` whose presence, shape or dtype differ from ``templates``.

    ``templates`` maps item names (params, ema_params, opt_state) to trees of the config being
    run. Reads only the checkpoint's metadata. Each line names the leaf and both shapes.
    """
    metadata = manager.item_metadata(step)
    problems = []
    for item, template in templates.items():
        saved_tree = metadata[item] if item in metadata else None
        if saved_tree is None:
            problems.append(f"{item}: missing from the checkpoint")
            continue
        saved, wanted = _leaf_specs(saved_tree), _leaf_specs(template)
        for name in sorted(saved.keys() | wanted.keys()):
            got, want = saved.get(name), wanted.get(name)
            if got == want:
                continue
            if got is None:
                problems.append(f"{item}/{name}: in the config {want[0]}, not in the checkpoint")
            elif want is None:
                problems.append(f"{item}/{name}: in the checkpoint {got[0]}, not in the config")
            else:
                problems.append(
                    f"{item}/{name}: checkpoint {got[0]} {got[1]}, config {want[0]} {want[1]}"
                )
    return problems


def _restore_step(
    manager: ocp.CheckpointManager, step: int, templates: dict[str, PyTree]
) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """Restore one step; CheckpointMismatchError if it does not fit, other errors if unreadable."""
    where = epath.Path(manager.directory) / str(step)
    if not (where / "opt_state").exists():
        raise CheckpointMismatchError(
            f"checkpoint {step} in {manager.directory} has no optimizer state (an inference-only "
            "run, e.g. converted weights): it cannot resume training; use another workdir"
        )
    problems = checkpoint_mismatches(manager, step, templates)
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED_MISMATCHES])
        more = len(problems) - _MAX_LISTED_MISMATCHES
        raise CheckpointMismatchError(
            f"checkpoint {where} does not fit the config ({listed}"
            f"{f'; and {more} more' if more > 0 else ''}); it was trained with "
            f"{epath.Path(manager.directory).parent / CONFIG_FILE}: resume with that config, or "
            "start the new config in another --workdir"
        )
    args = ocp.args.Composite(
        **{name: ocp.args.StandardRestore(_host(tree)) for name, tree in templates.items()},
        meta=ocp.args.JsonRestore(),
    )
    restored = manager.restore(step, args=args)
    trees = {name: restored[name] for name in templates}
    meta = dict(restored["meta"])
    if int(meta.get("step", -1)) != step:
        raise ValueError(f"meta of checkpoint {step} names step {meta.get('step')!r}")
    for name, tree in trees.items():
        if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree) if x.dtype.kind == "f"):
            raise ValueError(f"{name} of checkpoint {step} holds non-finite values")
    return trees, meta


def _all_processes(ok: bool) -> bool:
    """True when ``ok`` holds on every process (the same answer everywhere)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _quarantine(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Move step ``step`` out of the manager's sight into ``workdir/corrupt_checkpoints``."""
    source = epath.Path(manager.directory) / str(step)
    target_dir = epath.Path(manager.directory).parent / CORRUPT_SUBDIR
    target = target_dir / f"{step}-{int(time.time())}"
    if jax.process_index() == 0:
        target_dir.mkdir(parents=True, exist_ok=True)
        source.rename(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"diffjax_quarantine_{step}")
    manager.reload()
    return target


def restore_training_checkpoint(
    manager: ocp.CheckpointManager,
    *,
    params: PyTree,
    ema_params: PyTree,
    opt_state: PyTree,
    step: int | None = None,
) -> tuple[dict[str, PyTree], dict[str, Any]] | None:
    """Restore ``step``, or the latest readable checkpoint, into the templates' structure.

    Without ``step``, a latest checkpoint that cannot be read (or holds non-finite values) is
    moved to ``workdir/corrupt_checkpoints`` with a warning and the one before is tried; all
    processes agree on the step they restore. A checkpoint whose leaves do not match the
    templates raises :class:`CheckpointMismatchError` naming them: the config differs from the
    run's, and re-initialising would discard it.

    :return: ({"params", "ema_params", "opt_state"} as host numpy trees, meta dict), or None
        when the directory has no checkpoint.
    """
    templates = {"params": params, "ema_params": ema_params, "opt_state": opt_state}
    if step is not None:
        return _restore_step(manager, int(step), templates)
    while (latest := manager.latest_step()) is not None:
        error: Exception | None = None
        try:
            result = _restore_step(manager, latest, templates)
        except CheckpointMismatchError:
            raise
        except Exception as err:  # noqa: BLE001 - anything unreadable is treated alike
            error = err
        if _all_processes(error is None):
            return result
        moved = _quarantine(manager, latest)
        logging.warning(
            "checkpoint %d cannot be restored (%s); moved to %s; falling back to the previous "
            "checkpoint",
            latest,
            "on another process" if error is None else f"{type(error).__name__}: {error}",
            moved,
        )
    return None


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
