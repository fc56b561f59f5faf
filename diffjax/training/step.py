"""One data-parallel training update (Ho et al. 2020 Alg. 1), as a pure per-device function.

``train_step(state, batch, **static)`` sees one device's share of the global batch. It is mapped
over all local devices by ``jax.pmap(..., axis_name="batch")`` in ``make_p_train_step``; the
per-device function uses only ``lax.axis_index`` / ``lax.pmean`` over that axis name, so
``jax.shard_map`` can replace ``jax.pmap`` in that one place.

Randomness. Every random draw is a pure function of ``(seed, step)``:

- t ~ U{0..T-1}, the noise, and the class-label dropout use one key per *example*,
  ``fold_in(fold_in(step_key, 0), global example index)`` with
  ``global example index = lax.axis_index("batch") * per_device_batch + i``. These draws,
  and hence the whole update without network dropout, do not depend on how the global batch is
  split across devices.
- network dropout uses one key per device, ``fold_in(fold_in(step_key, 1), axis_index)``.

where ``step_key = fold_in(seed_key, state.step)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffjax.core import losses
from diffjax.core.schedules import Schedule
from diffjax.training.state import TrainState, create_learning_rate_fn, ema_decay_at, ema_update

__all__ = [
    "AXIS_NAME",
    "make_p_train_step",
    "make_train_step",
    "per_device_batch_size",
    "train_step",
]

AXIS_NAME = "batch"
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# Tags that separate the per-example and the per-device key streams of one step.
_EXAMPLE_STREAM, _DROPOUT_STREAM = 0, 1


def per_device_batch_size(global_batch: int, num_processes: int, local_devices: int) -> int:
    """Examples per device when ``global_batch`` is split evenly over processes and devices."""
    num_devices = num_processes * local_devices
    if global_batch <= 0 or global_batch % num_devices:
        raise ValueError(
            f"training.batch_size={global_batch} must be a positive multiple of the number of "
            f"devices {num_devices} ({num_processes} process(es) x {local_devices} local "
            f"device(s))"
        )
    return global_batch // num_devices


def _example_draws(
    key: jax.Array, example_ids: jax.Array, image_shape: tuple[int, ...], num_timesteps: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-example (t int32 [b], noise float32 [b, H, W, C], uniform float32 [b])."""

    def one(example_id: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        k_t, k_noise, k_label = jax.random.split(jax.random.fold_in(key, example_id), 3)
        t = jax.random.randint(k_t, (), 0, num_timesteps, dtype=jnp.int32)
        noise = jax.random.normal(k_noise, image_shape, jnp.float32)
        return t, noise, jax.random.uniform(k_label, ())

    return jax.vmap(one)(example_ids)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: Any,
    schedule: Schedule,
    seed_key: jax.Array,
    learning_rate_fn: optax.Schedule,
    loss_type: str,
    mean_type: str,
    var_type: str,
    ema_decay: float,
    num_classes: int,
    class_dropout: float,
    axis_name: str = AXIS_NAME,
    ema_warmup: bool = False,
) -> tuple[TrainState, Metrics]:
    """One Adam update on the simple/kl/hybrid loss, averaged over the ``axis_name`` devices.

    :param batch: this device's examples: ``image`` float32 [b, H, W, C] in [-1, 1] and
        ``label`` int32 [b] (used only when ``num_classes > 0``).
    :param num_classes: > 0 trains a class-conditional model; each label is replaced by the null
        class ``num_classes`` with probability ``class_dropout`` (Ho & Salimans 2022, Alg. 1).
    :return: the updated state (step + 1, EMA updated with the new params) and metrics averaged
        over all devices: ``loss`` (and ``mse``/``vlb`` as the loss provides), ``grad_norm``
        (global norm of the averaged gradient, before clipping), ``learning_rate`` (of this
        update), ``skipped`` (1.0 when the loss or the gradient was not finite: then params,
        EMA and optimizer state are returned unchanged and only the step advances).
    """
    images = batch["image"]  # [b, H, W, C]
    local_batch = images.shape[0]
    step_key = jax.random.fold_in(seed_key, state.step)
    device = jax.lax.axis_index(axis_name)
    example_ids = device * local_batch + jnp.arange(local_batch)  # [b] global example index
    t, noise, label_u = _example_draws(
        jax.random.fold_in(step_key, _EXAMPLE_STREAM),
        example_ids,
        images.shape[1:],
        schedule.num_timesteps,
    )
    dropout_key = jax.random.fold_in(jax.random.fold_in(step_key, _DROPOUT_STREAM), device)

    labels = None
    if num_classes > 0:
        labels = jnp.where(label_u < class_dropout, num_classes, batch["label"]).astype(jnp.int32)

    def loss_fn(params: Any) -> tuple[jax.Array, Metrics]:
        def model_fn(x_t: jax.Array, t_: jax.Array) -> jax.Array:
            return model.apply(
                {"params": params}, x_t, t_, labels, train=True, rngs={"dropout": dropout_key}
            )

        terms = losses.training_losses(
            model_fn,
            schedule,
            images,
            t,
            noise,
            loss_type=loss_type,
            mean_type=mean_type,
            var_type=var_type,
        )
        # Equal per-device batches: the mean of per-device means is the global batch mean.
        terms = {name: jnp.mean(value) for name, value in terms.items()}
        return terms["loss"], terms

    grads, terms = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, axis_name)
    metrics = dict(terms)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = learning_rate_fn(state.step)
    metrics = jax.lax.pmean(metrics, axis_name)
    # A non-finite loss or gradient on any device is non-finite in these all-reduced values on
    # every device (NaN and inf propagate through the mean), so all devices of all processes
    # take the same decision without another collective.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    new_state = state.apply_gradients(grads=grads)
    new_state = new_state.replace(
        ema_params=ema_update(
            state.ema_params, new_state.params, ema_decay_at(state.step, ema_decay, ema_warmup)
        )
    )
    # Skipped update: parameters, EMA and Adam state stay as they were; the step (and with it
    # the data position and the keys) advances. training.nan_policy decides on the host whether
    # to go on.
    new_state = new_state.replace(
        **{
            name: jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                getattr(new_state, name),
                getattr(state, name),
            )
            for name in ("params", "ema_params", "opt_state")
        }
    )
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics


def make_train_step(
    config: ml_collections.ConfigDict, model: Any, schedule: Schedule, seed_key: jax.Array
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """``train_step`` with the static pieces of ``config`` bound: ``(state, batch) -> ...``."""
    return functools.partial(
        train_step,
        model=model,
        schedule=schedule,
        seed_key=seed_key,
        learning_rate_fn=create_learning_rate_fn(
            config.optimizer, int(config.training.num_train_steps)
        ),
        loss_type=config.diffusion.loss_type,
        mean_type=config.diffusion.mean_type,
        var_type=config.diffusion.var_type,
        ema_decay=float(config.training.ema_decay),
        ema_warmup=bool(config.training.get("ema_warmup", False)),
        num_classes=int(config.model.num_classes or 0),
        class_dropout=float(config.training.class_dropout),
    )


def make_p_train_step(
    config: ml_collections.ConfigDict, model: Any, schedule: Schedule, seed_key: jax.Array
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The training step mapped over all local devices; the input state is donated.

    Takes and returns a state replicated along a leading device axis and a batch whose leading
    axis is the local device axis ([local_devices, per_device_batch, ...]).
    """
    step = make_train_step(config, model, schedule, seed_key)
    return jax.pmap(step, axis_name=AXIS_NAME, donate_argnums=(0,))
