"""Training recipes for the digits default compared at one wall-clock budget, by their curves.

Each recipe is a set of config overrides on ``configs/digits.py``. Its training step is timed
first on the idle machine (``recipe.bench_train``: the real pmapped step with train.py's
``cpu_runtime`` settings, median of 3 runs), and
the recipe gets as many steps as fit the budget: ``--budget`` seconds of training steps, by
default what the default recipe's 2,000 steps take. Then ``train.py`` trains it for each seed in
its own workdir with evaluation during training on (the fixed-noise eval loss every 100 steps;
bits/dim on 32 test digits and digits_fd of 512 DPM-Solver++-20 samples at the end, and with
``--mid`` at the middle), and the table gives the end of each curve: mean over seeds and their
range.

Step times are measured before any training starts, so training runs may share the machine
without changing the budget; runs already finished (``OUT/<recipe>/seed<S>/done``) are kept.

Screening (about 3-4 minutes of 2 CPU cores per run)::

    python bench/digits_recipes.py --out /tmp/recipes --seeds 0,1 \
        --recipes default,lr2e-3,ema0.999,cosine,batch128,ch64

``--recipes`` lists the names of ``RECIPES``; ``--list`` prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_STEPS = 2000  # configs/digits.py's num_train_steps: the budget is its training time

# name -> config overrides (dotted key -> value). What a recipe changes is all it changes.
RECIPES: dict[str, dict[str, object]] = {
    "default": {},
    "lr2e-3": {"optimizer.learning_rate": 2e-3},
    "lr5e-4": {"optimizer.learning_rate": 5e-4},
    "warmup500": {"optimizer.warmup_steps": 500},
    "ema0.999": {"training.ema_decay": 0.999},
    "ema0.99": {"training.ema_decay": 0.99},
    "ema0.999w": {"training.ema_decay": 0.999, "training.ema_warmup": True},
    "cosine": {"optimizer.decay": "cosine"},
    "cosine-lr2e-3": {"optimizer.decay": "cosine", "optimizer.learning_rate": 2e-3},
    "batch128": {"training.batch_size": 128},
    "batch32": {"training.batch_size": 32},
    "ch48": {"model.ch": 48},
    "ch64": {"model.ch": 64},
    "ch64-g16": {"model.ch": 64, "model.num_groups": 16},
    "groups4": {"model.num_groups": 4},
    "blocks2": {"model.num_res_blocks": 2},
    "dropout0.1": {"model.dropout": 0.1},
    "cosine-schedule": {"diffusion.schedule": "cosine"},
}
# The overrides that change what a step costs; the others share the default's step time.
_COST_KEYS = ("training.batch_size", "model.")


def cost_key(overrides: dict[str, object]) -> str:
    """The part of a recipe that sets its step time, as a stable string."""
    cost = {k: v for k, v in overrides.items() if any(k.startswith(c) for c in _COST_KEYS)}
    return json.dumps(cost, sort_keys=True)


def digits_config(overrides: dict[str, object]):
    """configs/digits.py with ``overrides`` applied (dotted keys)."""
    from diffjax.config.validation import load_config_file

    config = load_config_file(os.path.join(ROOT, "configs", "digits.py"))
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


def step_seconds(overrides: dict[str, object]) -> float:
    """Median seconds of the recipe's real training step (float32, idle machine assumed)."""
    from recipe import bench_train

    result = bench_train(digits_config(overrides), "float32", warmup=10, steps=30, runs=3)
    return float(result["step_s"])


