"""Process-wide XLA:CPU settings for speed: malloc reuse and YNNPACK fusion types.

Both must be in place before the process's first JAX computation (XLA reads its flags and
creates its worker threads with the CPU backend), so they are applied by the entry points:
``diffjax train`` (``train.py``), ``diffjax sample``, ``diffjax evaluate`` and ``bench/``. In
your own program call ``configure(compute_dtype, kernels)`` first thing (``model.dtype`` and
``model.kernels`` of the config); with ``kernels="plain"`` it applies nothing. Neither changes
a number that is computed, only how fast (the tests compare gradients and losses with and
without).

1. **malloc keeps freed memory** (``reuse_freed_memory``). Every call of a compiled XLA:CPU
   executable allocates one buffer for all its temporaries (over a gigabyte for a 32x32 model's
   train step) and YNNPACK allocates scratch, on XLA's worker threads, all freed when the call
   ends. glibc serves such a request with a fresh ``mmap`` (always, from a worker thread's
   arena) and unmaps it on free, so the next call faults every page in again and the kernel
   zeroes each one, hundreds of thousands of pages per step. With one arena, no mmap and no
   trimming, the heap is reused from call to call. The price: the process keeps its peak heap
   until it exits. The same for any program, set before
   it starts:
   ``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615``.
2. **YNNPACK fusion types** (``ynn_fusion_types``; per program: ``compiler_options``). jaxlib
   0.10 hands 3x3 convolutions, matrix products and reductions to YNNPACK one by one
   (``--xla_cpu_experimental_ynn_fusion_type`` = INDIVIDUAL_CONVOLUTION, INDIVIDUAL_DOT,
   REDUCE). For float32 compute, YNNPACK fusions of products and convolutions with their
   elementwise neighbours (DOT) and of reductions (REDUCE) are faster, while XLA's own loops
   stay faster for elementwise chains (YNNPACK's ELTWISE fusions run the slicing and stacking
   of the Winograd transforms, ``diffjax.kernels.winograd``, 3-4x slower); for bfloat16 compute
   the default is (its 8x8 and 4x4 convolutions are nine bfloat16 products, which the DOT
   fusion slows down). The flag is only added for the jaxlib versions it was measured on, and
   never over one already in ``XLA_FLAGS``.

Measured gains are in ``bench/README.md`` ("CPU runtime settings").

3. **persistent compilation cache** (``enable_compilation_cache``, any backend): the entry points
   keep compiled programs in ``$JAX_COMPILATION_CACHE_DIR``, else
   ``$XDG_CACHE_HOME/diffjax/jax`` (``~/.cache/diffjax/jax``), so that a second ``diffjax
   sample`` of the same run skips its compiles (README, "Costs").
   ``DIFFJAX_COMPILATION_CACHE=0`` turns it off. Programs with oneDNN calls (the opt-in of
   ``diffjax.kernels.onednn``) cannot be stored: XLA:CPU fails to serialize them.

``isa()`` names the instruction set of this CPU (AVX2, AVX-512, AVX-512 BF16, AMX) for the
benchmarks' reports and for the oneDNN gate (``diffjax.kernels.onednn``).

4. **bfloat16 only where the CPU computes in it** (``effective_dtype``): a CPU without bfloat16
   arithmetic (no AVX-512 BF16 or AMX, or XLA held below them by ``--xla_cpu_max_isa``) converts
   every bfloat16 operand to float32 and back, so bfloat16 compute is no faster there and
   sometimes slower (bench/README.md, "bfloat16 on CPUs without it").
   ``diffjax.models.create_model`` then builds the float32 network and says so in one line; the
   parameters are float32 either way, so checkpoints are the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

CACHE_ENV = "DIFFJAX_COMPILATION_CACHE"
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"

# Compute dtype -> YNNPACK fusion types (None: XLA's default). Measured on jaxlib 0.10.2.
YNN_FUSION_TYPES = {
    "float32": ("DOT", "REDUCE"),
    "bfloat16": None,
}
# jaxlib versions (prefixes) that know the flag; an unknown flag in XLA_FLAGS aborts the process.
YNN_FLAG_JAXLIB_VERSIONS = ("0.10.",)

# mallopt(3) parameters, from glibc's <malloc.h>, applied in this order. Why each one:
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_MALLOC_SETTINGS = (
    # One arena for all threads: only the main arena grows without mmap (a thread arena serves
    # any request above its 64 MiB heap size with mmap, whatever M_MMAP_MAX says).
    (_M_ARENA_MAX, 1),
    # No mmap for large requests: they come from the heap and go back to it when freed.
    (_M_MMAP_MAX, 0),
    # Never give the top of the heap back to the kernel (it would be faulted in again). -1
    # disables trimming; the largest int (2 GiB) would not: CIFAR-10's bfloat16 step frees
    # 2.6 GB at once.
    (_M_TRIM_THRESHOLD, -1),
)


def env_enabled(name: str, default: bool = True) -> bool:
    """Whether the environment variable ``name`` is on: 1/true/yes/on turn it on, 0/false/no/off
    (any case) off; unset or anything else gives ``default``."""
    value = os.environ.get(name, "").strip().lower()
    return {"1": True, "true": True, "yes": True, "on": True}.get(
        value, {"0": False, "false": False, "no": False, "off": False}.get(value, default)
    )


# --- the CPU's instruction sets ---------------------------------------------------------------

# Names of x86 instruction-set levels, best first, with the /proc/cpuinfo flags each needs.
# AVX-512 here is oneDNN's avx512_core (F, BW, VL, DQ), which every AVX-512 CPU since Skylake-SP
# has.
AVX512_CORE_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
ISA_FLAGS = (
    ("AMX", (*AVX512_CORE_FLAGS, "avx512_bf16", "amx_tile", "amx_bf16")),
    ("AVX-512 BF16", (*AVX512_CORE_FLAGS, "avx512_bf16")),
    ("AVX-512", AVX512_CORE_FLAGS),
    ("AVX2", ("avx2", "fma")),
)


@functools.cache
def _proc_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (default: /proc/cpuinfo); empty where
    there is no such file (macOS, Windows) or no flags line (non-x86)."""
    cpuinfo = _proc_cpuinfo() if cpuinfo is None else cpuinfo
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def isa(flags: frozenset[str] | None = None) -> str:
    """The best instruction-set level of ``flags`` (default: this CPU's) in ``ISA_FLAGS``:
    "AMX", "AVX-512 BF16", "AVX-512", "AVX2", or the machine's name (``platform.machine()``)
    when none applies (older x86, ARM)."""
    flags = cpu_flags() if flags is None else flags
    return next((name for name, need in ISA_FLAGS if flags.issuperset(need)), platform.machine())


