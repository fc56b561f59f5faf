"""Two jax.distributed processes on this machine (CPU, gloo): collectives and stop agreement.

Each test starts tests/_multihost_worker.py twice (process 0 and 1, two CPU devices each, so
four global devices) against a coordinator on a free local port, and compares what each
process wrote.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_multihost_worker.py")
REPO = WORKER.parent.parent
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(
    mode: str, out_dir: Path, *extra: str, cache_dir: Path | None = None
) -> list[dict]:
    """Run both processes of ``mode``; return their results, failing with their output."""
    port = _free_port()
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",  # as the test process: compile speed first
    )
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.pop("JAX_PLATFORMS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(port), str(i), str(out_dir), *extra],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{outputs[i][-4000:]}"
    return [json.loads((out_dir / f"result_{i}.json").read_text()) for i in range(2)]


@pytest.mark.slow
def test_collectives_and_stop_agreement(tmp_path):
    r0, r1 = run_two_processes("collectives", tmp_path)
    for r in (r0, r1):
        assert r["process_count"] == 2 and r["device_count"] == 4
        # Mean of the global device indices 0..3 over both processes.
        assert r["pmean"] == [1.5, 1.5]

    # SIGINT reached process 1 only; both must stop after the same step (otherwise one would
    # hang in the next collective), at the first all-gather at or after the signal (step 6:
    # signal at step 4, agreement every 3 steps).
    assert r0["sigint"]["stop_step"] == r1["sigint"]["stop_step"] == 6
    assert r1["sigint"]["reason"] == "SIGINT"
    assert r0["sigint"]["reason"] == "a stop request on another process"
    assert r0["sigint"]["value"] == r1["sigint"]["value"] == 6.0  # six identical pmapped steps

    # SIGTERM to process 1 only goes through JAX's preemption sync service: both processes get
    # the same sync step, later than the signal (the notifier polls once a second).
    s0, s1 = r0["sigterm"]["stop_step"], r1["sigterm"]["stop_step"]
    assert s0 is not None and s0 == s1 and s0 > 4
    assert r0["sigterm"]["reason"] == r1["sigterm"]["reason"] == "preemption notice (SIGTERM)"
    assert r0["sigterm"]["value"] == r1["sigterm"]["value"] == float(s0)


@pytest.mark.slow
def test_two_processes_train_on_disjoint_shards_to_identical_state(tmp_path, tmp_path_factory):
    from _train_helpers import example_digests, tiny_config, tree_digest

    from diffjax.data import pipeline as input_pipeline
    from diffjax.training import checkpointing

    config = tiny_config()
    input_pipeline.num_examples(config, "train")  # prepare the digits data before both start
    cache_dir = tmp_path_factory.getbasetemp() / "jax_cache"  # shared with the other tests
    r0, r1 = run_two_processes("train", tmp_path, cache_dir=cache_dir)
    # (Evaluation was on in the first run: it must not have changed anything checked here.)
    assert r0["step"] == r1["step"] == 4
    # Every process holds bitwise the same parameters, EMA and optimizer state: they applied
    # the same all-reduced gradients.
    assert r0["digests"] == r1["digests"]

    # Each step, the two processes read disjoint halves whose concatenation is exactly the
    # global batch a single process would read at that step.
    single = input_pipeline.create_train_iterator(
        config, start_step=0, process_index=0, process_count=1, num_threads=0
    )
    for step in range(1, 5):
        shard0, shard1 = r0["consumed"][str(step)], r1["consumed"][str(step)]
        assert len(shard0) == len(shard1) == 4
        assert not set(shard0) & set(shard1), f"step {step}: processes share examples"
        assert shard0 + shard1 == example_digests(next(single)), f"step {step}"

    # The checkpoints both processes saved together are complete and hold that state (the
    # resumed run below keeps every checkpoint).
    workdir = tmp_path / "run"
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert steps[:2] == [2, 4] and all(
        p.name.isdigit() for p in (workdir / "checkpoints").iterdir()
    )
    import orbax.checkpoint as ocp

    with checkpointing.create_checkpoint_manager(workdir, read_only=True) as manager:
        args = {name: ocp.args.StandardRestore() for name in checkpointing.TREE_ITEMS}
        restored = manager.restore(4, args=ocp.args.Composite(**args, meta=ocp.args.JsonRestore()))
    assert restored["meta"]["num_processes"] == 2 and restored["meta"]["step"] == 4
    for name in checkpointing.TREE_ITEMS:
        assert tree_digest(restored[name]) == r0["digests"][name], name

    # Then a resumed run: SIGTERM reached process 1 only (at step 6). Both processes stopped
    # after the same step, with the same state, and saved it together.
    p0, p1 = r0["preempted"], r1["preempted"]
    assert p0["stopped_early"] and p1["stopped_early"]
    assert p0["step"] == p1["step"] >= 6 and p0["digests"] == p1["digests"]
    assert str(p0["step"]) in [p.name for p in (workdir / "checkpoints").iterdir()]
    with checkpointing.create_checkpoint_manager(workdir, read_only=True) as manager:
        restored = manager.restore(p0["step"], args=ocp.args.Composite(**args))
    for name in checkpointing.TREE_ITEMS:
        assert tree_digest(restored[name]) == p0["digests"][name], name
    print(f"SIGTERM to process 1 at step 6: both stopped after step {p0['step']}")

    # Evaluation during training in the first run: the shares add up to the configured subsets
    # and samples, and process 0 wrote the record.
    metrics = json.loads((workdir / "eval" / "step_4.json").read_text())["metrics"]
    assert set(metrics) == {"eval_loss", "bpd", "digits_fd"}
    assert metrics["eval_loss"]["num_examples"] == 20  # psum over both processes' devices
    bpd = metrics["bpd"]  # 6 examples: 4 on process 0, 2 on process 1
    assert bpd["num_examples"] == 6 and len(bpd["terms_bpd"]) == 20
    assert 0 < bpd["total_bpd"] < 100 and bpd["total_bpd"] > bpd["prior_bpd"]
    fd = metrics["digits_fd"]  # 8 samples from each process, gathered
    assert fd["num_samples"] == 16 and fd["sampling"]["num_processes"] == 2
    assert fd["digits_fd"] > 0
