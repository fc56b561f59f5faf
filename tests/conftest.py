"""Shared test setup.

Two fake CPU devices are created before jax is imported so that the pmapped code paths
run with a real device axis; tests that need another count start a subprocess.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# Tests compile many small programs and run each only a few times: compile speed matters more.
jax.config.update("jax_disable_most_optimizations", True)
