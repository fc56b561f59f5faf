"""The run's working directory: proving it writable, and its ``config.json`` across resumes.

``prepare_workdir`` creates the workdir and writes (and removes) a probe file, so that a run
fails before it trains when its checkpoints could not be saved; ``record_config`` writes
``config.json`` and, on a resume, first warns about every key that differs from the one already
there (``config_changes``). Local paths and ``gs://`` buckets alike (``etils.epath``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from diffjax.errors import ReportableError
from diffjax.training import checkpointing

__all__ = ["WorkdirError", "config_changes", "prepare_workdir", "record_config"]


class WorkdirError(ReportableError):
    """The workdir cannot be created or written."""


def prepare_workdir(workdir: epath.Path) -> None:
    """Create ``workdir`` (with parents) and prove that files can be written in it."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe_{os.getpid()}"
        probe.write_text("ok\n")
        probe.unlink()
    except Exception as err:  # noqa: BLE001 - local and remote file systems raise differently
        raise WorkdirError(
            f"workdir {workdir} cannot be written ({type(err).__name__}: {err}); pass a "
            "writable --workdir (a local path or gs://bucket/path)"
        ) from err


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One line per dotted key whose value differs between two configs (as JSON dicts)."""
    a, b = _flat(old), _flat(new)
    missing = object()
    return [
        f"{key}: {a.get(key, missing)!r} -> {b.get(key, missing)!r}".replace(
            repr(missing), "(absent)"
        )
        for key in sorted(a.keys() | b.keys())
        if a.get(key, missing) != b.get(key, missing)
    ]


def record_config(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
    """Write config.json; on a resume, first warn about every key that changed."""
    path = workdir / checkpointing.CONFIG_FILE
    if path.exists():
        new = json.loads(config.to_json())
        try:
            changes = config_changes(json.loads(path.read_text()), new)
        except ValueError:
            changes = ["(the previous config.json is unreadable)"]
        for change in changes:
            logging.warning("config changed since this workdir's config.json: %s", change)
    checkpointing.save_config(workdir, config)
