"""Shared test setup.

Two fake CPU devices are created before jax is imported so that the pmapped code paths
run with a real device axis; tests that need another count start a subprocess. The XLA:CPU
settings of train.py (``cpu_runtime.configure``) apply here too, so that a run in a train.py
subprocess and one in the test process compile the same programs (bitwise-equal resumes).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Entry points run as subprocesses keep no compiled programs in the user's cache folder (tests
# that want a cache set JAX_COMPILATION_CACHE_DIR, which JAX reads itself).
os.environ.setdefault("DIFFJAX_COMPILATION_CACHE", "0")

from diffjax.kernels import cpu_runtime  # noqa: E402  (imports no jax)

cpu_runtime.configure("float32")

import jax  # noqa: E402

# Tests compile many small programs and run each only a few times: compile speed matters more.
jax.config.update("jax_disable_most_optimizations", True)
