"""One-process A/B of the U-Net's train step (or forward) under variants of the kernels' tuning
table (``diffjax.kernels.tuning.TUNING``), the steps alternating so that a slow spell of the
machine slows every variant alike.

Each ``--variant`` is a ``;``-separated list of ``field=value`` overrides of ``Tuning`` (values
are Python literals; the empty string is the table as committed) and of ``xla:option=value``
per-program XLA options over the ones ``cpu_runtime`` chooses (values as written: for the
YNNPACK fusion types an empty value is none). Every variant is traced and
compiled with its table in place, then the compiled steps run in turn, ``--runs`` rounds after
two warm-up rounds; each variant's median is compared with the first's::

    python bench/tuning_ab.py --workload small32 --batch 64 --runs 9 \
        --variant "winograd_min_channels=64;winograd4_min_size=16" --variant ""
    python bench/tuning_ab.py --workload small32 --batch 8 --forward --variant "" \
        --variant "winograd_min_channels=64"
    python bench/tuning_ab.py --workload small32 --batch 64 --runs 9 --variant "" \
        --variant "xla:xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import (  # noqa: E402
    WORKLOADS,
    compiler_options,
    environment,
    make_inputs,
    make_model,
    make_train_step,
)

import diffjax.kernels.tuned  # noqa: E402, F401  (imports every module that binds TUNING)
from diffjax.kernels import tuning  # noqa: E402
from diffjax.models import init_params  # noqa: E402

XLA_PREFIX = "xla:"


def parse_variant(text: str) -> tuple[dict, dict[str, str]]:
    """'a=1;b=(2, 3);xla:o=V' -> ({'a': 1, 'b': (2, 3)}, {'o': 'V'}): the ``Tuning`` overrides,
    each field checked against ``Tuning``, and the XLA options (checked by XLA at compile)."""
    fields = {f.name for f in dataclasses.fields(tuning.Tuning)}
    out, options = {}, {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, _, value = item.partition("=")
        if name.startswith(XLA_PREFIX) and len(name) > len(XLA_PREFIX):
            options[name[len(XLA_PREFIX) :]] = value
            continue
        if name not in fields:
            raise SystemExit(
                f"--variant field {name!r}; allowed: {', '.join(sorted(fields))}, "
                f"or {XLA_PREFIX}<XLA option>"
            )
        try:
            out[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f"--variant {item!r}: the value must be a Python literal") from None
    return out, options


def _install(table: tuning.Tuning) -> None:
    # The kernel modules bind TUNING at import: replace their bindings (read when tracing),
    # leaving tuning.TUNING itself as committed.
    for name, module in list(sys.modules.items()):
        if name.startswith("diffjax.kernels.") and module is not tuning:
            if hasattr(module, "TUNING"):
                module.TUNING = table


def _convolutions(compiled) -> int:
    return sum(" convolution(" in line for line in compiled.as_text().splitlines())


def compile_variant(
    model,
    size,
    channels,
    batch,
    forward: bool,
    table: tuning.Tuning,
    xla_options: dict[str, str] | None = None,
):
    """(a callable running one compiled step (or forward) of ``model`` traced under ``table``
    and compiled with ``xla_options`` over ``cpu_runtime``'s, how many convolutions XLA runs in
    it)."""
    _install(table)
    try:
        params = init_params(model, jax.random.key(0), size, channels)
        x, t, target = make_inputs(batch, size, channels)
        if forward:
            apply = jax.jit(
                lambda p, x, t: model.apply({"params": p}, x, t, train=False),
                compiler_options=compiler_options(model, xla_options),
            )
            compiled = apply.lower(params, x, t).compile()
            return (lambda: compiled(params, x, t).block_until_ready()), _convolutions(compiled)
        step, opt = make_train_step(model, xla_options=xla_options)
        state = [params, opt.init(params)]
        rng = jax.random.key(1)
        compiled = step.lower(state[0], state[1], x, t, target, rng).compile()

        def run():
            state[0], state[1], loss = compiled(state[0], state[1], x, t, target, rng)
            loss.block_until_ready()

        return run, _convolutions(compiled)
    finally:
        _install(tuning.TUNING)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="small32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--forward", action="store_true", help="time the forward (sampling) only")
    p.add_argument("--variant", action="append", required=True, help="'field=value;...'")
    args = p.parse_args()
    parsed = [parse_variant(v) for v in args.variant]
    tables = [dataclasses.replace(tuning.TUNING, **fields) for fields, _ in parsed]

    print(environment())
    model, size, channels = make_model(args.workload, getattr(jnp, args.dtype))
    what = "forward" if args.forward else "train step"
    print(f"{args.workload} b{args.batch} {args.dtype} {what}, {args.runs} alternating rounds")
    runs = []
    for text, table, (_, options) in zip(args.variant, tables, parsed, strict=True):
        t0 = time.perf_counter()
        try:
            run, convs = compile_variant(
                model, size, channels, args.batch, args.forward, table, options
            )
        except Exception as e:  # XLA rejects an option: name it in one line
            if not options:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SystemExit(f"--variant {text!r} did not compile: {first}") from None
        runs.append(run)
        print(
            f"  compiled {text or '(as committed)'} in {time.perf_counter() - t0:.1f} s: "
            f"{convs} XLA convolutions (the rest Winograd)"
        )
    times = [[] for _ in runs]
    for r in range(args.runs + 2):
        for i, run in enumerate(runs):
            t0 = time.perf_counter()
            run()
            if r >= 2:  # two warm-up rounds
                times[i].append(time.perf_counter() - t0)
    first = statistics.median(times[0])
    for text, ts in zip(args.variant, times, strict=True):
        med = statistics.median(ts)
        print(
            f"{med:8.3f} s  {first / med:5.3f}x the first  {text or '(as committed)'}"
            f"   runs {[round(v, 3) for v in ts]}"
        )


if __name__ == "__main__":
    main()
