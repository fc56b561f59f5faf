"""Shared pieces of the reliability tests: a tiny config, batch recording, CLI runs, comparisons.

The tiny config is configs/digits.py with the overrides of tests/test_training.py (one U-Net
level without attention, T = 20, global batch 8, 4 steps, checkpoints every 2, no evaluation
during training), so that all of them compile the same training step, once per persistent
compilation cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

REPO = Path(__file__).resolve().parent.parent

TINY_OVERRIDES = {
    "model.ch_mult": "(1,)",
    "model.attn_resolutions": "()",
    "diffusion.num_timesteps": "20",
    "training.batch_size": "8",
    "training.num_train_steps": "4",
    "training.checkpoint_every_steps": "2",
    "training.sample_every_steps": "4",
    "training.log_every_steps": "2",
    "training.keep_checkpoints": "2",
    "optimizer.warmup_steps": "2",
    "sampling.num_samples": "4",
    "sampling.num_steps": "2",
    # configs/digits.py evaluates during training; these tests train without (tests/
    # test_training_evaluation.py turns it on).
    "evaluation.eval_every_steps": "0",
    "evaluation.quality_every_steps": "0",
}


def tiny_config(**overrides: Any):
    """configs/digits.py with TINY_OVERRIDES, then ``overrides`` ({"training.seed": 1, ...})."""
    spec = importlib.util.spec_from_file_location("digits_config", REPO / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    values = {k: eval(v) for k, v in TINY_OVERRIDES.items()}  # literals only: "(1,)", "20"
    values.update(overrides)
    for key, value in values.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def cli_args(workdir: Path, **overrides: str) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, **overrides}.items()]
    return [sys.executable, str(REPO / "train.py"), f"--workdir={workdir}", *flags]


# The compiled programs of train.py subprocesses, shared by every test that starts one (JAX keys
# them by program and version, so a stale entry is never used): each compiles the same tiny
# train step, and compiling it is most of such a test's time.
SHARED_CACHE_DIR = Path(tempfile.gettempdir()) / f"diffjax-tests-jax-cache-{os.getuid()}"


def cli_env(cache_dir: Path | None = None) -> dict[str, str]:
    """The environment of a train.py subprocess: 2 fake devices, unbuffered output, compiled
    programs kept in ``cache_dir`` (default: ``SHARED_CACHE_DIR``)."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # the compiler settings of the test process
        PYTHONUNBUFFERED="1",
    )
    env.pop("DIFFJAX_DISTRIBUTED", None)
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir or SHARED_CACHE_DIR)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def run_cli(workdir: Path, cache_dir: Path | None = None, **overrides: str):
    """``python train.py`` on the tiny config; the CompletedProcess."""
    return subprocess.run(
        cli_args(workdir, **overrides),
        cwd=REPO,
        env=cli_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )


@contextlib.contextmanager
def persistent_compilation_cache(path: Path) -> Iterator[None]:
    """Compile each distinct program once for the tests in the block (and their subprocesses).

    Runs of the same config in one process would otherwise recompile the training step each
    time (a new pmapped function per run). The previous settings are restored afterwards.
    """
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def batch_digest(batch: dict[str, np.ndarray]) -> str:
    """A digest of a batch's images (what the data order comparison compares)."""
    return hashlib.sha256(np.ascontiguousarray(batch["image"]).tobytes()).hexdigest()[:16]


def example_digests(batch: dict[str, np.ndarray]) -> list[str]:
    """One digest per example: what the disjoint-shard comparison compares."""
    return [
        hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16] for x in batch["image"]
    ]


def assert_trees_bitwise_equal(a: Any, b: Any, what: str) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b), what
    for i, (x, y) in enumerate(zip(leaves_a, leaves_b, strict=True)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, (what, i)
        assert x.tobytes() == y.tobytes(), (
            f"{what}: leaf {i} differs (max |d| = {np.max(np.abs(x - y))})"
        )


def tree_digest(tree: Any) -> str:
    """sha256 over the bytes of every leaf, in tree order."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()
