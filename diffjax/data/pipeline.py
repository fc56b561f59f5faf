"""Input pipeline: deterministic, resumable, per-process sharded image batches.

Datasets are read with TFDS's random-access `data_source` (array_record) and fed through grain
threads (and optionally worker processes); TensorFlow is not needed at run time. Names are the
keys of `diffjax.data.registry.DATASETS`.

Preparing datasets
------------------
`digits` (scikit-learn's bundled 8x8 handwritten digits) needs nothing: it is written on first
use, offline, in about a second, to `<data_dir>/digits/1.0.0`. The other datasets are prepared
once, in an environment with TensorFlow and network access (TensorFlow is only needed for this
step), with `data_dir` a local folder or a gs:// bucket (default: $TFDS_DATA_DIR, else
~/tensorflow_datasets)::

    pip install tensorflow tensorflow-datasets
    tfds build mnist --file_format=array_record --data_dir=DATA_DIR
    tfds build cifar10 --file_format=array_record --data_dir=DATA_DIR
    tfds build celeb_a --file_format=array_record --data_dir=DATA_DIR
    # CelebA-HQ: first download the progressive-GAN tars (data1024x1024.tar, ...) into MANUAL_DIR,
    # see https://github.com/tkarras/progressive_growing_of_gans#preparing-datasets-for-training
    tfds build celeb_a_hq/256 --file_format=array_record --data_dir=DATA_DIR --manual_dir=MANUAL_DIR
    # LSUN reads LMDB files through tensorflow-io.
    pip install tensorflow-io
    tfds build lsun/church_outdoor --file_format=array_record --data_dir=DATA_DIR

Reading a gs:// data_dir without TensorFlow needs `pip install gcsfs`. Using a dataset that is not
prepared raises `DatasetNotPreparedError` with the exact command.

Order, sharding and resumption
------------------------------
The training stream is a pure function of (seed, step, process): epoch e = step // S, with
S = num_records // global_batch steps per epoch, is a fresh permutation of the split (grain's
`index_shuffle` Feistel permutation, seeded by (seed, e)); step k takes positions
[(k mod S) * B, (k mod S + 1) * B) of it, and process p of P takes the p-th contiguous slice of
B / P of those. The num_records mod B examples left over at the end of each permutation are
skipped in that epoch (a different subset each epoch). Consequences:
  * a run resumed at step k (`start_step=k`) sees exactly the batches of an uninterrupted run;
  * processes read disjoint examples, and the global batch does not depend on the process
    count (concatenating the shards of P processes gives the single-process batch);
  * horizontal flips (`data.random_flip`) are drawn per (seed, step, position in the global
    batch), so they too are independent of the process count.

Evaluation (`create_eval_iterator`) visits every example of a split exactly once, in storage
order; the last batch is padded and a boolean `mask` marks the real examples. All processes
yield the same number of batches.
"""

import dataclasses
import functools
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from diffjax.config.defaults import CACHE_MAX_MB
from diffjax.data.preprocess import crop_and_resize, to_model_range
from diffjax.data.registry import DatasetSpec, get_dataset_spec
from diffjax.data.sources import DatasetNotPreparedError, open_split, resolve_data_dir

__all__ = [
    "DatasetNotPreparedError",
    "create_eval_iterator",
    "create_train_iterator",
    "describe",
    "load_split_as_array",
    "num_examples",
    "train_positions",
]

