"""Open one split of a dataset as a TFDS random-access data source (array_record).

Official datasets must have been prepared with `tfds build` (see `diffjax.data.pipeline`);
asking for one that is not gives a single-line `DatasetNotPreparedError` holding the command.
Datasets with a diffjax builder (`DatasetSpec.builder`, e.g. digits) are written on first use.

First use from several processes at once (several hosts sharing a disk, or several processes on
one machine) is safe: TFDS writes into a private `incomplete.*` directory and renames it into
place, so readers only ever see a complete dataset; on local disks an exclusive file lock in
`data_dir` also keeps the other processes waiting instead of writing a second copy.
"""

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds

from diffjax.data.registry import DatasetSpec, build_command, get_dataset_spec
from diffjax.errors import ReportableError

try:  # POSIX only; elsewhere concurrent first use relies on the atomic rename alone.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


class DatasetNotPreparedError(ReportableError, FileNotFoundError):
    """The dataset has no array_record files in `data_dir` yet; the message holds the command.

    A command line reports it as one ``error: ...`` line with exit status 1 (`ReportableError`).
    """


def default_data_dir() -> str:
    """TFDS's default data dir: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return tfds.core.constants.get_default_data_dir()


def resolve_data_dir(data_dir: str | None) -> str:
    """`data_dir` with `~` expanded, or `default_data_dir()` when None/empty."""
    if not data_dir:
        return default_data_dir()
    return data_dir if "://" in data_dir else os.path.expanduser(data_dir)


@contextlib.contextmanager
def _exclusive_lock(data_dir: str, name: str) -> Iterator[None]:
    """Exclusive inter-process lock on a local `data_dir`; no-op for remote paths."""
    if "://" in data_dir or fcntl is None:
        yield
        return
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{name}.prepare.lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def prepare_builder(builder_cls: type, data_dir: str) -> tfds.core.DatasetBuilder:
    """Write `builder_cls`'s dataset as array_record in `data_dir` unless already there.

    Returns a builder whose info was read back from the written files.
    """
    builder = builder_cls(data_dir=data_dir)
    if builder.is_prepared():
        return builder
    with _exclusive_lock(data_dir, builder.name):
        # Re-created under the lock: another process may have finished writing meanwhile.
        builder = builder_cls(data_dir=data_dir)
        if not builder.is_prepared():
            # No GCS look-up: the data is generated locally and must work offline.
            config = tfds.download.DownloadConfig(try_download_gcs=False)
            try:
                builder.download_and_prepare(file_format="array_record", download_config=config)
            except OSError:
                # Without a lock (remote data_dir) the slower writer fails its final rename.
                if not builder_cls(data_dir=data_dir).is_prepared():
                    raise
    return builder_cls(data_dir=data_dir)


def open_builder(name: str, spec: DatasetSpec, data_dir: str) -> tfds.core.DatasetBuilder:
    """A prepared builder for dataset `name`; DatasetNotPreparedError with the command if not."""
    if spec.builder is not None:
        return prepare_builder(spec.builder, data_dir)
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"dataset '{name}' is not prepared in data_dir '{data_dir}'; prepare it "
            f"once ({spec.build_needs}) with: {build_command(spec, data_dir)}"
        )
    return builder


def open_split(name: str, split: str, data_dir: str | None = None) -> Sequence[dict[str, Any]]:
    """Random-access source of decoded examples (dicts of numpy) for `split` of dataset `name`.

    `split` accepts TFDS slicing ("train[:1000]"). `data_dir` may be local or gs:// (reading
    gs:// without TensorFlow needs `gcsfs` installed for the metadata files).
    """
    spec = get_dataset_spec(name)
    data_dir = resolve_data_dir(data_dir)
    builder = open_builder(name, spec, data_dir)
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError as e:
        raise DatasetNotPreparedError(
            f"dataset '{name}' in data_dir '{data_dir}' was prepared in another file "
            f"format; prepare it as array_record with: {build_command(spec, data_dir)}"
        ) from e
