"""The data-parallel training step: device-count invariance, optimizer, EMA, label dropout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import jax_utils

from diffjax.core.schedules import make_schedule
from diffjax.data.digits import digits_uint8
from diffjax.models import create_model
from diffjax.training.state import create_learning_rate_fn, create_train_state
from diffjax.training.step import AXIS_NAME, make_train_step, per_device_batch_size

REPO = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 8
LR = 1e-3


def tiny_config(**training):
    """The digits config shrunk to one U-Net level without attention (cheap to compile)."""
    spec = importlib.util.spec_from_file_location("digits_config", REPO / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.ch_mult = (1,)
    config.model.attn_resolutions = ()
    config.diffusion.num_timesteps = 100
    config.training.batch_size = GLOBAL_BATCH
    config.optimizer.learning_rate = LR
    config.optimizer.warmup_steps = 0
    config.training.update(training)
    return config


def digits_batch(step: int) -> dict[str, np.ndarray]:
    """A deterministic global batch of real digits in [-1, 1] with their labels."""
    images, labels = digits_uint8()
    idx = (np.arange(GLOBAL_BATCH) * 37 + step * GLOBAL_BATCH) % 1500
    x = images[idx, :, :, None].astype(np.float32) / 127.5 - 1.0  # [B, 8, 8, 1]
    return {"image": x, "label": labels[idx].astype(np.int32)}


def run_steps(config, devices, num_steps: int):
    """num_steps pmapped updates over ``devices``: (initial state, final state, metrics)."""
    model = create_model(config)
    schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    state = create_train_state(config, model, jax.random.key(0))
    step = make_train_step(config, model, schedule, jax.random.key(1))
    p_step = jax.pmap(step, axis_name=AXIS_NAME, devices=devices)
    n = len(devices)
    p_state = jax_utils.replicate(state, devices, axis_name=AXIS_NAME)
    history = []
    for k in range(num_steps):
        batch = jax.tree.map(lambda v: v.reshape(n, -1, *v.shape[1:]), digits_batch(k))
        p_state, metrics = p_step(p_state, batch)
        history.append(unreplicated(metrics))
    return state, unreplicated(p_state), history


@pytest.fixture(scope="module")
def two_device_run():
    """40 steps on the 2 fake CPU devices of conftest, every label dropped to the null class."""
    assert jax.local_device_count() == 2, "conftest sets 2 fake CPU devices"
    config = tiny_config(class_dropout=1.0)
    config.model.num_classes = 10
    return config, *run_steps(config, jax.local_devices(), 40)


def unreplicated(tree):
    """Replica 0 of a pmapped result, as host arrays."""
    return jax.device_get(jax.tree.map(lambda v: v[0], tree))


@pytest.mark.slow
def test_two_devices_match_one_device_with_the_same_global_batch():
    # Adam with a large eps is a well-conditioned map of the gradient: its update
    # lr * m / (sqrt(v) + eps) changes by at most lr * |dg| / eps (sqrt(v) >= 0). With the tiny
    # default eps, a gradient entry that cancels to ~0 flips the update between 0 and +-lr on
    # rounding noise, so parameters would not be comparable; the loss and grad norm still are.
    config = tiny_config(class_dropout=0.0)
    config.model.num_classes = 10
    config.optimizer.eps = 1.0
    steps = 3
    _, one, history1 = run_steps(config, jax.local_devices()[:1], steps)
    _, two, history2 = run_steps(config, jax.local_devices(), steps)
    for m1, m2 in zip(history1, history2, strict=True):
        # Same draws per example; only the order of float32 sums differs (a mean of two
        # per-device means vs one mean over 8): agreement to a few float32 ulps of O(1) values.
        np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
        np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    # Gradient entries are sums of O(grad_norm) terms accurate to ~1e-6 relative in float32, so
    # |dg| <= 1e-5 per step; over 3 steps the parameters may differ by 3 * lr * 1e-5 / eps.
    tol = steps * LR * 1e-5 / config.optimizer.eps
    leaves1, leaves2 = jax.tree.leaves(one.params), jax.tree.leaves(two.params)
    moved = max(np.max(np.abs(p)) for p in jax.tree.leaves(two.params["conv_out"]))
    assert moved > 100 * tol, "the comparison must be of parameters that actually moved"
    for p1, p2 in zip(leaves1, leaves2, strict=True):
        np.testing.assert_allclose(p1, p2, atol=tol, rtol=0)
    assert int(one.step) == int(two.step) == steps
    # Without label dropout exactly the labels of step 3 are trained (trained_embedding_rows).
    assert trained_embedding_rows(two) == set(digits_batch(2)["label"].tolist())


@pytest.mark.slow
def test_first_loss_is_the_noise_power_and_training_reduces_it(two_device_run):
    _, _, _, history = two_device_run
    # conv_out is zero-initialised, so at step 0 the network outputs 0 and the eps-MSE is the
    # mean of eps^2 over N = 8 * 64 values: 1 with standard deviation sqrt(2 / N) = 0.0625.
    assert abs(history[0]["loss"] - 1.0) < 4 * np.sqrt(2.0 / (GLOBAL_BATCH * 64))
    late = np.mean([h["loss"] for h in history[-10:]])
    assert late < 0.6, f"loss after 30-40 steps {late:.3f}; started at {history[0]['loss']:.3f}"


@pytest.mark.slow
def test_learning_rate_ema_and_grad_norm_metrics(two_device_run):
    config, initial, final, history = two_device_run
    # No warmup: the learning rate is constant.
    assert all(h["learning_rate"] == pytest.approx(LR) for h in history)
    assert all(np.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in history)
    # EMA: e_k = d e_{k-1} + (1 - d) p_k with e_0 = p_0. Check the recursion's closed-form bound:
    # e_K - p_0 = (1 - d) sum_k d^{K-k} (p_k - p_0), so |e_K - p_0| <= (1 - d^K) max|p_k - p_0|.
    d = config.training.ema_decay
    k = len(history)
    for e, p0, pk in zip(
        jax.tree.leaves(final.ema_params),
        jax.tree.leaves(initial.params),
        jax.tree.leaves(final.params),
        strict=True,
    ):
        moved = np.max(np.abs(np.asarray(pk) - np.asarray(p0)))
        # Adam moves a parameter by at most ~lr per step, so max_k |p_k - p_0| <= K lr.
        bound = (1 - d**k) * k * LR * 1.01 + 1e-7
        assert np.max(np.abs(np.asarray(e) - np.asarray(p0))) <= bound
        assert moved <= k * LR * 1.01 + 1e-7


def test_learning_rate_warmup_is_linear_then_constant():
    config = tiny_config()
    config.optimizer.warmup_steps = 10
    lr = create_learning_rate_fn(config.optimizer)
    # Official DDPM: lr * min(step / warmup, 1).
    for step in (0, 1, 5, 10, 11, 1000):
        assert float(lr(step)) == pytest.approx(LR * min(step / 10, 1.0), rel=1e-6, abs=1e-12)
    config.optimizer.warmup_steps = 0
    assert float(create_learning_rate_fn(config.optimizer)(0)) == pytest.approx(LR)


def test_cosine_decay_follows_the_closed_form_after_warmup():
    import math

    config = tiny_config()
    config.optimizer.warmup_steps = 10
    config.optimizer.decay = "cosine"
    lr = create_learning_rate_fn(config.optimizer, 110)
    # Linear warm-up, then lr (1 + cos(pi (s - w) / (N - w))) / 2: peak at w, half at the middle
    # of the decay, 0 at N (and after it).
    for step in (0, 5, 10, 35, 60, 85, 109, 110, 200):
        s = min(max(step - 10, 0), 100)
        expected = (
            LR * min(step / 10, 1.0) if step < 10 else LR * (1 + math.cos(math.pi * s / 100)) / 2
        )
        assert float(lr(step)) == pytest.approx(expected, rel=1e-5, abs=1e-10), step
    with pytest.raises(ValueError, match="num_train_steps"):
        create_learning_rate_fn(config.optimizer)


def test_ema_warmup_forgets_the_initialisation():
    from diffjax.training.state import ema_decay_at

    # (1 + n) / (10 + n) below the decay, the decay above: 0.1 at the first update.
    for n in (0, 1, 10, 100, 1000, 5000):
        expected = min(0.999, (1 + n) / (10 + n))
        assert float(ema_decay_at(n, 0.999, True)) == pytest.approx(expected, rel=1e-6)
    assert ema_decay_at(123, 0.999, False) == 0.999
    # One update from the same state: with warm-up the EMA is 0.1 init + 0.9 new params.
    config = tiny_config(ema_decay=0.999, ema_warmup=True)
    devices = jax.devices()[:1]
    initial, final, _ = run_steps(config, devices, 1)
    for e, p0, p1 in zip(*(jax.tree.leaves(t) for t in (final.ema_params, initial.params,
                                                        final.params)), strict=True):  # fmt: skip
        np.testing.assert_allclose(e, 0.1 * np.asarray(p0) + 0.9 * np.asarray(p1), rtol=1e-5,
                                   atol=1e-7)  # fmt: skip


def test_gradient_clipping_applies_before_adam():
    config = tiny_config()
    config.optimizer.grad_clip = 0.5
    from diffjax.training.state import create_optimizer

    tx = create_optimizer(config.optimizer)
    params = {"w": np.zeros(4, np.float32)}
    grads = {"w": np.array([3.0, 4.0, 0.0, 0.0], np.float32)}  # global norm 5
    state = tx.init(params)
    clip = optax.clip_by_global_norm(0.5)
    clipped, _ = clip.update(grads, clip.init(params))
    np.testing.assert_allclose(optax.tree.norm(clipped), 0.5, rtol=1e-6)
    # Adam's first bias-corrected step is lr * g / (|g| + eps): the same for clipped and raw g.
    updates, _ = tx.update(grads, state, params)
    expected = -LR * np.array([1.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-5, atol=1e-12)


def test_grad_clip_zero_means_no_clipping():
    from diffjax.training.state import create_optimizer

    config = tiny_config()
    params = {"w": np.zeros(4, np.float32)}
    # Global norms 5 and 50 on a shared coordinate: clipping both to 0.5 changes the ratio
    # Adam sees there, so its second update differs from unclipped Adam.
    grads = [{"w": np.array(g, np.float32)} for g in ([3.0, 4.0, 0.0, 0.0], [0.0, 40.0, 30.0, 0.0])]
    opt = config.optimizer
    reference = optax.adam(create_learning_rate_fn(opt), b1=opt.beta1, b2=opt.beta2, eps=opt.eps)
    for grad_clip, same in ((0.0, True), (0.5, False)):
        config.optimizer.grad_clip = grad_clip
        tx = create_optimizer(config.optimizer)
        state, ref_state = tx.init(params), reference.init(params)
        for g in grads:
            updates, state = tx.update(g, state, params)
            ref_updates, ref_state = reference.update(g, ref_state, params)
        close = np.allclose(updates["w"], ref_updates["w"], rtol=1e-6, atol=1e-12)
        assert close == same, (grad_clip, updates["w"], ref_updates["w"])


def trained_embedding_rows(state) -> set[int]:
    """Class-embedding rows that received a nonzero gradient: Adam's first moment is not zero.

    conv_out and every residual branch's last conv start at zero, so the class embedding (added
    to the timestep embedding, which enters a block before its zero-initialised conv2) gets an
    exactly zero gradient in steps 1 and 2 and first learns in step 3.
    """
    adam = next(
        s
        for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")
    )
    mu = np.asarray(adam.mu["class_embed"]["embedding"])  # [11, 4ch]
    return set(np.flatnonzero(np.any(mu != 0, axis=1)).tolist())


@pytest.mark.slow
def test_label_dropout_one_trains_only_the_null_class(two_device_run):
    _, _, final, _ = two_device_run
    assert trained_embedding_rows(final) == {10}  # the null class id is num_classes


def test_per_device_batch_size_names_the_numbers():
    assert per_device_batch_size(128, 2, 8) == 8
    with pytest.raises(ValueError, match=r"batch_size=30 .* 16 \(2 process\(es\) x 8 local"):
        per_device_batch_size(30, 2, 8)