def train(
    out: str, name: str, seed: int, steps: int, overrides: dict[str, object], mid: bool
) -> None:
    """``train.py`` for one recipe and seed: the eval loss every 100 steps, bits/dim and
    digits_fd at the end (and at the middle with ``mid``)."""
    workdir = os.path.join(out, name, f"seed{seed}")
    if os.path.exists(os.path.join(workdir, "done")):
        return
    flags = {
        "training.seed": seed,
        "training.num_train_steps": steps,
        "training.checkpoint_every_steps": steps,
        "training.sample_every_steps": steps,
        "evaluation.quality_every_steps": steps // 2 if mid else steps,
        # The end-of-run sample grid only shows the samples; a fast sampler keeps it cheap.
        "sampling.sampler": "dpm++",
        "sampling.num_steps": 20,
        **overrides,
    }
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config",
           os.path.join(ROOT, "configs", "digits.py"), "--workdir", workdir]  # fmt: skip
    cmd += [f"--config.{k}={v}" for k, v in flags.items()]
    t0 = time.time()
    with open(os.path.join(out, f"{name}-seed{seed}.log"), "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"error: {name} seed {seed} exited {rc}; see {log.name}")
    with open(os.path.join(workdir, "done"), "w") as f:
        f.write(f"{time.time() - t0:.1f}\n")


def curve(workdir: str) -> dict[int, dict[str, float]]:
    """step -> {eval_loss, bpd, digits_fd} from ``workdir/eval/step_<N>.json``."""
    points: dict[int, dict[str, float]] = {}
    eval_dir = os.path.join(workdir, "eval")
    for name in os.listdir(eval_dir) if os.path.isdir(eval_dir) else ():
        if not (name.startswith("step_") and name.endswith(".json")):
            continue
        with open(os.path.join(eval_dir, name)) as f:
            record = json.load(f)
        metrics = record["metrics"]
        point = {}
        if "eval_loss" in metrics:
            point["eval_loss"] = metrics["eval_loss"]["ema_loss"]
        if "bpd" in metrics:
            point["bpd"] = metrics["bpd"]["total_bpd"]
        if "digits_fd" in metrics:
            point["digits_fd"] = metrics["digits_fd"]["digits_fd"]
        points[int(record["step"])] = point
    return points


def summarize(out: str, names: list[str], seeds: list[int], plan: dict) -> str:
    """A markdown table: the last point of each curve, mean over seeds [min-max]."""

    def cell(values: list[float], fmt: str) -> str:
        if not values:
            return "-"
        mean = statistics.fmean(values)
        return f"{mean:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    rows = ["| recipe | overrides | steps | s/step | digits_fd (middle) | digits_fd | bits/dim "
            "| eval loss |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name in names:
        ends: dict[str, list[float]] = {"mid": [], "digits_fd": [], "bpd": [], "eval_loss": []}
        for seed in seeds:
            points = curve(os.path.join(out, name, f"seed{seed}"))
            if not points:
                continue
            steps = sorted(p for p in points if "digits_fd" in points[p])
            last = points[max(points)]
            for key in ("digits_fd", "bpd", "eval_loss"):
                if key in last:
                    ends[key].append(last[key])
            if len(steps) > 1:
                ends["mid"].append(points[steps[-2]]["digits_fd"])
        overrides = ", ".join(f"{k}={v}" for k, v in RECIPES[name].items()) or "-"
        rows.append(
            f"| {name} | {overrides} | {plan[name]['steps']} | {plan[name]['step_s']:.4f} | "
            f"{cell(ends['mid'], '.2f')} | {cell(ends['digits_fd'], '.2f')} | "
            f"{cell(ends['bpd'], '.3f')} | {cell(ends['eval_loss'], '.4f')} |"
        )
    return "\n".join(rows)


def main() -> None:
    from diffjax.kernels import cpu_runtime

    # Before any JAX computation, as train.py: the step is timed with the runtime it trains in.
    cpu_runtime.configure("float32")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder of the runs, their logs and plan.json")
    p.add_argument("--recipes", default="default", help="comma-separated names of RECIPES")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument(
        "--budget",
        type=float,
        default=0.0,
        help="seconds of training steps per run (0: the default recipe's 2,000 steps)",
    )
    p.add_argument("--round", type=int, default=100, help="steps are rounded to a multiple of this")
    p.add_argument("--mid", action="store_true", help="bits/dim and digits_fd at the middle too")
    p.add_argument("--plan-only", action="store_true", help="time the steps, train nothing")
    p.add_argument("--summary-only", action="store_true", help="print the table of finished runs")
    p.add_argument("--list", action="store_true", help="print the recipes and exit")
    args = p.parse_args()
    if args.list:
        for name, overrides in RECIPES.items():
            print(f"{name}: {overrides}")
        return
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"error: --recipes {','.join(unknown)} unknown; allowed: {', '.join(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    os.makedirs(args.out, exist_ok=True)

    # Step times, measured once per cost and kept across invocations (plan.json).
    plan_path = os.path.join(args.out, "plan.json")
    times: dict[str, float] = {}
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            times = json.load(f)["step_s"]
    for name in ["default", *names]:
        key = cost_key(RECIPES[name])
        if key not in times and not args.summary_only:
            times[key] = step_seconds(RECIPES[name])
            print(f"{name}: {times[key] * 1e3:.1f} ms/step", flush=True)
            with open(plan_path, "w") as f:
                json.dump({"step_s": times}, f, indent=1)
    budget = args.budget or DEFAULT_STEPS * times[cost_key({})]
    plan = {}
    for name in names:
        step_s = times[cost_key(RECIPES[name])]
        steps = max(args.round, int(round(budget / step_s / args.round)) * args.round)
        plan[name] = {"steps": steps, "step_s": step_s}
    print(f"budget {budget:.1f} s of training steps: "
          + ", ".join(f"{n} {v['steps']}" for n, v in plan.items()), flush=True)  # fmt: skip
    if not (args.plan_only or args.summary_only):
        for seed in seeds:
            for name in names:
                t0 = time.time()
                train(args.out, name, seed, plan[name]["steps"], RECIPES[name], args.mid)
                print(f"{name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
                print(summarize(args.out, names, seeds, plan), flush=True)
    print(summarize(args.out, names, seeds, plan))


if __name__ == "__main__":
    main()
