"""Training state: parameters, their exponential moving average and the optimizer.

The optimizer is the one of Ho et al. 2020 (appendix B): Adam whose learning rate ramps up
linearly from 0 over ``warmup_steps`` updates and then stays constant (or, ``optimizer.decay =
"cosine"``, falls to 0 at the end of the run), applied after clipping the gradient to a global
norm of ``grad_clip``. The EMA of the parameters (decay 0.9999 in the paper; optionally warmed up,
:func:`ema_decay_at`) is what samples are drawn from.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from diffjax import models

__all__ = [
    "TrainState",
    "create_learning_rate_fn",
    "create_optimizer",
    "create_train_state",
    "ema_decay_at",
    "ema_update",
    "init_params",
]

PyTree = Any


class TrainState(train_state.TrainState):
    """flax TrainState plus ``ema_params``, the exponential moving average of ``params``."""

    ema_params: PyTree = None


def _constant_after_warmup(
    opt: ml_collections.ConfigDict, num_train_steps: int | None
) -> optax.Schedule:
    if opt.warmup_steps == 0:
        # optax.linear_schedule with 0 transition steps would stay at its *initial* value.
        return optax.constant_schedule(opt.learning_rate)
    return optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps)


def _cosine_after_warmup(
    opt: ml_collections.ConfigDict, num_train_steps: int | None
) -> optax.Schedule:
    if num_train_steps is None or num_train_steps <= opt.warmup_steps:
        raise ValueError(
            f"optimizer.decay='cosine' needs training.num_train_steps ({num_train_steps}) > "
            f"optimizer.warmup_steps ({opt.warmup_steps})"
        )
    return optax.warmup_cosine_decay_schedule(
        0.0, opt.learning_rate, opt.warmup_steps, num_train_steps, end_value=0.0
    )


# optimizer.decay -> the schedule after warm-up (choices.LR_DECAYS).
_LR_DECAYS = {"constant": _constant_after_warmup, "cosine": _cosine_after_warmup}


def create_learning_rate_fn(
    opt: ml_collections.ConfigDict, num_train_steps: int | None = None
) -> optax.Schedule:
    """The learning rate of the update that follows ``step`` completed updates.

    Linear warm-up from 0 over ``opt.warmup_steps`` updates (the first update has lr 0), then
    ``opt.decay``: "constant" keeps ``opt.learning_rate`` (official DDPM code, Ho et al.
    appendix B); "cosine" follows lr * (1 + cos(pi * (step - warmup) / (num_train_steps -
    warmup))) / 2 down to 0 at ``num_train_steps`` (Loshchilov & Hutter 2017, one cycle), so a
    short run ends on small steps that the EMA need not average away. Configs older than the
    field are "constant".
    """
    if opt.learning_rate <= 0:
        raise ValueError(f"optimizer.learning_rate must be > 0, got {opt.learning_rate}")
    if opt.warmup_steps < 0:
        raise ValueError(f"optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}")
    decay = opt.get("decay", "constant")
    if decay not in _LR_DECAYS:
        raise ValueError(f"optimizer.decay must be one of {', '.join(_LR_DECAYS)}, got {decay!r}")
    return _LR_DECAYS[decay](opt, num_train_steps)


def create_optimizer(
    opt: ml_collections.ConfigDict, num_train_steps: int | None = None
) -> optax.GradientTransformation:
    """Global-norm clipping (none when ``grad_clip == 0``) followed by Adam on
    :func:`create_learning_rate_fn`'s schedule."""
    clip = optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity()
    adam = optax.adam(
        learning_rate=create_learning_rate_fn(opt, num_train_steps),
        b1=opt.beta1,
        b2=opt.beta2,
        eps=opt.eps,
    )
    return optax.chain(clip, adam)


def ema_update(ema_params: PyTree, params: PyTree, decay: float | jax.Array) -> PyTree:
    """ema <- decay * ema + (1 - decay) * params, leafwise (Polyak averaging)."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def ema_decay_at(step: jax.Array | int, decay: float, warmup: bool) -> float | jax.Array:
    """The EMA decay of the update after ``step`` completed ones.

    With ``warmup``, min(decay, (1 + step) / (10 + step)) (the num_updates rule of
    tf.train.ExponentialMovingAverage): early averages forget the random initialisation quickly,
    so a short run can use a long-memory ``decay`` without its EMA still weighting the
    initialisation by decay ** num_train_steps at the end.
    """
    if not warmup:
        return decay  # a Python float: 1 - decay is then formed in float64, as it always was
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


# XLA CPU spends most of the initialiser's compile time optimising code that runs once.
_CPU_INIT_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def init_params(model: Any, rng: jax.Array, image_size: int, channels: int) -> PyTree:
    """``diffjax.models.init_params`` (float32 parameters of ``model`` for
    [1, image_size, image_size, channels] images), bitwise the same values; on CPU its one-off
    program is compiled without backend optimisations, which takes a third of the time.
    """
    # The models' jitted initialiser nests into this one, which carries the compiler options.
    init = jax.jit(lambda r: models.init_params(model, r, image_size, channels))
    options = _CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return init.lower(rng).compile(compiler_options=options)(rng)


def create_train_state(config: ml_collections.ConfigDict, model: Any, rng: jax.Array) -> TrainState:
    """Fresh state at step 0: initialised float32 params, EMA equal to them, Adam moments zero."""
    params = init_params(model, rng, config.data.image_size, config.data.channels)
    # A distinct buffer: the training step donates the state, and the EMA must not alias params.
    ema_params = jax.tree.map(jnp.copy, params)
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=create_optimizer(config.optimizer, int(config.training.num_train_steps)),
        ema_params=ema_params,
    )
