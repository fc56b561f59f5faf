"""Which YNNPACK kernels a U-Net train step runs: gdb breakpoints on every ISA-named kernel.

YNNPACK (XLA:CPU's convolutions, products and reductions) names its kernels by instruction set
(``dot_fp32_5x64x1_1x16x1_avx512``, ``dot_fp32_6x16x1_1x8x1_fma3``, ``add_fp32_x86_avx``, ...).
This runs one jitted train step of a workload (``common.py``) under gdb with a one-shot
breakpoint on each such function of jaxlib, and prints those that ran: the evidence for what
``DIFFJAX_BENCH_YNN_ISA=AVX2`` (``ynn_isa.py``) changes::

    python bench/ynn_kernels.py                                # this CPU's choice
    DIFFJAX_BENCH_YNN_ISA=AVX2 python bench/ynn_kernels.py     # held to AVX2

Slow: gdb takes 10-25 minutes for the digits step on 2 cores (its breakpoints are re-set at
every library load). Needs gdb (and c++filt for
readable names).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Runs inside gdb: a one-shot breakpoint per kernel, set once jaxlib is loaded; prints "HIT name".
_GDB_SCRIPT = """
import gdb
names = [l.strip() for l in open({names!r}) if l.strip()]
hits = []
class Once(gdb.Breakpoint):
    def stop(self):
        hits.append(self.location)
        self.enabled = False
        return False
gdb.execute("set pagination off")
gdb.execute("set confirm off")
gdb.execute("catch load libjax_common")
gdb.execute("run")
for n in names:
    Once(n, internal=True)
gdb.execute("delete")
gdb.execute("continue")
for n in hits:
    print("HIT", n)
"""
# ISA-named YNNPACK functions: the kernels a CPU level selects.
_ISA_NAME = re.compile(rb"sse|avx|fma|amx")


def _worker(workload: str, batch: int) -> None:
    import common  # holds YNNPACK first where DIFFJAX_BENCH_YNN_ISA is set
    import jax

    from diffjax.models import init_params

    model, size, channels = common.make_model(workload)
    params = init_params(model, jax.random.key(0), size, channels)
    step, opt = common.make_train_step(model)
    x, t, target = common.make_inputs(batch, size, channels)
    jax.block_until_ready(step(params, opt.init(params), x, t, target, jax.random.key(1)))
    print(f"ynn_kernels worker: {common.YNN_HOLD or 'YNNPACK on this CPU'}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="digits", choices=("digits", "small32", "cifar10"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args.workload, args.batch)
        return 0
    gdb = shutil.which("gdb")
    if gdb is None:
        p.error("gdb is not on PATH (Debian: gdb)")
    import ynn_isa

    names = [
        n.decode()
        for n in ynn_isa.function_names(ynn_isa.library_path(), b"_ZN3ynn")
        if _ISA_NAME.search(n)
    ]
    if not names:
        p.error(f"{ynn_isa.library_path()} has no ISA-named YNNPACK functions in its symbol table")
    with tempfile.TemporaryDirectory() as tmp:
        names_file, script = os.path.join(tmp, "names.txt"), os.path.join(tmp, "hits.py")
        with open(names_file, "w") as f:
            f.write("\n".join(names))
        with open(script, "w") as f:
            f.write(_GDB_SCRIPT.format(names=names_file))
        me = os.path.abspath(__file__)
        cmd = [gdb, "-batch", "-x", script, "--args", sys.executable, me, "--worker"]
        run = subprocess.run(
            [*cmd, f"--workload={args.workload}", f"--batch={args.batch}"],
            capture_output=True,
            text=True,
        )
    worker = [ln for ln in run.stdout.splitlines() if ln.startswith("ynn_kernels worker:")]
    if not worker:
        print(run.stdout[-3000:] + run.stderr[-3000:], file=sys.stderr)
        return 1
    hits = sorted({ln[4:] for ln in run.stdout.splitlines() if ln.startswith("HIT ")})
    if shutil.which("c++filt"):
        out = subprocess.run(["c++filt"], input="\n".join(hits), capture_output=True, text=True)
        hits = sorted({h.split("(")[0] for h in out.stdout.splitlines()})
    print(f"{worker[0][len('ynn_kernels worker: ') :]}; {args.workload} batch {args.batch}")
    print(f"{len(hits)} of {len(names)} ISA-named YNNPACK kernels ran:")
    for h in hits:
        print(f"  {h}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
