"""The mathematics of DDPM as free functions over a ``Schedule`` pytree.

``schedules`` (beta schedules and the coefficients derived from them), ``diffusion`` (the forward
process, its posterior and the reverse-process parameterizations), ``losses`` (L_simple and the
terms of the variational bound), ``respacing`` (sampling on a subset of the T steps) and the
samplers: ``sampling`` (ancestral and DDIM, and the ``sample`` entry point), ``dpm_solver``
(DPM-Solver++) over the loop they share, ``sampling_loop``.
"""
