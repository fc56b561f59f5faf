"""Hold YNNPACK to AVX2 on an AVX-512 CPU: the kernels a Zen 3 runs, at this CPU's speed.

XLA:CPU runs its convolutions, products and reductions through YNNPACK, which picks each kernel
by ``ynn::get_supported_arch_flags()``: a function-local static that the first YNNPACK call
fills from CPUID (through cpuinfo), and that every later kernel choice reads. Neither
``--xla_cpu_max_isa`` nor any environment variable reaches it (bench/README.md, "How faithful
holding to AVX2 is"), so an AVX-512 machine held to AVX2 by flags alone still times YNNPACK's
AVX-512 kernels. ``hold("AVX2")`` writes that static, and sets its guard so that YNNPACK never
overwrites it, before the process's first computation: from then on YNNPACK takes its AVX2 + FMA
kernels, as under ``qemu-x86_64 -cpu EPYC-Milan``, but at native speed.

Benchmarks only, opt-in with ``DIFFJAX_BENCH_YNN_ISA=AVX2`` (``bench/common.py`` and
``soak.py --isa AVX2`` apply it): it writes into jaxlib's memory at the addresses of two local
symbols of ``libjax_common.so``, read from its ELF symbol table. A jaxlib without them is a
one-line error, never a silent unheld run.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import struct

ENV = "DIFFJAX_BENCH_YNN_ISA"

# YNNPACK's x86 arch_flag bits up to AVX2 + FMA (ynnpack/base/arch.h; the same in every layout
# it has had), with the /proc/cpuinfo flag of each. AVX-512 and AMX are bits 7 and up.
_AVX2_BITS = {"sse2": 0, "ssse3": 1, "sse4_1": 2, "avx": 3, "f16c": 4, "avx2": 5, "fma": 6}
LEVELS = {"AVX2": _AVX2_BITS}

_FLAGS = b"_ZZN3ynn24get_supported_arch_flagsEvE5flags"  # uint64_t flags
_GUARD = b"_ZGVZN3ynn24get_supported_arch_flagsEvE5flags"  # its static-init guard
_LIBRARY = "libjax_common.so"


class HoldError(RuntimeError):
    """YNNPACK cannot be held in this process (one line: what and why)."""


def library_path() -> str:
    """The jaxlib shared object that contains YNNPACK."""
    import jaxlib

    return os.path.realpath(os.path.join(os.path.dirname(jaxlib.__file__), _LIBRARY))


def _symtab(m: mmap.mmap, path: str) -> tuple[int, int, range] | None:
    """(string table start, its end, the byte offsets of the symbols) of the ELF64 ``.symtab``
    in ``m``; None without one. Local symbols live only there, not in the dynamic table that
    ``dlsym`` reads."""
    if m[:4] != b"\x7fELF" or m[4] != 2 or m[5] != 1:
        raise HoldError(f"{path}: not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", m, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", m, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", m, shoff + i * shentsize) for i in range(shnum)]
    symtab = next((s for s in sections if s[1] == 2), None)  # SHT_SYMTAB
    if symtab is None:
        return None
    strtab = sections[symtab[6]]  # sh_link
    return strtab[4], strtab[4] + strtab[5], range(symtab[4], symtab[4] + symtab[5], symtab[9])


def symbol_offsets(path: str, names: list[bytes]) -> dict[bytes, int]:
    """``st_value`` of each of ``names`` in the ``.symtab`` of ``path`` (missing ones are left
    out)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        table = _symtab(m, path)
        if table is None:
            return {}
        str_start, str_end, entries = table
        wanted = {}  # string-table offset -> name; a name may also be the tail of a longer one
        for name in names:
            at = m.find(name + b"\0", str_start, str_end)
            while at >= 0:
                wanted[at - str_start] = name
                at = m.find(name + b"\0", at + 1, str_end)
        found = {}
        for i in entries:
            (st_name,) = struct.unpack_from("<I", m, i)
            if st_name in wanted:
                found[wanted[st_name]] = struct.unpack_from("<Q", m, i + 8)[0]
                if len(found) == len(names):
                    break
        return found


def function_names(path: str, prefix: bytes) -> list[bytes]:
    """The (mangled) names of the function symbols in the ``.symtab`` of ``path`` that start
    with ``prefix``."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        table = _symtab(m, path)
        if table is None:
            return []
        str_start, str_end, entries = table
        names = []
        for i in entries:
            st_name, st_info = struct.unpack_from("<IB", m, i)
            at = str_start + st_name
            if st_info & 0xF == 2 and m[at : at + len(prefix)] == prefix:  # STT_FUNC
                names.append(m[at : m.find(b"\0", at, str_end)])
        return names


def load_base(path: str) -> int:
    """Where ``path`` is mapped in this process (its first segment starts at address 0)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == path and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    raise HoldError(f"{path} is not loaded in this process")


@functools.cache
def _offsets(path: str) -> dict[bytes, int] | str:
    """The two variables' offsets in ``path``, or why they cannot be found there; the symbol
    table is read once per process and library."""
    import jaxlib

    try:
        found = symbol_offsets(path, [_FLAGS, _GUARD])
    except HoldError as e:
        return str(e)
    if len(found) != 2:
        return (
            f"jaxlib {jaxlib.__version__}: {path} has no ynn::get_supported_arch_flags() "
            "variables in its symbol table"
        )
    return found


def unavailable() -> str | None:
    """Why YNNPACK cannot be held in this environment (one line), None where it can."""
    import jaxlib

    path = library_path()
    if not os.path.exists("/proc/self/maps"):
        return "there is no /proc/self/maps to find jaxlib's memory in"
    if not os.path.exists(path):
        return f"jaxlib {jaxlib.__version__} has no {_LIBRARY}"
    found = _offsets(path)
    return found if isinstance(found, str) else None


def _variables() -> tuple[ctypes.c_uint64, ctypes.c_uint8]:
    import jax  # noqa: F401  (loads the library)

    why = unavailable()
    if why:
        raise HoldError(f"{why}; YNNPACK cannot be held here")
    path = library_path()
    offsets, base = _offsets(path), load_base(path)
    return (
        ctypes.c_uint64.from_address(base + offsets[_FLAGS]),
        ctypes.c_uint8.from_address(base + offsets[_GUARD]),
    )


def current_flags() -> int | None:
    """YNNPACK's arch flags in this process, None before its first kernel choice."""
    flags, guard = _variables()
    return flags.value if guard.value else None


def hold(isa: str) -> str:
    """Make YNNPACK choose the kernels of ``isa`` (a key of ``LEVELS``) from now on, for the
    features this CPU has up to it. Call before the process's first computation; returns a
    one-line description."""
    if isa not in LEVELS:
        raise HoldError(
            f"{ENV}={isa!r} is not a level YNNPACK can be held to; allowed: " + ", ".join(LEVELS)
        )
    from diffjax.kernels import cpu_runtime

    flags, guard = _variables()
    if guard.value:
        raise HoldError(
            f"YNNPACK already chose kernels in this process (arch flags {flags.value:#x}); "
            f"hold it before the first computation"
        )
    have = cpu_runtime.cpu_flags()
    value = sum(1 << bit for name, bit in LEVELS[isa].items() if name in have)
    flags.value = value
    guard.value = 1  # initialized: YNNPACK returns ``flags`` and never reads CPUID again
    return f"YNNPACK held to {isa} (arch flags {value:#x})"


def hold_from_env() -> str | None:
    """``hold($DIFFJAX_BENCH_YNN_ISA)`` where it is set; None where it is not."""
    isa = os.environ.get(ENV, "")
    return hold(isa) if isa else None
