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
import functools
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
    "lr3e-3": {"optimizer.learning_rate": 3e-3},
    "lr2e-3-ema0.999w": {
        "optimizer.learning_rate": 2e-3,
        "training.ema_decay": 0.999,
        "training.ema_warmup": True,
    },
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
    "groups4-lr2e-3": {"model.num_groups": 4, "optimizer.learning_rate": 2e-3},
    "blocks2": {"model.num_res_blocks": 2},
    "dropout0.1": {"model.dropout": 0.1},
    "cosine-schedule": {"diffusion.schedule": "cosine"},
}
# The overrides that change what a step costs; the others share the default's step time. The
# GroupNorm group count changes no work (the same sums over other slices), so it shares it too:
# timed apart, 4 groups read 97.0 ms against 104.5 for 8, which is the timing noise.
_COST_KEYS = ("training.batch_size", "model.")
_FREE_KEYS = ("model.num_groups",)


def cost_key(overrides: dict[str, object]) -> str:
    """The part of a recipe that sets its step time, as a stable string."""
    cost = {k: v for k, v in overrides.items()
            if any(k.startswith(c) for c in _COST_KEYS) and k not in _FREE_KEYS}  # fmt: skip
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


@functools.cache
def _classifier(out: str):
    """The digits classifier of evaluation during training, its config, the train images and
    the reference statistics of its features on each split (test: the metric of
    ``diffjax evaluate``; train: 1,500 digits, the reference that resolves a model near the
    data's own floor)."""
    from diffjax.data import pipeline
    from diffjax.evaluation import digits_classifier as dc
    from diffjax.evaluation import fid

    config = digits_config({})
    train = pipeline.load_split_as_array(config, config.data.train_split)
    test = pipeline.load_split_as_array(config, config.data.eval_split)
    cfg = dc.ClassifierConfig(num_classes=int(config.data.num_classes))
    cache = os.path.join(out, "classifier_digits_test.npz")
    params, _, _ = dc.get_classifier(train, test, cache_path=cache, cfg=cfg)
    refs = {name: fid.compute_statistics(dc.classifier_outputs(params, split[0], cfg)[0])
            for name, split in (("test", test), ("train", train))}  # fmt: skip
    return params, cfg, train[0], refs


def fd_against(out: str, images) -> dict[str, float]:
    """digits_fd of uint8 ``images`` [N, 8, 8, 1] against the test and the train split."""
    from diffjax.evaluation import digits_classifier as dc
    from diffjax.evaluation import fid

    params, cfg, _, refs = _classifier(out)
    stats = fid.compute_statistics(dc.classifier_outputs(params, images, cfg)[0])
    return {name: float(fid.frechet_distance_stats(stats, ref)) for name, ref in refs.items()}


def real_data_floor(out: str, num: int, seeds: list[int]) -> list[dict[str, float]]:
    """digits_fd of ``num`` real training digits (drawn per seed, as evaluation's
    ``real_train_fd`` draws them) against each split: what a generator that had learnt the
    training distribution exactly would score."""
    from diffjax.evaluation.run_metrics import real_train_fd

    params, cfg, train_images, refs = _classifier(out)
    return [{name: real_train_fd(train_images, num, ref, params, cfg, seed=seed)
             for name, ref in refs.items()} for seed in seeds]  # fmt: skip


def score(workdir: str, out: str, num: int = 512, seeds: tuple[int, ...] = (0, 1)) -> dict:
    """digits_fd against both splits of ``num`` DPM-Solver++-20 samples of the run's EMA
    parameters per sample seed, mean over ``seeds``; kept in ``workdir/score.json``."""
    path = os.path.join(workdir, "score.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    import jax
    import numpy as np

    from diffjax.run import load_run

    run = load_run(workdir)
    values = []
    for seed in seeds:
        x = np.asarray(run.sample(jax.random.key(seed), num, sampler="dpm++", steps=20))
        values.append(fd_against(out, np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)))
    result = {name: statistics.fmean(v[name] for v in values) for name in values[0]}
    with open(path, "w") as f:
        json.dump(result, f)
    return result


def summarize(
    out: str, names: list[str], seeds: list[int], plan: dict, with_scores: bool = False
) -> str:
    """A markdown table: the last point of each curve, mean over seeds (min-max); with
    ``with_scores`` also digits_fd against the train split (:func:`score`)."""

    def cell(values: list[float], fmt: str) -> str:
        if not values:
            return "-"
        mean = statistics.fmean(values)
        return f"{mean:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

    rows = ["| recipe | overrides | steps | s/step | digits_fd (middle) | digits_fd | digits_fd "
            "vs train | bits/dim | eval loss |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name in names:
        ends: dict[str, list[float]] = {"mid": [], "digits_fd": [], "bpd": [], "eval_loss": [],
                                        "train": []}  # fmt: skip
        for seed in seeds:
            workdir = os.path.join(out, name, f"seed{seed}")
            points = curve(workdir)
            if not points:
                continue
            if with_scores and os.path.exists(os.path.join(workdir, "done")):
                ends["train"].append(score(workdir, out)["train"])
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
            f"{cell(ends['train'], '.2f')} | "
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
    p.add_argument(
        "--floor",
        type=int,
        default=0,
        help="also score this many real training digits per seed (the data's floor)",
    )
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
    print(summarize(args.out, names, seeds, plan, with_scores=True))
    if args.floor:
        values = real_data_floor(args.out, args.floor, seeds)
        for split in ("test", "train"):
            v = [x[split] for x in values]
            print(f"real training digits ({args.floor} per seed), digits_fd against the {split} "
                  f"split: {statistics.fmean(v):.2f} ({min(v):.2f}-{max(v):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
