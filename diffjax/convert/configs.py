"""diffusers UNet2DModel and DDPMScheduler configs -> a diffjax config.

``model_config_from_unet`` accepts only what computes exactly like the DDPM U-Net (sinusoidal
embedding in [sin, cos] order with frequencies exp(-j log(10000) / (half - 1)), GroupNorm eps
1e-6, single-head attention, TF-"SAME" stride-2 downsampling, no class embedding) and maps
``block_out_channels``, ``layers_per_block`` and the attention blocks to ``ch``, ``ch_mult``,
``num_res_blocks`` and ``attn_resolutions``. ``diffusion_config_from_scheduler`` recomputes the
scheduler's betas in float64 and names the diffjax schedule that equals them, and maps
``variance_type`` / ``prediction_type`` to var_type / mean_type. Anything else is a ValueError
naming the config key and value. ``make_config`` assembles a complete config; ``guess_dataset``
reads the dataset from folder names such as ``ddpm-ema-cifar10-32``. The tensors themselves are
converted by :mod:`diffjax.convert`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from diffjax.config.defaults import get_base_config
from diffjax.core import diffusion, schedules

__all__ = [
    "diffusion_config_from_scheduler",
    "guess_dataset",
    "make_config",
    "model_config_from_unet",
]

# UNet2DModel.__init__ defaults (diffusers 0.42), used for keys a config.json leaves out. Only
# attention_head_dim differs: its absence means the single head of diffusers 0.0.x configs.
_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D", "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "act_fn": "silu", "attention_head_dim": None, "norm_num_groups": 32,
    "attn_norm_num_groups": None, "norm_eps": 1e-5, "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
}  # fmt: skip

# Config values that compute exactly as the DDPM U-Net: key -> allowed values.
_REQUIRED: dict[str, tuple[Any, ...]] = {
    "time_embedding_type": ("positional",),
    "flip_sin_to_cos": (False,),  # [sin, cos] order
    "freq_shift": (1,),  # frequencies exp(-j log(10000) / (half - 1))
    "norm_eps": (1e-6,),  # tf.contrib group_norm's epsilon
    "act_fn": ("silu", "swish"),
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2D",),
    "mid_block_scale_factor": (1,),
    "resnet_time_scale_shift": ("default",),
    "downsample_padding": (0,),  # pad (0, 1) then stride 2, as TF "SAME"; 1 pads (1, 1)
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "add_attention": (True,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
}

# Block type -> has attention ("UNetRes" prefixes are aliases in diffusers).
_DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}

# diffusers scheduler beta_schedule -> float64 betas (T, beta_start, beta_end), as diffusers'
# DDPMScheduler computes them.
_SCHEDULER_BETAS: dict[str, Callable[[int, float, float], np.ndarray]] = {
    "linear": lambda t, b0, b1: np.linspace(b0, b1, t, dtype=np.float64),
    "scaled_linear": lambda t, b0, b1: np.linspace(b0**0.5, b1**0.5, t, dtype=np.float64) ** 2,
    "squaredcos_cap_v2": lambda t, b0, b1: _glide_cosine(t),
    "sigmoid": lambda t, b0, b1: b0 + (b1 - b0) / (1.0 + np.exp(-np.linspace(-6.0, 6.0, t))),
}
_VAR_TYPES = {
    "fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}  # fmt: skip
_MEAN_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# diffusers DDPMScheduler defaults, for keys a scheduler config leaves out.
_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "prediction_type": "epsilon",
    "clip_sample": True, "clip_sample_range": 1.0, "thresholding": False,
    "rescale_betas_zero_snr": False,
}  # fmt: skip
# Betas are float32 in diffusers and in a diffjax Schedule: agreement to 1e-6 is agreement.
_BETAS_RTOL = 1e-6

# Folder-name pattern -> diffjax dataset name (data.name), as in the google/ddpm-* names.
_DATASET_GUESSES = (
    (r"cifar-?10", "cifar10"), (r"celeb_?a?[_-]?hq", "celeb_a_hq"), (r"church", "lsun_church"),
    (r"bedroom", "lsun_bedroom"), (r"(?<![a-z])cat(?![a-z])", "lsun_cat"),
)  # fmt: skip
# A Hub snapshot is .../models--google--ddpm-cat-256/snapshots/<hash>/[unet]: 4 names suffice.
_GUESS_DEPTH = 4
_EVAL_SPLITS = {"celeb_a_hq": "train", "lsun_church": "validation", "lsun_bedroom": "validation"}


def _glide_cosine(num_timesteps: int) -> np.ndarray:
    # diffusers betas_for_alpha_bar: Nichol & Dhariwal 2021 eq. 17 with s = 0.008, cap 0.999.
    s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], 0.999)


def _unet_value(cfg: Mapping[str, Any], key: str) -> Any:
    return cfg.get(key, _UNET_DEFAULTS.get(key))


def _unsupported(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"unsupported UNet2DModel config {key}={value!r}; diffjax supports {allowed}")


def _is_allowed(value: Any, allowed: tuple[Any, ...]) -> bool:
    # Booleans match only booleans: JSON true is no freq_shift of 1.
    return any(
        (value is a) if isinstance(a, bool) or isinstance(value, bool) else value == a
        for a in allowed
    )


def _block_attention(cfg: Mapping[str, Any], key: str, table: Mapping[str, bool]) -> list[bool]:
    """Per block of ``cfg[key]``, whether it has attention."""
    attn = []
    for i, block in enumerate(_unet_value(cfg, key)):
        name = str(block).removeprefix("UNetRes")  # diffusers' alias prefix
        if name not in table:
            raise _unsupported(f"{key}[{i}]", block, " or ".join(table))
        attn.append(table[name])
    return attn


def _attention_levels(cfg: Mapping[str, Any]) -> list[bool]:
    """Per level, whether it has attention; the up path (in reverse) must agree with the down."""
    down = _block_attention(cfg, "down_block_types", _DOWN_BLOCKS)
    up = _block_attention(cfg, "up_block_types", _UP_BLOCKS)
    if down != up[::-1]:
        raise _unsupported(
            "up_block_types",
            list(_unet_value(cfg, "up_block_types")),
            "attention at the levels of down_block_types, in reverse order",
        )
    return down


def model_config_from_unet(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """diffjax ``data`` and ``model`` fields of a UNet2DModel config; ValueError if unsupported.

    :return: ``{"image_size", "channels", "out_channels", "model": {...}}``.
    """
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _unsupported("_class_name", cfg["_class_name"], "UNet2DModel")
    for key, allowed in _REQUIRED.items():
        value = _unet_value(cfg, key)
        if not _is_allowed(value, allowed):
            raise _unsupported(key, value, " or ".join(map(repr, allowed)))
    attn = _attention_levels(cfg)
    channels = [int(c) for c in _unet_value(cfg, "block_out_channels")]
    if len(channels) != len(attn):
        raise _unsupported("block_out_channels", channels, f"{len(attn)} levels")
    ch = channels[0]
    if any(c % ch for c in channels):
        raise _unsupported("block_out_channels", channels, f"multiples of the first ({ch})")
    if _unet_value(cfg, "time_embedding_dim") not in (None, 4 * ch):
        raise _unsupported("time_embedding_dim", cfg["time_embedding_dim"], f"None or {4 * ch}")
    head_dim = _unet_value(cfg, "attention_head_dim")
    for level, c in [(i, c) for i, c in enumerate(channels) if attn[i]] + [("mid", channels[-1])]:
        if head_dim not in (None, c):
            raise _unsupported(
                "attention_head_dim",
                head_dim,
                f"None or the channel count (single-head attention); level {level} has {c} "
                f"channels, i.e. {c // head_dim} heads",
            )
    groups = _unet_value(cfg, "norm_num_groups")
    if not isinstance(groups, int) or groups < 1 or any(c % groups for c in channels):
        raise _unsupported(
            "norm_num_groups", groups, f"a positive divisor of every block_out_channels {channels}"
        )
    if _unet_value(cfg, "attn_norm_num_groups") not in (None, groups):
        raise _unsupported("attn_norm_num_groups", cfg["attn_norm_num_groups"], f"None or {groups}")
    size = _unet_value(cfg, "sample_size")
    sizes = size if isinstance(size, list | tuple) else [size, size]
    if not isinstance(sizes[0], int) or sizes[0] != sizes[1]:
        raise _unsupported("sample_size", size, "a square size (an int)")
    return {
        "image_size": sizes[0],
        "channels": int(_unet_value(cfg, "in_channels")),
        "out_channels": int(_unet_value(cfg, "out_channels")),
        "model": {
            "ch": ch,
            "ch_mult": tuple(c // ch for c in channels),
            "num_res_blocks": int(_unet_value(cfg, "layers_per_block")),
            "attn_resolutions": tuple(sizes[0] // 2**i for i, a in enumerate(attn) if a),
            "dropout": 0.0,
            "resamp_with_conv": True,
            "dtype": "float32",
            "num_classes": 0,
            "num_groups": groups,
        },
    }


def diffusion_config_from_scheduler(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """diffjax ``diffusion`` fields (and ``clip_denoised``) of a diffusers scheduler config."""
    sched = {**_SCHEDULER_DEFAULTS, **(cfg or {})}
    for key, bad in (("thresholding", True), ("rescale_betas_zero_snr", True)):
        if sched[key] == bad:
            raise ValueError(f"unsupported scheduler config {key}={bad!r}; diffjax supports False")
    if sched["clip_sample"] and sched["clip_sample_range"] != 1.0:
        raise ValueError(
            f"unsupported scheduler config clip_sample_range={sched['clip_sample_range']!r}; "
            "diffjax clips x_0 to [-1, 1]"
        )
    for key, table in (("variance_type", _VAR_TYPES), ("prediction_type", _MEAN_TYPES)):
        if sched[key] not in table:
            raise ValueError(
                f"unsupported scheduler config {key}={sched[key]!r}; allowed: {', '.join(table)}"
            )
    t = int(sched["num_train_timesteps"])
    if sched["trained_betas"] is not None:
        betas = np.asarray(sched["trained_betas"], dtype=np.float64)
        what = "trained_betas"
    elif sched["beta_schedule"] in _SCHEDULER_BETAS:
        betas = _SCHEDULER_BETAS[sched["beta_schedule"]](t, sched["beta_start"], sched["beta_end"])
        what = (
            f"beta_schedule={sched['beta_schedule']!r} (beta_start={sched['beta_start']}, "
            f"beta_end={sched['beta_end']})"
        )
    else:
        raise ValueError(
            f"unsupported scheduler config beta_schedule={sched['beta_schedule']!r}; "
            f"allowed: {', '.join(_SCHEDULER_BETAS)}"
        )
    name = next(
        (
            n
            for n in schedules.SCHEDULES
            if betas.shape == (t,)
            and np.allclose(schedules.get_betas(n, t), betas, rtol=_BETAS_RTOL)
        ),
        None,
    )
    if name is None:
        raise ValueError(
            f"scheduler {what} at num_train_timesteps={t} equals no diffjax schedule; "
            f"allowed: {', '.join(schedules.SCHEDULES)} as "
            f"diffjax.core.schedules.get_betas(name, {t})"
        )
    var_type = _VAR_TYPES[sched["variance_type"]]
    return {
        "schedule": name,
        "num_timesteps": t,
        "mean_type": _MEAN_TYPES[sched["prediction_type"]],
        "var_type": var_type,
        "loss_type": "hybrid" if var_type == "learned_range" else "simple",
        "clip_denoised": bool(sched["clip_sample"]),
    }


def guess_dataset(folder: Path) -> str:
    """The dataset named in the innermost of the last few folder names that names one."""
    parts = folder.resolve().parts[::-1][:_GUESS_DEPTH]
    for part in parts:
        for pattern, name in _DATASET_GUESSES:
            if re.search(pattern, part.lower()):
                return name
    raise ValueError(
        f"cannot tell the dataset from the folder names {list(parts[::-1])}; name it "
        "(dataset=..., --dataset=NAME), e.g. "
        + ", ".join(dict.fromkeys(n for _, n in _DATASET_GUESSES))
    )


def make_config(
    unet_config: Mapping[str, Any],
    scheduler_config: Mapping[str, Any] | None,
    dataset: str,
) -> ml_collections.ConfigDict:
    """A complete diffjax config (schema of configs/*.py) for a converted model.

    Training and optimizer fields take the paper's CIFAR-10 values (Ho et al. 2020 appendix B);
    they matter only when training continues from the converted weights.
    """
    arch = model_config_from_unet(unet_config)
    diff = diffusion_config_from_scheduler(scheduler_config)
    clip = diff.pop("clip_denoised")
    expected = diffusion.model_output_channels(arch["channels"], diff["var_type"])
    if arch["out_channels"] != expected:
        raise ValueError(
            f"unsupported UNet2DModel config out_channels={arch['out_channels']}; with in_channels="
            f"{arch['channels']} and var_type={diff['var_type']!r} it must be {expected}"
        )
    config = get_base_config()
    config.data.update(
        dict(
            name=dataset,
            image_size=arch["image_size"],
            channels=arch["channels"],
            eval_split=_EVAL_SPLITS.get(dataset, "test"),
        )
    )
    config.model.update(arch["model"])
    config.diffusion.update(diff)
    config.training.class_dropout = 0.0
    config.training.sample_every_steps = 10_000
    config.sampling.num_samples = 50_000
    config.sampling.clip_denoised = clip
    return config
