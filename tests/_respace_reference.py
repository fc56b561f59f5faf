"""Respacing in float64 numpy from its definition, the reference of the respacing tests.

Nichol & Dhariwal 2021 Sec. 4: for kept steps k_1 < ... < k_K, beta'_i = 1 - abar_{k_i} /
abar_{k_{i-1}} (abar_{k_0} = 1), so that abar'_i = abar_{k_i}. Written as the ratio of the
definition, independently of ``diffjax.core.respacing`` (a traced sum of log1p terms).
"""

import numpy as np


def respace_f64(betas, steps) -> tuple[np.ndarray, np.ndarray]:
    """(float64 betas' [K], int32 timestep map [K]) for increasing 0-indexed ``steps``."""
    steps = np.asarray(steps, np.int64)
    abar = np.cumprod(1.0 - np.asarray(betas, np.float64))[steps]  # [K]
    prev = np.concatenate([[1.0], abar[:-1]])
    return 1.0 - abar / prev, steps.astype(np.int32)
