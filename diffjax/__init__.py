"""diffjax: denoising diffusion probabilistic models in JAX/Flax, as pure functions."""

__version__ = "0.1.0"
