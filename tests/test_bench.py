"""The benchmarks in bench/ run end to end (tiny sizes): they are not timed tests, but a script
that no longer runs against the library is a broken measurement. Each runs as a subprocess,
as a user would start it, and must print its result line."""

import importlib
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(script, *args, timeout=600):
    # A fresh process: the benchmarks set up XLA:CPU themselves, with the real device count.
    # Their programs are compiled without most optimizations: here they only have to run.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip


CASES = {
    "vs_torch": (
        ["vs_torch.py", "--workload=digits", "--batch=4", "--runs=1", "--warmup=1"],
        r"jax float32 +step: median [\d.]+ s, .* speedup vs torch [\d.]+x",
    ),
    "unet_train_step": (
        ["unet_train_step.py", "--workloads=digits", "--batches=4", "--dtypes=float32", "--runs=1"],
        r"digits +4 float32 +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +\d+ +\d+",
    ),
    "sampling": (
        "sampling.py --workload=digits --batch=2 --ddpm-steps=10 --ddim-steps=5 "
        "--dpm-steps=3".split(),
        r"ddim: 5 steps, median [\d.]+ s .* images/s\), .* scan overhead [+-]?[\d.]+% of a "
        r"forward(.|\n)*dpm\+\+3: 3 steps, median [\d.]+ s(.|\n)*"
        r"DDPM-10 / DDIM-5 wall ratio [\d.]+x",
    ),
    "sampler_quality": (
        "sampler_quality.py --workdir={run} --num=4 --seeds=0 --rows=ddim:2,dpm++:2".split(),
        r"\| dpm\+\+ \| 2 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|",
    ),
    "products": (
        ["products.py", "--shapes=2x16x8x16", "--runs=1"],
        r"(\| 2x16x8x16 \| (nn|nt|tn) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| (YNNPACK|XLA) \|\n){3}",
    ),
    "recipe": (
        "recipe.py --config=digits --batch=4 --steps=2 --runs=1 --warmup=1 --samples=2 "
        "--sample-steps=10 --dtypes=float32 --profile={tmp} --profile-steps=2".split(),
        r"train digits float32: batch 4, [\d.]+ ms/step, \d+ img/s, [\d.e+-]+ TFLOP/s.*"
        r"host dispatch [\d.]+ ms/step\n"
        r"host time per step: [\d.]+ ms in \d+ events\n(.|\n)*top 25 ops(.|\n)*"
        r"sample digits bfloat16: 2 samples x 10 steps in [\d.]+ s .* scan overhead [+-][\d.]+%",
    ),
    "conv_dtypes": (
        ["conv_dtypes.py", "--shapes=2x8x8x4x4", "--runs=1"],
        r"\[2, 8, 8, 4\] -> 4, bf16 operands, bf16 result: [\d.]+ ms, [\d.e+-]+ TFLOP/s\n +[\d.]+ "
        r"+1\.0 +\S",
    ),
    "conv_layers": (
        ["conv_layers.py", "--workload=digits", "--batch=2", "--runs=1"],
        r"all convolutions of one train step \(forward \+ backward\): diffjax [\d.]+ s, "
        r"torch [\d.]+ s, torch/diffjax [\d.]+x",
    ),
    "tuning_ab": (
        # F(4x4) at batch 2 on 8x8 maps only with its row minimum lowered: the digits U-Net's
        # 32-channel 8x8 convolutions (forward) leave XLA.
        "tuning_ab.py --workload=digits --batch=2 --runs=1 --forward "
        "--variant=winograd4_min_rows=8 --variant=".split(),
        r"digits b2 float32 forward, 1 alternating rounds\n"
        r"  compiled winograd4_min_rows=8 in [\d.]+ s: 13 XLA convolutions \(the rest Winograd\)\n"
        r"  compiled \(as committed\) in [\d.]+ s: 20 XLA convolutions(.|\n)*"
        r" +[\d.]+ s +1\.000x the first +winograd4_min_rows=8 +runs (.|\n)*"
        r" +[\d.]+ s +[\d.]+x the first +\(as committed\)",
    ),
}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """An inference-only run of a tiny random digits U-Net (T = 20), for sampler_quality.py."""
    import jax
    from _train_helpers import tiny_config

    from diffjax.models import create_model, init_params
    from diffjax.training import checkpointing

    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(**{"data.data_dir": str(tmp_path_factory.mktemp("tfds"))})
    params = init_params(create_model(config), jax.random.key(0), 8, 1)
    checkpointing.save_inference_run(str(workdir), config, params, params, 3)
    return workdir


