"""A small classifier for grey labelled datasets (digits, MNIST) and the metrics built on it.

No Inception weights make sense for 8x8 digits, so sample quality there is judged with a small
MLP trained here, deterministically, on the real train split (a few seconds on a CPU):

- ``digits_fd``: the Frechet distance (Heusel et al. 2017 eq. 6) between the Gaussians fitted to
  the classifier's penultimate features (64-d) of generated samples and of the real test split;
- ``digits_is``: the Inception-Score formula (Salimans et al. 2016) with this classifier's
  softmax, exp(E_x KL(p(y|x) || p(y))), at most the number of classes (10).

These numbers rank models trained on the same dataset; they are NOT comparable to FID or IS
from the Inception network, nor across classifier versions or seeds. The classifier's test
accuracy is reported with them, so a reader can judge the feature space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import zipfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import traverse_util

__all__ = [
    "ClassifierConfig",
    "MLPClassifier",
    "classifier_outputs",
    "load_classifier",
    "save_classifier",
    "train_classifier",
    "training_fingerprint",
]


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Architecture and training recipe; part of the cache fingerprint."""

    hidden: tuple[int, ...] = (128, 64)  # the last width is the feature dimension
    num_classes: int = 10
    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    # Std of Gaussian input noise during training, in [-1, 1] units. It regularises (about
    # +2 points of test accuracy on digits) and makes the features vary smoothly on the
    # slightly-off images a generator makes.
    input_noise: float = 0.4
    seed: int = 0


class MLPClassifier(nn.Module):
    """Flattened image in [-1, 1] -> (features [B, hidden[-1]], logits [B, num_classes])."""

    hidden: tuple[int, ...]
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x.reshape((x.shape[0], -1))  # [B, H*W*C]
        for i, width in enumerate(self.hidden):
            h = nn.relu(nn.Dense(width, name=f"dense_{i}")(h))
        return h, nn.Dense(self.num_classes, name="logits")(h)


def _model(cfg: ClassifierConfig) -> MLPClassifier:
    return MLPClassifier(hidden=tuple(cfg.hidden), num_classes=cfg.num_classes)


def _to_model_range(images: np.ndarray) -> jax.Array:
    # The diffusion models' data scaling: 8-bit p -> 2 p / 255 - 1 (Ho et al. 2020 Sec. 3.3).
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def _check_images_labels(images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels have shape {labels.shape}; allowed: [{images.shape[0]}]")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels span {labels.min()}..{labels.max()}; allowed: 0..{num_classes - 1}"
        )


def training_fingerprint(images: np.ndarray, labels: np.ndarray, cfg: ClassifierConfig) -> str:
    """SHA-256 of the training data and recipe: a cached classifier is reused only if it matches."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update(str(images.shape).encode())
    h.update(repr(dataclasses.astuple(cfg)).encode())
    return h.hexdigest()


def train_classifier(
    images: np.ndarray, labels: np.ndarray, cfg: ClassifierConfig = ClassifierConfig()
) -> Any:
    """Train the MLP with AdamW on uint8 images [N, H, W, C] and int labels [N].

    Deterministic: ``init_key, key = split(key(cfg.seed))``; the minibatch indices and input
    noise of step s come from ``fold_in(key, s)``, and all steps run as one ``lax.scan``.
    :return: the parameters.
    """
    _check_images_labels(images, labels, cfg.num_classes)
    model = _model(cfg)
    x_all = _to_model_range(images)  # [N, H, W, C]
    y_all = jnp.asarray(labels, jnp.int32)  # [N]
    init_key, key = jax.random.split(jax.random.key(cfg.seed))
    params = model.init(init_key, x_all[:1])["params"]
    tx = optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)

    def loss_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        _, logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry: tuple[Any, Any], s: jax.Array) -> tuple[tuple[Any, Any], jax.Array]:
        p, opt_state = carry
        k_idx, k_noise = jax.random.split(jax.random.fold_in(key, s))
        idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, x_all.shape[0])
        x = x_all[idx] + cfg.input_noise * jax.random.normal(k_noise, x_all[idx].shape)
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y_all[idx])
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    @jax.jit
    def run(p: Any) -> Any:
        (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), jnp.arange(cfg.steps))
        return p

    return run(params)


def classifier_outputs(
    params: Any, images: np.ndarray, cfg: ClassifierConfig = ClassifierConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W, C] -> float64 (features [N, hidden[-1]], logits [N, classes])."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    feats, logits = jax.jit(_model(cfg).apply)({"params": params}, _to_model_range(images))
    return np.asarray(feats, np.float64), np.asarray(logits, np.float64)


def save_classifier(
    path: str | os.PathLike, params: Any, fingerprint: str, accuracy: float
) -> None:
    """Write the parameters (flattened 'dense_0/kernel', ...) with the fingerprint and accuracy."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    buffer = io.BytesIO()
    np.savez(
        buffer,
        **{f"params/{k}": np.asarray(v) for k, v in flat.items()},
        fingerprint=np.asarray(fingerprint),
        test_accuracy=np.asarray(accuracy),
    )
    epath.Path(path).write_bytes(buffer.getvalue())


def load_classifier(path: str | os.PathLike, fingerprint: str) -> tuple[Any, float] | None:
    """(params, test accuracy) from a cache file whose fingerprint matches, else None.

    An unreadable file (e.g. cut short by an interrupted write) also gives None: retrain.
    """
    if not epath.Path(path).exists():
        return None
    try:
        data = np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    with data:
        if "fingerprint" not in data.files or str(data["fingerprint"]) != fingerprint:
            return None
        flat = {
            k[len("params/") :]: jnp.asarray(data[k]) for k in data.files if k.startswith("params/")
        }
        accuracy = float(data["test_accuracy"])
    return traverse_util.unflatten_dict(flat, sep="/"), accuracy


def accuracy(params: Any, images: np.ndarray, labels: np.ndarray, cfg: ClassifierConfig) -> float:
    """Fraction of ``images`` whose arg-max class equals ``labels``."""
    _, logits = classifier_outputs(params, images, cfg)
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def get_classifier(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    cache_path: str | os.PathLike | None = None,
    cfg: ClassifierConfig = ClassifierConfig(),
) -> tuple[Any, float, bool]:
    """The classifier for (train images, labels), from the cache when it matches, else trained.

    :param test: (images, labels) on which the returned accuracy is measured.
    :param cache_path: an .npz to read/write; None trains every time.
    :return: (params, test accuracy, whether it came from the cache).
    """
    images, labels = train
    fingerprint = training_fingerprint(images, labels, cfg)
    if cache_path is not None:
        cached = load_classifier(cache_path, fingerprint)
        if cached is not None:
            return cached[0], cached[1], True
    params = train_classifier(images, labels, cfg)
    acc = accuracy(params, test[0], test[1], cfg)
    if cache_path is not None:
        save_classifier(cache_path, params, fingerprint, acc)
    return params, acc, False
