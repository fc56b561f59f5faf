"""Input pipeline: offline digits dataset, deterministic sharded batches, official datasets."""

import collections
import itertools
import os
import re
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits
from tensorflow_datasets.core.data_sources.base import BaseDataSource

from diffjax.data import pipeline as input_pipeline
from diffjax.data.digits import Digits
from diffjax.data.preprocess import (
    celeba_face_crop,
    center_square_crop,
    crop_and_resize,
    resize,
)
from diffjax.data.registry import DATASETS, get_dataset_spec
from diffjax.data.sources import DatasetNotPreparedError, open_split

GLOBAL_BATCH = 100  # divides the 1,500 digits training examples: 15 steps per epoch


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    open_split("digits", "train", data_dir)  # written on first use
    return data_dir


@pytest.fixture(scope="module")
def sklearn_digits():
    """Independent reference straight from scikit-learn: uint8 [1797, 8, 8], labels [1797]."""
    data = load_digits()
    # Intensities are the integers 0..16 stored as float64, so *255/16 then rounding is exact.
    return np.round(data.images * 255.0 / 16.0).astype(np.uint8), data.target


def make_config(data_dir, **overrides):
    data = dict(
        name="digits",
        data_dir=data_dir,
        image_size=8,
        channels=1,
        random_flip=False,
        train_split="train",
        eval_split="test",
        num_classes=10,
    )
    training = dict(batch_size=GLOBAL_BATCH, seed=0)
    for key, value in overrides.items():
        (training if key in training else data)[key] = value
    return ml_collections.ConfigDict({"data": data, "training": training})


def to_uint8(images):
    # Batches hold k / 127.5 - 1 for integer k; float32 error is ~1e-5, far below the 0.5 rounding.
    return np.rint((images + 1.0) * 127.5).astype(np.uint8)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_digits_builder_writes_sklearn_values(digits_dir, sklearn_digits):
    ref_images, ref_labels = sklearn_digits
    sources = Digits(data_dir=digits_dir).as_data_source()
    assert {split: len(src) for split, src in sources.items()} == {"train": 1500, "test": 297}
    records = [r for split in ("train", "test") for r in sources[split]]  # storage order
    images = np.stack([r["image"] for r in records])
    labels = np.asarray([r["label"] for r in records])
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    np.testing.assert_array_equal(images[..., 0], ref_images)
    np.testing.assert_array_equal(labels, ref_labels)