@pytest.mark.slow  # subprocesses that compile a U-Net and build its torch twin
@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_reports(name, tmp_path, request):
    args, pattern = CASES[name]
    run = request.getfixturevalue("digits_run") if name == "sampler_quality" else ""
    res = _bench(*(a.replace("{tmp}", str(tmp_path)).replace("{run}", str(run)) for a in args))
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(pattern, res.stdout), res.stdout[-3000:]


def test_products_forms_store_the_same_product(monkeypatch):
    # Each form must time B [M, K] x [K, N] products, whatever the layout it stores: checked
    # against float64 products of the same operands (float32 sums of 8 terms: < 1e-5).
    monkeypatch.setenv("DIFFJAX_REUSE_FREED_MEMORY", "0")
    products = _bench_module("products")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 5, 8)), rng.standard_normal((3, 8, 7))
    expected = np.matmul(a, b)
    for form in products.FORMS:
        stored = products.stored(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), form)
        got = np.asarray(products.product(*stored, form=form))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=form)
    assert products.parse_shape("64x256x64x256") == (64, 256, 64, 256)
    with pytest.raises(ValueError, match="'64x256x64': expected BxMxKxN"):
        products.parse_shape("64x256x64")


def test_tuning_ab_names_a_bad_field_and_the_allowed_ones():
    res = _bench("tuning_ab.py", "--variant=winograd_channels=8", timeout=120)
    assert res.returncode != 0
    assert "--variant field 'winograd_channels'; allowed: " in res.stderr
    assert "winograd_min_channels" in res.stderr and "Traceback" not in res.stderr
    res = _bench("tuning_ab.py", "--variant=winograd_min_channels=abc", timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "'winograd_min_channels=abc': the value must be a Python literal" in res.stderr


def test_tuning_ab_variant_splits_table_fields_from_xla_options(monkeypatch):
    # bench/common.py would otherwise set this test process's malloc to keep freed memory.
    monkeypatch.setenv("DIFFJAX_REUSE_FREED_MEMORY", "0")
    tuning_ab = _bench_module("tuning_ab")
    fields, options = tuning_ab.parse_variant(
        "winograd_min_channels=64; xla:xla_cpu_experimental_ynn_fusion_type=;"
        "xla:xla_cpu_max_isa=AVX2"
    )
    assert fields == {"winograd_min_channels": 64}
    assert options == {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_max_isa": "AVX2"}
    assert tuning_ab.parse_variant("") == ({}, {})


@pytest.mark.slow  # one subprocess that traces the digits U-Net
def test_tuning_ab_names_an_xla_option_that_xla_rejects():
    # The option reaches XLA's compile (which knows no such option) and comes back as one line.
    res = _bench(
        "tuning_ab.py",
        *"--workload=digits --batch=2 --runs=1 --forward".split(),
        "--variant=xla:xla_no_such_option=1",
        timeout=300,
    )
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "--variant 'xla:xla_no_such_option=1' did not compile: " in res.stderr
    assert "xla_no_such_option" in res.stderr.rsplit("did not compile", 1)[1]


def _bench_module(name):
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


def _trace_summary():
    return _bench_module("trace_summary")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 20)), max_size=12))
