"""gpu_runtime: the command-buffer flag is added only where it can apply, and XLA accepts it."""

from __future__ import annotations

import os
import subprocess
import sys

import jaxlib.version
import pytest

from diffjax import gpu_runtime

FLAG = "--xla_gpu_enable_command_buffer=+CONVOLUTION"


@pytest.mark.parametrize("version", ["0.10.2", "0.11.2", "0.11.0rc1"])
def test_flag_for_the_jaxlib_versions_that_know_it(version):
    assert gpu_runtime.command_buffer_flag(version, "") == FLAG
    assert gpu_runtime.command_buffer_flag(version, "--xla_dump_to=/tmp/d") == FLAG


@pytest.mark.parametrize("version", ["0.9.2", "0.12.0", "1.0.0"])
def test_no_flag_for_other_jaxlib_versions(version):
    # Unknown to them: an unknown flag or command type in XLA_FLAGS aborts the process.
    assert gpu_runtime.command_buffer_flag(version, "") is None


def test_the_users_command_types_are_kept():
    mine = "--xla_gpu_enable_command_buffer=FUSION"
    assert gpu_runtime.command_buffer_flag("0.11.2", mine) is None
    assert gpu_runtime.command_buffer_flag("0.11.2", f"--xla_dump_to=/d {mine}") is None


def test_configure_appends_once_and_only_where_cuda_is(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d")
    monkeypatch.delenv(gpu_runtime.ENV, raising=False)
    monkeypatch.setattr(gpu_runtime, "cuda_installed", lambda: False)
    assert gpu_runtime.configure() == []
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/d"

    monkeypatch.setattr(gpu_runtime, "cuda_installed", lambda: True)
    assert gpu_runtime.configure() == [FLAG]
    assert os.environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/d {FLAG}"
    assert gpu_runtime.configure() == []  # already there: not added twice
    assert os.environ["XLA_FLAGS"].count("command_buffer") == 1

    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(gpu_runtime.ENV, "0")
    assert gpu_runtime.configure() == [] and os.environ["XLA_FLAGS"] == ""


def test_cuda_installed_reads_the_package_metadata(tmp_path, monkeypatch):
    # No CUDA backend here (CI has none); a distribution's metadata on the path is enough.
    if gpu_runtime.cuda_installed():
        pytest.skip("a JAX CUDA backend is installed")
    info = tmp_path / "jax_cuda12_pjrt-0.11.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: jax-cuda12-pjrt\nVersion: 0.11.2\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert gpu_runtime.cuda_installed()


def _runs_with(xla_flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=xla_flags)
    code = "import jax.numpy as jnp; print(float(jnp.arange(4.0).sum()))"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(
    not jaxlib.version.__version__.startswith(gpu_runtime.COMMAND_BUFFER_JAXLIB_VERSIONS),
    reason="the flag is not added for this jaxlib",
)
def test_the_installed_xla_accepts_the_flag():
    # The premise first: a command type XLA does not know aborts the process.
    assert _runs_with("--xla_gpu_enable_command_buffer=+NO_SUCH_TYPE").returncode != 0
    ok = _runs_with(FLAG)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.split()[-1] == "6.0"