def test_train_batches_are_scaled_images_of_the_train_split(digits_dir, sklearn_digits):
    ref_images, ref_labels = sklearn_digits
    config = make_config(digits_dir)
    batch = next(input_pipeline.create_train_iterator(config, start_step=0, process_count=1))
    assert batch["image"].shape == (GLOBAL_BATCH, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (GLOBAL_BATCH,) and batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
    # Exactly k / 127.5 - 1 (float32 arithmetic: 2 ulp slack).
    np.testing.assert_allclose(
        batch["image"], to_uint8(batch["image"]) / 127.5 - 1.0, rtol=0, atol=2.5e-7
    )
    train = {(ref_images[i].tobytes(), ref_labels[i]) for i in range(1500)}
    for image, label in zip(to_uint8(batch["image"]), batch["label"], strict=True):
        assert (image[..., 0].tobytes(), label) in train


def test_each_epoch_is_a_fresh_permutation_of_the_train_split(digits_dir, sklearn_digits):
    ref_images, ref_labels = sklearn_digits
    train = collections.Counter((ref_images[i].tobytes(), ref_labels[i]) for i in range(1500))
    config = make_config(digits_dir, seed=3)
    batches = take(input_pipeline.create_train_iterator(config, start_step=0, process_count=1), 30)

    def epoch_content(epoch_batches):
        images = np.concatenate([to_uint8(b["image"])[..., 0] for b in epoch_batches])
        labels = np.concatenate([b["label"] for b in epoch_batches])
        return images, collections.Counter(
            (im.tobytes(), lab) for im, lab in zip(images, labels, strict=True)
        )

    first_images, first = epoch_content(batches[:15])
    second_images, second = epoch_content(batches[15:])
    assert first == train and second == train
    assert not np.array_equal(first_images, second_images)


def test_batch_is_a_function_of_seed_and_step(digits_dir):
    config = make_config(digits_dir, seed=7, random_flip=True)
    full = take(input_pipeline.create_train_iterator(config, start_step=0, process_count=1), 20)
    # Resuming mid-epoch and in the second epoch (steps 15..) both replay the same batches.
    for start in (6, 17):
        resumed = take(
            input_pipeline.create_train_iterator(config, start_step=start, process_count=1), 3
        )
        for offset, batch in enumerate(resumed):
            np.testing.assert_array_equal(batch["image"], full[start + offset]["image"])
            np.testing.assert_array_equal(batch["label"], full[start + offset]["label"])
    other = next(
        input_pipeline.create_train_iterator(
            make_config(digits_dir, seed=8, random_flip=True), start_step=0, process_count=1
        )
    )
    assert not np.array_equal(other["image"], full[0]["image"])


def test_split_decoded_in_memory_gives_the_same_batches_and_reads_each_record_once(
    digits_dir, monkeypatch
):
    reads = collections.Counter()
    original = input_pipeline._Reader.read

    def counting_read(self, indices):
        reads.update(int(i) for i in indices)
        return original(self, indices)

    monkeypatch.setattr(input_pipeline._Reader, "read", counting_read)
    # 1,500 images of 8 x 8 x 1 bytes fit in 1 MiB (a 0 MiB cache: decode per batch).
    cached, per_batch = (
        take(
            input_pipeline.create_train_iterator(
                make_config(digits_dir, seed=5, random_flip=True, cache_max_mb=mb),
                start_step=13,
                process_index=1,
                process_count=2,
                num_threads=0,
            ),
            20,  # crosses the epoch boundary at step 15
        )
        for mb in (1, 0)
    )
    for a, b in zip(cached, per_batch, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # The cached iterator decoded all 1,500 records once; the other one 20 batches of 50.
    per_batch_reads = collections.Counter(
        int(i)
        for step in range(13, 33)
        for i in input_pipeline.train_positions(
            step,
            seed=5,
            num_records=1500,
            global_batch=GLOBAL_BATCH,
            process_index=1,
            process_count=2,
        )[0]
    )
    assert reads == collections.Counter(range(1500)) + per_batch_reads


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_form_the_global_batch(digits_dir, process_count):
    config = make_config(digits_dir, seed=1, random_flip=True)
    step = 16  # second epoch
    whole = next(input_pipeline.create_train_iterator(config, start_step=step, process_count=1))
    shards = [
        next(
            input_pipeline.create_train_iterator(
                config, start_step=step, process_index=p, process_count=process_count
            )
        )
        for p in range(process_count)
    ]
    local = GLOBAL_BATCH // process_count
    assert all(s["image"].shape[0] == local for s in shards)
    np.testing.assert_array_equal(np.concatenate([s["image"] for s in shards]), whole["image"])
    np.testing.assert_array_equal(np.concatenate([s["label"] for s in shards]), whole["label"])
    indices = [
        input_pipeline.train_positions(
            step,
            seed=1,
            num_records=1500,
            global_batch=GLOBAL_BATCH,
            process_index=p,
            process_count=process_count,
        )[0]
        for p in range(process_count)
    ]
    all_indices = np.concatenate(indices)
    assert len(set(all_indices.tolist())) == GLOBAL_BATCH  # disjoint records
    assert all_indices.min() >= 0 and all_indices.max() < 1500


def test_random_flip_mirrors_exactly_the_drawn_examples(digits_dir):
    plain, flipped = (
        take(
            input_pipeline.create_train_iterator(
                make_config(digits_dir, seed=5, random_flip=flip), start_step=0, process_count=1
            ),
            10,
        )
        for flip in (False, True)
    )
    num_flipped = 0
    for step, (a, b) in enumerate(zip(plain, flipped, strict=True)):
        _, flip = input_pipeline.train_positions(
            step, seed=5, num_records=1500, global_batch=GLOBAL_BATCH, process_index=0,
            process_count=1,
        )  # fmt: skip
        expected = np.where(flip[:, None, None, None], a["image"][:, :, ::-1], a["image"])
        np.testing.assert_array_equal(b["image"], expected)
        np.testing.assert_array_equal(b["label"], a["label"])
        num_flipped += int(flip.sum())
    # Fair coins: 1000 draws, sd = sqrt(1000) / 2 ~ 16; 500 +- 80 is a 5-sigma band.
    assert 420 <= num_flipped <= 580


def test_eval_iterator_counts_every_example_once(digits_dir, sklearn_digits):
    ref_images, ref_labels = sklearn_digits
    config = make_config(digits_dir)
    shards = [
        list(
            input_pipeline.create_eval_iterator(
                config, batch_size=64, process_index=p, process_count=2
            )
        )  # fmt: skip
        for p in range(2)
    ]
    assert [len(s) for s in shards] == [5, 5]  # ceil(297 / 64) on every process
    images, labels = [], []
    for b0, b1 in zip(*shards, strict=True):
        for part in (b0, b1):
            assert part["image"].shape == (32, 8, 8, 1) and part["mask"].dtype == bool
            images.append(to_uint8(part["image"])[part["mask"]])
            labels.append(part["label"][part["mask"]])
    assert sum(int(b["mask"].sum()) for s in shards for b in s) == 297
    np.testing.assert_array_equal(np.concatenate(images)[..., 0], ref_images[1500:])
    np.testing.assert_array_equal(np.concatenate(labels), ref_labels[1500:])


def test_load_split_as_array(digits_dir, sklearn_digits):
    ref_images, ref_labels = sklearn_digits
    images, labels = input_pipeline.load_split_as_array(make_config(digits_dir), "test")
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images[..., 0], ref_images[1500:])
    np.testing.assert_array_equal(labels, ref_labels[1500:])
    big, _ = input_pipeline.load_split_as_array(
        make_config(digits_dir, image_size=16), "train", max_examples=300
    )
    assert big.shape == (300, 16, 16, 1)
    # Upsampling keeps the mean intensity (bicubic weights sum to 1; 3 levels of slack for
    # clipping of the overshoot and rounding).
    assert abs(big.mean() - ref_images[:300].mean()) < 3.0
    assert input_pipeline.num_examples(make_config(digits_dir), "train") == 1500


def test_crops_and_resize():
    image = np.arange(5 * 9).reshape(5, 9, 1).astype(np.uint8)
    np.testing.assert_array_equal(center_square_crop(image), image[:, 2:7])
    tall = image.transpose(1, 0, 2)  # [9, 5, 1]
    np.testing.assert_array_equal(center_square_crop(tall), tall[2:7])
    rows, cols = np.meshgrid(np.arange(218), np.arange(178), indexing="ij")
    face = celeba_face_crop(np.stack([rows, cols], -1))
    assert face.shape == (128, 128, 2)
    assert (face[0, 0].tolist(), face[-1, -1].tolist()) == ([57, 25], [184, 152])
    # A 1-pixel checkerboard has no representable content at 1/4 the size; an antialiased
    # resize gives its mean 127.5 everywhere (nearest-neighbour sampling would give 0 or 255).
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None]
    assert np.abs(resize(checker, 16).astype(float) - 127.5).max() <= 3.0
    rgb = np.full((40, 60, 3), (10, 200, 90), np.uint8)
    np.testing.assert_array_equal(
        crop_and_resize(rgb, crop="center_square", image_size=8), np.full((8, 8, 3), (10, 200, 90))
    )
    with pytest.raises(ValueError, match="unknown crop 'zoom'; allowed: center_square"):
        crop_and_resize(rgb, crop="zoom", image_size=8)


