"""Multi-host start-up: join the other processes of a run before any JAX computation.

Every process of a multi-host run (a TPU pod slice, a Slurm or MPI job) runs the same program;
:func:`initialize_distributed` calls ``jax.distributed.initialize()`` only when the environment
describes several processes, so the same command works on one machine and on a pod.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

__all__ = ["initialize_distributed", "multiprocess_requested"]


def multiprocess_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment describes a run of several processes.

    ``DIFFJAX_DISTRIBUTED=1`` / ``0`` decides explicitly. Otherwise any of: an explicit
    coordinator (``JAX_COORDINATOR_ADDRESS``), a multislice TPU job
    (``MEGASCALE_COORDINATOR_ADDRESS``), several TPU workers (``TPU_WORKER_HOSTNAMES`` or
    ``TPU_PROCESS_ADDRESSES`` with more than one entry, as on GKE), or a Slurm / Open MPI job
    of several tasks (``SLURM_NTASKS``, ``OMPI_COMM_WORLD_SIZE`` > 1).
    """
    env = os.environ if env is None else env
    explicit = env.get("DIFFJAX_DISTRIBUTED")
    if explicit is not None:
        return explicit.strip().lower() in ("1", "true", "yes")
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if any("," in env.get(k, "") for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")):
        return True
    return any(int(env.get(k, "1") or "1") > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """``jax.distributed.initialize()`` when :func:`multiprocess_requested`; else nothing.

    Must run before any JAX computation. On Cloud TPU, Slurm and Open MPI the coordinator,
    process count and id are detected by JAX; elsewhere set ``JAX_COORDINATOR_ADDRESS``
    (host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
    Returns whether it initialized.
    """
    env = os.environ if env is None else env
    if not multiprocess_requested(env):
        return False
    kwargs: dict[str, Any] = {}
    if env.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    return True
