"""scikit-learn's bundled handwritten digits as a TFDS dataset (offline, no TensorFlow).

`sklearn.datasets.load_digits` ships 1,797 grey 8x8 images with integer intensities 0..16 and
labels 0..9 inside the scikit-learn wheel, so this dataset is written on first use in about a
second without network access. Intensities are rescaled to uint8 as `round(v * 255 / 16)`
(0 -> 0, 16 -> 255).

Splits are deterministic and follow the file order of the bundled data:
  train: rows 0..1499 (1,500 examples), test: rows 1500..1796 (297 examples).
Shuffling at write time is disabled, so record i of `train` is sklearn row i and record j of
`test` is sklearn row 1500 + j.

TensorFlow-free writing: TFDS encodes `numpy` images to PNG through TensorFlow, but it also
accepts `PIL.Image.Image` inputs, which it encodes with Pillow; the example serializer and the
array_record writer are pure Python/protobuf. The builder therefore yields PIL images.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

NUM_TRAIN = 1500
NUM_EXAMPLES = 1797
MAX_SKLEARN_VALUE = 16


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits in file order: (images uint8 [N, 8, 8], labels int64 [N])."""
    data = load_digits()
    images = np.round(data.images * (255.0 / MAX_SKLEARN_VALUE)).astype(np.uint8)  # [N, 8, 8]
    return images, data.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn handwritten digits, 8x8x1 uint8, labels 0..9."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: train = rows 0..1499, test = rows 1500..1796."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Optical recognition of handwritten digits (UCI), as bundled with scikit-learn; "
                "intensities 0..16 rescaled to 0..255."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            # Record order = sklearn row order, so examples can be traced back to their source.
            disable_shuffling=True,
            homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
            citation=(
                "@misc{alpaydin1998optical, author={Alpaydin, E. and Kaynak, C.}, "
                "title={Optical Recognition of Handwritten Digits}, year={1998}, "
                "howpublished={UCI Machine Learning Repository}}"
            ),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # The data ships with scikit-learn.
        return {
            "train": self._generate_examples(0, NUM_TRAIN),
            "test": self._generate_examples(NUM_TRAIN, NUM_EXAMPLES),
        }

    def _generate_examples(self, start: int, stop: int) -> Iterator[tuple[int, dict]]:
        images, labels = digits_uint8()
        for row in range(start, stop):
            image = Image.fromarray(images[row])  # 2-D uint8 -> mode "L"
            yield row, {"image": image, "label": int(labels[row])}
