"""Datasets known to diffjax: one lookup table entry per dataset name.

Every dataset is read through TFDS's random-access `data_source` (array_record files), so no
TensorFlow is needed to read. `digits` is written offline on first use by a diffjax builder; the
others are prepared once with the `tfds build` command that `build_command` returns (see
`diffjax.data.pipeline` for the full list).
"""

import dataclasses

from diffjax.data.digits import Digits


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset.

    Attributes:
      tfds_name: name[/config] as given to `tfds.builder` and `tfds build`.
      image_key: feature holding the uint8 image [H, W, C].
      label_key: feature holding the integer class label, or None if unlabelled.
      native_size: stored (H, W), or None when it varies per example.
      channels: image channels.
      num_classes: number of label classes (0 when unlabelled).
      splits: split names the prepared dataset provides.
      crop: key of `diffjax.data.preprocess.CROPS` applied before resizing.
      build_flags: extra `tfds build` flags needed to prepare it.
      build_needs: what `tfds build` needs besides this package.
      builder: a builder class this package prepares offline on first use, or None.
    """

    tfds_name: str
    image_key: str
    label_key: str | None
    native_size: tuple[int, int] | None
    channels: int
    num_classes: int
    splits: tuple[str, ...]
    crop: str = "center_square"
    build_flags: str = ""
    build_needs: str = "tensorflow, network"
    builder: type | None = None


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        tfds_name="digits",
        image_key="image",
        label_key="label",
        native_size=(8, 8),
        channels=1,
        num_classes=10,
        splits=("train", "test"),
        build_needs="nothing: written offline on first use",
        builder=Digits,
    ),
    "mnist": DatasetSpec(
        tfds_name="mnist",
        image_key="image",
        label_key="label",
        native_size=(28, 28),
        channels=1,
        num_classes=10,
        splits=("train", "test"),
    ),
    "cifar10": DatasetSpec(
        tfds_name="cifar10",
        image_key="image",
        label_key="label",
        native_size=(32, 32),
        channels=3,
        num_classes=10,
        splits=("train", "test"),
    ),
    # Aligned CelebA 218x178; the 128x128 face box of Song et al. 2021 (DDIM) is cut out first.
    "celeb_a": DatasetSpec(
        tfds_name="celeb_a",
        image_key="image",
        label_key=None,
        native_size=(218, 178),
        channels=3,
        num_classes=0,
        splits=("train", "validation", "test"),
        crop="celeba_face",
    ),
    "celeb_a_hq": DatasetSpec(
        tfds_name="celeb_a_hq/256",
        image_key="image",
        label_key=None,
        native_size=(256, 256),
        channels=3,
        num_classes=0,
        splits=("train",),
        build_flags=" --manual_dir=DIR_WITH_PGGAN_CELEBA_HQ_TARS",
        build_needs="tensorflow, manual download",
    ),
    "lsun_church": DatasetSpec(
        tfds_name="lsun/church_outdoor",
        image_key="image",
        label_key=None,
        native_size=None,
        channels=3,
        num_classes=0,
        splits=("train", "validation"),
        build_needs="tensorflow, tensorflow-io, network",
    ),
}


def get_dataset_spec(name: str) -> DatasetSpec:
    """The `DATASETS` entry for `name`; ValueError naming it and the allowed names otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; allowed: {', '.join(DATASETS)}")
    return DATASETS[name]


def build_command(spec: DatasetSpec, data_dir: str) -> str:
    """The one-time `tfds build` command that prepares `spec` as array_record in `data_dir`."""
    return (
        f"tfds build {spec.tfds_name} --file_format=array_record --data_dir={data_dir}"
        f"{spec.build_flags}"
    )
