"""One process of a two-process jax.distributed job on this machine (CPU, gloo collectives).

Started by tests/test_multihost.py as::

    python tests/_multihost_worker.py MODE PORT PROCESS_ID OUT_DIR

and writes OUT_DIR/result_<PROCESS_ID>.json. Modes:

* ``collectives``: a pmean across both processes, then two stop-agreement loops with
  diffjax.training.preemption.StopGuard: SIGINT to process 1 only (Python flag, all-gather
  agreement),
  then SIGTERM to process 1 only (JAX's preemption sync service).
* ``train``: ``diffjax.training.loop.train_and_evaluate`` on the tiny digits config, with
  evaluation during training on (tests/test_training_evaluation.py's EVAL_ON: every process
  evaluates its share), into the shared workdir OUT_DIR/run, recording the examples each step
  consumed and digests of the final state; then a resumed run of many steps that only process 1
  receives a SIGTERM in.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402

NUM_PROCESSES = 2


def _init(port: int, process_id: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=NUM_PROCESSES,
        process_id=process_id,
        initialization_timeout=60,
    )


def _stop_loop(process_id: int, sig: signal.Signals, signal_at: int, max_steps: int) -> dict:
    """Run pmapped steps until StopGuard says stop; process 1 signals itself at ``signal_at``."""
    from diffjax.training.preemption import StopGuard

    step_fn = jax.pmap(lambda x: jax.lax.pmean(x + 1.0, "d"), axis_name="d")
    x = np.zeros(jax.local_device_count(), np.float32)
    t_signal = None
    with StopGuard(sync_every_steps=3) as guard:
        for step in range(1, max_steps + 1):
            x = np.asarray(step_fn(x))
            time.sleep(0.01)  # the native notifier polls once a second: give it steps to run
            if process_id == 1 and step == signal_at:
                t_signal = time.monotonic()
                os.kill(os.getpid(), sig)
            if guard.should_stop(step):
                return {
                    "stop_step": step,
                    "reason": guard.reason,
                    "value": float(x[0]),
                    "latency_s": None if t_signal is None else time.monotonic() - t_signal,
                }
    return {"stop_step": None, "reason": None, "value": float(x[0]), "latency_s": None}


def collectives(process_id: int, out_dir: str) -> dict:
    # pmean over 2 processes x 2 devices of (global device index): (0+1+2+3)/4 = 1.5.
    f = jax.pmap(lambda v: jax.lax.pmean(v, "d"), axis_name="d")
    local = np.arange(jax.local_device_count(), dtype=np.float32)
    local += process_id * jax.local_device_count()
    mean = np.asarray(f(local)).tolist()
    sigint = _stop_loop(process_id, signal.SIGINT, signal_at=4, max_steps=100)
    sigterm = _stop_loop(process_id, signal.SIGTERM, signal_at=4, max_steps=1000)
    return {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "pmean": mean,
        "sigint": sigint,
        "sigterm": sigterm,
    }


def train(process_id: int, out_dir: str) -> dict:
    """4 steps from scratch with evaluation during training on (tests/test_training_evaluation.py's
    EVAL_ON: every process evaluates its share), then a resumed run that process 1 alone
    SIGTERMs at step 6."""
    from _train_helpers import example_digests, tiny_config, tree_digest
    from test_training_evaluation import EVAL_ON

    from diffjax.data import pipeline as input_pipeline
    from diffjax.training import loop as training

    consumed: dict[int, list[str]] = {}
    real = input_pipeline.create_train_iterator
    sigterm_at = 6 if process_id == 1 else None

    def recording(config, *, start_step, **kwargs):
        for step, batch in enumerate(real(config, start_step=start_step, **kwargs), 1):
            consumed[start_step + step] = example_digests(batch)
            if start_step + step == sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice to this host only
            yield batch

    def digests(result) -> dict[str, str]:
        return {
            name: tree_digest(getattr(result.state, name))
            for name in ("params", "ema_params", "opt_state")
        }

    input_pipeline.create_train_iterator = recording
    workdir = os.path.join(out_dir, "run")
    first = training.train_and_evaluate(tiny_config(**EVAL_ON), workdir)
    report = {"step": int(first.state.step), "consumed": dict(consumed), "digests": digests(first)}
    # The notifier polls once a second: steps continue meanwhile, up to the agreed one.
    config = tiny_config(**{"training.num_train_steps": 100_000, "training.keep_checkpoints": 100})
    t_start = time.monotonic()
    preempted = training.train_and_evaluate(config, workdir)
    report["preempted"] = {
        "step": int(preempted.state.step),
        "stopped_early": preempted.stopped_early,
        "digests": digests(preempted),
        "seconds": time.monotonic() - t_start,
    }
    return report


MODES = {"collectives": collectives, "train": train}


def main(argv: list[str]) -> None:
    mode, port, process_id, out_dir = argv[1], int(argv[2]), int(argv[3]), argv[4]
    _init(port, process_id)
    result = MODES[mode](process_id, out_dir)
    with open(os.path.join(out_dir, f"result_{process_id}.json"), "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