# Independent random streams derived from the one data seed.
_SHUFFLE_STREAM = 0
_FLIP_STREAM = 1
# Grain's MapDataset.shuffle uses 4 Feistel rounds as well.
_FEISTEL_ROUNDS = 4
_LOAD_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class _Reader:
    """Reads records of one split and brings them to uint8 [image_size, image_size, C]."""

    source: Sequence[dict[str, Any]]
    spec: DatasetSpec
    image_size: int

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Records at `indices` [n] -> (images uint8 [n, S, S, C], labels int32 [n] | None)."""
        records = self.source.__getitems__([int(i) for i in indices])
        crop = functools.partial(crop_and_resize, crop=self.spec.crop, image_size=self.image_size)
        images = np.stack([crop(r[self.spec.image_key]) for r in records])  # [n, S, S, C]
        if self.spec.label_key is None:
            return images, None
        labels = np.asarray([r[self.spec.label_key] for r in records], dtype=np.int32)  # [n]
        return images, labels


@dataclasses.dataclass(frozen=True)
class _ArrayReader:
    """A whole split, decoded once (`_Reader.read` of every record): reads are array gathers."""

    images: np.ndarray  # [N, S, S, C] uint8
    labels: np.ndarray | None  # [N] int32

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        labels = None if self.labels is None else self.labels[indices]
        return self.images[indices], labels


def _read_all(
    reader: _Reader, total: int, num_threads: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Records [0, total) of `reader`, decoded by `num_threads` threads in chunks."""
    chunks = grain.MapDataset.range(0, total, _LOAD_CHUNK).map(
        lambda start: reader.read(np.arange(start, min(start + _LOAD_CHUNK, total)))
    )
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads)
    parts = list(chunks.to_iter_dataset(read_options))
    if not parts:
        shape = (0, reader.image_size, reader.image_size, reader.spec.channels)
        empty_labels = None if reader.spec.label_key is None else np.zeros(0, np.int32)
        return np.zeros(shape, np.uint8), empty_labels
    images = np.concatenate([p[0] for p in parts])  # [N, H, W, C]
    labels = None if reader.spec.label_key is None else np.concatenate([p[1] for p in parts])
    return images, labels


def _cached_if_small(reader: _Reader, max_mb: int, num_threads: int) -> _Reader | _ArrayReader:
    """`reader`, or its whole split in memory when the decoded images take <= `max_mb` MiB.

    Decoding a record (PNG) costs ~0.1 ms: 64 of them per step are ~10 ms of CPU time, which
    on a small model is a sizeable share of the step and competes with it for the cores.
    """
    decoded_bytes = len(reader) * reader.image_size**2 * reader.spec.channels
    if decoded_bytes > max_mb * 2**20:
        return reader
    return _ArrayReader(*_read_all(reader, len(reader), num_threads))


def _seed_for(seed: int, stream: int, counter: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, stream, counter])


