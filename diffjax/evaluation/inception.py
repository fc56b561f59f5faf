"""The "FID Inception" network (Inception-v3, graph inception-2015-12-05) in Flax.

This is the network behind FID (Heusel et al. 2017) and the Inception Score (Salimans et al.
2016) as computed by TTUR, TF-GAN and pytorch-fid: Szegedy et al. 2016's Inception-v3 with the
quirks of the 2015-12-05 TensorFlow graph, which pytorch-fid reproduces as ``FIDInceptionA``,
``FIDInceptionC``, ``FIDInceptionE_1`` and ``FIDInceptionE_2``:

- the average pools inside the A, C and first E blocks do not count padded zeros
  (``count_include_pad=False``, TensorFlow's behaviour);
- the pool branch of the last E block (``Mixed_7c``) is a 3x3 max pool, not an average pool;
- BatchNorm epsilon is 1e-3; the classifier has 1008 outputs (index 0 is "background",
  1..1000 the ImageNet classes, 1001..1007 unused).

Outputs are ``pool3`` [B, 2048] (global average of ``Mixed_7c``: the FID features) and
``logits`` [B, 1008] (the Inception Score uses the softmax over all 1008, as TF-GAN's
``classifier_score_from_logits`` does on this graph's ``logits:0``).

Weights are never downloaded: :func:`load_inception_variables` reads a local .npz made by
``scripts/convert_inception_weights.py`` from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth).
Parameter names follow that state dict (``Mixed_5b/branch1x1/conv/kernel`` for
``Mixed_5b.branch1x1.conv.weight``), so the conversion is a transpose per tensor.

Preprocessing (:data:`PREPROCESSING`), from 8-bit images:

- ``"tf1"`` (default): the graph's own input stage, as TTUR feeds it and as TF-GAN's
  ``preprocess_image`` rebuilds it (the FIDs of the TensorFlow-era papers): bilinear resize
  to 299 with TF1's legacy ``resize_bilinear`` (align_corners=False, no half-pixel centres)
  on values in [0, 255], then (x - 128) / 128.
- ``"pytorch_fid"``: pytorch-fid's ``InceptionV3``: ``F.interpolate(mode="bilinear",
  align_corners=False)`` (half-pixel centres) of x / 255, then 2 x - 1.

Grey images are repeated to 3 channels. Convolutions run at ``Precision.HIGHEST`` so that GPUs
do not drop to TF32 for the features.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

__all__ = [
    "INCEPTION_SIZE",
    "PREPROCESSING",
    "InceptionV3",
    "compute_inception_features",
    "expected_shapes",
    "inception_apply",
    "load_inception_variables",
    "make_inception_fn",
    "preprocess",
    "resize_matrix",
    "save_inception_variables",
    "torch_state_dict_to_variables",
]

INCEPTION_SIZE = 299
NUM_LOGITS = 1008
POOL_FEATURES = 2048
_BN_EPS = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=_HIGHEST,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool divides by the number of real (unpadded) inputs.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
    """35x35 block (FIDInceptionA): 1x1 | 5x5 | double 3x3 | avg pool + 1x1."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): strided 3x3 | double 3x3 | max pool."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block (FIDInceptionC) with factorised 7x7 convolutions."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs: FIDInceptionE_1 (avg pool) or E_2 (max pool)."""

    pool: Callable[[jax.Array], jax.Array]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3a = BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3)
        b3b = BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bda = BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd)
        bdb = BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(self.pool(x))
        return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


_MIXED_6 = {"Mixed_6b": 128, "Mixed_6c": 160, "Mixed_6d": 160, "Mixed_6e": 192}


