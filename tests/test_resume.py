"""Resumption and failure handling of the training loop, in process, on the tiny digits config.

Every run here shares one compiled training step (persistent compilation cache), so each
costs a few seconds. The reference is one uninterrupted 4-step run ("baseline"); XLA on CPU is
deterministic for a fixed program and inputs, so every path that must not change the run
(stop and resume, fallback to an older checkpoint, partial checkpoints left by a kill) is
compared with it bitwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from _train_helpers import (
    assert_trees_bitwise_equal,
    batch_digest,
    persistent_compilation_cache,
    run_cli,
    tiny_config,
)

from diffjax.data import pipeline as input_pipeline
from diffjax.training import checkpointing
from diffjax.training import loop as training

pytestmark = pytest.mark.slow  # every test trains or starts a process


@dataclasses.dataclass
class Pipeline:
    """Wraps the real training stream: records what each step consumed, can poison or signal."""

    consumed: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    nan_steps: frozenset[int] = frozenset()
    signal_at: dict[int, signal.Signals] = dataclasses.field(default_factory=dict)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Pipeline:
        real = input_pipeline.create_train_iterator

        def wrapped(config, *, start_step, **kwargs):
            for step, batch in enumerate(real(config, start_step=start_step, **kwargs), 1):
                step += start_step  # the batch of the update that produces `step`
                if step in self.nan_steps:
                    batch = dict(batch, image=np.full_like(batch["image"], np.nan))
                self.consumed.append((step, batch_digest(batch)))
                if step in self.signal_at:
                    os.kill(os.getpid(), self.signal_at[step])
                yield batch

        monkeypatch.setattr(input_pipeline, "create_train_iterator", wrapped)
        return self


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with persistent_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache"):
        yield tmp_path_factory.getbasetemp() / "jax_cache"


@pytest.fixture(scope="module")
def baseline(cache, tmp_path_factory):
    """4 uninterrupted steps into a workdir whose parents do not exist yet."""
    workdir = tmp_path_factory.mktemp("baseline") / "not" / "yet" / "run"
    with pytest.MonkeyPatch.context() as mp:
        pipeline = Pipeline().install(mp)
        result = training.train_and_evaluate(tiny_config(), workdir)
    assert [s for s, _ in pipeline.consumed] == [1, 2, 3, 4]
    return workdir, result, pipeline.consumed


def restore(workdir: Path, step: int) -> dict:
    """Items of checkpoint ``step`` as saved (templates: the baseline's own shapes)."""
    import orbax.checkpoint as ocp

    with checkpointing.create_checkpoint_manager(workdir, read_only=True) as manager:
        args = {name: ocp.args.StandardRestore() for name in checkpointing.TREE_ITEMS}
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    return {name: restored[name] for name in checkpointing.TREE_ITEMS}


def assert_same_state(result, reference, what: str) -> None:
    for name in ("params", "ema_params", "opt_state"):
        assert_trees_bitwise_equal(
            getattr(result.state, name), getattr(reference.state, name), f"{what}: {name}"
        )
    assert int(result.state.step) == int(reference.state.step)


def copy_checkpoints(source: Path, target: Path, steps: list[int]) -> Path:
    (target / "checkpoints").mkdir(parents=True)
    for step in steps:
        shutil.copytree(source / "checkpoints" / str(step), target / "checkpoints" / str(step))
    shutil.copy(source / "config.json", target / "config.json")
    return target


def test_missing_workdir_is_created_with_config_and_checkpoints(baseline):
    workdir, result, _ = baseline
    assert (workdir / "config.json").is_file()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    assert not result.stopped_early and int(result.state.step) == 4


def test_signal_stop_then_resume_is_bitwise_identical(baseline, tmp_path, monkeypatch, capsys):
    """Stop by SIGINT during step 3, resume to 4: same params, EMA, Adam state, data order."""
    _, reference, reference_order = baseline
    workdir = tmp_path / "run"
    pipeline = Pipeline(signal_at={3: signal.SIGINT}).install(monkeypatch)
    stopped = training.train_and_evaluate(tiny_config(), workdir)
    out = capsys.readouterr().out
    assert stopped.stopped_early and int(stopped.state.step) == 3
    # Step 3 is not a checkpoint step (every 2): this checkpoint exists because of the stop.
    assert f"stopped by SIGINT after step 3: checkpoint {workdir / 'checkpoints' / '3'}" in out
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3"]
    assert not list(workdir.glob("samples/*")), "no sampling on the way out"

    resumed = training.train_and_evaluate(tiny_config(), workdir)
    assert "resuming from the checkpoint at step 3" in capsys.readouterr().out
    assert_same_state(resumed, reference, "stop at 3 + resume")
    # The data order: the resumed run consumed exactly the batches 4 of the straight run.
    assert pipeline.consumed == reference_order
    assert_trees_bitwise_equal(restore(workdir, 4), restore(baseline[0], 4), "checkpoint 4")


def test_partial_temporary_checkpoints_are_ignored_and_removed(baseline, tmp_path, capsys):
    """What a kill -9 during a save leaves: unfinished step directories. Resume skips them."""
    source, reference, _ = baseline
    workdir = copy_checkpoints(source, tmp_path / "run", [2])
    ckpt = workdir / "checkpoints"
    # orbax 0.12.8 writes <step>.orbax-checkpoint-tmp and renames it when complete; older
    # versions appended a timestamp. Both hold some items and no completion marker.
    for name in ("3.orbax-checkpoint-tmp", "4.orbax-checkpoint-tmp-1700000000"):
        shutil.copytree(source / "checkpoints" / "4" / "params", ckpt / name / "params")
        (ckpt / name / "opt_state").mkdir()
        (ckpt / name / "opt_state" / "_METADATA").write_text("{trunc")
    resumed = training.train_and_evaluate(tiny_config(), workdir)
    assert "resuming from the checkpoint at step 2" in capsys.readouterr().out
    assert_same_state(resumed, reference, "resume from 2 past partial checkpoints")
    assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4"], "temporaries not cleaned up"


# orbax's background event loop may report the failed read of the damaged checkpoint once more
# after the loop closed ("Event loop is closed"); the restore itself has already failed cleanly.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(baseline, tmp_path, caplog, capsys):
    source, reference, _ = baseline
    workdir = copy_checkpoints(source, tmp_path / "run", [2, 4])
    # Damage the stored parameter data of the latest checkpoint (bit rot, a truncated copy).
    for f in (workdir / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0garbage" * 3)
    with caplog.at_level(logging.WARNING, logger="absl"):  # whatever verbosity an earlier test left
        resumed = training.train_and_evaluate(tiny_config(), workdir)
    assert "resuming from the checkpoint at step 2" in capsys.readouterr().out
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "checkpoint 4 cannot be restored" in warning and "falling back" in warning
    (moved,) = (workdir / "corrupt_checkpoints").iterdir()
    assert moved.name.startswith("4-") and (moved / "params").is_dir(), "kept for inspection"
    # Steps 3-4 were trained again from checkpoint 2: the same as the straight run.
    assert_same_state(resumed, reference, "fallback to 2")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


def test_config_with_other_shapes_is_an_error_naming_the_leaf(baseline, tmp_path):
    source, _, _ = baseline
    workdir = copy_checkpoints(source, tmp_path / "run", [2, 4])
    before = (workdir / "config.json").read_text()
    config = tiny_config(**{"model.ch": 64})
    with pytest.raises(checkpointing.CheckpointMismatchError) as err:
        training.train_and_evaluate(config, workdir)
    message = str(err.value)
    assert "\n" not in message
    assert "params/conv_in/kernel: checkpoint (3, 3, 1, 32) float32, config (3, 3, 1, 64)" in (
        message
    )
    assert str(workdir / "config.json") in message
    # Nothing was re-initialised or overwritten: the trained run is intact.
    assert (workdir / "config.json").read_text() == before
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    # A structural change (another block) names the leaves that are missing.
    config = tiny_config(**{"model.num_res_blocks": 2})
    with pytest.raises(checkpointing.CheckpointMismatchError, match="down_0_block_1/.*not in the"):
        training.train_and_evaluate(config, workdir)


def test_nan_with_stop_policy_names_the_step_and_last_good_checkpoint(cache, tmp_path, monkeypatch):
    Pipeline(nan_steps=frozenset({3})).install(monkeypatch)
    workdir = tmp_path / "run"
    with pytest.raises(training.NonFiniteError) as err:
        training.train_and_evaluate(tiny_config(**{"training.nan_policy": "stop"}), workdir)
    message = str(err.value)
    assert "non-finite loss or gradient at step 3" in message
    assert f"the last good checkpoint is {workdir / 'checkpoints' / '2'}" in message
    # Nothing after the bad step was written.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]


def test_nan_with_skip_policy_leaves_the_state_unchanged(baseline, tmp_path, monkeypatch, capsys):
    source, _, _ = baseline
    Pipeline(nan_steps=frozenset({3})).install(monkeypatch)
    config = tiny_config(**{"training.nan_policy": "skip", "training.num_train_steps": 3})
    result = training.train_and_evaluate(config, tmp_path / "run")
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row" in (
        capsys.readouterr().out
    )
    # Step 3 was skipped: params, EMA and Adam state are those after step 2, the step is 3.
    assert int(result.state.step) == 3
    after_2 = restore(source, 2)
    for name in ("params", "ema_params", "opt_state"):
        assert_trees_bitwise_equal(getattr(result.state, name), after_2[name], name)
    assert_trees_bitwise_equal(restore(tmp_path / "run", 3), after_2, "checkpoint 3")


def test_nan_with_skip_policy_stops_after_too_many_in_a_row(cache, tmp_path, monkeypatch):
    Pipeline(nan_steps=frozenset({2, 3})).install(monkeypatch)
    config = tiny_config(**{"training.nan_policy": "skip", "training.max_consecutive_skips": 1})
    with pytest.raises(training.NonFiniteError, match=r"2 consecutive steps \(2-3\)"):
        training.train_and_evaluate(config, tmp_path / "run")


def test_unwritable_workdir_is_a_clear_error(cache, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(training.WorkdirError, match="cannot be written") as err:
        training.train_and_evaluate(tiny_config(), blocker / "run")
    assert str(blocker / "run") in str(err.value) and "\n" not in str(err.value)


def test_cli_start_up_errors_are_one_line(cache, tmp_path):
    # An unwritable workdir, through train.py: one line, no traceback, status 1.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_cli(blocker / "run", cache)
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "cannot be written" in line and "Traceback" not in result.stderr
    # A dataset that is not prepared: the line says how to prepare it.
    empty = tmp_path / "empty_data_dir"
    empty.mkdir()
    result = run_cli(tmp_path / "run", cache, **{"data.name": "mnist", "data.data_dir": str(empty)})
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "not prepared" in line and "tfds build mnist --file_format=array_record" in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_changes_are_listed_on_resume(baseline, tmp_path, caplog):
    source, _, _ = baseline
    workdir = copy_checkpoints(source, tmp_path / "run", [4])
    config = tiny_config(**{"optimizer.learning_rate": 5e-4})
    with caplog.at_level(logging.WARNING, logger="absl"):  # whatever verbosity an earlier test left
        training.train_and_evaluate(config, workdir)  # nothing to train: already at step 4
    warning = "\n".join(r.getMessage() for r in caplog.records)
    before = tiny_config().optimizer.learning_rate
    assert f"optimizer.learning_rate: {before} -> 0.0005" in warning
    assert json.loads((workdir / "config.json").read_text())["optimizer"]["learning_rate"] == 5e-4
