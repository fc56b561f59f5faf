"""Run directories: config.json, training checkpoints, EMA restore and inference-only runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax.models import create_model
from diffjax.training import checkpointing
from diffjax.training.state import create_optimizer

REPO = Path(__file__).resolve().parent.parent


def digits_config():
    spec = importlib.util.spec_from_file_location("digits_config", REPO / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def random_tree(seed: int):
    """A small nested parameter tree with distinct random values."""
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": rng.normal(size=(3, 3, 1, 4)).astype(np.float32)},
        "bias": rng.normal(size=(4,)).astype(np.float32),
    }


def digits_params(seed: int):
    """Random arrays shaped like the digits U-Net parameters (eval_shape: nothing compiles)."""
    config = digits_config()
    model = create_model(config)
    shapes = jax.eval_shape(
        lambda r: model.init(
            {"params": r}, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), train=False
        )["params"],
        jax.random.key(0),
    )
    rng = np.random.default_rng(seed)
    return config, jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)


def test_config_round_trips_through_json(tmp_path):
    config = digits_config()
    path = checkpointing.save_config(tmp_path / "run", config)
    assert path == tmp_path / "run" / "config.json"
    loaded = checkpointing.load_config(tmp_path / "run")
    assert loaded.model.ch_mult == (1, 2) and isinstance(loaded.model.attn_resolutions, tuple)
    assert loaded.data.data_dir is None
    assert loaded.to_dict() == {
        section: {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
        for section, values in config.to_dict().items()
    }
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        checkpointing.load_config(tmp_path / "elsewhere")


def test_training_checkpoint_round_trip_keeps_the_latest(tmp_path):
    config = digits_config()
    tx = create_optimizer(config.optimizer)
    params = random_tree(0)
    # Adam moments from two updates, so that mu, nu and the counts are not trivial.
    opt_state = tx.init(params)
    for k in range(2):
        _, opt_state = tx.update(random_tree(10 + k), opt_state, params)
    saved = {}
    with checkpointing.create_checkpoint_manager(tmp_path, keep=2) as manager:
        assert (
            checkpointing.restore_training_checkpoint(
                manager, params=params, ema_params=params, opt_state=opt_state
            )
            is None
        )
        for step in (10, 20, 30):
            saved[step] = (random_tree(step), random_tree(step + 1))
            checkpointing.save_training_checkpoint(
                manager,
                step,
                params=saved[step][0],
                ema_params=saved[step][1],
                opt_state=opt_state,
                meta={"seed": 7, "data_position": step},
            )
        manager.wait_until_finished()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["20", "30"]

    with checkpointing.create_checkpoint_manager(tmp_path, keep=2) as manager:
        trees, meta = checkpointing.restore_training_checkpoint(
            manager, params=params, ema_params=params, opt_state=opt_state
        )
        older, _ = checkpointing.restore_training_checkpoint(
            manager, params=params, ema_params=params, opt_state=opt_state, step=20
        )
    assert meta == {"step": 30, "seed": 7, "data_position": 30}
    assert jax.tree.structure(trees["opt_state"]) == jax.tree.structure(opt_state)
    for got, want in ((trees["params"], saved[30][0]), (trees["ema_params"], saved[30][1])):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)  # lossless: float32 written as float32
    for a, b in zip(jax.tree.leaves(trees["opt_state"]), jax.tree.leaves(opt_state), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    np.testing.assert_array_equal(older["params"]["bias"], saved[20][0]["bias"])


def test_restore_ema_params_explains_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        checkpointing.restore_ema_params(tmp_path)
    message = str(err.value)
    assert f"no checkpoint in {tmp_path / 'checkpoints'}" in message
    assert "train first with" in message and "python train.py" in message
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpointing.restore_ema_params(tmp_path)


def test_relative_workdir_is_made_absolute(tmp_path, monkeypatch):
    # orbax rejects relative checkpoint paths; `python train.py` defaults to workdirs/<config>.
    monkeypatch.chdir(tmp_path)
    params = random_tree(0)
    checkpointing.save_inference_run("workdirs/rel", digits_config(), params, params, step=3)
    assert (tmp_path / "workdirs" / "rel" / "checkpoints" / "3").is_dir()
    assert checkpointing.restore_ema_params("workdirs/rel")[1] == 3


def test_inference_run_has_no_optimizer_state_and_loads_as_a_run(tmp_path):
    config, params = digits_params(0)
    _, ema = digits_params(1)
    ckpt = checkpointing.save_inference_run(tmp_path, config, params, ema, step=1234)
    assert ckpt == tmp_path / "checkpoints" / "1234"
    assert {p.name for p in ckpt.iterdir()} >= {"params", "ema_params", "meta"}
    assert not (ckpt / "opt_state").exists()

    restored, step = checkpointing.restore_ema_params(tmp_path)
    assert step == 1234
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(ema), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint 99 .* steps there: \[1234\]"):
        checkpointing.restore_ema_params(tmp_path, step=99)

    with checkpointing.create_checkpoint_manager(tmp_path) as manager:
        with pytest.raises(ValueError, match="no optimizer state .* cannot resume training"):
            checkpointing.restore_training_checkpoint(
                manager, params=params, ema_params=ema, opt_state=()
            )

    run = diffjax.load_run(tmp_path)  # what sampling and evaluation read
    assert run.step == 1234 and run.config.model.ch_mult == (1, 2)
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(ema), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