def train_positions(
    step: int,
    *,
    seed: int,
    num_records: int,
    global_batch: int,
    process_index: int,
    process_count: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Record indices and flip flags of this process's share of the global batch at `step`.

    Returns (indices int64 [global_batch // process_count], flip bool [same]).
    """
    local_batch = global_batch // process_count
    epoch, step_in_epoch = divmod(step, num_records // global_batch)
    first = step_in_epoch * global_batch + process_index * local_batch
    offsets = range(first, first + local_batch)  # positions in the epoch's permutation
    epoch_seed = int(_seed_for(seed, _SHUFFLE_STREAM, epoch).generate_state(1)[0])
    indices = np.asarray(
        [
            grain.experimental.index_shuffle(
                o, max_index=num_records - 1, seed=epoch_seed, rounds=_FEISTEL_ROUNDS
            )
            for o in offsets
        ],
        dtype=np.int64,
    )
    # One coin per slot of the global batch, so flips do not depend on process_count.
    coins = np.random.default_rng(_seed_for(seed, _FLIP_STREAM, step)).random(global_batch)
    start = process_index * local_batch
    return indices, coins[start : start + local_batch] < 0.5


def _train_batch(
    step: int,
    *,
    reader: _Reader,
    seed: int,
    global_batch: int,
    process_index: int,
    process_count: int,
    random_flip: bool,
    with_labels: bool,
) -> dict[str, np.ndarray]:
    indices, flip = train_positions(
        step,
        seed=seed,
        num_records=len(reader),
        global_batch=global_batch,
        process_index=process_index,
        process_count=process_count,
    )
    images, labels = reader.read(indices)  # [b, H, W, C] uint8
    if random_flip:
        images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    batch = {"image": to_model_range(images)}
    if with_labels:
        batch["label"] = labels
    return batch


def _eval_batch(
    batch_index: int,
    *,
    reader: _Reader,
    global_batch: int,
    process_index: int,
    process_count: int,
    with_labels: bool,
) -> dict[str, np.ndarray]:
    local_batch = global_batch // process_count
    first = batch_index * global_batch + process_index * local_batch
    positions = np.arange(first, first + local_batch)  # [b]
    mask = positions < len(reader)
    shape = (local_batch, reader.image_size, reader.image_size, reader.spec.channels)
    images = np.zeros(shape, np.uint8)
    labels = np.zeros((local_batch,), np.int32)
    if mask.any():
        real_images, real_labels = reader.read(positions[mask])
        images[mask] = real_images
        if real_labels is not None:
            labels[mask] = real_labels
    batch = {"image": to_model_range(images), "mask": mask}
    if with_labels:
        batch["label"] = labels
    return batch


def _validated_spec(config: ml_collections.ConfigDict) -> DatasetSpec:
    data = config.data
    spec = get_dataset_spec(data.name)
    if data.channels != spec.channels:
        raise ValueError(
            f"data.channels={data.channels} does not match dataset '{data.name}'; "
            f"allowed: {spec.channels}"
        )
    if not isinstance(data.image_size, int) or data.image_size <= 0:
        raise ValueError(f"data.image_size={data.image_size!r}; allowed: a positive int")
    if data.num_classes > 0 and data.num_classes != spec.num_classes:
        allowed = "0 (unlabelled dataset)" if spec.label_key is None else f"0 or {spec.num_classes}"
        raise ValueError(
            f"data.num_classes={data.num_classes} for dataset '{data.name}'; allowed: {allowed}"
        )
    return spec


def _process_layout(
    global_batch: int, process_index: int | None, process_count: int | None
) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}; allowed: 0..{process_count - 1}")
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(
            f"batch size {global_batch}; allowed: a positive multiple of the process count "
            f"{process_count}"
        )
    return process_index, process_count


def _open_reader(config: ml_collections.ConfigDict, spec: DatasetSpec, split: str) -> _Reader:
    source = open_split(config.data.name, split, config.data.get("data_dir"))
    return _Reader(source=source, spec=spec, image_size=config.data.image_size)


def _prefetched(
    ds: grain.MapDataset, *, worker_count: int, num_threads: int, prefetch_batches: int
) -> Iterator[dict[str, np.ndarray]]:
    """Iterate `ds` in order while threads (and optional processes) build the next batches."""
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    iter_ds = ds.to_iter_dataset(read_options)
    if worker_count < 0:
        raise ValueError(f"worker_count={worker_count}; allowed: >= 0")
    if worker_count > 0:
        # grain 0.2.18 reads an absl flag in its worker start-up (google/grain#1355).
        if not flags.FLAGS.is_parsed():
            raise ValueError(
                f"worker_count={worker_count} needs parsed absl flags (absl.app.run, or "
                "absl.flags.FLAGS.mark_as_parsed()); allowed without them: worker_count=0"
            )
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(iter_ds)


def create_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    start_step: int,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    num_threads: int = 4,
    prefetch_batches: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches for steps start_step, start_step + 1, ... of this process.

    Yields {"image": float32 [B / P, H, W, C] in [-1, 1], "label": int32 [B / P]}, with "label"
    only when config.data.num_classes > 0. B = config.training.batch_size (global), P = the
    process count (default jax.process_count()), order as in the module docstring.
    `num_threads` batches are built concurrently and up to `prefetch_batches` wait ready
    (0 threads: built on demand). A split whose decoded images take at most
    config.data.cache_max_mb MiB (0: never) is decoded once, by `num_threads` threads, before
    the first batch; the batches are the same either way. `worker_count` > 0 moves batch
    building into that many grain worker processes (same batches; needs parsed absl flags;
    call the iterator's `close()` when done to release the workers' shared memory).
    """
    spec = _validated_spec(config)
    global_batch = config.training.batch_size
    process_index, process_count = _process_layout(global_batch, process_index, process_count)
    seed = config.training.seed
    if seed < 0 or start_step < 0:
        raise ValueError(f"seed={seed}, start_step={start_step}; allowed: non-negative ints")
    reader = _open_reader(config, spec, config.data.train_split)
    if len(reader) < global_batch:
        raise ValueError(
            f"batch size {global_batch} exceeds the {len(reader)} examples of "
            f"'{config.data.name}' split '{config.data.train_split}'; allowed: <= {len(reader)}"
        )
    max_mb = config.data.get("cache_max_mb", CACHE_MAX_MB)
    reader = _cached_if_small(reader, max_mb, num_threads)
    make_batch = functools.partial(
        _train_batch,
        reader=reader,
        seed=seed,
        global_batch=global_batch,
        process_index=process_index,
        process_count=process_count,
        random_flip=bool(config.data.random_flip),
        with_labels=config.data.num_classes > 0,
    )
    steps = grain.MapDataset.range(start_step, sys.maxsize)
    return _prefetched(
        steps.map(make_batch),
        worker_count=worker_count,
        num_threads=num_threads,
        prefetch_batches=prefetch_batches,
    )


def create_eval_iterator(
    config: ml_collections.ConfigDict,
    *,
    batch_size: int,
    split: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 4,
    prefetch_batches: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `split` (default config.data.eval_split), every example exactly once.

    `batch_size` is global. Yields ceil(N / batch_size) batches on every process:
    {"image": float32 [b, H, W, C], "mask": bool [b], "label": int32 [b] (if num_classes > 0)},
    b = batch_size / process_count. Padding slots hold zero images (-1.0) and label 0 with
    mask False; weight per-example results by `mask`. No shuffling, no flips.
    """
    spec = _validated_spec(config)
    process_index, process_count = _process_layout(batch_size, process_index, process_count)
    reader = _open_reader(config, spec, split or config.data.eval_split)
    make_batch = functools.partial(
        _eval_batch,
        reader=reader,
        global_batch=batch_size,
        process_index=process_index,
        process_count=process_count,
        with_labels=config.data.num_classes > 0,
    )
    num_batches = math.ceil(len(reader) / batch_size)
    return _prefetched(
        grain.MapDataset.range(num_batches).map(make_batch),
        worker_count=0,
        num_threads=num_threads,
        prefetch_batches=prefetch_batches,
    )


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
    """Number of examples in `split` of config.data.name."""
    return len(open_split(config.data.name, split, config.data.get("data_dir")))


def load_split_as_array(
    config: ml_collections.ConfigDict,
    split: str,
    max_examples: int | None = None,
    *,
    num_threads: int = 4,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The first `max_examples` (default all) examples of `split`, in storage order.

    Images are cropped/resized to config.data.image_size but not flipped or rescaled:
    returns (images uint8 [N, H, W, C], labels int32 [N] or None for unlabelled datasets).
    For reference statistics (FID) and classifier metrics.
    """
    spec = _validated_spec(config)
    reader = _open_reader(config, spec, split)
    total = len(reader) if max_examples is None else min(max_examples, len(reader))
    return _read_all(reader, total, num_threads)


def describe(config: ml_collections.ConfigDict) -> str:
    """One line naming the dataset, its data_dir and preprocessing (for logs)."""
    spec = _validated_spec(config)
    data = config.data
    return (
        f"{data.name} (tfds {spec.tfds_name}) from {resolve_data_dir(data.get('data_dir'))}: "
        f"crop {spec.crop}, {data.image_size}x{data.image_size}x{spec.channels}, "
        f"flip {bool(data.random_flip)}"
    )
