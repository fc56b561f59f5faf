"""The fixed-noise eval loss: the training loss on a fixed subset of the eval split.

The training loss is an estimate over random t and noise (Ho et al. 2020 Alg. 1), so two logged
values differ by sampling noise as much as by learning. The eval loss removes that noise: the
first N examples of ``data.eval_split`` (:class:`FixedSubset`), and for example j

    t_j ~ U{0..T-1}, eps_j ~ N(0, I)   from   fold_in(loss_key, j),

the same at every evaluation, so that the curve over steps shows only what the parameters
changed. It is ``losses.training_losses`` (the config's loss_type, mean_type, var_type) with
``train=False`` (no dropout) and the examples' labels for a class-conditional model (no label
dropout), averaged over the N examples, for the current parameters (comparable to the training
loss) and for the EMA parameters (what samples are drawn from).

Multi-host: every process holds the (small) subset, evaluates its share of each global batch on
its devices, and ``lax.psum`` over the pmapped axis adds the shares of all processes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax.core import losses
from diffjax.core.schedules import Schedule
from diffjax.data import pipeline as input_pipeline
from diffjax.data.preprocess import to_model_range
from diffjax.training.step import AXIS_NAME

__all__ = ["FixedSubset", "eval_loss_sums", "evaluate_loss", "make_p_eval_loss"]

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class FixedSubset:
    """The first ``num`` examples of a split, cut into global batches of ``batch``.

    ``images``: float32 [num_padded, H, W, C] in [-1, 1] (padding: -1.0), ``labels``: int32
    [num_padded] or None (unlabelled data); ``num_padded`` is a multiple of ``batch``.
    """

    images: np.ndarray
    labels: np.ndarray | None
    num: int
    batch: int
    split: str

    @classmethod
    def load(
        cls, config: ml_collections.ConfigDict, split: str, num: int, batch: int, shards: int
    ) -> FixedSubset:
        """The first ``num`` examples of ``split`` (fewer if it is smaller), in storage order.

        ``batch``: the largest global batch; a smaller subset uses the smallest multiple of
        ``shards`` (processes x local devices) that holds it, so no batch is mostly padding.
        """
        pixels, labels = input_pipeline.load_split_as_array(config, split, num)  # uint8 [n, ...]
        n = int(pixels.shape[0])
        batch = min(batch, -(-n // shards) * shards)
        padded = -(-n // batch) * batch
        images = np.full((padded, *pixels.shape[1:]), -1.0, np.float32)
        images[:n] = to_model_range(pixels)
        if labels is not None:
            labels = np.concatenate([labels, np.zeros(padded - n, labels.dtype)]).astype(np.int32)
        return cls(images=images, labels=labels, num=n, batch=batch, split=split)

    @property
    def num_batches(self) -> int:
        return self.images.shape[0] // self.batch

    def process_batches(self, process_index: int, process_count: int) -> Iterator[Batch]:
        """This process's share of every global batch, as ``create_eval_iterator`` lays it out.

        Yields ``image`` [b, H, W, C], ``mask`` bool [b] (real examples), ``index`` int32 [b]
        (position in the split) and ``label`` int32 [b] when there are labels; b = batch / P.
        """
        b = self.batch // process_count
        for first in range(0, self.images.shape[0], self.batch):
            index = np.arange(first + process_index * b, first + (process_index + 1) * b)  # [b]
            batch = {"image": self.images[index], "mask": index < self.num,
                     "index": index.astype(np.int32)}  # fmt: skip
            if self.labels is not None:
                batch["label"] = self.labels[index]
            yield batch


def eval_loss_sums(
    params: Any,
    ema_params: Any,
    batch: dict[str, jax.Array],
    *,
    model: Any,
    schedule: Schedule,
    key: jax.Array,
    loss_type: str,
    mean_type: str,
    var_type: str,
    num_classes: int,
    axis_name: str = AXIS_NAME,
) -> jax.Array:
    """[sum of the loss at ``params``, sum at ``ema_params``, number of real examples] over the
    real examples of every device on ``axis_name`` (one device's batch: ``image`` [b, H, W, C],
    ``mask`` [b], ``index`` [b], ``label`` [b]). t and noise of example j: ``fold_in(key, j)``.
    """
    x0 = batch["image"]  # [b, H, W, C]

    def draw(index: jax.Array) -> tuple[jax.Array, jax.Array]:
        k_t, k_noise = jax.random.split(jax.random.fold_in(key, index))
        t = jax.random.randint(k_t, (), 0, schedule.num_timesteps, dtype=jnp.int32)
        return t, jax.random.normal(k_noise, x0.shape[1:], jnp.float32)

    t, noise = jax.vmap(draw)(batch["index"])  # [b], [b, H, W, C]
    y = batch["label"] if num_classes else None

    def loss(p: Any) -> jax.Array:
        def model_fn(x_t: jax.Array, t_: jax.Array) -> jax.Array:
            return model.apply({"params": p}, x_t, t_, y, train=False)

        terms = losses.training_losses(model_fn, schedule, x0, t, noise, loss_type=loss_type,
                                       mean_type=mean_type, var_type=var_type)  # fmt: skip
        return jnp.sum(jnp.where(batch["mask"], terms["loss"], 0.0))  # masked sum over [b]

    count = jnp.sum(batch["mask"].astype(jnp.float32))
    return jax.lax.psum(jnp.stack([loss(params), loss(ema_params), count]), axis_name)  # [3]


def make_p_eval_loss(
    config: ml_collections.ConfigDict, model: Any, schedule: Schedule, key: jax.Array
) -> Callable[[Any, Any, Batch], jax.Array]:
    """:func:`eval_loss_sums` mapped over the local devices (nothing donated): takes replicated
    params and EMA ([num_local, ...]) and a batch [num_local, b / num_local, ...]; [num_local, 3].
    """
    d = config.diffusion
    fn = functools.partial(eval_loss_sums, model=model, schedule=schedule, key=key,
                           loss_type=d.loss_type, mean_type=d.mean_type, var_type=d.var_type,
                           num_classes=int(config.model.num_classes or 0))  # fmt: skip
    return jax.pmap(fn, axis_name=AXIS_NAME)


def evaluate_loss(
    p_eval_loss: Callable[[Any, Any, Batch], jax.Array],
    p_params: Any,
    p_ema_params: Any,
    subset: FixedSubset,
    *,
    process_index: int,
    process_count: int,
    num_local: int,
    before_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """The mean eval loss at the parameters and at the EMA over ``subset``: ``loss``,
    ``ema_loss``, ``num_examples``. ``before_batch(i)`` is called before global batch i."""
    total = np.zeros(3, np.float64)
    for i, batch in enumerate(subset.process_batches(process_index, process_count)):
        if before_batch is not None:
            before_batch(i)
        # [b, ...] -> [num_local, b / num_local, ...]
        sharded = {k: v.reshape(num_local, -1, *v.shape[1:]) for k, v in batch.items()}
        sums = p_eval_loss(p_params, p_ema_params, sharded)  # [num_local, 3], all equal
        total += np.asarray(jax.device_get(sums[0]), np.float64)
    return {"loss": total[0] / total[2], "ema_loss": total[1] / total[2],
            "num_examples": int(total[2])}  # fmt: skip
