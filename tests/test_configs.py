"""Every config builds, follows the schema, validates, and matches its published recipe."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from diffjax.config.validation import validate_config
from diffjax.models import create_model

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("digits", "mnist", "cifar10", "celeba_hq256", "lsun_church256")

# The config schema, section by section.
SCHEMA = {
    "data": {
        "name",
        "data_dir",
        "image_size",
        "channels",
        "random_flip",
        "cache_max_mb",
        "train_split",
        "eval_split",
        "num_classes",
    },
    "model": {
        "ch",
        "ch_mult",
        "num_res_blocks",
        "attn_resolutions",
        "dropout",
        "resamp_with_conv",
        "dtype",
        "kernels",
        "num_classes",
        "num_groups",
    },
    "diffusion": {"schedule", "num_timesteps", "mean_type", "var_type", "loss_type"},
    "training": {
        "num_train_steps",
        "batch_size",
        "seed",
        "checkpoint_every_steps",
        "sample_every_steps",
        "log_every_steps",
        "keep_checkpoints",
        "ema_decay",
        "ema_warmup",
        "class_dropout",
        "nan_policy",
        "max_consecutive_skips",
        "watchdog_factor",
        "watchdog_min_seconds",
        "watchdog_first_seconds",
    },
    "optimizer": {"learning_rate", "warmup_steps", "decay", "grad_clip", "beta1", "beta2", "eps"},
    "sampling": {
        "num_samples",
        "sampler",
        "num_steps",
        "eta",
        "clip_denoised",
        "guidance_scale",
        "order",
        "spacing",
    },
    "evaluation": {
        "eval_every_steps",
        "eval_examples",
        "quality_every_steps",
        "bpd_examples",
        "sample_metric",
        "num_samples",
        "sampler",
        "num_steps",
        "batch_size",
        "inception_weights",
        "ref_stats",
    },
}

# Ho et al. 2020, Sec. 4 and appendix B, shared by all of its experiments.
PAPER_DIFFUSION = {
    "schedule": "linear",
    "num_timesteps": 1000,
    "mean_type": "eps",
    "var_type": "fixed_large",
    "loss_type": "simple",
}
PAPER_OPTIMIZER = {"warmup_steps": 5000, "grad_clip": 1.0, "beta1": 0.9, "beta2": 0.999}


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_config", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def num_params(config) -> int:
    model = create_model(config)
    size, channels = config.data.image_size, config.data.channels
    shapes = jax.eval_shape(
        lambda r: model.init(
            {"params": r},
            jnp.zeros((1, size, size, channels)),
            jnp.zeros((1,), jnp.int32),
            train=False,
        )["params"],
        jax.random.key(0),
    )
    return sum(x.size for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_follows_the_schema_and_validates(name):
    module = load(name)
    config = module.get_config()
    assert {k: set(v.keys()) for k, v in config.items()} == SCHEMA
    validate_config(config, num_devices=1, num_processes=1)
    validate_config(config, num_devices=8, num_processes=1)  # a TPU v3-8 / v4-8 host
    doc = module.__doc__
    assert "python train.py" in doc and "Expected result" in doc


@pytest.mark.parametrize(
    "name, expected",
    [
        # The reference DDPM CIFAR-10 model has 35.7M parameters (Ho et al. 2020, Table 1 text;
        # 35,746,307 in the official diffusion_tf checkpoint), the 256x256 one 114M.
        ("cifar10", 35_746_307),
        ("celeba_hq256", 113_673_219),
        ("lsun_church256", 113_673_219),
    ],
)
def test_paper_models_have_the_reference_parameter_count(name, expected):
    assert num_params(load(name).get_config()) == expected


def test_evaluation_during_training_is_on_for_the_digits_default_only():
    from diffjax.training.evaluation import sample_metrics

    digits = load("digits").get_config()
    ev = digits.evaluation
    assert ev.eval_every_steps > 0 and ev.quality_every_steps > 0
    assert sample_metrics(digits) == ("digits_fd",)
    # Cheap: a fast sampler, a few hundred samples, bits/dim on a small subset.
    assert (ev.sampler, ev.num_steps, ev.num_samples, ev.bpd_examples) == ("dpm++", 20, 512, 32)
    for name in ("cifar10", "celeba_hq256", "lsun_church256"):
        ev = load(name).get_config().evaluation
        assert (ev.eval_every_steps, ev.quality_every_steps) == (0, 0), name


def test_cifar10_is_the_paper_recipe():
    c = load("cifar10").get_config()
    assert c.diffusion.to_dict() == PAPER_DIFFUSION
    assert {k: c.optimizer[k] for k in PAPER_OPTIMIZER} == PAPER_OPTIMIZER
    assert c.optimizer.learning_rate == 2e-4
    assert (c.model.ch, c.model.ch_mult, c.model.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert (c.model.attn_resolutions, c.model.dropout) == ((16,), 0.1)
    assert (c.training.batch_size, c.training.ema_decay) == (128, 0.9999)
    assert (c.training.num_train_steps, c.data.random_flip) == (800_000, True)
    assert (c.data.name, c.data.image_size, c.data.channels) == ("cifar10", 32, 3)


@pytest.mark.parametrize("name, steps", [("celeba_hq256", 500_000), ("lsun_church256", 1_200_000)])
def test_256_configs_are_the_paper_recipe(name, steps):
    c = load(name).get_config()
    assert c.diffusion.to_dict() == PAPER_DIFFUSION
    assert {k: c.optimizer[k] for k in PAPER_OPTIMIZER} == PAPER_OPTIMIZER
    assert c.optimizer.learning_rate == 2e-5
    assert (c.model.ch, c.model.ch_mult, c.model.num_res_blocks) == (128, (1, 1, 2, 2, 4, 4), 2)
    assert (c.model.attn_resolutions, c.model.dropout) == ((16,), 0.0)
    assert (c.training.batch_size, c.training.ema_decay) == (64, 0.9999)
    assert (c.training.num_train_steps, c.data.random_flip) == (steps, True)
    assert (c.data.image_size, c.data.channels) == (256, 3)


def test_train_py_without_flags_uses_the_digits_config_and_workdir():
    # Parse train.py's flags with no arguments, in a fresh process (absl flags are global).
    code = (
        "import sys; from absl import flags; import train; flags.FLAGS(['train.py']); "
        "path = train.config_flags.get_config_filename(flags.FLAGS['config']); "
        "print(train._CONFIG.value.data.name, train.default_workdir(path), flags.FLAGS.workdir)"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["digits", str(Path("workdirs") / "digits"), "None"]
