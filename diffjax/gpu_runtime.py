"""Process-wide XLA:GPU setting for speed: convolutions recorded into command buffers.

XLA:GPU records runs of consecutive kernels into command buffers (CUDA graphs) and launches
each buffer with one call. By default cuDNN's convolutions are not recorded: each is launched
on its own from the host and splits the kernels around it into another buffer. A profile of the
CIFAR-10 train step (batch 128, bfloat16, one H100) showed ~120 command buffers and ~340
separate launches per step, 21.4 ms of kernels, and runs of 22.2, 37.6 and 29.5 ms per step:
the GPU waited for the host. With ``--xla_gpu_enable_command_buffer=+CONVOLUTION`` (XLA's
default command types plus convolutions) the convolutions join the buffers: 22.5 ms per step
(median of 7 runs, 5,678 img/s; bench/README.md, "GPU").

Like ``cpu_runtime``, the flag must be in ``XLA_FLAGS`` before the process's first JAX
computation, so the entry points apply it (``train.py``, ``python -m diffjax.sample``,
``python -m diffjax.evaluate``, ``bench/``); in your own program call ``configure()`` first
thing. It changes no number that is computed, only how kernels are launched. It is only added
where JAX's CUDA plugin is installed (a TPU or CPU machine's process never sees it) and for the
jaxlib versions that know the flag (an unknown flag in ``XLA_FLAGS`` aborts the process), never
over an ``--xla_gpu_enable_command_buffer`` already in ``XLA_FLAGS``;
``DIFFJAX_GPU_CONV_COMMAND_BUFFERS=0`` leaves XLA's default.
"""

from __future__ import annotations

import importlib.metadata
import os

from diffjax.cpu_runtime import env_enabled

ENV = "DIFFJAX_GPU_CONV_COMMAND_BUFFERS"
COMMAND_BUFFER_FLAG = "--xla_gpu_enable_command_buffer"
# "+" adds to XLA's default command types instead of replacing them.
COMMAND_BUFFER_TYPES = "+CONVOLUTION"
# jaxlib versions (prefixes) whose XLA has the CONVOLUTION command type; measured on 0.11.2
# (GPU), and 0.10 parses it (its CPU backend ignores it).
COMMAND_BUFFER_JAXLIB_VERSIONS = ("0.10.", "0.11.")
# The distributions that give JAX its CUDA backend (``pip install "jax[cuda12]"`` / cuda13).
CUDA_DISTRIBUTIONS = (
    "jax-cuda13-pjrt",
    "jax-cuda12-pjrt",
    "jax-cuda13-plugin",
    "jax-cuda12-plugin",
)


def cuda_installed() -> bool:
    """Whether a JAX CUDA backend is installed (looked up in the package metadata, so that
    nothing is imported and no backend starts)."""
    for name in CUDA_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return True
    return False


def command_buffer_flag(jaxlib_version: str, xla_flags: str) -> str | None:
    """The flag to add to ``xla_flags`` for ``jaxlib_version``; None when none is to be added
    (an unknown jaxlib, or the command types already set by the user)."""
    if COMMAND_BUFFER_FLAG in xla_flags:
        return None
    if not jaxlib_version.startswith(COMMAND_BUFFER_JAXLIB_VERSIONS):
        return None
    return f"{COMMAND_BUFFER_FLAG}={COMMAND_BUFFER_TYPES}"


def configure() -> list[str]:
    """Add the command-buffer flag to ``XLA_FLAGS`` where a CUDA backend is installed, unless
    ``DIFFJAX_GPU_CONV_COMMAND_BUFFERS=0``; returns what was applied. Call before the first JAX
    computation of the process."""
    import jaxlib.version  # the version only: importing jaxlib starts no backend

    if not env_enabled(ENV) or not cuda_installed():
        return []
    xla_flags = os.environ.get("XLA_FLAGS", "")
    flag = command_buffer_flag(jaxlib.version.__version__, xla_flags)
    if flag is None:
        return []
    os.environ["XLA_FLAGS"] = f"{xla_flags} {flag}".strip()
    return [flag]
