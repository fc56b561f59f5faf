"""Soak test: many fresh processes over the U-Net's entry points, each under a hang watchdog.

Every run is a new Python process that does one thing (a *cell*): ``init`` (eager
``UNet.init``), ``eager_apply`` / ``jit_apply`` (a forward pass outside / inside ``jit``, or
``pmap`` over several devices), ``train_step`` (diffjax's pmapped train step, three updates),
``ddpm`` / ``ddim`` (``sampling.sample_pmapped``), for a workload (digits, small32, cifar10), a
compute dtype, a batch size and a number of host devices. The parent watches each child:

- **hang**: the child's CPU time (all threads, ``/proc/PID/stat``) stops growing for
  ``--idle`` seconds (a deadlock leaves every thread waiting), or it outlives ``--timeout``.
  Then the child's Python stacks (``faulthandler`` on SIGUSR1) and native stacks (``gdb``
  ``thread apply all bt``, where gdb is installed) are saved under ``--logs`` and it is killed;
- **crash**: it dies by a signal (SIGILL, SIGSEGV, SIGABRT, ...) or exits non-zero; its
  output's tail is saved.

Runs, by default the process environment's path (what ``train.py`` does; ``DIFFJAX_ONEDNN``
unset):

    python bench/soak.py --runs 60                  # 60 cells drawn from the matrix
    python bench/soak.py --runs 60 --isa AVX2       # oneDNN, XLA and YNNPACK held to AVX2
    python bench/soak.py --cells repros             # the reported hangs and crashes
    python bench/soak.py --cells quick --isa AVX2   # the reduced soak of the test suite
    python bench/soak.py --cells small32:float32:train_step:64:1 --onednn on

``--isa AVX2`` sets ``ONEDNN_MAX_CPU_ISA=AVX2`` and XLA's ``--xla_cpu_max_isa=AVX2`` in the
children, and holds YNNPACK (XLA:CPU's convolutions, products and reductions) to its AVX2
kernels (``DIFFJAX_BENCH_YNN_ISA=AVX2``, ``ynn_isa.py``): every library of jaxlib then runs the
kernels of an AVX2-only CPU, at this CPU's speed (bench/README.md, "How faithful holding to AVX2
is"). ``--qemu EPYC-Milan`` runs each child under ``qemu-x86_64 -cpu
EPYC-Milan`` (Debian's ``qemu-user``), whose CPUID is a Zen 3's (AVX2 + FMA, no AVX-512), so every
library picks the kernels it would pick there and any AVX-512 instruction is a SIGILL; it implies
``--isa AVX2``, because qemu-user passes the host's /proc/cpuinfo through to the gates that read it.
Emulated children are about 10x slower to compile and 100x slower to run: digits cells only.
``--onednn on`` opts the children in to oneDNN (``DIFFJAX_ONEDNN=1``). The exit status is 1
when any run hung or crashed::

    python bench/soak.py --qemu EPYC-Milan --idle 300 --timeout 1800 \
        --cells digits:float32:jit_apply:2:1,digits:bfloat16:jit_apply:2:1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ynn_isa

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("digits", "small32", "cifar10")
DTYPES = ("float32", "bfloat16")
OPS = ("init", "eager_apply", "jit_apply", "train_step", "ddpm", "ddim")
BATCHES = (1, 2, 7, 64, 200, 500)
DEVICES = (1, 2)
# model.kernels of the child processes (the parent sets it from --onednn).
KERNELS_ENV = "DIFFJAX_SOAK_KERNELS"
# The soak's own check (tests/test_soak.py): a child that stalls without CPU, one that aborts.
SELF_TEST_OPS = ("selftest_hang", "selftest_crash")

# Largest batch per (workload, op) that a 2-core machine runs in about a minute; larger cells
# are left out of the drawn matrix (an explicit --cells list may still name them).
MAX_BATCH = {
    "digits": {op: 500 for op in OPS},
    "small32": {**{op: 500 for op in OPS}, "eager_apply": 64, "ddpm": 200},
    "cifar10": {**{op: 7 for op in OPS}, "jit_apply": 64},
}
# Sampling steps of the drawn cells: DDPM on evenly respaced steps, DDIM num_steps.
SAMPLE_STEPS = {"digits": 100, "small32": 10, "cifar10": 5}


@dataclasses.dataclass(frozen=True)
class Cell:
    workload: str
    dtype: str
    op: str
    batch: int
    devices: int
    steps: int = 0  # sampling steps; 0: SAMPLE_STEPS[workload]

    def spec(self) -> str:
        base = f"{self.workload}:{self.dtype}:{self.op}:{self.batch}:{self.devices}"
        return f"{base}:{self.steps}" if self.steps else base

    @classmethod
    def parse(cls, spec: str) -> Cell:
        parts = spec.split(":")
        if len(parts) not in (5, 6):
            raise ValueError(f"cell {spec!r}: allowed: WORKLOAD:DTYPE:OP:BATCH:DEVICES[:STEPS]")
        w, d, op, b, n, *steps = parts
        cell = cls(w, d, op, int(b), int(n), int(steps[0]) if steps else 0)
        problems = [
            f"{name} {value!r} not in {allowed}"
            for name, value, allowed in (
                ("workload", w, WORKLOADS),
                ("dtype", d, DTYPES),
                ("op", op, OPS + SELF_TEST_OPS),
            )
            if value not in allowed
        ]
        if cell.batch < 1 or cell.devices < 1 or cell.steps < 0:
            problems.append("batch and devices must be >= 1, steps >= 0")
        if problems:
            raise ValueError(f"cell {spec!r}: {'; '.join(problems)}")
        return cell


# The hangs and crashes reported on an AVX2-only Zen 3 (oneDNN's nested gemm; bfloat16 SIGILL).
REPROS = (
    Cell("digits", "float32", "ddpm", 500, 1, 1000),
    Cell("cifar10", "float32", "eager_apply", 2, 1),
    Cell("small32", "float32", "train_step", 64, 1),
    Cell("cifar10", "float32", "train_step", 16, 1),
    Cell("small32", "bfloat16", "init", 1, 1),
    Cell("small32", "bfloat16", "init", 2, 1),
)
# The reduced soak of the test suite, under a minute on 2 cores: the three kinds of cell that
# hung or crashed on the old default (bench/README.md), all on the digits U-Net (the repros'
# CIFAR-10 eager apply and small32 train step take 35 and 70 s; REPROS has them). The bfloat16
# U-Net is initialised jitted (jit_apply initialises it, then applies it), a third of the time
# of the eager init that crashed; held to AVX2 it is built in float32 with its notice, on any
# workload alike. tests/test_unet.py runs a small U-Net's bfloat16 init and apply, eager and
# jitted, at batch 1 and 2 in the test process.
QUICK = (
    Cell("digits", "float32", "eager_apply", 2, 1),
    Cell("digits", "float32", "train_step", 64, 1),
    Cell("digits", "bfloat16", "jit_apply", 1, 1),
)
NAMED_CELLS = {"repros": REPROS, "quick": QUICK}


def matrix() -> list[Cell]:
    """Every cell of the drawn soak, within ``MAX_BATCH``."""
    return [
        Cell(w, d, op, b, n)
        for w in WORKLOADS
        for d in DTYPES
        for op in OPS
        for b in BATCHES
        for n in DEVICES
        if b <= MAX_BATCH[w][op]
    ]


def draw(runs: int, seed: int) -> list[Cell]:
    """``runs`` cells: the repros first, then cells drawn without replacement (repeating the
    matrix if ``runs`` exceeds it)."""
    cells = list(REPROS[:runs])
    rng = random.Random(seed)
    pool: list[Cell] = []
    while len(cells) < runs:
        if not pool:
            pool = matrix()
            rng.shuffle(pool)
        cells.append(pool.pop())
    return cells


# --- the child ---------------------------------------------------------------------------------


def _config(workload: str, dtype: str):
    sys.path.insert(0, str(ROOT))
    from configs import cifar10, digits

    if workload == "cifar10":
        config = cifar10.get_config()
    else:
        config = digits.get_config()
    if workload == "small32":
        config.data.image_size = 32
        m = config.model
        m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 32, (1, 2, 2), 2, (16,)
        m.dropout, m.num_groups = 0.1, 32
    config.model.dtype = dtype
    return config


def run_cell(cell: Cell) -> str:
    """Do the cell's work in this process; returns a one-line summary."""
    if cell.op == "selftest_hang":
        time.sleep(3600)
    if cell.op == "selftest_crash":
        os.abort()

    held = ynn_isa.hold_from_env()  # --isa AVX2: before the first kernel choice
    from diffjax.kernels import cpu_runtime

    cpu_runtime.configure(cell.dtype, os.environ.get(KERNELS_ENV, "tuned"))  # as entry points do

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import jax_utils

    from diffjax import kernels as K
    from diffjax.core import sampling
    from diffjax.core.schedules import make_schedule
    from diffjax.models import create_model
    from diffjax.training import state as train_state
    from diffjax.training import step as train_step

    config = _config(cell.workload, cell.dtype)
    config.model.kernels = os.environ.get(KERNELS_ENV, "tuned")
    model = create_model(config)
    size, channels = config.data.image_size, config.data.channels
    n = jax.local_device_count()
    batch = -(-cell.batch // n) * n if cell.op in ("train_step", "ddpm", "ddim") else cell.batch
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, size, size, channels))  # [B, H, W, C]
    t = jnp.arange(batch, dtype=jnp.int32) * 7 % 1000  # [B]
    kernels = K.describe(config.model.kernels, cell.dtype)

    if cell.op == "init":
        out = model.init({"params": key, "dropout": key}, x, t, train=False)["params"]
    else:
        params = train_state.init_params(model, key, size, channels)
    if cell.op in ("eager_apply", "jit_apply"):
        apply = lambda p, x, t: model.apply({"params": p}, x, t, train=False)  # noqa: E731
        if cell.op == "jit_apply":
            if cell.devices > 1 and batch % n == 0:
                apply = jax.pmap(apply, in_axes=(None, 0, 0))
                x, t = x.reshape(n, -1, *x.shape[1:]), t.reshape(n, -1)
            else:
                apply = jax.jit(apply)
        out = [apply(params, x, t) for _ in range(2)][-1]
    if cell.op == "train_step":
        schedule = make_schedule("linear", 1000)
        state = train_state.create_train_state(config, model, key)
        p_state = jax_utils.replicate(state, axis_name=train_step.AXIS_NAME)
        p_step = train_step.make_p_train_step(config, model, schedule, key)
        sharded = {"image": x.reshape(n, -1, *x.shape[1:])}
        for _ in range(3):
            p_state, metrics = p_step(p_state, sharded)
        out = metrics["loss"]
    if cell.op in ("ddpm", "ddim"):
        schedule = make_schedule("linear", 1000)
        steps = cell.steps or SAMPLE_STEPS[cell.workload]
        options = (
            {"num_steps": steps}
            if cell.op == "ddim"
            else {"timesteps": None if steps == 1000 else sampling.space_timesteps(1000, steps)}
        )
        model_fn = sampling.make_model_fn(model, params)
        out = sampling.sample_pmapped(
            model_fn, schedule, key, (batch, size, size, channels), sampler=cell.op, **options
        )
    values = np.asarray(jax.tree.leaves(out)[0], np.float32)
    if not np.all(np.isfinite(values)):
        raise FloatingPointError(f"{cell.spec()}: non-finite output")
    ynn = f"; {held}" if held else ""
    return f"{kernels}; {jax.local_device_count()} device(s){ynn}"