def cpu_model() -> str:
    """The CPU's model name and x86 family/model numbers from /proc/cpuinfo (virtual machines
    often report only "AMD EPYC"; family 25 model 1 is a Zen 3, model 17 a Zen 4), else
    ``platform.processor()`` or ``platform.machine()``."""
    fields: dict[str, str] = {}
    for line in _proc_cpuinfo().splitlines():
        if not line.strip():
            break  # the first CPU only
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def describe_cpu() -> str:
    """One line for reports: model, core count and ISA, e.g. "AMD EPYC, 2 cores, AVX-512 BF16"."""
    return f"{cpu_model()}, {os.cpu_count()} cores, {isa()}"


# XLA's --xla_cpu_max_isa values (XLA's CPU feature names) that include bfloat16 arithmetic.
XLA_BF16_ISAS = ("AVX512_BF16", "AMX", "AMX_BF16", "AMX_FP16")
_XLA_ISA_FLAG = "--xla_cpu_max_isa="


def xla_isa_limit(xla_flags: str | None = None) -> str | None:
    """The value of ``--xla_cpu_max_isa`` in ``xla_flags`` (default ``$XLA_FLAGS``), else None."""
    xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    values = [f[len(_XLA_ISA_FLAG) :] for f in xla_flags.split() if f.startswith(_XLA_ISA_FLAG)]
    return values[-1].upper() if values else None  # the last one wins, as in XLA's parser


def native_bfloat16(flags: frozenset[str] | None = None, xla_flags: str | None = None) -> bool:
    """Whether XLA:CPU computes bfloat16 in bfloat16 instructions here: the CPU has AVX-512 BF16
    or AMX (``flags``, default this CPU's) and ``--xla_cpu_max_isa`` does not hold XLA below."""
    limit = xla_isa_limit(xla_flags)
    return isa(flags) in ("AVX-512 BF16", "AMX") and (limit is None or limit in XLA_BF16_ISAS)


def effective_dtype(
    requested: str, platform: str, flags: frozenset[str] | None = None, xla_flags: str | None = None
) -> str:
    """The dtype a network asked to compute in ``requested`` computes in on ``platform``:
    float32 for bfloat16 on a CPU without bfloat16 arithmetic (``native_bfloat16``), else
    ``requested``."""
    if requested == "bfloat16" and platform == "cpu" and not native_bfloat16(flags, xla_flags):
        return "float32"
    return requested


