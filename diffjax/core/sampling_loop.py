"""The loop every sampler shares: initial noise, one ``lax.scan`` over the steps, trajectories.

A sampler supplies ``step(carry, i) -> (carry, (x_t, pred_x0))``, where ``carry`` holds the
current sample (and whatever else the sampler carries from step to step, e.g. the previous data
predictions of a multistep solver) and ``i`` runs over descending step indices ending at 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.core import diffusion
from diffjax.core.respacing import check_int

__all__ = ["Trajectory", "check_options", "check_shape", "initial_noise", "run_steps"]

Array = jax.Array


class Trajectory(NamedTuple):
    """Intermediate states of a sampling run, at the saved steps (see ``trajectory_stride``)."""

    t: Array  # [S] int32, the original timestep of each saved step
    x_t: Array  # [S, B, H, W, C], the state fed to the model at that step
    pred_x0: Array  # [S, B, H, W, C], the (clipped) estimate of x_0 made from it


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints, or a ValueError naming it."""
    shape = tuple(shape)
    if len(shape) < 2 or not all(
        isinstance(s, int | np.integer) and not isinstance(s, bool) and s >= 1 for s in shape
    ):
        raise ValueError(f"shape = {shape!r}; allowed: positive ints (B, H, W, C)")
    return tuple(int(s) for s in shape)


def check_options(mean_type: str, var_type: str, trajectory_stride: int) -> None:
    """The options every sampler takes, or a ValueError naming the bad one."""
    diffusion.check_mean_type(mean_type)
    diffusion.check_var_type(var_type)
    check_int("trajectory_stride", trajectory_stride, 1)


def initial_noise(init_key: Array, shape: tuple[int, ...], x_T: Array | None) -> Array:
    """x_T ~ N(0, I) drawn with ``init_key``, or the given ``x_T`` (checked against ``shape``)."""
    if x_T is None:
        return jax.random.normal(init_key, shape, jnp.float32)  # [B, H, W, C]
    x_T = jnp.asarray(x_T, jnp.float32)
    if x_T.shape != shape:
        raise ValueError(f"x_T has shape {x_T.shape}; allowed: the sample shape {shape}")
    return x_T


def run_steps(
    step: Callable[[Any, Array], tuple[Any, tuple[Array, Array]]],
    carry: Any,
    indices: np.ndarray,
    timestep_map: np.ndarray | Array,
    *,
    return_trajectory: bool,
    stride: int,
    image: Callable[[Any], Array] = lambda carry: carry,
) -> Array | tuple[Array, Trajectory]:
    """Apply ``step`` at the descending step indices; optionally keep every ``stride``-th step.

    ``image(carry)`` is the sample within the carry; ``timestep_map[i]`` the model timestep of
    step index i (for the trajectory; numpy or a traced array). The saved steps are those whose
    index i satisfies i % stride == 0, so the last step (i = 0) is always kept; saving only them
    (a scan of scans) keeps the memory at S, not K, states.
    """
    if not return_trajectory:
        carry, _ = jax.lax.scan(lambda c, i: (step(c, i)[0], None), carry, jnp.asarray(indices))
        return image(carry)

    def chunk(carry: Any, chunk_indices: Array) -> tuple[Any, tuple[Array, Array]]:
        # Carry the outputs of the latest step: the chunk's last step is the saved one.
        x = image(carry)
        zeros = (jnp.zeros_like(x), jnp.zeros_like(x))

        def inner(state, i):
            new, saved = step(state[0], i)
            return (new, saved), None

        (carry, saved), _ = jax.lax.scan(inner, (carry, zeros), chunk_indices)
        return carry, saved

    head = (indices.size - 1) % stride + 1  # steps up to and including the first saved one
    carry, first = chunk(carry, jnp.asarray(indices[:head]))
    rest = indices[head:].reshape(-1, stride)  # [S - 1, stride]
    if rest.size:
        carry, more = jax.lax.scan(chunk, carry, jnp.asarray(rest))
        saved = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, more)
    else:
        saved = jax.tree.map(lambda a: a[None], first)
    kept = np.concatenate([indices[head - 1 : head], rest[:, -1]])  # [S]
    t = jnp.asarray(timestep_map)[jnp.asarray(kept)].astype(jnp.int32)
    return image(carry), Trajectory(t=t, x_t=saved[0], pred_x0=saved[1])
