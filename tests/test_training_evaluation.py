"""Evaluation during training (``config.evaluation``) on the tiny digits config, in process.

One run with evaluation on (the eval loss every 2 steps, bits/dim and digits_fd at step 4) is
compared bitwise with the same run without it; its records, TensorBoard tags and figure are
checked; and a SIGTERM that arrives while an evaluation runs stops the run with a checkpoint
from which it resumes to the same parameters. All runs share one compiled training step.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
from _train_helpers import assert_trees_bitwise_equal, persistent_compilation_cache, tiny_config

from diffjax import viz
from diffjax.training import evaluation
from diffjax.training import loop as training

pytestmark = pytest.mark.slow  # every test trains

EVAL_ON = {
    "evaluation.eval_every_steps": 2,
    "evaluation.eval_examples": 20,
    "evaluation.quality_every_steps": 4,
    "evaluation.bpd_examples": 6,
    "evaluation.num_samples": 16,
    "evaluation.sampler": "dpm++",
    "evaluation.num_steps": 2,
    "evaluation.batch_size": 8,
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with persistent_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache"):
        yield


@pytest.fixture(scope="module")
def baseline(cache, tmp_path_factory):
    """4 steps without evaluation."""
    return training.train_and_evaluate(tiny_config(), tmp_path_factory.mktemp("off") / "run")


@pytest.fixture(scope="module")
def evaluated(cache, tmp_path_factory):
    """The same 4 steps with evaluation on."""
    workdir = tmp_path_factory.mktemp("on") / "run"
    return workdir, training.train_and_evaluate(tiny_config(**EVAL_ON), workdir)


def assert_same_state(result, reference, what: str) -> None:
    for name in ("params", "ema_params", "opt_state"):
        assert_trees_bitwise_equal(
            getattr(result.state, name), getattr(reference.state, name), f"{what}: {name}"
        )
    assert int(result.state.step) == int(reference.state.step)


def read_record(workdir, step: int) -> dict:
    return json.loads((workdir / "eval" / f"step_{step}.json").read_text())


def test_evaluation_leaves_the_parameters_bitwise_equal(baseline, evaluated):
    _, result = evaluated
    assert_same_state(result, baseline, "evaluation on vs off")


def test_records_and_tensorboard_scalars(evaluated):
    workdir, _ = evaluated
    assert sorted(p.name for p in (workdir / "eval").glob("step_*.json")) == [
        "step_2.json",
        "step_4.json",
    ]
    early, last = read_record(workdir, 2), read_record(workdir, 4)
    assert set(early["metrics"]) == {"eval_loss"}
    assert set(last["metrics"]) == {"eval_loss", "bpd", "digits_fd"}
    assert last["step"] == 4 and last["params"] == "ema" and "jax" in last["versions"]
    loss = last["metrics"]["eval_loss"]
    assert loss["num_examples"] == 20 and loss["split"] == "test"
    assert all(math.isfinite(loss[k]) and loss[k] > 0 for k in ("loss", "ema_loss"))
    bpd = last["metrics"]["bpd"]
    assert bpd["num_examples"] == 6 and bpd["num_timesteps"] == 20
    assert len(bpd["terms_bpd"]) == 20 and math.isfinite(bpd["total_bpd"])
    fd = last["metrics"]["digits_fd"]
    assert fd["num_samples"] == 16 and fd["digits_fd"] > 0 and 1.0 <= fd["digits_is"] <= 10.0
    assert 0 < fd["real_train_fd"] < fd["digits_fd"]  # 16 real digits beat 2-step samples
    # The sampler and step count it used are recorded with it.
    assert fd["sampling"]["sampler"] == "dpm++" and fd["sampling"]["steps"] == 2
    # The digits classifier is trained once and cached in the run.
    assert (workdir / "eval" / "classifier_digits_test.npz").is_file()

    scalars = viz.read_scalars(workdir)
    for tag in ("eval/loss", "eval/ema_loss"):
        assert scalars[tag][0].tolist() == [2, 4], tag
    for tag in ("eval/bpd", "eval/digits_fd", "eval/digits_is", "eval/digits_fd_real"):
        assert scalars[tag][0].tolist() == [4], tag
    assert scalars["eval/bpd"][1][0] == pytest.approx(bpd["total_bpd"], rel=1e-6)
    assert scalars["eval/loss"][1][1] == pytest.approx(loss["loss"], rel=1e-6)


def test_evaluation_curves_figure(evaluated, tmp_path):
    workdir, _ = evaluated
    path = viz.evaluation_curves(workdir, tmp_path / "evaluation.png", size_px=(900, 300))
    assert path == str(tmp_path / "evaluation.png") and (tmp_path / "evaluation.svg").exists()


def test_sigterm_during_evaluation_saves_and_resumes(evaluated, baseline, tmp_path, monkeypatch):
    """SIGTERM while bits/dim runs at step 2: the evaluation ends unrecorded, the run stops
    after step 3 with its checkpoint, and the resumed run ends with the same parameters."""
    straight, _ = evaluated
    config = tiny_config(**{**EVAL_ON, "evaluation.quality_every_steps": 2})
    real = evaluation._bits_per_dim
    calls = []

    def bits_per_dim_then_signal(ev, ema, dog):
        calls.append(ev)
        if len(calls) == 1:  # the first evaluation only
            os.kill(os.getpid(), signal.SIGTERM)
        return real(ev, ema, dog)

    monkeypatch.setattr(evaluation, "_bits_per_dim", bits_per_dim_then_signal)
    workdir = tmp_path / "run"
    stopped = training.train_and_evaluate(config, workdir)
    assert stopped.stopped_early and int(stopped.state.step) == 3
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3"]
    # The eval loss of step 2 ran before the signal: the same fixed-noise value as the run
    # without interruption; the interrupted quality metrics were not recorded.
    record = read_record(workdir, 2)
    assert set(record["metrics"]) == {"eval_loss"}
    assert record["metrics"]["eval_loss"] == {
        **read_record(straight, 2)["metrics"]["eval_loss"],
        "time_s": record["metrics"]["eval_loss"]["time_s"],
    }

    resumed = training.train_and_evaluate(config, workdir)
    assert not resumed.stopped_early
    assert_same_state(resumed, baseline, "stopped during evaluation + resumed")
    assert set(read_record(workdir, 4)["metrics"]) == {"eval_loss", "bpd", "digits_fd"}
