"""Where a ``jax.profiler`` trace's compute time goes, per step: the summary bench/recipe.py's
``--profile`` prints, and a command for any trace directory.

Reads the newest ``*.xplane.pb`` under a trace directory. On a GPU (or TPU) it takes the kernels
of the device planes (``/device:GPU:0``, one line per stream) and also reports how much of the
wall time the device was busy at all (the union of its kernels' intervals; the rest is launch
gaps and host work); on a CPU, the events that carry an XLA op (``hlo_op``) on the host's
threads, summed over threads (so busy time can exceed wall time). Events are grouped by XLA op
(e.g. ``cudnn-conv-bw-filter.12``, ``fusion.31``; a command buffer's by kernel), each shown
with its longest kernel's name (cuDNN's and cuBLAS's kernel names tell the algorithm and the
data types, e.g. ``bf16`` vs ``tf32``), and by category::

    python bench/trace_summary.py /tmp/trace --steps 5 --top 30
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
from collections.abc import Iterator

# (substring of the op or kernel name, category); first match wins, the op's name first.
CATEGORIES = (
    ("conv-bw-filter", "convolution, kernel gradient"),
    ("conv-bw-input", "convolution, input gradient"),
    ("wgrad", "convolution, kernel gradient"),
    ("dgrad", "convolution, input gradient"),
    ("conv", "convolution"),
    ("fprop", "convolution"),
    ("gemm", "matrix product"),
    ("dot", "matrix product"),
    ("matmul", "matrix product"),
    ("cublas", "matrix product"),
    ("memcpy", "copy / memset"),
    ("memset", "copy / memset"),
    ("copy", "copy / memset"),
    ("transpose", "copy / memset"),
    ("all-reduce", "collective"),
    ("nccl", "collective"),
    ("reduce", "reduction fusion"),
    ("fusion", "elementwise fusion"),
)

# XLA ops that group other ops' kernels (XLA:GPU's CUDA graphs).
_GROUPS = ("command_buffer",)

# Lines of a device plane that profilers derive from the kernels (counting them again would
# double the time): keep the per-stream lines.
_DEVICE_LINE_PREFIXES = ("Stream",)


def category(op: str, kernel: str) -> str:
    for name in (op.lower(), kernel.lower()):
        for pattern, cat in CATEGORIES:
            if pattern in name:
                return cat
    return "other"


def newest_xplane(logdir: str) -> str:
    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {logdir!r}: not a jax.profiler trace")
    return max(paths, key=os.path.getmtime)


def events(path: str) -> tuple[str, list[tuple[str, str, int, int]]]:
    """(where, [(op, kernel, start_ns, duration_ns)]) from the trace's device planes, else its
    host threads' XLA-op events."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    device, host = [], []
    for plane in data.planes:
        if plane.name.startswith("/device:"):
            for line in plane.lines:
                if line.name.startswith(_DEVICE_LINE_PREFIXES):
                    device.extend(_events(line, require_op=False))
        elif plane.name.startswith("/host:CPU"):
            for line in plane.lines:
                host.extend(_events(line, require_op=True))
    return ("device", device) if device else ("host", host)


def _events(line, require_op: bool) -> Iterator[tuple[str, str, int, int]]:
    for e in line.events:
        stats = dict(e.stats)
        op = str(stats.get("hlo_op", ""))
        if require_op and not op:
            continue
        yield op or e.name, e.name, int(e.start_ns), int(e.duration_ns)


def busy_ns(evs: list[tuple[str, str, int, int]]) -> int:
    """Length of the union of the events' [start, start + duration) intervals."""
    total, end = 0, None
    for _, _, start, dur in sorted(evs, key=lambda e: e[2]):
        stop = start + dur
        if end is None or start >= end:
            total += dur
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def summarize(logdir: str, steps: int, top: int = 25, wall_s: float | None = None) -> str:
    """Per-step table of the trace's compute time by category and by op (largest first).
    ``wall_s``: the traced steps' wall time, to report the device's idle share."""
    where, evs = events(newest_xplane(logdir))
    if not evs:
        return f"no XLA events found in {logdir!r}"
    by_op = collections.defaultdict(collections.Counter)  # op -> {kernel: ns}
    calls = collections.Counter()
    by_cat = collections.Counter()
    for op, kernel, _, dur in evs:
        # A command buffer (a CUDA graph of many XLA ops) would hide its kernels: split it.
        key = kernel if op.startswith(_GROUPS) else op
        by_op[key][kernel] += dur
        calls[key] += 1
        by_cat[category(op, kernel)] += dur
    total = sum(by_cat.values())
    ms = lambda ns: ns / steps / 1e6  # noqa: E731  per step
    lines = [f"{where} time per step: {ms(total):.2f} ms in {len(evs) / steps:.0f} events"]
    if where == "device":
        busy = busy_ns(evs)
        lines[0] += f", busy {ms(busy):.2f} ms"
        if wall_s:
            idle = 1.0 - busy / 1e9 / wall_s
            lines[0] += f" of {wall_s / steps * 1e3:.2f} ms wall ({100 * idle:.1f}% idle)"
    for cat, ns in by_cat.most_common():
        lines.append(f"  {100 * ns / total:5.1f}%  {ms(ns):8.3f} ms  {cat}")
    lines.append(f"top {top} ops (ms per step, kernels per step, op, [its longest kernel]):")
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1].total())
    for op, kernels in ranked[:top]:
        kernel = kernels.most_common(1)[0][0]
        name = "" if kernel == op else f"  [{kernel[:120]}]"
        lines.append(f"  {ms(kernels.total()):8.3f} {calls[op] / steps:5.1f}  {op[:60]}{name}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logdir", help="the directory given to jax.profiler.trace / start_trace")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds (per-step times)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    try:
        print(summarize(args.logdir, args.steps, args.top))
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
