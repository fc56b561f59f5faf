"""Up-front validation of a training config: every problem found at once, one line each.

A run on a preemptible multi-host slice should fail in its first second, not after hours of
compilation and data loading, and should report every mistake in one go rather than one per
restart. ``validate_config`` therefore evaluates every rule and raises a single
:class:`ConfigError` whose message has one line per problem; each line names the key, the bad
value and what is allowed, e.g.::

    training.batch_size = 30: must be divisible by 8 devices x 2 processes = 16

Rules are data (tables of ``(key, predicate, allowed)``), plus a few cross-field rules that need
several keys (schedule at T, U-Net geometry, batch sharding, the dataset's channels and labels).

Command lines: :func:`exit_on_unknown_overrides` reports ``--config.x.y=...`` overrides that
name no field, which ml_collections would otherwise report with a traceback. How errors reach a
command line (``ConfigError``, ``ReportableError``, ``exit_on_reportable_error``) is
``diffjax.errors``; the names are re-exported here.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from diffjax import choices
from diffjax.core import diffusion, losses, schedules
from diffjax.errors import (
    ConfigError,
    ReportableError,
    exit_on_config_error,
    exit_on_reportable_error,
    exit_with_config_error,
    format_config_error,
)
from diffjax.models.geometry import unet_problems
from diffjax.training import watchdog

__all__ = [
    "ConfigError",
    "ReportableError",
    "config_problems",
    "exit_on_config_error",
    "exit_on_reportable_error",
    "exit_on_unknown_overrides",
    "exit_with_config_error",
    "format_config_error",
    "load_config_file",
    "override_problems",
    "validate_config",
]

_MISSING = object()
NAN_POLICIES = ("stop", "skip")
DTYPES = choices.DTYPES
SAMPLERS = choices.SAMPLERS


# ---------------------------------------------------------------------------------------------
# Predicates. bool is excluded from the numbers: `True` as a step count is a typo, not a 1.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(lo: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= lo), f"an integer >= {lo}"


def _real_in(lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> tuple[Callable, str]:
    def ok(v: Any) -> bool:
        if not _is_real(v):
            return False
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        return above and below

    text = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return ok, text


def _positive_real() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_real(v) and v > 0), "a finite number > 0"


def _non_negative_real() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_real(v) and v >= 0), "a finite number >= 0"


def _one_of(names: Sequence[str]) -> tuple[Callable[[Any], bool], str]:
    names = tuple(names)
    return (lambda v: isinstance(v, str) and v in names), "one of " + ", ".join(names)


def _boolean() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, bool)), "True or False"


def _optional_path() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or (isinstance(v, str) and v != "")), "None or a file path"


def _int_tuple(*, non_empty: bool) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        if not isinstance(v, tuple | list) or (non_empty and not v):
            return False
        return all(_is_int(x) and x >= 1 for x in v)

    return ok, ("a non-empty" if non_empty else "a") + " tuple of integers >= 1"


def _dataset_table() -> dict[str, Any] | None:
    """``diffjax.data.registry.DATASETS`` (name -> spec), or None while it is unavailable.

    Imported lazily: the dataset package pulls in heavier dependencies than validation needs.
    """
    try:
        datasets = importlib.import_module("diffjax.data.registry")
    except ImportError:
        return None
    return getattr(datasets, "DATASETS", None)


def _field_rules() -> list[tuple[str, Callable[[Any], bool], str]]:
    """Single-key rules: (dotted key, predicate, what is allowed)."""
    rules = [
        ("data.image_size", *_int_at_least(1)),
        ("data.channels", *_int_at_least(1)),
        ("data.num_classes", *_int_at_least(0)),
        ("data.random_flip", *_boolean()),
        ("data.cache_max_mb", *_int_at_least(0)),
        ("model.ch", *_int_at_least(1)),
        ("model.num_groups", *_int_at_least(1)),
        ("model.ch_mult", *_int_tuple(non_empty=True)),
        ("model.num_res_blocks", *_int_at_least(1)),
        ("model.attn_resolutions", *_int_tuple(non_empty=False)),
        ("model.dropout", *_real_in(0, 1, lo_open=False, hi_open=True)),
        ("model.resamp_with_conv", *_boolean()),
        ("model.dtype", *_one_of(DTYPES)),
        ("model.kernels", *_one_of(choices.KERNELS)),
        ("model.num_classes", *_int_at_least(0)),
        ("diffusion.schedule", *_one_of(schedules.SCHEDULES)),
        ("diffusion.num_timesteps", *_int_at_least(1)),
        ("diffusion.mean_type", *_one_of(diffusion.MEAN_TYPES)),
        ("diffusion.var_type", *_one_of(diffusion.VAR_TYPES)),
        ("diffusion.loss_type", *_one_of(losses.LOSS_TYPES)),
        ("training.num_train_steps", *_int_at_least(1)),
        ("training.batch_size", *_int_at_least(1)),
        ("training.seed", lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
        ("training.checkpoint_every_steps", *_int_at_least(1)),
        ("training.sample_every_steps", *_int_at_least(1)),
        ("training.log_every_steps", *_int_at_least(1)),
        ("training.keep_checkpoints", *_int_at_least(1)),
        ("training.ema_decay", *_real_in(0, 1, lo_open=False, hi_open=True)),
        ("training.ema_warmup", *_boolean()),
        ("training.class_dropout", *_real_in(0, 1, lo_open=False, hi_open=False)),
        ("training.nan_policy", *_one_of(NAN_POLICIES)),
        ("training.max_consecutive_skips", *_int_at_least(1)),
        *((f"training.watchdog_{name}", *rule) for name, rule in watchdog.FIELD_RULES.items()),
        ("optimizer.learning_rate", *_positive_real()),
        ("optimizer.warmup_steps", *_int_at_least(0)),
        ("optimizer.decay", *_one_of(choices.LR_DECAYS)),
        ("optimizer.grad_clip", *_non_negative_real()),  # 0 = no clipping
        ("optimizer.beta1", *_real_in(0, 1, lo_open=False, hi_open=True)),
        ("optimizer.beta2", *_real_in(0, 1, lo_open=False, hi_open=True)),
        ("optimizer.eps", *_positive_real()),
        ("sampling.num_samples", *_int_at_least(1)),
        ("sampling.sampler", *_one_of(SAMPLERS)),
        ("sampling.num_steps", *_int_at_least(0)),
        ("sampling.eta", *_non_negative_real()),
        ("sampling.clip_denoised", *_boolean()),
        ("sampling.guidance_scale", *_non_negative_real()),
        (
            "sampling.order",
            lambda v: _is_int(v) and v in choices.DPM_ORDERS,
            f"one of {', '.join(map(str, choices.DPM_ORDERS))}",
        ),
        ("sampling.spacing", *_one_of(choices.DPM_SPACINGS)),
        ("evaluation.eval_every_steps", *_int_at_least(0)),  # 0 = off
        ("evaluation.eval_examples", *_int_at_least(1)),
        ("evaluation.quality_every_steps", *_int_at_least(0)),  # 0 = off
        ("evaluation.bpd_examples", *_int_at_least(0)),  # 0 = no bits/dim
        ("evaluation.sample_metric", *_one_of(choices.EVAL_SAMPLE_METRICS)),
        ("evaluation.num_samples", *_int_at_least(2)),
        ("evaluation.sampler", *_one_of(SAMPLERS)),
        ("evaluation.num_steps", *_int_at_least(0)),
        ("evaluation.batch_size", *_int_at_least(1)),
        ("evaluation.inception_weights", *_optional_path()),
        ("evaluation.ref_stats", *_optional_path()),
    ]
    table = _dataset_table()
    if table is not None:
        rules.insert(0, ("data.name", *_one_of(tuple(table))))
    return rules


# ---------------------------------------------------------------------------------------------
# Cross-field rules. Each reads the keys it needs, and stays silent when one of them already
# failed its own field rule (that problem is reported once, by the field rule).


def _get(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return node


def _valid(config: Any, key: str, ok: Callable[[Any], bool]) -> Any:
    v = _get(config, key)
    return v if v is not _MISSING and ok(v) else _MISSING


def _check_betas(config: Any, ctx: dict[str, int]) -> Iterator[str]:
    name = _valid(config, "diffusion.schedule", _one_of(schedules.SCHEDULES)[0])
    t = _valid(config, "diffusion.num_timesteps", _int_at_least(1)[0])
    if name is _MISSING or t is _MISSING:
        return
    betas = schedules.get_betas(name, t)
    bad = [i for i, b in enumerate(betas) if not (math.isfinite(b) and 0.0 < b <= 1.0)]
    if bad:
        i = bad[0]
        yield (
            f"diffusion.schedule = {name!r} with diffusion.num_timesteps = {t}: betas[{i}] = "
            f"{betas[i]!r} ({len(bad)} of {t} bad); every beta must be in (0, 1]"
        )


def _check_variance_loss(config: Any, ctx: dict[str, int]) -> Iterator[str]:
    var_type = _valid(config, "diffusion.var_type", _one_of(diffusion.VAR_TYPES)[0])
    loss_type = _valid(config, "diffusion.loss_type", _one_of(losses.LOSS_TYPES)[0])
    if var_type == "learned_range" and loss_type == "simple":
        # L_simple has no gradient for the variance channels: they would stay at their init.
        yield (
            "diffusion.loss_type = 'simple' with diffusion.var_type = 'learned_range': L_simple "
            "trains no variance; use loss_type 'hybrid' (Nichol & Dhariwal 2021 eq. 16) or 'kl'"
        )


def _check_batch(config: Any, ctx: dict[str, int]) -> Iterator[str]:
    batch = _valid(config, "training.batch_size", _int_at_least(1)[0])
    shards = ctx["num_devices"] * ctx["num_processes"]
    if batch is not _MISSING and batch % shards:
        yield (
            f"training.batch_size = {batch}: the global batch must be divisible by "
            f"{ctx['num_devices']} devices per process x {ctx['num_processes']} process(es) "
            f"= {shards}"
        )


def _check_unet_geometry(config: Any, ctx: dict[str, int]) -> Iterator[str]:
    # The U-Net's own rules (diffjax.models.geometry), checked before any compilation.
    size = _valid(config, "data.image_size", _int_at_least(1)[0])
    ch_mult = _valid(config, "model.ch_mult", _int_tuple(non_empty=True)[0])
    ch = _valid(config, "model.ch", _int_at_least(1)[0])
    attn = _valid(config, "model.attn_resolutions", _int_tuple(non_empty=False)[0])
    groups = _valid(config, "model.num_groups", _int_at_least(1)[0])
    if _MISSING in (size, ch_mult, ch, attn, groups):
        return
    for field, message in unet_problems(size, size, ch, ch_mult, attn, groups):
        yield f"{field} = {_get(config, field)!r}: {message}"


def _check_sampling_steps(config: Any, ctx: dict[str, int]) -> Iterator[str]:
    steps = _valid(config, "sampling.num_steps", _int_at_least(0)[0])
    t = _valid(config, "diffusion.num_timesteps", _int_at_least(1)[0])
    if steps is not _MISSING and t is not _MISSING and steps > t:
        yield (
            f"sampling.num_steps = {steps}: must be <= diffusion.num_timesteps = {t} "
            "(0 means all steps)"
        )


def _check_classes(config: Any, ctx: dict[str, int]) -> Iterator[str]:
    model_classes = _valid(config, "model.num_classes", _int_at_least(0)[0])
    data_classes = _valid(config, "data.num_classes", _int_at_least(0)[0])
    guidance = _valid(config, "sampling.guidance_scale", _non_negative_real()[0])
    if model_classes is _MISSING:
        return
    # A conditional model needs labels from the data, with the same id range.
    if model_classes > 0 and data_classes is not _MISSING and data_classes != model_classes:
        yield (
            f"model.num_classes = {model_classes}: a conditional model needs "
            f"data.num_classes = {model_classes} labels, got data.num_classes = {data_classes}; "
            "allowed: model.num_classes = 0 (unconditional) or equal to data.num_classes"
        )
    if model_classes == 0 and guidance is not _MISSING and guidance > 0:
        yield (
            f"sampling.guidance_scale = {guidance}: classifier-free guidance needs a "
            "conditional model; allowed: 0 when model.num_classes = 0"
        )


def _check_dataset(config: Any, ctx: dict[str, int]) -> Iterator[str]:
    # The rules diffjax.data.pipeline applies when it opens the data, checked up front.
    table = _dataset_table()
    name = _get(config, "data.name")
    if table is None or not isinstance(name, str) or name not in table:
        return
    spec = table[name]
    channels = _valid(config, "data.channels", _int_at_least(1)[0])
    if channels is not _MISSING and channels != spec.channels:
        yield f"data.channels = {channels}: dataset {name!r} has {spec.channels} channel(s)"
    classes = _valid(config, "data.num_classes", _int_at_least(0)[0])
    if classes is not _MISSING and classes > 0 and classes != spec.num_classes:
        allowed = "0 (unlabelled dataset)" if not spec.num_classes else f"0 or {spec.num_classes}"
        yield f"data.num_classes = {classes}: dataset {name!r} allows {allowed}"
    split = _get(config, "data.train_split")
    if isinstance(split, str) and split not in spec.splits:
        yield (
            f"data.train_split = {split!r}: dataset {name!r} has splits {', '.join(spec.splits)}"
        )


def _check_evaluation(config: Any, ctx: dict[str, int]) -> Iterator[str]:
    # Evaluation during training (diffjax.training.evaluation): its batch is sharded like the
    # training batch, its sampler has at most T steps, and its sample metric needs its inputs.
    every = [_valid(config, f"evaluation.{k}_every_steps", _int_at_least(0)[0]) for k in
             ("eval", "quality")]  # fmt: skip
    batch = _valid(config, "evaluation.batch_size", _int_at_least(1)[0])
    shards = ctx["num_devices"] * ctx["num_processes"]
    if any(e not in (_MISSING, 0) for e in every) and batch is not _MISSING and batch % shards:
        yield (
            f"evaluation.batch_size = {batch}: must be divisible by {ctx['num_devices']} devices "
            f"per process x {ctx['num_processes']} process(es) = {shards}"
        )
    steps = _valid(config, "evaluation.num_steps", _int_at_least(0)[0])
    t = _valid(config, "diffusion.num_timesteps", _int_at_least(1)[0])
    if steps is not _MISSING and t is not _MISSING and steps > t:
        yield (
            f"evaluation.num_steps = {steps}: must be <= diffusion.num_timesteps = {t} "
            "(0 means all steps)"
        )
    weights, ref = (_valid(config, f"evaluation.{k}", _optional_path()[0]) for k in
                    ("inception_weights", "ref_stats"))  # fmt: skip
    if _MISSING not in (weights, ref) and (weights is None) != (ref is None):
        given, other = ("inception_weights", "ref_stats")[:: 1 if ref is None else -1]
        yield (
            f"evaluation.{given} = {_get(config, f'evaluation.{given}')!r}: FID/IS also need "
            f"evaluation.{other}; allowed: both or neither"
        )
    metric = _valid(config, "evaluation.sample_metric", _one_of(choices.EVAL_SAMPLE_METRICS)[0])
    name = _get(config, "data.name")
    if metric == "digits_fd" and name not in ("digits", "mnist"):
        yield (
            f"evaluation.sample_metric = 'digits_fd': needs data.name digits or mnist, got "
            f"{name!r}; allowed here: auto, fid, none"
        )
    if metric == "fid" and weights is None and ref is None:
        yield (
            "evaluation.sample_metric = 'fid': needs evaluation.inception_weights and "
            "evaluation.ref_stats (an .npz each)"
        )


def _check_lr_decay(config: Any, ctx: dict[str, int]) -> Iterator[str]:
    # A cosine decays from the end of warm-up to the last step: it needs steps after warm-up.
    decay = _valid(config, "optimizer.decay", _one_of(choices.LR_DECAYS)[0])
    warmup = _valid(config, "optimizer.warmup_steps", _int_at_least(0)[0])
    steps = _valid(config, "training.num_train_steps", _int_at_least(1)[0])
    if decay == "cosine" and _MISSING not in (warmup, steps) and steps <= warmup:
        yield (
            f"optimizer.decay = 'cosine' with training.num_train_steps = {steps}: needs more "
            f"steps than optimizer.warmup_steps = {warmup}; allowed: decay 'constant', or fewer "
            "warm-up steps"
        )


_CROSS_RULES: tuple[Callable[[Any, dict[str, int]], Iterator[str]], ...] = (
    _check_dataset,
    _check_betas,
    _check_variance_loss,
    _check_batch,
    _check_unet_geometry,
    _check_sampling_steps,
    _check_classes,
    _check_evaluation,
    _check_lr_decay,
)


def config_problems(config: Any, *, num_devices: int, num_processes: int) -> list[str]:
    """Every problem of ``config``, one line each (empty when the config is valid).

    :param num_devices: devices per process (``jax.local_device_count()``).
    :param num_processes: ``jax.process_count()``; the global batch is split over
        ``num_devices * num_processes`` devices.
    """
    for name, n in (("num_devices", num_devices), ("num_processes", num_processes)):
        if not _is_int(n) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    problems = []
    for key, ok, allowed in _field_rules():
        value = _get(config, key)
        if value is _MISSING:
            problems.append(f"{key} is missing; allowed: {allowed}")
        elif not ok(value):
            problems.append(f"{key} = {value!r}: must be {allowed}")
    ctx = {"num_devices": num_devices, "num_processes": num_processes}
    for rule in _CROSS_RULES:
        problems.extend(rule(config, ctx))
    return problems


def validate_config(config: Any, *, num_devices: int, num_processes: int) -> None:
    """Raise one :class:`ConfigError` listing every problem of ``config``; None if valid.

    :param config: the training ConfigDict (schema: data, model, diffusion, training,
        optimizer, sampling, evaluation).
    :param num_devices: devices per process (``jax.local_device_count()``).
    :param num_processes: ``jax.process_count()``.
    """
    problems = config_problems(config, num_devices=num_devices, num_processes=num_processes)
    if problems:
        raise ConfigError(problems)


def override_problems(config: Any, argv: Sequence[str], flag: str = "config") -> list[str]:
    """One line per ``--config.a.b=value`` in ``argv`` that names no field of ``config``.

    ml_collections' config flags report such an override with a Python traceback (and, when
    ``--config`` is not given, already while the flag is defined); a command line calls this
    first, with the config it is about to load, to print a one-line error instead.
    """
    problems = []
    prefix = re.compile(rf"^--?(?:no)?{re.escape(flag)}\.")
    for arg in argv:
        if not prefix.match(arg):
            continue
        path = arg.split("=", 1)[0].split(".", 1)[1]
        node, walked = config, [flag]
        for part in path.split("."):
            keys = _child_keys(node)
            if keys is None:
                break  # inside a leaf value (e.g. a tuple): ml_collections reports that itself
            if part not in keys:
                where = ".".join(walked)
                problems.append(
                    f"{arg.split('=', 1)[0]}: {where} has no field {part!r}; allowed: "
                    f"{', '.join(sorted(keys))}"
                )
                break
            node, walked = node[part], [*walked, part]
    return problems


def _config_file_from_argv(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}=") or arg.startswith(f"-{flag}="):
            return arg.split("=", 1)[1]
        if arg in (f"--{flag}", f"-{flag}") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(path: str) -> Any:
    """``get_config()`` of a config file given as ``PATH[:ARG]``, as ml_collections' flag does."""
    file, *arg = path.split(":", 1)
    spec = importlib.util.spec_from_file_location("diffjax_config_file", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*arg)


def exit_on_unknown_overrides(
    argv: Sequence[str], default_config: str, flag: str = "config", stream: TextIO | None = None
) -> None:
    """Exit with status 2 and one line per override in ``argv`` that names no config field.

    Call it before ``config_flags.DEFINE_config_file`` (which already applies the overrides
    when ``--config`` is not given). The config file is ``--config=PATH[:ARG]`` from ``argv``,
    else ``default_config``; when it cannot be loaded, nothing is checked here and the flag
    reports the failure itself.
    """
    path = _config_file_from_argv(argv, flag) or str(default_config)
    try:
        config = load_config_file(path)
        problems = override_problems(config, argv, flag)
    except Exception:  # noqa: BLE001 - loading errors are reported by the flag itself
        return
    if problems:
        exit_with_config_error(ConfigError(problems), stream)


def _child_keys(node: Any) -> list[str] | None:
    if hasattr(node, "keys") and callable(node.keys):
        return [str(k) for k in node.keys()]
    return None
