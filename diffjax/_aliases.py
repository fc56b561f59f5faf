"""Old module paths, importable for one more release (0.2) with a DeprecationWarning.

diffjax 0.1 had its modules flat in ``diffjax/``; they now live in sub-packages named for their
part of the system. ``import diffjax.sampling`` still gives the module (the very object of its new
path, ``diffjax.core.sampling``) and warns once with the new name. ``diffjax.sample``,
``diffjax.evaluate`` and ``diffjax.convert`` remain real modules: they are the ``python -m``
forms of the ``diffjax`` command.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

# old module path -> new module path
ALIASES = {
    "diffjax.checkpointing": "diffjax.training.checkpointing",
    "diffjax.config_validation": "diffjax.config.validation",
    "diffjax.cpu_runtime": "diffjax.kernels.cpu_runtime",
    "diffjax.datasets": "diffjax.data.registry",
    "diffjax.datasets.digits": "diffjax.data.digits",
    "diffjax.datasets.preprocess": "diffjax.data.preprocess",
    "diffjax.datasets.sources": "diffjax.data.sources",
    "diffjax.default_config": "diffjax.config.defaults",
    "diffjax.diffusers_config": "diffjax.convert.configs",
    "diffjax.diffusion": "diffjax.core.diffusion",
    "diffjax.dpm_solver": "diffjax.core.dpm_solver",
    "diffjax.images": "diffjax.data.images",
    "diffjax.input_pipeline": "diffjax.data.pipeline",
    "diffjax.losses": "diffjax.core.losses",
    "diffjax.metrics_writer": "diffjax.training.metrics",
    "diffjax.models.normalization": "diffjax.kernels.normalization",
    "diffjax.models.onednn": "diffjax.kernels.onednn",
    "diffjax.models.primitives": "diffjax.kernels.primitives",
    "diffjax.models.winograd": "diffjax.kernels.winograd",
    "diffjax.preemption": "diffjax.training.preemption",
    "diffjax.respacing": "diffjax.core.respacing",
    "diffjax.sampling": "diffjax.core.sampling",
    "diffjax.sampling_loop": "diffjax.core.sampling_loop",
    "diffjax.schedules": "diffjax.core.schedules",
    "diffjax.train_state": "diffjax.training.state",
    "diffjax.train_step": "diffjax.training.step",
    "diffjax.watchdog": "diffjax.training.watchdog",
    "diffjax.workdir": "diffjax.training.workdir",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.target}; the old name goes away in diffjax 0.2",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(self.target)
        if not any(old.startswith(spec.name + ".") for old in ALIASES):
            return module
        # An old package (diffjax.datasets) whose submodules moved too: a package-like stand-in
        # whose attributes are the new module's, so that its old submodules can be imported.
        stand_in = ModuleType(spec.name, module.__doc__)
        stand_in.__path__ = []
        stand_in.__getattr__ = lambda name: getattr(module, name)
        return stand_in

    def exec_module(self, module: ModuleType) -> None:
        pass  # the target module is already executed


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Resolves an old module path of ``ALIASES`` to the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ALIASES:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(ALIASES[fullname]))


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
