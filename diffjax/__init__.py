"""diffjax: denoising diffusion probabilistic models in JAX/Flax, as pure functions."""

from __future__ import annotations

import importlib
from typing import Any

from diffjax import _aliases

__version__ = "0.1.0"

# Imported on first use, so that `import diffjax` stays light (no jax or orbax import).
_LAZY = {"load_run": "diffjax.run", "ddim_sample": "diffjax.core.sampling"}

__all__ = ["__version__", *_LAZY]

_aliases.install()  # old flat module paths (diffjax.sampling, ...) for one more release


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffjax' has no attribute {name!r}")