OFFICIAL = {
    # name: (image_size, num_classes); sizes below native also exercise crop + resize.
    "mnist": (28, 10),
    "cifar10": (32, 10),
    "celeb_a": (32, 0),
    "celeb_a_hq": (16, 0),
    "lsun_church": (16, 0),  # mock images have random shapes
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_datasets_through_mock_data(name, tmp_path, monkeypatch):
    image_size, num_classes = OFFICIAL[name]
    spec = get_dataset_spec(name)
    config = make_config(
        str(tmp_path),
        name=name,
        image_size=image_size,
        channels=spec.channels,
        num_classes=num_classes,
        random_flip=True,
        batch_size=4,
        eval_split=spec.splits[-1],
    )
    # mock_data replaces the array_record reader by random examples from the builder's
    # features but leaves the data_dir empty, so the "prepared" check has to be told.
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
    # tfds 4.9.10's mock sets `__getitems__` as a plain partial on a MagicMock, which then
    # misses its `self` argument; batched reads go through the mocked `__getitem__` instead.
    monkeypatch.setattr(BaseDataSource, "__getitems__", lambda self, keys: [self[k] for k in keys])
    with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
        batches = take(
            input_pipeline.create_train_iterator(config, start_step=0, process_count=1), 3
        )
        evals = list(input_pipeline.create_eval_iterator(config, batch_size=4, process_count=1))
        images, labels = input_pipeline.load_split_as_array(config, "train", max_examples=5)
    shape = (4, image_size, image_size, spec.channels)
    for batch in batches:
        assert batch["image"].shape == shape and batch["image"].dtype == np.float32
        assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
        if num_classes:
            assert batch["label"].dtype == np.int32
            assert 0 <= batch["label"].min() and batch["label"].max() < num_classes
        else:
            assert "label" not in batch
    assert len(evals) == 3 and sum(int(b["mask"].sum()) for b in evals) == 10  # 4 + 4 + 2
    assert images.shape == (5, image_size, image_size, spec.channels)
    assert images.dtype == np.uint8
    assert (labels is None) == (spec.label_key is None)


def test_unprepared_dataset_names_the_build_command(tmp_path):
    config = make_config(str(tmp_path), name="cifar10", image_size=32, channels=3)
    with pytest.raises(DatasetNotPreparedError) as info:
        input_pipeline.create_train_iterator(config, start_step=0, process_count=1)
    message = str(info.value)
    assert "\n" not in message
    assert f"dataset 'cifar10' is not prepared in data_dir '{tmp_path}'" in message
    assert f"tfds build cifar10 --file_format=array_record --data_dir={tmp_path}" in message


def test_bad_config_values_are_named(digits_dir):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; allowed: digits, mnist"):
        input_pipeline.create_train_iterator(
            make_config(digits_dir, name="imagenet"), start_step=0, process_count=1
        )
    assert set(DATASETS) >= {"digits", "mnist", "cifar10", "celeb_a_hq", "lsun_church"}
    cases = [  # (message, config overrides, process count)
        ("data.channels=3 does not match dataset 'digits'; allowed: 1", dict(channels=3), 1),
        ("data.num_classes=7 for dataset 'digits'; allowed: 0 or 10", dict(num_classes=7), 1),
        ("batch size 10; allowed: a positive multiple of the process count 4", {}, 4),
    ]
    for expected, overrides, process_count in cases:
        config = make_config(digits_dir, **overrides)
        if process_count == 4:
            config.training.batch_size = 10
        with pytest.raises(ValueError, match=re.escape(expected)):
            input_pipeline.create_train_iterator(
                config, start_step=0, process_index=0, process_count=process_count
            )
    with pytest.raises(ValueError, match="batch size 2000 exceeds the 1500 examples"):
        input_pipeline.create_train_iterator(
            make_config(digits_dir, batch_size=2000), start_step=0, process_count=1
        )


_PREPARE_SCRIPT = textwrap.dedent(
    """
    import sys
    from diffjax.data.sources import open_split
    print(len(open_split("digits", "train", sys.argv[1])))
    """
)


@pytest.mark.slow
def test_concurrent_first_use_prepares_once(tmp_path):
    data_dir = str(tmp_path / "shared")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PREPARE_SCRIPT, data_dir],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HOME": str(tmp_path)},
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == "1500"
    # One complete version directory and no leftover partial writes.
    assert sorted(os.listdir(os.path.join(data_dir, "digits"))) == ["1.0.0"]
    assert len(open_split("digits", "test", data_dir)) == 297
