"""cpu_runtime: malloc reuse removes the per-call page faults; fusion flags change no number."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny_unet import randomized

from diffjax.kernels import cpu_runtime
from diffjax.models import init_params
from diffjax.models.unet import UNet

# A program with ~512 MB of temporaries per call (YNNPACK materialises the [8192, 8192] product
# inside its fusion); prints the minor page faults per call after a warm-up call.
_FAULTS_PER_CALL = textwrap.dedent(
    """
    import resource, sys
    from diffjax.kernels import cpu_runtime
    if sys.argv[1] == "reuse":
        assert cpu_runtime.reuse_freed_memory()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.exp(-jnp.abs(jnp.sin(x) @ jnp.cos(x).T)).sum(0))
    x = jnp.ones((8192, 8))
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        f(x).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
    """
)


def _faults_per_call(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_CALL, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_reusing_freed_memory_removes_the_page_faults_of_every_call():
    # Without reuse each call faults its temporaries in again: 512 MB / 4 KiB = 131,072 pages
    # (measured 131,119); with reuse the heap is kept and a call faults (almost) nothing in.
    # Thresholds sit an order of magnitude from both.
    assert _faults_per_call("default") > 30_000
    assert _faults_per_call("reuse") < 3_000


def test_fusion_types_by_dtype_and_jaxlib_version():
    assert cpu_runtime.ynn_fusion_types("float32", "0.10.2") == (
        "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    )
    assert cpu_runtime.ynn_fusion_types("bfloat16", "0.10.2") is None  # XLA's default
    # A jaxlib the flag was not measured on (it may not know it: XLA aborts on unknown flags).
    assert cpu_runtime.ynn_fusion_types("float32", "0.11.0") is None
    with pytest.raises(ValueError, match=r"'float16' is not one of \['bfloat16', 'float32'\]"):
        cpu_runtime.ynn_fusion_types("float16", "0.10.2")


def test_configure_appends_the_flag_once_and_nothing_for_plain_kernels(monkeypatch):
    # reuse_memory=False: leave this process's malloc alone.
    configure = functools.partial(cpu_runtime.configure, reuse_memory=False)
    monkeypatch.setattr("jaxlib.version.__version__", "0.10.2")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    applied = configure("float32")
    assert applied == [
        f"{cpu_runtime.YNN_FLAG}={cpu_runtime.ynn_fusion_types('float32', '0.10.2')}"
    ]
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 " + applied[0]
    assert configure("float32") == []  # already there: not added twice
    # A user's own value of the flag wins.
    monkeypatch.setenv("XLA_FLAGS", f"{cpu_runtime.YNN_FLAG}=LIBRARY_FUSION_TYPE_REDUCE")
    assert configure("float32") == []
    assert os.environ["XLA_FLAGS"] == f"{cpu_runtime.YNN_FLAG}=LIBRARY_FUSION_TYPE_REDUCE"
    monkeypatch.setenv("XLA_FLAGS", "")
    # bfloat16: XLA's default is the faster one where the CPU computes in bfloat16; elsewhere
    # the network computes in float32 (effective_dtype), with float32's fusions.
    float32_flag = f"{cpu_runtime.YNN_FLAG}={cpu_runtime.ynn_fusion_types('float32', '0.10.2')}"
    assert configure("bfloat16") == ([] if cpu_runtime.native_bfloat16() else [float32_flag])
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    assert configure("bfloat16") == [float32_flag]
    monkeypatch.setenv("XLA_FLAGS", "")
    assert configure("float16") == []  # config validation reports bad dtypes
    # The plain kernels change no setting at all (malloc included).
    assert cpu_runtime.configure("float32", "plain") == [] and os.environ["XLA_FLAGS"] == ""
    assert cpu_runtime.compiler_options("float32", "plain") == {}
    assert cpu_runtime.compiler_options("float32", "onednn") == cpu_runtime.compiler_options(
        "float32"
    )


def test_float32_fusion_types_change_no_loss_or_gradient(monkeypatch):
    """The fusion types reorder float32 sums only: loss and gradients of a U-Net train loss
    agree with XLA's default compilation to float32 rounding."""
    monkeypatch.setattr("jaxlib.version.__version__", "0.10.2")
    options = cpu_runtime.compiler_options("float32")
    assert options
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=8)
    kx, kn, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (8, 8, 8, 3))  # [B, H, W, C]
    t = jnp.arange(8) * 100
    noise = jax.random.normal(kn, x.shape)
    # Random leaves everywhere: the zero-initialised output convolutions would make the output
    # 0 and every gradient but theirs vanish, hiding what the fusions compute.
    params = randomized(init_params(model, kp, 8, 3))

    def loss(p):
        return jnp.mean(jnp.square(model.apply({"params": p}, x, t, train=False) - noise))

    grad = jax.value_and_grad(loss)
    (l0, g0), (l1, g1) = jax.jit(grad)(params), jax.jit(grad, compiler_options=options)(params)
    # Summation order differs (fused vs separate reductions): ~1e-7 relative per sum, a few
    # hundred sums deep; 1e-5 is far below any real change (a dropped term moves it by O(1)).
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert float(jnp.linalg.norm(a - b)) <= 1e-5 * float(jnp.linalg.norm(b)) + 1e-9


