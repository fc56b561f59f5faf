"""Every name the configs and command lines accept, without importing jax (flags are checked first).

Each tuple equals the keys of the table that dispatches on it (tests/test_dpm_solver.py and
tests/test_sampling.py check that they agree).
"""

from __future__ import annotations

__all__ = [
    "DPM_ORDERS",
    "DPM_SPACINGS",
    "DTYPES",
    "EVAL_SAMPLE_METRICS",
    "KERNELS",
    "LOSS_TYPES",
    "LR_DECAYS",
    "MEAN_TYPES",
    "SAMPLERS",
    "VAR_TYPES",
]

# diffjax.core.sampling.SAMPLERS: ancestral (Ho et al. 2020), DDIM (Song et al. 2021), DPM-Solver++
# and SDE-DPM-Solver++ (Lu et al. 2022b), UniPC (Zhao et al. 2023).
SAMPLERS = ("ddpm", "ddim", "dpm++", "sde-dpm++", "unipc")
# diffjax.core.dpm_solver.SPACINGS and the orders of its multistep solver.
DPM_SPACINGS = ("logsnr", "time", "karras", "uniform")
DPM_ORDERS = (1, 2, 3)

# Compute dtypes of the U-Net (model.dtype); parameters are float32 whatever it is.
DTYPES = ("float32", "bfloat16")
# diffjax.kernels: the switch between the tuned kernels, the plain lax/jax.nn reference, and the
# tuned kernels with oneDNN calls on AVX-512 CPUs (model.kernels).
KERNELS = ("tuned", "plain", "onednn")
# diffjax.core.diffusion: what the network predicts (Ho et al. eps, x_0, Salimans & Ho v) and
# the reverse-process variances (Ho et al. sigma^2 = beta~ or beta; Nichol & Dhariwal learned).
MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
# diffjax.core.losses: L_simple, the variational bound, and their hybrid (Nichol & Dhariwal).
LOSS_TYPES = ("simple", "kl", "hybrid")
# diffjax.training.state: the learning rate after warm-up (optimizer.decay), constant as in Ho et
# al. or a cosine down to 0 at the last step.
LR_DECAYS = ("constant", "cosine")
# diffjax.training.evaluation: the sample metric evaluated during training
# (evaluation.sample_metric); "auto" is digits_fd on digits/MNIST, else FID/IS where the config
# gives the Inception weights and reference statistics, else none.
EVAL_SAMPLE_METRICS = ("auto", "digits_fd", "fid", "none")
