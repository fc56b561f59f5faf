"""Scalars from TensorBoard event files, read without TensorFlow.

An event file is a sequence of TFRecords (``[length u64][masked CRC32C of length][data][masked
CRC32C of data]``, little-endian) whose payloads are ``Event`` protobufs; tensorboardX, which
writes them for diffjax, also ships the protobuf classes and the checksum used here.
"""

from __future__ import annotations

import struct

import numpy as np
from etils import epath

from diffjax.viz.canvas import PathLike

__all__ = ["read_scalars"]


def _read_records(data: bytes, name: str) -> list[bytes]:
    """Payloads of a TFRecord file: [len u64][crc u32][data][crc u32] (masked CRC32C each)."""
    from tensorboardX.record_writer import masked_crc32c

    records, pos = [], 0
    while pos + 12 <= len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if header_crc != masked_crc32c(header):
            raise ValueError(f"event file {name} is corrupt at byte {pos} (bad length checksum)")
        end = pos + 12 + length + 4
        if end > len(data):  # a record still being written
            break
        payload = data[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", data[end - 4 : end])
        if payload_crc != masked_crc32c(payload):
            raise ValueError(f"event file {name} is corrupt at byte {pos} (bad data checksum)")
        records.append(payload)
        pos = end
    return records


def read_scalars(workdir: PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar of the TensorBoard event files under ``workdir``: tag -> (steps, values).

    Reads the TFRecord files with tensorboardX's protobufs (no TensorFlow). Files in ``workdir``
    and its direct subfolders are read; tags of a subfolder's files are prefixed with its name
    (``eval/bpd``). Where a step was written more than once
    (a resumed run), the latest write wins; steps come out ascending.

    :raises FileNotFoundError: no event file under ``workdir``.
    """
    from tensorboardX.proto import event_pb2

    root = epath.Path(workdir)
    # The run folder and its direct subfolders (e.g. train/, eval/): `**` is not allowed on GCS.
    pattern = "events.out.tfevents*"
    files = sorted([*root.glob(pattern), *root.glob(f"*/{pattern}")])
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files (events.out.tfevents*) under {root}")
    found: dict[str, list[tuple[float, int, float]]] = {}
    for f in files:
        prefix = "/".join(f.relative_to(root).parts[:-1])
        for payload in _read_records(f.read_bytes(), str(f)):
            event = event_pb2.Event.FromString(payload)
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    value = float(v.simple_value)
                elif v.HasField("tensor") and v.tensor.float_val:
                    value = float(v.tensor.float_val[0])
                else:
                    continue
                tag = f"{prefix}/{v.tag}" if prefix else v.tag
                found.setdefault(tag, []).append((event.wall_time, int(event.step), value))
    scalars = {}
    for tag, rows in found.items():
        latest = {step: value for _, step, value in sorted(rows)}
        steps = np.array(sorted(latest), dtype=np.int64)
        scalars[tag] = (steps, np.array([latest[s] for s in steps], dtype=np.float64))
    return scalars
