"""Names the configs and command lines accept, without importing jax (flags are checked first).

Each tuple equals the keys of the table that dispatches on it (tests/test_dpm_solver.py and
tests/test_sampling.py check that they agree).
"""

from __future__ import annotations

__all__ = ["DPM_ORDERS", "DPM_SPACINGS", "SAMPLERS"]

# diffjax.core.sampling.SAMPLERS: ancestral (Ho et al. 2020), DDIM (Song et al. 2021), DPM-Solver++
# (Lu et al. 2022b).
SAMPLERS = ("ddpm", "ddim", "dpm++")
# diffjax.core.dpm_solver.SPACINGS and the orders of its multistep solver.
DPM_SPACINGS = ("logsnr", "time", "karras", "uniform")
DPM_ORDERS = (1, 2, 3)
