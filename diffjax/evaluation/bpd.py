"""Negative log-likelihood in bits/dim from the full variational bound over all T steps.

The bound of Ho et al. 2020 eq. 5,

    -log p(x_0) <= L_T + sum_{t=2..T} L_{t-1} + L_0,

is evaluated exactly in its sum over t (not estimated from one random t): for every step the
network is run once on x_t ~ q(x_t | x_0) with fresh noise, and each L_{t-1} is the closed-form
KL between Gaussians (``losses.vlb_terms_bpd``); L_0 is the discretized-Gaussian decoder and L_T
the parameter-free prior term (``losses.prior_bpd``). This is ``calc_bpd_loop`` of the official
DDPM code (and of Nichol & Dhariwal 2021), including its per-step MSEs of the x_0 and eps
predictions.

Randomness: the noise of step t for a batch is ``normal(fold_in(batch_key, t))`` with
``batch_key = fold_in(seed_key, batch_index)``, so results do not depend on host state.
The loop over t is a ``lax.scan`` inside one jitted function per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax.core import diffusion, losses
from diffjax.core.schedules import Schedule

__all__ = [
    "BPD_KEYS",
    "accumulate_bpd",
    "bpd_batch",
    "evaluate_bpd",
    "make_bpd_step",
]

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]
# apply_fn(params, x_t [B,H,W,C], t int32 [B], y int32 [B] | None) -> model output.
ApplyFn = Callable[[Any, Array, Array, Array | None], Array]

# Per-example outputs of `bpd_batch`: scalars [B] and per-step curves [B, T].
_SCALARS = ("total_bpd", "prior_bpd", "decoder_bpd")
_CURVES = ("terms_bpd", "mse_x0", "mse_eps")
BPD_KEYS: tuple[str, ...] = _SCALARS + _CURVES


def bpd_batch(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: Array,
    key: Array,
    *,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    clip_denoised: bool = True,
) -> dict[str, Array]:
    """Every term of the variational bound for one batch (Ho et al. 2020 eq. 5), in bits/dim.

    :param model_fn: ``model_fn(x_t [B,H,W,C], t int32 [B]) -> model output``.
    :param x0: data in [-1, 1] on the 8-bit grid, [B, H, W, C].
    :param key: the batch's key; step t uses ``fold_in(key, t)`` for its noise.
    :param clip_denoised: clip the x_0 estimate to [-1, 1] inside p(x_{t-1} | x_t), as the
        official ``calc_bpd_loop`` does by default (the bound holds for either choice: clipping
        only defines a different reverse process).
    :return: dict of per-example arrays: ``total_bpd`` [B] = prior + sum over t of the terms,
        ``prior_bpd`` [B] (L_T), ``decoder_bpd`` [B] (L_0, the t = 0 term), ``terms_bpd``
        [B, T] (L_{t-1}, with L_0 at index 0), ``mse_x0`` [B, T] and ``mse_eps`` [B, T] (mean
        squared error of the x_0 and eps implied by the network at each step).
    """
    diffusion.check_mean_type(mean_type)
    diffusion.check_var_type(var_type)
    batch = x0.shape[0]

    def step(carry: None, t_scalar: Array) -> tuple[None, tuple[Array, Array, Array]]:
        t = jnp.full((batch,), t_scalar, dtype=jnp.int32)  # [B]
        noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape, x0.dtype)
        x_t = diffusion.q_sample(schedule, x0, t, noise)
        out = model_fn(x_t, t)
        terms, pred_x0 = losses.vlb_terms_bpd(
            schedule,
            out,
            x0,
            x_t,
            t,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=clip_denoised,
        )
        # The eps implied by the (possibly clipped) x_0 estimate, as in improved-diffusion.
        pred_eps = diffusion.predict_eps_from_x0(schedule, x_t, t, pred_x0)
        mse_x0 = losses.mean_flat(jnp.square(pred_x0 - x0))
        mse_eps = losses.mean_flat(jnp.square(pred_eps - noise))
        return carry, (terms, mse_x0, mse_eps)

    steps = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)  # [T]
    _, (terms, mse_x0, mse_eps) = jax.lax.scan(step, None, steps)  # each [T, B]
    terms, mse_x0, mse_eps = terms.T, mse_x0.T, mse_eps.T  # [B, T]
    prior = losses.prior_bpd(schedule, x0)  # [B]
    return {
        "total_bpd": prior + jnp.sum(terms, axis=1),
        "prior_bpd": prior,
        "decoder_bpd": terms[:, 0],
        "terms_bpd": terms,
        "mse_x0": mse_x0,
        "mse_eps": mse_eps,
    }


def make_bpd_step(
    apply_fn: ApplyFn,
    schedule: Schedule,
    *,
    mean_type: str = "eps",
    var_type: str = "fixed_small",
    clip_denoised: bool = True,
) -> Callable[[Any, Array, Array | None, Array], dict[str, Array]]:
    """A jitted ``step(params, x0, y, key) -> bpd_batch(...)`` with the parameters as an argument.

    Passing the parameters as an argument (rather than closing over them) keeps them out of the
    compiled program as constants. ``y`` is the class label [B] or None.
    """
    diffusion.check_mean_type(mean_type)
    diffusion.check_var_type(var_type)

    @jax.jit
    def step(params: Any, x0: Array, y: Array | None, key: Array) -> dict[str, Array]:
        def model_fn(x_t: Array, t: Array) -> Array:
            return apply_fn(params, x_t, t, y)

        return bpd_batch(
            model_fn,
            schedule,
            x0,
            key,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=clip_denoised,
        )

    return step


def accumulate_bpd(results: Iterable[tuple[Mapping[str, Any], np.ndarray]]) -> dict[str, Any]:
    """Dataset averages of per-example ``bpd_batch`` outputs, weighting each by its mask.

    :param results: (per-example outputs of one batch, mask bool [B]) pairs; masked-out rows
        (the padding of a last partial batch) do not count.
    :return: ``total_bpd``, ``prior_bpd``, ``decoder_bpd`` (floats), ``terms_bpd``,
        ``mse_x0``, ``mse_eps`` (lists of T floats) and ``num_examples``; sums are kept in
        float64 so the average is exact up to the float32 per-example values.
    """
    sums: dict[str, np.ndarray] = {}
    count = 0
    for out, mask in results:
        mask = np.asarray(mask, dtype=bool)  # [B]
        count += int(mask.sum())
        for name in BPD_KEYS:
            value = np.asarray(out[name], dtype=np.float64)  # [B] or [B, T]
            # Selecting (not multiplying by 0) keeps a non-finite padding row out of the sum.
            total = value[mask].sum(axis=0)
            sums[name] = sums.get(name, 0.0) + total
    if count == 0:
        raise ValueError("no examples to average: every mask was empty (or there were no batches)")
    averages: dict[str, Any] = {name: sums[name] / count for name in BPD_KEYS}
    summary: dict[str, Any] = {name: float(averages[name]) for name in _SCALARS}
    summary.update({name: [float(v) for v in averages[name]] for name in _CURVES})
    summary["num_examples"] = count
    return summary


def evaluate_bpd(
    step: Callable[[Any, Array, Array | None, Array], Mapping[str, Array]],
    params: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    key: Array,
    *,
    use_labels: bool = False,
    max_examples: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Average the full bound over a finite pass of batches (official ``calc_bpd_loop``).

    :param step: from :func:`make_bpd_step`.
    :param batches: dicts with ``"image"`` float32 [B, H, W, C] in [-1, 1], ``"mask"`` bool [B]
        (and ``"label"`` int32 [B] when ``use_labels``), as yielded by
        ``input_pipeline.create_eval_iterator``; every batch must have the same B, so that one
        program is compiled.
    :param key: batch i uses ``fold_in(key, i)``.
    :param max_examples: stop after this many real examples (the rest of the last batch used is
        masked out), or None for the whole pass.
    :param progress: called as ``progress(batch_index, examples_so_far)`` after each batch.
    :param devices: split each batch across these devices (data parallel: the batch axis is
        sharded, the parameters replicated, and the compiler partitions the jitted step); the
        batch size must be a multiple of their number. None: the default device.
    """
    if max_examples is not None and max_examples <= 0:
        raise ValueError(f"max_examples={max_examples}; allowed: a positive int or None")
    put_batch: Callable[[Any], Any] = jnp.asarray
    if devices is not None:
        mesh = Mesh(np.asarray(devices), ("batch",))
        params = jax.device_put(params, NamedSharding(mesh, P()))
        batch_sharding = NamedSharding(mesh, P("batch"))

        def put_batch(x: Any) -> Any:
            if x.shape[0] % len(devices):
                raise ValueError(
                    f"batch size {x.shape[0]} is not a multiple of the {len(devices)} devices"
                )
            return jax.device_put(x, batch_sharding)

    def results() -> Iterable[tuple[Mapping[str, Any], np.ndarray]]:
        seen = 0
        for i, batch in enumerate(batches):
            if max_examples is not None and seen >= max_examples:
                return
            mask = np.asarray(batch["mask"], dtype=bool)  # [B]
            if max_examples is not None:
                # Keep only the first (max_examples - seen) real examples of this batch.
                mask = mask & (np.cumsum(mask) <= max_examples - seen)
            y = put_batch(np.asarray(batch["label"])) if use_labels else None
            x = put_batch(np.asarray(batch["image"]))
            out = step(params, x, y, jax.random.fold_in(key, i))
            out = jax.device_get(out)
            seen += int(mask.sum())
            if progress is not None:
                progress(i, seen)
            yield out, mask

    return accumulate_bpd(results())