_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse4_1 avx avx2 fma
"""


@pytest.mark.parametrize(
    "extra, name",
    [
        ("", "AVX2"),
        (" avx512f avx512bw avx512vl avx512dq", "AVX-512"),
        (" avx512f avx512bw avx512vl avx512dq avx512_bf16", "AVX-512 BF16"),
        (" avx512f avx512bw avx512vl avx512dq avx512_bf16 amx_tile amx_bf16", "AMX"),
        (" avx512f", "AVX2"),  # AVX-512 foundation alone is not oneDNN's avx512_core
    ],
)
def test_isa_names_the_best_level_the_flags_give(extra, name):
    flags = cpu_runtime.cpu_flags(_CPUINFO.replace("fma\n", "fma" + extra + "\n"))
    assert cpu_runtime.isa(flags) == name


_AVX512 = " avx512f avx512bw avx512vl avx512dq"


@pytest.mark.parametrize(
    "extra, xla_flags, native",
    [
        ("", "", False),  # AVX2 (Zen 3, Haswell-Skylake clients)
        (_AVX512, "", False),  # AVX-512 without BF16 (Skylake-SP, Ice Lake)
        (_AVX512 + " avx512_bf16", "", True),  # Zen 4, Cooper Lake
        (_AVX512 + " avx512_bf16 amx_tile amx_bf16", "", True),  # Sapphire Rapids
        (_AVX512 + " avx512_bf16", "--xla_cpu_max_isa=AVX2", False),  # XLA held to AVX2
        (_AVX512 + " avx512_bf16", "--xla_cpu_max_isa=avx512", False),
        (_AVX512 + " avx512_bf16", "--xla_cpu_max_isa=AVX2 --xla_cpu_max_isa=AVX512_BF16", True),
    ],
)
def test_bfloat16_computes_in_float32_where_the_cpu_has_no_bfloat16(extra, xla_flags, native):
    flags = cpu_runtime.cpu_flags(_CPUINFO.replace("fma\n", "fma" + extra + "\n"))
    assert cpu_runtime.native_bfloat16(flags, xla_flags) is native
    want = "bfloat16" if native else "float32"
    assert cpu_runtime.effective_dtype("bfloat16", "cpu", flags, xla_flags) == want
    # float32 stays float32, and accelerators compute in what was asked.
    assert cpu_runtime.effective_dtype("float32", "cpu", flags, xla_flags) == "float32"
    for platform_ in ("gpu", "tpu"):
        assert cpu_runtime.effective_dtype("bfloat16", platform_, flags, xla_flags) == "bfloat16"


_BF16_CONFIG = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from diffjax.config.validation import load_config_file
    from diffjax.models import create_model, init_params
    config = load_config_file("configs/digits.py")
    config.model.dtype = "bfloat16"
    for _ in range(2):
        model = create_model(config)  # the notice comes once
    params = init_params(model, jax.random.key(0), 8, 1)
    out = model.apply({"params": params}, jnp.zeros((64, 8, 8, 1)), jnp.zeros((64,), jnp.int32),
                      train=False)
    print(jnp.dtype(model.dtype).name, out.dtype)
    """
)


def test_bfloat16_config_on_a_cpu_without_bfloat16_builds_float32_with_one_notice():
    # The AVX2 limit stands for an AVX2-only CPU to the gate, which reads XLA_FLAGS
    # (bench/README.md, "How faithful holding to AVX2 is").
    # Compiled without most optimizations (like the test process): only the dtype is checked.
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_max_isa=AVX2", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _BF16_CONFIG], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["float32", "float32"], out.stdout
    notices = [line for line in out.stderr.splitlines() if "computes in float32" in line]
    assert len(notices) == 1 and "--xla_cpu_max_isa=AVX2" in notices[0], out.stderr[-2000:]


def test_isa_without_flags_is_the_machine():
    assert cpu_runtime.cpu_flags("processor\t: 0\n") == frozenset()
    assert cpu_runtime.isa(frozenset()) == platform.machine()


def test_describe_cpu_names_model_cores_and_isa():
    line = cpu_runtime.describe_cpu()
    assert f"{os.cpu_count()} cores" in line and line.endswith(cpu_runtime.isa())


@pytest.mark.parametrize(
    "value, default, want",
    [(None, True, True), (None, False, False), ("1", False, True), ("ON", False, True),
     ("0", True, False), ("off", True, False), ("maybe", False, False), ("maybe", True, True)],
)  # fmt: skip
def test_env_enabled(monkeypatch, value, default, want):
    if value is None:
        monkeypatch.delenv("DIFFJAX_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("DIFFJAX_TEST_SWITCH", value)
    assert cpu_runtime.env_enabled("DIFFJAX_TEST_SWITCH", default) == want


def test_compilation_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv(cpu_runtime.CACHE_ENV, "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cpu_runtime.compilation_cache_dir() == str(tmp_path / "diffjax" / "jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert cpu_runtime.compilation_cache_dir() == str(tmp_path / "mine")
    monkeypatch.setenv(cpu_runtime.CACHE_ENV, "0")
    assert cpu_runtime.compilation_cache_dir() is None


def test_entry_point_cache_stores_a_default_path_program(tmp_path):
    # The default path's programs (no oneDNN calls) are stored; a second process reads them.
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp
        from diffjax.kernels import cpu_runtime
        from diffjax.models.unet import UNet
        print(cpu_runtime.enable_compilation_cache())
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        net = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), out_channels=1,
                   num_groups=8)
        x, t = jnp.ones((2, 8, 8, 1)), jnp.zeros((2,), jnp.int32)
        p = jax.jit(lambda: net.init(jax.random.key(0), x, t, train=False))()
        jax.jit(lambda p: net.apply(p, x, t, train=False))(p).block_until_ready()
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update({cpu_runtime.CACHE_ENV: "1", "XDG_CACHE_HOME": str(tmp_path)})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "diffjax" / "jax"
    assert out.stdout.strip() == str(folder)
    assert len(list(folder.iterdir())) >= 2, "the init and apply programs were not stored"
    assert "Error writing persistent compilation cache" not in out.stderr
