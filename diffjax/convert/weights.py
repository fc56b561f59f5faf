"""Convert diffusers ``UNet2DModel`` DDPM checkpoints into diffjax runs.

The official DDPM weights of Ho et al. 2020 (``google/ddpm-cifar10-32``,
``google/ddpm-ema-cifar10-32``, ``google/ddpm-{celebahq,church,bedroom,cat}-256`` and their EMA
versions) are published as diffusers folders: a ``UNet2DModel`` ``config.json`` with its
``diffusion_pytorch_model.safetensors`` (at the root or under ``unet/``; a pipeline folder has a
``model_index.json`` naming the component folders) and a ``scheduler_config.json`` (at the root or
under ``scheduler/``). The tensors are read with ``safetensors.numpy``: no torch at conversion.

Mapping (diffusers -> diffjax, see the param tree in ``diffjax.models.unet``):

- architecture: ``ch = block_out_channels[0]``, ``ch_mult = block_out_channels / ch``,
  ``num_res_blocks = layers_per_block``, ``attn_resolutions`` = the heights of the levels whose
  down block is ``AttnDownBlock2D``; conv resampling; dropout 0 (inference).
- tensors: conv ``[O, I, kh, kw] -> [kh, kw, I, O]``; linear ``[out, in] -> [in, out]``; 1x1 convs
  (``conv_shortcut``) -> Dense kernels; GroupNorm ``weight -> scale``; ``up_blocks.k`` is diffjax
  level ``L - 1 - k``. Attention projections under their current (``to_q``, ``to_out.0``) or legacy
  (``query``, ``proj_attn``) names. Every source tensor must be consumed and every diffjax
  parameter filled with its exact shape.
- diffusion: the scheduler's betas (recomputed in float64 from its ``beta_schedule``) must equal a
  diffjax schedule at the same T within float32 precision, since a diffjax config names its
  schedule; anything else (other endpoints, ``trained_betas`` of no named schedule) is a
  ValueError. ``variance_type`` fixed_small(_log) / fixed_large(_log) / learned_range and
  ``prediction_type`` epsilon / sample / v_prediction map to var_type and mean_type (eps/x0/v).
  Without a scheduler config, diffusers' ``DDPMScheduler`` defaults (Ho et al. 2020's linear
  1e-4..0.02 at T=1000, fixed_small, epsilon) apply.

Only what computes exactly like the DDPM U-Net is accepted: a sinusoidal embedding in
[sin, cos] order with frequencies exp(-j log(10000) / (half - 1)) (``flip_sin_to_cos=False,
freq_shift=1``), GroupNorm with 32 groups and eps 1e-6, single-head attention, TF-"SAME" stride-2
downsampling (``downsample_padding=0``: pad 0 before and 1 after), no class embedding. Anything
else is a ValueError naming the config key and value. A config without ``attention_head_dim``
(as written by diffusers 0.0.x, the official DDPM folders) means single-head attention, the
architecture those weights were trained with.

The config translation (and its checks) is :mod:`diffjax.convert.configs`; this module reads
the folders and maps the tensors.

Command line::

    python -m diffjax.convert --from=DIR_OR_HUB_ID --to=RUN [--ema_from=DIR] [--dataset=NAME]
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy
from etils import epath

from diffjax import errors
from diffjax.cli import common as cli
from diffjax.convert.configs import (
    diffusion_config_from_scheduler,
    guess_dataset,
    make_config,
    model_config_from_unet,
)
from diffjax.models import create_model
from diffjax.training import checkpointing

__all__ = [
    "DiffusersFolder",
    "convert",
    "convert_unet_params",
    "diffusion_config_from_scheduler",
    "locate",
    "main",
    "make_config",
    "model_config_from_unet",
    "read_diffusers",
    "read_tensors",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
EXIT_USAGE = cli.EXIT_USAGE
_PROG = "diffjax.convert"

_RESNET = {
    "norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2",
    "conv2": "conv2", "conv_shortcut": "nin_shortcut",
}  # fmt: skip
_ATTN = {
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
}  # fmt: skip
_RESAMPLE = {"conv": "conv", "Conv2d_0": "conv"}  # diffusers registers the conv under both


# diffusers module (regex; a sub-layer from the table follows when there is one) -> diffjax
# module. Group "down" is the level, "up" an up_blocks index k (level L - 1 - k), "i" the index.
_MODULES: tuple[tuple[re.Pattern, str, Mapping[str, str] | None], ...] = tuple(
    (re.compile(pattern + (r"\.(?P<layer>.+)" if table else "")), target, table)
    for pattern, target, table in (
        (r"conv_in", "conv_in", None),
        (r"time_embedding\.linear_1", "temb_dense_0", None),
        (r"time_embedding\.linear_2", "temb_dense_1", None),
        (r"down_blocks\.(?P<down>\d+)\.resnets\.(?P<i>\d+)", "down_{level}_block_{i}", _RESNET),
        (r"down_blocks\.(?P<down>\d+)\.attentions\.(?P<i>\d+)", "down_{level}_attn_{i}", _ATTN),
        (r"down_blocks\.(?P<down>\d+)\.downsamplers\.0", "down_{level}_downsample", _RESAMPLE),
        (r"mid_block\.resnets\.0", "mid_block_1", _RESNET),
        (r"mid_block\.attentions\.0", "mid_attn", _ATTN),
        (r"mid_block\.resnets\.1", "mid_block_2", _RESNET),
        (r"up_blocks\.(?P<up>\d+)\.resnets\.(?P<i>\d+)", "up_{level}_block_{i}", _RESNET),
        (r"up_blocks\.(?P<up>\d+)\.attentions\.(?P<i>\d+)", "up_{level}_attn_{i}", _ATTN),
        (r"up_blocks\.(?P<up>\d+)\.upsamplers\.0", "up_{level}_upsample", _RESAMPLE),
        (r"conv_norm_out", "norm_out", None),
        (r"conv_out", "conv_out", None),
    )
)  # fmt: skip

# (source ndim, target ndim) -> PyTorch layout to flax layout.
_LAYOUTS: dict[tuple[int, int], Callable[[np.ndarray], np.ndarray]] = {
    (4, 4): lambda w: w.transpose(2, 3, 1, 0),  # conv OIHW -> HWIO
    (4, 2): lambda w: w[:, :, 0, 0].T if w.shape[2:] == (1, 1) else None,  # 1x1 conv -> Dense
    (2, 2): lambda w: w.T,  # linear [out, in] -> [in, out]
    (1, 1): lambda w: w,
}

# A Hugging Face Hub repository id ("owner/name"), downloaded when no such local path exists.
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class DiffusersFolder(NamedTuple):
    """A located diffusers model: its folder, UNet config and scheduler config (or None)."""

    unet_dir: Path
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any] | None


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def locate(src: str | Path) -> DiffusersFolder:
    """Find the UNet2DModel and scheduler configs in a pipeline, ``unet/`` or flat folder."""
    root = Path(src)
    index = root / "model_index.json"
    unet_name, sched_name = "unet", "scheduler"
    if index.is_file():
        components = {k: v for k, v in _read_json(index).items() if isinstance(v, list)}
        unets = [k for k, v in components.items() if v[-1] == "UNet2DModel"]
        if not unets:
            raise ValueError(f"{index} names no UNet2DModel component; components: {components}")
        unet_name = unets[0]
        sched_name = next((k for k, v in components.items() if "Scheduler" in str(v[-1])), "")
    config = _first_existing(root / unet_name / "config.json", root / "config.json")
    if config is None:
        raise ValueError(
            f"no UNet2DModel config.json in {root} (looked in {root / unet_name} and {root})"
        )
    scheduler = _first_existing(
        *((root / sched_name / "scheduler_config.json",) if sched_name else ()),
        root / "scheduler_config.json",
        root.parent / "scheduler" / "scheduler_config.json",  # src is a pipeline's unet/
    )
    return DiffusersFolder(
        config.parent, _read_json(config), None if scheduler is None else _read_json(scheduler)
    )


def read_tensors(unet_dir: str | Path) -> dict[str, np.ndarray]:
    """All tensors of ``diffusion_pytorch_model.safetensors`` (or its shards), as numpy."""
    folder = Path(unet_dir)
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
    elif (folder / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise ValueError(
            f"no {WEIGHTS_NAME} in {folder} (found: {sorted(p.name for p in folder.iterdir())}); "
            "a .bin checkpoint must first be re-saved as safetensors, e.g. with diffusers' "
            "UNet2DModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(safetensors.numpy.load_file(folder / name))
    return tensors


def _expected_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """'module/.../leaf' -> shape of every parameter of the diffjax U-Net for ``config``."""
    model = create_model(config)
    size, c = config.data.image_size, config.data.channels
    x = jnp.zeros((1, size, size, c), jnp.float32)  # [1, H, W, C]
    t = jnp.zeros((1,), jnp.int32)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False))["params"]
    return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()}


def _target_of(key: str, ndim: int, num_levels: int) -> str | None:
    """The diffjax parameter path of diffusers tensor ``key`` (of rank ``ndim``), or None."""
    module, _, leaf = key.rpartition(".")
    leaf = {"bias": "bias", "weight": "scale" if ndim == 1 else "kernel"}.get(leaf)
    for pattern, target, table in _MODULES:
        m = pattern.fullmatch(module)
        if m is None:
            continue
        g = m.groupdict()
        layer = table.get(g["layer"]) if table else ""
        if leaf is None or layer is None:
            return None
        level = int(g["down"]) if g.get("down") else num_levels - 1 - int(g.get("up") or 0)
        name = target.format(level=level, i=g.get("i"))
        return "/".join(p for p in (name, layer, leaf) if p)
    return None


def convert_unet_params(
    tensors: Mapping[str, np.ndarray], config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """The diffjax ``params`` tree (float32 numpy) of UNet2DModel tensors, for ``config``.

    ValueError when a tensor has no place, a parameter stays unfilled, or a shape differs.
    """
    expected = _expected_shapes(config)
    num_levels = len(config.model.ch_mult)
    out: dict[str, np.ndarray] = {}
    source_of: dict[str, str] = {}
    unknown = []
    for key in sorted(tensors):
        w = np.asarray(tensors[key], dtype=np.float32)
        path = _target_of(key, w.ndim, num_levels)
        if path is None or path not in expected:
            unknown.append(f"{key} {w.shape}" + (f" -> {path}" if path else ""))
            continue
        layout = _LAYOUTS.get((w.ndim, len(expected[path])))
        flax_w = None if layout is None else layout(w)
        if flax_w is None or flax_w.shape != expected[path]:
            raise ValueError(
                f"tensor {key} of shape {w.shape} does not fit diffjax parameter {path} of "
                f"shape {expected[path]}"
            )
        if path in out and not np.array_equal(out[path], flax_w):
            raise ValueError(f"tensors {source_of[path]} and {key} both map to {path} but differ")
        out[path], source_of[path] = flax_w, key
    if unknown:
        raise ValueError(
            f"{len(unknown)} tensor(s) have no place in the diffjax U-Net: {'; '.join(unknown[:8])}"
        )
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(
            f"{len(missing)} diffjax parameter(s) not in the checkpoint: {', '.join(missing[:8])}"
        )
    return flax.traverse_util.unflatten_dict(out, sep="/")


def read_diffusers(
    src: str | Path, dataset: str | None = None
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(diffjax config, params) of a diffusers UNet2DModel folder; see the module docstring."""
    folder = locate(src)
    name = dataset or guess_dataset(Path(src))
    config = make_config(folder.unet_config, folder.scheduler_config, name)
    return config, convert_unet_params(read_tensors(folder.unet_dir), config)