def _child_main(spec: str) -> int:
    import faulthandler

    faulthandler.enable()  # fatal signals print the Python stacks
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent's hang dump
    t0 = time.perf_counter()
    summary = run_cell(Cell.parse(spec))
    print(f"soak-ok {time.perf_counter() - t0:.1f} s: {summary}", flush=True)
    return 0


# --- the parent --------------------------------------------------------------------------------


def child_env(cell: Cell, isa: str | None, onednn: str, hold_ynn: bool = True) -> dict[str, str]:
    """The child's environment: ``isa`` held in oneDNN, XLA and (``hold_ynn``, for the levels
    ``ynn_isa`` knows) YNNPACK."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={cell.devices}")
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    env.pop(ynn_isa.ENV, None)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
        if hold_ynn and isa in ynn_isa.LEVELS:
            env[ynn_isa.ENV] = isa
        flags = [f for f in flags if not f.startswith("--xla_cpu_max_isa")]
        flags.append(f"--xla_cpu_max_isa={isa}")
    env["XLA_FLAGS"] = " ".join(flags)
    env[KERNELS_ENV] = "onednn" if onednn == "on" else "tuned"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of all threads of ``pid``; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _native_stacks(pid: int) -> str:
    gdb = shutil.which("gdb")
    if gdb is None:
        return "(gdb not installed: no native stacks)"
    cmd = [gdb, "-p", str(pid), "-batch", "-nx", "-ex", "thread apply all bt 40"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        return out.stdout + out.stderr
    except subprocess.TimeoutExpired:
        return "(gdb timed out)"


@dataclasses.dataclass
class Result:
    cell: str
    status: str  # ok, hang, crash
    seconds: float
    detail: str
    log: str


def run_one(
    cell: Cell,
    env: dict[str, str],
    idle: float,
    timeout: float,
    logs: Path,
    prefix: tuple[str, ...] = (),
) -> Result:
    """Run ``cell`` in a fresh process (``prefix``: e.g. qemu-x86_64 and its flags) under the
    watchdog."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / (cell.spec().replace(":", "_") + f"_{time.strftime('%H%M%S')}.log")
    t0 = time.monotonic()
    with open(log, "w+") as out:
        child = subprocess.Popen(
            [*prefix, sys.executable, str(Path(__file__).resolve()), "--worker", cell.spec()],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        last_cpu, last_change, why = 0.0, time.monotonic(), None
        while child.poll() is None:
            time.sleep(0.5)
            now, cpu = time.monotonic(), _cpu_seconds(child.pid)
            if cpu is not None and cpu > last_cpu + 0.05:
                last_cpu, last_change = cpu, now
            if now - last_change > idle:
                why = f"no CPU time for {idle:.0f} s after {now - t0:.1f} s"
            elif now - t0 > timeout:
                why = f"still running after {timeout:.0f} s"
            if why and child.poll() is None:
                child.send_signal(signal.SIGUSR1)  # Python stacks, into the log
                time.sleep(2)
                stacks = _native_stacks(child.pid)
                child.kill()
                child.wait()
                out.write("\n--- native stacks (gdb) ---\n" + stacks)
                return Result(cell.spec(), "hang", now - t0, why, str(log))
        seconds = time.monotonic() - t0
        out.seek(0)
        text = out.read()
    code = child.returncode
    if code == 0 and "soak-ok" in text:
        return Result(cell.spec(), "ok", seconds, text.rsplit("soak-ok", 1)[1].strip(), str(log))
    name = signal.Signals(-code).name if code < 0 else f"exit status {code}"
    tail = " | ".join(text.strip().splitlines()[-3:])
    return Result(cell.spec(), "crash", seconds, f"{name}: {tail}", str(log))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=60, help="cells drawn from the matrix")
    p.add_argument("--cells", help="'repros', 'quick', or a comma list WORKLOAD:DTYPE:OP:B:D[:S]")
    p.add_argument(
        "--isa", default=None, help="hold oneDNN, XLA and YNNPACK to this ISA, e.g. AVX2"
    )
    p.add_argument(
        "--qemu", default=None, help="run children under qemu-x86_64 -cpu MODEL, e.g. EPYC-Milan"
    )
    p.add_argument("--onednn", choices=("default", "on"), default="default")
    p.add_argument("--idle", type=float, default=30.0, help="seconds without CPU = a hang")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run at most")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn cells")
    p.add_argument("--logs", default="/tmp/diffjax-soak", help="folder for each run's output")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.worker:
        return _child_main(args.worker)

    if args.cells in NAMED_CELLS:
        cells = list(NAMED_CELLS[args.cells])
    elif args.cells:
        try:
            cells = [Cell.parse(s) for s in args.cells.split(",")]
        except ValueError as e:
            p.error(str(e))
    else:
        cells = draw(args.runs, args.seed)
    prefix = ()
    if args.qemu:
        qemu = shutil.which("qemu-x86_64")
        if qemu is None:
            p.error(f"--qemu {args.qemu}: qemu-x86_64 is not on PATH (Debian: qemu-user)")
        prefix = (qemu, "-cpu", args.qemu)
        args.isa = args.isa or "AVX2"
    sys.path.insert(0, str(ROOT))
    from diffjax.kernels import cpu_runtime

    where = f"qemu-x86_64 -cpu {args.qemu} on " if args.qemu else ""
    print(f"soak: {len(cells)} runs on {where}{cpu_runtime.describe_cpu()}", flush=True)
    # Under qemu the CPUID is already the model's: YNNPACK needs no holding there.
    hold_ynn = not args.qemu and args.isa in ynn_isa.LEVELS
    why_not = ynn_isa.unavailable() if hold_ynn else None
    if why_not:
        print(f"  YNNPACK not held (it keeps this CPU's kernels): {why_not}")
        hold_ynn = False
    held = f"{args.isa} (oneDNN, XLA{', YNNPACK' if hold_ynn else ''})" if args.isa else "no"
    print(f"  ISA held to: {held}; oneDNN: {args.onednn}; idle {args.idle:.0f} s")
    results = []
    for i, cell in enumerate(cells, 1):
        env = child_env(cell, args.isa, args.onednn, hold_ynn)
        r = run_one(cell, env, args.idle, args.timeout, Path(args.logs), prefix)
        results.append(r)
        print(f"[{i}/{len(cells)}] {r.cell}: {r.status.upper()} {r.seconds:.1f} s  {r.detail}")
        if r.status != "ok":
            print(f"    output and stacks: {r.log}")
        sys.stdout.flush()
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "hang", "crash")}
    print(
        f"soak: {len(results)} runs: {counts['ok']} ok, {counts['hang']} hangs, "
        f"{counts['crash']} crashes"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "cpu": cpu_runtime.describe_cpu(),
                    "isa_limit": args.isa,
                    "qemu_cpu": args.qemu,
                    "onednn": args.onednn,
                    "results": [dataclasses.asdict(r) for r in results],
                },
                indent=1,
            )
        )
    return 0 if counts["ok"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
