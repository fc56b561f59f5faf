"""Quality against steps: the digits metric of DDPM, DDIM and DPM-Solver++ samples of one run.

For every row (sampler, steps) and seed, ``--num`` samples from the run's EMA parameters (one
compiled call, compiled before it is timed), their ``digits_fd`` (Frechet distance in the
features of the digits classifier) against the real test split, as ``python -m
diffjax.evaluate``, and against the train split, and the wall time of the call; a markdown table
with the mean over seeds. The test split (297 digits) is what the metric is defined on, but real
training digits themselves score about 10 against it (``bench/digits_recipes.py --floor``), so
near that floor the train split (1,500 digits; real digits score about 1) tells samplers apart.

    python train.py                                   # the digits default -> workdirs/digits
    python bench/sampler_quality.py --workdir workdirs/digits --num 500 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import environment  # noqa: E402

from diffjax.data import images
from diffjax.data import pipeline as input_pipeline  # noqa: E402
from diffjax.evaluation import digits_classifier as dc  # noqa: E402
from diffjax.evaluation import fid  # noqa: E402
from diffjax.run import load_run, resolve_sampling_options, sample_with_params  # noqa: E402

DEFAULT_ROWS = "ddpm:1000,ddim:5,ddim:10,ddim:20,ddim:50,dpm++:5,dpm++:10,dpm++:20,dpm++:50"


def _rows(spec: str) -> list[tuple[str, int]]:
    return [(name, int(steps)) for name, steps in (r.split(":") for r in spec.split(","))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a digits or MNIST run")
    p.add_argument("--num", type=int, default=500, help="samples per row and seed")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default=DEFAULT_ROWS, help="SAMPLER:STEPS,...")
    p.add_argument("--order", type=int, default=2, help="DPM-Solver++ order")
    p.add_argument("--spacing", default="logsnr", help="DPM-Solver++ levels")
    args = p.parse_args()

    print(environment(), flush=True)
    run = load_run(args.workdir)
    config = run.config
    train = input_pipeline.load_split_as_array(config, config.data.train_split)
    test = input_pipeline.load_split_as_array(config, config.data.eval_split)
    cfg = dc.ClassifierConfig(num_classes=int(config.data.get("num_classes") or 10))
    cache = os.path.join(args.workdir, "eval", f"classifier_{config.data.name}_test.npz")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    classifier, accuracy, _ = dc.get_classifier(train, test, cache_path=cache, cfg=cfg)
    refs = {name: fid.compute_statistics(dc.classifier_outputs(classifier, split[0], cfg)[0])
            for name, split in (("test", test), ("train", train))}  # fmt: skip
    print(
        f"run {args.workdir} step {run.step}; classifier test accuracy {accuracy:.3f}; "
        f"references: {test[0].shape[0]} test and {train[0].shape[0]} train images; "
        f"{args.num} samples per row and seed"
    )
    devices = tuple(jax.local_devices()[:1])
    seeds = [int(s) for s in args.seeds.split(",")]
    table = []
    for name, steps in _rows(args.rows):
        sampler, options = resolve_sampling_options(
            config, sampler=name, steps=steps, order=args.order, spacing=args.spacing
        )
        static = dict(model=run.model, shape=(args.num, *run.image_shape), sampler=sampler,
                      guidance_scale=0.0, options=tuple(sorted(options.items())),
                      devices=devices)  # fmt: skip
        key = jax.random.key(seeds[0])
        t0 = time.perf_counter()
        compiled = sample_with_params.lower(run.params, run.schedule, key, None, **static).compile()
        compile_s = time.perf_counter() - t0
        fds, secs = {name: [] for name in refs}, []
        for seed in seeds:
            t0 = time.perf_counter()
            x = compiled(run.params, run.schedule, jax.random.key(seed), None)
            x = np.asarray(jax.block_until_ready(x))
            secs.append(time.perf_counter() - t0)
            stats = fid.compute_statistics(
                dc.classifier_outputs(classifier, images.to_uint8(x), cfg)[0]
            )
            for ref, values in fds.items():
                values.append(fid.frechet_distance_stats(stats, refs[ref]))
        cells = {ref: f"{statistics.mean(v):.2f}" + (f" ({min(v):.2f}-{max(v):.2f})"
                                                      if len(v) > 1 else "")
                 for ref, v in fds.items()}  # fmt: skip
        row = (name, steps, cells["test"], cells["train"], statistics.median(secs), compile_s)
        table.append(row)
        print(
            f"{name} {steps} steps: digits_fd {row[2]} against test, {row[3]} against train, "
            f"{row[4]:.2f} s per {args.num} samples, compile {compile_s:.1f} s",
            flush=True,
        )
    print(f"\n| sampler | steps | digits_fd vs test (mean of {len(seeds)} seeds) | vs train | "
          f"wall s / {args.num} samples | compile s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for name, steps, fd_test, fd_train, sec, comp in table:
        print(f"| {name} | {steps} | {fd_test} | {fd_train} | {sec:.2f} | {comp:.1f} |")


if __name__ == "__main__":
    main()