class InceptionV3(nn.Module):
    """FID Inception-v3 on preprocessed images [B, H, W, 3] in [-1, 1] (H, W >= 75).

    Returns (pool3 [B, 2048], logits [B, 1008]). At 299x299 the stem gives 35x35, Mixed_6a
    17x17 and Mixed_7a 8x8 maps; smaller inputs (down to 75x75) run the same weights.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        # Mixed_6b..e: channels_7x7 of the factorised 7x7 towers.
        for name, c7 in _MIXED_6.items():
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(_avg_pool_3x3, name="Mixed_7b")(x)
        x = InceptionE(_max_pool_3x3, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))  # [B, 2048]
        logits = nn.Dense(NUM_LOGITS, precision=_HIGHEST, name="fc")(pool3)  # [B, 1008]
        return pool3, logits


# ----------------------------------------------------------------------------- preprocessing


def _src_legacy(dst: np.ndarray, scale: float) -> np.ndarray:
    # TF1 resize_bilinear, align_corners=False, half_pixel_centers=False.
    return dst * scale


def _src_half_pixel(dst: np.ndarray, scale: float) -> np.ndarray:
    # torch F.interpolate(align_corners=False): half-pixel centres, negatives clamped to 0.
    return np.maximum((dst + 0.5) * scale - 0.5, 0.0)


_SOURCE_COORDS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "legacy": _src_legacy,
    "half_pixel": _src_half_pixel,
}


def resize_matrix(in_size: int, out_size: int, convention: str) -> np.ndarray:
    """[out, in] float64 matrix of 1-D bilinear interpolation (rows sum to 1).

    :param convention: ``"legacy"`` (TF1 ``resize_bilinear``) or ``"half_pixel"`` (torch
        ``interpolate(align_corners=False)``); neither antialiases when shrinking.
    """
    if convention not in _SOURCE_COORDS:
        raise ValueError(f"unknown convention {convention!r}; allowed: {', '.join(_SOURCE_COORDS)}")
    src = _SOURCE_COORDS[convention](np.arange(out_size, dtype=np.float64), in_size / out_size)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    mat = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(mat, (rows, lo), 1.0 - frac)
    np.add.at(mat, (rows, hi), frac)
    return mat


def _resize(x: jax.Array, size: int, convention: str) -> jax.Array:
    rh = jnp.asarray(resize_matrix(x.shape[1], size, convention), jnp.float32)  # [S, H]
    rw = jnp.asarray(resize_matrix(x.shape[2], size, convention), jnp.float32)  # [S, W]
    return jnp.einsum("oh,bhwc,pw->bopc", rh, x, rw, precision=_HIGHEST)  # [B, S, S, C]


def _preprocess_tf1(x: jax.Array, size: int) -> jax.Array:
    return (_resize(x, size, "legacy") - 128.0) / 128.0


def _preprocess_pytorch_fid(x: jax.Array, size: int) -> jax.Array:
    return 2.0 * _resize(x / 255.0, size, "half_pixel") - 1.0


PREPROCESSING: dict[str, Callable[[jax.Array, int], jax.Array]] = {
    "tf1": _preprocess_tf1,
    "pytorch_fid": _preprocess_pytorch_fid,
}


def preprocess(images: jax.Array, mode: str = "tf1", size: int = INCEPTION_SIZE) -> jax.Array:
    """8-bit images [B, H, W, 1 or 3] (uint8 or float in [0, 255]) -> [B, size, size, 3]."""
    if mode not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {mode!r}; allowed: {', '.join(PREPROCESSING)}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [B, H, W, 1 or 3], got shape {images.shape}")
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return PREPROCESSING[mode](x, size)


@jax.jit
def inception_apply(variables: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The network on preprocessed images [B, H, W, 3] -> (pool3 [B, 2048], logits [B, 1008]).

    One module-level jitted function: every caller with the same batch shape shares its
    compiled program (the variables are an argument, so they are not baked into it).
    """
    return InceptionV3().apply(variables, x)


_preprocess_jit = jax.jit(preprocess, static_argnames=("mode", "size"))


def make_inception_fn(
    preprocessing: str = "tf1", size: int = INCEPTION_SIZE
) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """``fn(variables, uint8 images [B, H, W, C]) -> (pool3 [B, 2048], logits [B, 1008])``.

    Preprocessing and network are two jitted programs: the network's compile depends only on
    the batch size, not on the source image size.
    """
    if preprocessing not in PREPROCESSING:
        raise ValueError(
            f"unknown preprocessing {preprocessing!r}; allowed: {', '.join(PREPROCESSING)}"
        )

    def fn(variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return inception_apply(variables, _preprocess_jit(images, mode=preprocessing, size=size))

    return fn


def compute_inception_features(
    fn: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]],
    variables: Any,
    images: np.ndarray | Iterable[np.ndarray],
    *,
    batch_size: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``fn`` over uint8 images [N, H, W, C] (or an iterable of such chunks).

    Every call sees exactly ``batch_size`` images (the last batch is padded and the padding
    dropped), so one program is compiled. Returns float64 (pool3 [N, 2048], logits [N, 1008]).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}; allowed: a positive int")
    chunks = [images] if isinstance(images, np.ndarray) else images
    pools, logits = [], []
    for chunk in chunks:
        chunk = np.asarray(chunk)
        for start in range(0, chunk.shape[0], batch_size):
            part = chunk[start : start + batch_size]
            n = part.shape[0]
            if n < batch_size:
                pad = np.zeros((batch_size - n,) + part.shape[1:], part.dtype)
                part = np.concatenate([part, pad])
            p, z = jax.device_get(fn(variables, jnp.asarray(part)))
            pools.append(np.asarray(p[:n], np.float64))
            logits.append(np.asarray(z[:n], np.float64))
    if not pools:
        raise ValueError("no images given")
    return np.concatenate(pools), np.concatenate(logits)