def _local(src: str | Path) -> Path:
    """``src`` itself, or for a Hub id (``owner/name``, not a local path) a local snapshot."""
    if Path(src).exists() or not _HUB_ID.fullmatch(str(src)):
        return Path(src)
    repo_id = str(src)
    try:
        import huggingface_hub  # optional: only for hub ids
    except ImportError as e:
        raise ValueError(
            f"{repo_id!r} is no local folder, and downloading it needs huggingface_hub "
            "(pip install 'diffjax[convert]')"
        ) from e
    files = ["*.json", "*.safetensors", "*.safetensors.index.json"]
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=files))
    except Exception as e:  # network, authentication or unknown repository
        raise ValueError(f"cannot download {repo_id!r} from the Hugging Face Hub: {e}") from e


def convert(
    src: str | Path,
    workdir: str,
    *,
    ema_src: str | Path | None = None,
    dataset: str | None = None,
    step: int = 0,
) -> ml_collections.ConfigDict:
    """Write a diffjax inference run (config.json + orbax checkpoint) from diffusers weights.

    :param src: a diffusers folder, or a Hub id such as ``google/ddpm-ema-cifar10-32``.
    :param workdir: the run directory to write (local path or gs://).
    :param ema_src: optional second folder for ``ema_params`` (e.g. the ``ddpm-ema-*`` weights,
        ``src`` then giving ``params``); its config must convert to the same diffjax config.
        Without it, ``params`` and ``ema_params`` are both the weights of ``src``.
    :param dataset: diffjax dataset name (data.name); guessed from the folder name if None.
    :param step: the checkpoint step to record.
    :return: the config written.
    """
    if (epath.Path(workdir) / "config.json").exists():
        raise ValueError(f"{workdir} already holds a run (config.json); choose a new workdir")
    config, params = read_diffusers(_local(src), dataset)
    ema_params = params
    if ema_src is not None:
        ema_config, ema_params = read_diffusers(_local(ema_src), config.data.name)
        if ema_config.to_dict() != config.to_dict():
            raise ValueError(f"{ema_src} converts to another config than {src}")
    checkpointing.save_inference_run(workdir, config, params, ema_params, step)
    return config


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> None:
    """``python -m diffjax.convert --from=DIR --to=RUN``; errors: one line, exit status 2.

    ``prog``: the command ``--help`` shows (``diffjax convert``; default
    ``python -m diffjax.convert``). Errors are one ``diffjax.convert: error: ...`` line
    (``diffjax.errors.exit_on_reportable_error``).
    """
    parser = cli.OneLineParser(_PROG, prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="src", required=True, help="diffusers folder or Hub id")
    parser.add_argument("--to", dest="workdir", required=True, help="diffjax run directory")
    parser.add_argument("--ema_from", default=None, help="optional folder for ema_params")
    parser.add_argument("--dataset", default=None, help="data.name (default: from the folder)")
    parser.add_argument("--step", type=int, default=0, help="checkpoint step to record")
    with errors.exit_on_reportable_error(prog=_PROG):
        args = parser.parse_args(argv)
        try:
            config = convert(
                args.src, args.workdir, ema_src=args.ema_from, dataset=args.dataset, step=args.step
            )
        except (ValueError, OSError) as e:
            raise cli.UsageError(str(e)) from None
    m, d = config.model, config.diffusion
    print(
        f"wrote {args.workdir}: {config.data.name} {config.data.image_size}px, ch={m.ch} "
        f"ch_mult={m.ch_mult} attn={m.attn_resolutions}, {d.schedule} T={d.num_timesteps} "
        f"{d.mean_type}/{d.var_type}"
    )


if __name__ == "__main__":
    main()