def test_trace_busy_time_is_the_union_of_the_kernels_intervals(spans):
    # Against a unit-step timeline: covered instants of [start, start + duration).
    evs = [("op", "kernel", start, dur) for start, dur in spans]
    covered = set()
    for start, dur in spans:
        covered.update(range(start, start + dur))
    assert _trace_summary().busy_ns(evs) == len(covered)


def test_trace_categories_read_the_op_then_the_kernel():
    cat = _trace_summary().category
    assert cat("cudnn-conv-bw-filter.3", "sm90_xmma_wgrad_x") == "convolution, kernel gradient"
    assert cat("command_buffer_2", "input_reduce_fusion_1") == "reduction fusion"
    assert cat("all-reduce.1", "nccl") == "collective"
    assert cat("custom-call.4", "memcpy32_post") == "copy / memset"
    assert cat("mystery", "mystery") == "other"


def test_digits_recipes_plan_table_and_cost_keys(tmp_path, monkeypatch):
    # The recipe search's own logic, without training: what shares a step time, how the steps
    # fill a budget, and the table of the ends of the curves (mean and range over seeds).
    import json

    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import digits_recipes as dr

    assert dr.cost_key(dr.RECIPES["cosine"]) == dr.cost_key({}) == "{}"
    assert dr.cost_key(dr.RECIPES["ch64-g16"]) == '{"model.ch": 64}'
    assert dr.cost_key(dr.RECIPES["groups4"]) == "{}"
    assert dr.cost_key(dr.RECIPES["batch128"]) != dr.cost_key(dr.RECIPES["batch32"])
    config = dr.digits_config({"model.ch": 48, "optimizer.decay": "cosine"})
    assert config.model.ch == 48 and config.optimizer.decay == "cosine"
    for seed, (fd, bpd) in enumerate(((10.0, 4.5), (12.0, 4.7))):
        eval_dir = tmp_path / "cosine" / f"seed{seed}" / "eval"
        eval_dir.mkdir(parents=True)
        for step, extra in ((1000, {}), (2000, {"bpd": {"total_bpd": bpd},
                                                "digits_fd": {"digits_fd": fd}})):  # fmt: skip
            record = {"step": step, "metrics": {"eval_loss": {"ema_loss": 0.08}, **extra}}
            (eval_dir / f"step_{step}.json").write_text(json.dumps(record))
    plan = {"cosine": {"steps": 2000, "step_s": 0.1}}
    table = dr.summarize(str(tmp_path), ["cosine"], [0, 1], plan)
    row = table.splitlines()[-1]
    assert "| cosine | optimizer.decay=cosine | 2000 | 0.1000 |" in row, row
    assert "11.00 (10.00-12.00)" in row and "4.600 (4.500-4.700)" in row, row
    out = _bench("digits_recipes.py", "--out", str(tmp_path), "--recipes", "nope", timeout=120)
    assert out.returncode != 0 and "--recipes nope unknown; allowed: default," in out.stderr


_HELD_PROGRAM = r"""
import common, ynn_isa
import jax, jax.numpy as jnp, numpy as np
held = ynn_isa.current_flags()  # held before any kernel choice
x = np.random.default_rng(0).standard_normal((2, 16, 16, 8), dtype=np.float32)  # [B, H, W, C]
w = np.random.default_rng(1).standard_normal((3, 3, 8, 16), dtype=np.float32)  # [KH, KW, I, O]
conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
y = np.asarray(jax.jit(conv)(x, w))
ref = np.asarray(conv(x.astype(np.float64), w.astype(np.float64)))
a = x.reshape(-1, 8)
err = max(np.abs(y - ref).max(), np.abs(np.asarray(jax.jit(jnp.dot)(a, a.T)) - a @ a.T).max())
try:
    ynn_isa.hold("AVX2")
    again = "held twice"
except ynn_isa.HoldError as e:
    again = str(e)
print(f"before={held} after={ynn_isa.current_flags()} err={err:.2e} again={again}")
"""