# ----------------------------------------------------------------------------- weights


@functools.cache
def _variable_shapes() -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Tracing the network takes ~1 s; its shapes are a constant, so they are traced once.
    x = jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(lambda v: InceptionV3().init(jax.random.key(0), v), x)
    flat = traverse_util.flatten_dict(jax.tree.map(lambda s: s.shape, shapes), sep="/")
    return tuple((k, tuple(v)) for k, v in flat.items())


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Flat name ('params/Mixed_5b/branch1x1/conv/kernel', ...) -> shape of every variable."""
    return dict(_variable_shapes())


# torch tensor name (last component) -> (flax collection, flax name, how to reorder the array).
_TORCH_LEAVES: dict[tuple[str, str], tuple[str, str, Callable[[np.ndarray], np.ndarray]]] = {
    ("conv", "weight"): ("params", "kernel", lambda w: np.transpose(w, (2, 3, 1, 0))),
    ("bn", "weight"): ("params", "scale", lambda w: w),
    ("bn", "bias"): ("params", "bias", lambda w: w),
    ("bn", "running_mean"): ("batch_stats", "mean", lambda w: w),
    ("bn", "running_var"): ("batch_stats", "var", lambda w: w),
    ("fc", "weight"): ("params", "kernel", lambda w: np.transpose(w)),
    ("fc", "bias"): ("params", "bias", lambda w: w),
}
# BatchNorm's update counter has no use at inference.
_IGNORED_SUFFIXES = (".num_batches_tracked",)


def torch_state_dict_to_variables(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """pytorch-fid ``FIDInceptionV3`` state dict (NumPy arrays) -> Flax variables.

    Conv weights [O, I, kh, kw] become kernels [kh, kw, I, O], the fc weight [1008, 2048] a
    kernel [2048, 1008], BatchNorm weight/bias/running_mean/running_var become
    params scale/bias and batch_stats mean/var. Every expected variable must be present with
    its expected shape and no other tensor may be: a ValueError names the offenders.
    """
    flat: dict[str, np.ndarray] = {}
    unexpected = []
    for key, value in state_dict.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        parts = key.split(".")
        leaf = _TORCH_LEAVES.get(tuple(parts[-2:]))
        if leaf is None:
            unexpected.append(key)
            continue
        collection, name, reorder = leaf
        path = "/".join([collection, *parts[:-1], name])
        flat[path] = np.ascontiguousarray(reorder(np.asarray(value, np.float32)))
    if unexpected:
        raise ValueError(f"unexpected tensors in the state dict: {sorted(unexpected)[:10]}")
    return _validated(flat, source="state dict")


def _validated(flat: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
    shapes = expected_shapes()
    missing = sorted(set(shapes) - set(flat))
    extra = sorted(set(flat) - set(shapes))
    if missing or extra:
        raise ValueError(
            f"{source} does not match the FID Inception: {len(missing)} missing "
            f"(e.g. {missing[:5]}), {len(extra)} unexpected (e.g. {extra[:5]})"
        )
    wrong = [(k, flat[k].shape, shapes[k]) for k in shapes if tuple(flat[k].shape) != shapes[k]]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(
            f"{source}: {len(wrong)} tensors have the wrong shape, e.g. {k} {got} != {want}"
        )
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}
    return dict(traverse_util.unflatten_dict(arrays, sep="/"))


def save_inception_variables(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
    """Write Flax variables to an .npz with keys like 'params/Mixed_5b/branch1x1/conv/kernel'."""
    flat = traverse_util.flatten_dict(dict(variables), sep="/")
    with open(path, "wb") as f:
        np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_inception_variables(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate the .npz written by ``scripts/convert_inception_weights.py``."""
    path = os.fspath(path)
    if not epath.Path(path).exists():
        raise FileNotFoundError(
            f"Inception weights {path!r} do not exist; convert pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth with scripts/convert_inception_weights.py"
        )
    if path.endswith((".pth", ".pt")):
        raise ValueError(
            f"{path!r} is a PyTorch file; convert it first: "
            f"python scripts/convert_inception_weights.py {path} OUT.npz"
        )
    with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as data:
        flat = {k: data[k] for k in data.files}
    return _validated(flat, source=f"weights file {path!r}")