def bfloat16_fallback_notice() -> str:
    """The line the entry points print when ``effective_dtype`` chose float32 for bfloat16."""
    limit = xla_isa_limit()
    why = f"--xla_cpu_max_isa={limit}" if limit else f"this CPU ({isa()})"
    return (
        f"notice: model.dtype='bfloat16' computes in float32 here: {why} has no bfloat16 "
        "arithmetic (AVX-512 BF16 or AMX), so bfloat16 would be no faster; parameters and "
        "checkpoints are float32 either way"
    )


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; True if applied (glibc only).

    A thread that has already allocated keeps its own arena, so call it before JAX's CPU
    backend starts. On other C libraries (macOS, musl) it does nothing and returns False.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return all(mallopt(param, value) == 1 for param, value in _MALLOC_SETTINGS)


def ynn_fusion_types(compute_dtype: str, jaxlib_version: str) -> str | None:
    """The value of XLA's YNNPACK fusion-type option for ``compute_dtype`` (None: keep XLA's).

    :raises ValueError: an unknown compute dtype (the message lists the known ones).
    """
    if compute_dtype not in YNN_FUSION_TYPES:
        raise ValueError(
            f"compute dtype {compute_dtype!r} is not one of {sorted(YNN_FUSION_TYPES)}"
        )
    types = YNN_FUSION_TYPES[compute_dtype]
    if types is None or not jaxlib_version.startswith(YNN_FLAG_JAXLIB_VERSIONS):
        return None
    return ",".join(f"LIBRARY_FUSION_TYPE_{t}" for t in types)


def _installed_fusion_types(compute_dtype: str) -> str | None:
    """``ynn_fusion_types`` for the installed jaxlib."""
    import jaxlib.version  # the version only: importing jaxlib starts no backend

    return ynn_fusion_types(compute_dtype, jaxlib.version.__version__)


def compiler_options(compute_dtype: str, kernels: str = "tuned") -> dict[str, str]:
    """The fusion types as per-program options, ``jax.jit(f, compiler_options=...)``.

    For a process that compiles programs of both dtypes (``configure``'s flag is process-wide);
    empty when XLA's default is the faster one or ``kernels`` is "plain".
    """
    value = None if kernels == "plain" else _installed_fusion_types(compute_dtype)
    return {} if value is None else {YNN_FLAG.lstrip("-"): value}


def compilation_cache_dir() -> str | None:
    """Where the entry points keep compiled programs: ``$JAX_COMPILATION_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/diffjax/jax`` (default ``~/.cache/diffjax/jax``); None when
    ``DIFFJAX_COMPILATION_CACHE=0``."""
    if not env_enabled(CACHE_ENV):
        return None
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffjax", "jax")


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache at ``compilation_cache_dir()`` unless the
    process already set one; returns the folder in use (None: off). Imports jax (no backend
    starts)."""
    import jax

    path = compilation_cache_dir()
    if path is None:
        return None
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
    return jax.config.jax_compilation_cache_dir


def configure(
    compute_dtype: str = "float32", kernels: str = "tuned", reuse_memory: bool = True
) -> list[str]:
    """Apply both settings (none with ``kernels="plain"``); returns what was applied.

    Call before the first JAX computation of the process (later, XLA has read its flags and
    started its threads, and nothing changes). ``compute_dtype`` and ``kernels`` are the
    model's (config ``model.dtype``, ``model.kernels``); ``reuse_memory=False`` leaves malloc
    alone (a benchmark's A/B).
    """
    applied = []
    if kernels == "plain":
        return applied
    # The fusions of the dtype the CPU will compute in (a GPU backend ignores the CPU flag).
    compute_dtype = effective_dtype(compute_dtype, "cpu")
    if reuse_memory and reuse_freed_memory():
        applied.append("malloc reuses freed memory")
    xla_flags = os.environ.get("XLA_FLAGS", "")
    # An unknown dtype adds nothing here; config validation reports it in one line.
    if YNN_FLAG not in xla_flags and compute_dtype in YNN_FUSION_TYPES:
        value = _installed_fusion_types(compute_dtype)
        if value is not None:
            os.environ["XLA_FLAGS"] = f"{xla_flags} {YNN_FLAG}={value}".strip()
            applied.append(f"{YNN_FLAG}={value}")
    return applied