def _read(path):
    return open(path).read() if os.path.exists(path) else ""


def _held_run(isa):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["DIFFJAX_BENCH_YNN_ISA"] = isa
    env["JAX_ENABLE_X64"] = "true"  # the float64 reference
    return subprocess.run(
        [sys.executable, "-c", _HELD_PROGRAM], capture_output=True, text=True, timeout=300,
        env=env, cwd=os.path.join(ROOT, "bench"),
    )  # fmt: skip


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_ynn_hold_sets_ynnpack_to_avx2_before_its_first_kernel_choice_and_keeps_it():
    from diffjax.kernels import cpu_runtime

    res = _held_run("AVX2")
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"before=(\d+) after=(\d+) err=(\S+) again=(.*)", res.stdout)
    assert m, res.stdout
    # The bits of sse2, ssse3, sse4_1, avx, f16c, avx2 and fma (ynnpack/base/arch.h), those this
    # CPU has; YNNPACK's first kernel choices must not have overwritten them from CPUID.
    bits = {"sse2": 0, "ssse3": 1, "sse4_1": 2, "avx": 3, "f16c": 4, "avx2": 5, "fma": 6}
    want = sum(1 << b for f, b in bits.items() if f in cpu_runtime.cpu_flags())
    assert int(m[1]) == int(m[2]) == want
    # The AVX2 kernels compute the same convolution and product: float32 sums of 72 and 8
    # products of N(0, 1) values, well within 1e-3 of float64.
    assert float(m[3]) < 1e-3
    assert m[4].startswith("YNNPACK already chose kernels in this process (arch flags ")

    res = _held_run("SSE9")  # a level it does not know: one line, no traceback
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert (
        "error: DIFFJAX_BENCH_YNN_ISA='SSE9' is not a level YNNPACK can be held to; "
        "allowed: AVX2" in res.stderr
    )


@pytest.mark.skipif("avx512f" not in _read("/proc/cpuinfo"), reason="needs a CPU with AVX-512")
def test_unheld_ynnpack_takes_this_cpus_avx512_features():
    # So the held run above has something to change: unheld, the same program sees AVX-512.
    res = _held_run("")
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"before=None after=(\d+) ", res.stdout)
    assert m and int(m[1]) & ~0x7F, res.stdout


def test_ynn_function_names_reads_the_local_symbols_of_jaxlib():
    ynn_isa = _bench_module("ynn_isa")
    names = ynn_isa.function_names(ynn_isa.library_path(), b"_ZN3ynn")
    assert b"_ZN3ynn24get_supported_arch_flagsEv" in names  # a local (non-dynamic) symbol
    assert all(n.startswith(b"_ZN3ynn") for n in names)
    # Kernels of both levels are there to choose from: AVX-512 and AVX2 + FMA.
    assert any(b"_avx512" in n for n in names)
    assert any(b"fma3" in n for n in names)


def test_ynn_kernels_names_a_missing_gdb_in_one_line(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "ynn_kernels.py")],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "gdb is not on PATH (Debian: gdb)" in res.stderr


def test_ynn_hold_names_what_is_missing_in_one_line(tmp_path, monkeypatch):
    ynn_isa = _bench_module("ynn_isa")
    assert ynn_isa.unavailable() is None  # this jaxlib: the two variables are in .symtab
    # A library without them: a copy of the python executable (an ELF64 with no YNNPACK).
    fake = tmp_path / "libjax_common.so"
    fake.write_bytes(open(sys.executable, "rb").read())
    monkeypatch.setattr(ynn_isa, "library_path", lambda: str(fake))
    why = ynn_isa.unavailable()
    assert why and "has no ynn::get_supported_arch_flags() variables in its symbol table" in why
    with pytest.raises(ynn_isa.HoldError, match="YNNPACK cannot be held here"):
        ynn_isa.hold("AVX2")
