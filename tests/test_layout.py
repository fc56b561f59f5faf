"""The package layout's promises: old module paths of diffjax 0.1 still import (one release,
with a DeprecationWarning naming the new path), and ``import diffjax`` stays light."""

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_every_old_module_path_is_the_new_module_with_a_warning():
    res = _run(
        """
        import importlib, warnings
        from diffjax import _aliases
        for old, new in _aliases.ALIASES.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module = importlib.import_module(old)
            target = importlib.import_module(new)
            assert module is target or module.__name__ == old, (old, module)
            assert any(
                issubclass(w.category, DeprecationWarning) and new in str(w.message)
                for w in caught
            ), (old, [str(w.message) for w in caught])
        import diffjax.sampling, diffjax.core.sampling
        assert diffjax.sampling is diffjax.core.sampling
        from diffjax.datasets.digits import Digits
        from diffjax.data.digits import Digits as D2
        assert Digits is D2
        from diffjax.datasets import get_dataset_spec
        from diffjax.models.winograd import conv3x3_winograd
        import diffjax.training
        from diffjax.training.loop import train_and_evaluate
        assert diffjax.training.train_and_evaluate is train_and_evaluate
        print("ok", len(_aliases.ALIASES))
        """
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("ok")


def test_import_diffjax_imports_no_jax_and_names_load_run_lazily():
    res = _run(
        """
        import sys, diffjax
        assert "jax" not in sys.modules, "import diffjax imported jax"
        assert callable(diffjax.load_run) and "jax" in sys.modules
        print("ok")
        """
    )
    assert res.returncode == 0, res.stderr[-3000:]
