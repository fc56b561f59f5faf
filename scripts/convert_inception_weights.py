"""Convert pytorch-fid's FID Inception weights (.pth) to the .npz that diffjax loads.

The weights are the TensorFlow inception-2015-12-05 graph (the network of TTUR and TF-GAN's
FID) as ported to PyTorch by pytorch-fid. Get them once, by hand, from its GitHub release:

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

(about 91 MB; by torch.hub's naming convention the 8 hex digits in the name are the start of
its SHA-256, which this script checks and reports). Then, with PyTorch installed (only this
conversion needs it):

    python scripts/convert_inception_weights.py pt_inception-2015-12-05-6726825d.pth \\
        inception_fid.npz

and pass ``--inception_weights=inception_fid.npz`` to ``python -m diffjax.evaluate``.
The conversion checks that every tensor of the network is present with the right shape.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import numpy as np

from diffjax.evaluation.inception import save_inception_variables, torch_state_dict_to_variables

EXPECTED_SHA256_PREFIX = "6726825d"


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Tensors of a PyTorch state dict file as float32 NumPy arrays (needs torch)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(f"error: reading {path!r} needs PyTorch (pip install torch): {e}") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise SystemExit(f"error: {path!r} holds a {type(state).__name__}, not a state dict")
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pth", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("out", help="the .npz to write")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.pth):
        print(f"error: {args.pth!r} does not exist", file=sys.stderr)
        return 2

    digest = sha256_of(args.pth)
    if not digest.startswith(EXPECTED_SHA256_PREFIX):
        # The tensor names and shapes are checked below; a different hash means other values
        # (e.g. a re-export), which gives FIDs that are not comparable with published ones.
        print(
            f"warning: {args.pth!r} has SHA-256 {digest[:16]}..., not {EXPECTED_SHA256_PREFIX}...",
            file=sys.stderr,
        )
    try:
        variables = torch_state_dict_to_variables(load_torch_state_dict(args.pth))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_inception_variables(args.out, variables)
    print(f"wrote {args.out} (source SHA-256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
