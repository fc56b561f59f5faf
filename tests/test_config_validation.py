"""validate_config: each bad value gives exactly its own line; several give several lines."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from diffjax.config import validation as config_validation
from diffjax.config.validation import ConfigError, config_problems, validate_config


def _valid_config() -> ml_collections.ConfigDict:
    """A complete, valid config (independent of configs/*.py, so these tests stand alone)."""
    c = ml_collections.ConfigDict()
    c.data = dict(
        name="digits",
        data_dir=None,
        image_size=16,
        channels=1,
        random_flip=False,
        train_split="train",
        eval_split="test",
        num_classes=10,
        cache_max_mb=64,
    )
    c.model = dict(
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        dropout=0.1,
        resamp_with_conv=True,
        dtype="float32",
        kernels="tuned",
        num_classes=0,
        num_groups=32,
    )
    c.diffusion = dict(
        schedule="linear",
        num_timesteps=100,
        mean_type="eps",
        var_type="fixed_small",
        loss_type="simple",
    )
    c.training = dict(
        num_train_steps=10,
        batch_size=8,
        seed=0,
        checkpoint_every_steps=5,
        sample_every_steps=5,
        log_every_steps=1,
        keep_checkpoints=2,
        ema_decay=0.999,
        ema_warmup=False,
        class_dropout=0.1,
        nan_policy="stop",
        max_consecutive_skips=3,
        watchdog_factor=20.0,
        watchdog_min_seconds=120.0,
        watchdog_first_seconds=0.0,
    )
    c.optimizer = dict(
        learning_rate=2e-4,
        warmup_steps=0,
        decay="constant",
        grad_clip=1.0,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
    )
    c.sampling = dict(
        num_samples=4,
        sampler="ddpm",
        num_steps=0,
        eta=0.0,
        clip_denoised=True,
        guidance_scale=0.0,
        order=2,
        spacing="logsnr",
    )
    c.evaluation = dict(
        eval_every_steps=5,
        eval_examples=64,
        quality_every_steps=10,
        bpd_examples=16,
        sample_metric="auto",
        num_samples=32,
        sampler="dpm++",
        num_steps=10,
        batch_size=24,  # divisible by 2 x 3 and 2 x 4 devices
        inception_weights=None,
        ref_stats=None,
    )
    return c


def _problems(config, num_devices=2, num_processes=1):
    return config_problems(config, num_devices=num_devices, num_processes=num_processes)


def _set(config, key, value):
    """``config`` with ``key`` replaced, whatever the type (ConfigDict keeps field types)."""
    section, name = key.split(".")
    fields = config[section].to_dict()
    fields[name] = value
    del config[section]
    config[section] = fields
    return config


def test_valid_config_passes():
    validate_config(_valid_config(), num_devices=2, num_processes=1)
    assert _problems(_valid_config()) == []


# (key, bad value, fragments the one line must contain besides the key and the value).
SINGLE_PROBLEMS = [
    ("diffusion.num_timesteps", 0, ["integer >= 1"]),
    ("diffusion.num_timesteps", 2.5, ["integer >= 1"]),
    ("data.name", "imagenet", ["digits", "cifar10"]),
    ("data.channels", 3, ["'digits' has 1 channel"]),
    ("data.num_classes", 7, ["0 or 10"]),
    ("data.train_split", "validation", ["train, test"]),
    ("diffusion.schedule", "cubic", ["linear", "cosine"]),
    ("diffusion.loss_type", "l1", ["simple", "kl", "hybrid"]),
    ("diffusion.mean_type", "score", ["eps", "x0", "v"]),
    ("diffusion.var_type", "learned", ["fixed_small", "learned_range"]),
    ("training.batch_size", 7, ["divisible", "2 devices"]),
    ("training.batch_size", 0, ["integer >= 1"]),
    ("data.image_size", 18, ["divisible", "= 4"]),
    ("model.attn_resolutions", (32, 8), ["never occur", "[32]", "[16, 8, 4]"]),
    ("model.ch", 48, ["GroupNorm", "[48]"]),
    ("model.ch", 16, ["GroupNorm", "[16]"]),
    ("model.num_groups", 0, ["integer >= 1"]),
    ("model.ch_mult", (), ["non-empty"]),
    ("model.dtype", "float16", ["float32", "bfloat16"]),
    ("model.kernels", "fast", ["tuned", "plain", "onednn"]),
    ("model.dropout", 1.0, ["[0, 1)"]),
    ("model.num_classes", -1, [">= 0"]),
    ("data.num_classes", -2, [">= 0"]),
    ("data.cache_max_mb", -1, ["integer >= 0"]),
    ("data.cache_max_mb", 0.5, ["integer >= 0"]),
    ("training.ema_decay", 1.0, ["[0, 1)"]),
    ("training.ema_decay", -0.1, ["[0, 1)"]),
    ("optimizer.learning_rate", 0.0, ["> 0"]),
    ("optimizer.learning_rate", float("nan"), ["> 0"]),
    ("optimizer.warmup_steps", -1, [">= 0"]),
    ("optimizer.grad_clip", -1.0, [">= 0"]),
    ("optimizer.grad_clip", float("inf"), [">= 0"]),
    ("training.num_train_steps", 0, [">= 1"]),
    ("training.checkpoint_every_steps", 0, [">= 1"]),
    ("training.sample_every_steps", -5, [">= 1"]),
    ("training.log_every_steps", 0, [">= 1"]),
    ("training.nan_policy", "ignore", ["stop", "skip"]),
    ("training.max_consecutive_skips", 0, [">= 1"]),
    ("training.class_dropout", 1.5, ["[0, 1]"]),
    ("training.watchdog_factor", 1.5, ["0 (off)", ">= 2"]),
    ("training.watchdog_factor", float("inf"), [">= 2"]),
    ("training.watchdog_min_seconds", 0.0, ["> 0"]),
    ("training.watchdog_first_seconds", -1.0, ["not watched", "> 0"]),
    ("training.num_train_steps", True, ["integer"]),
    ("training.ema_warmup", 1, ["True or False"]),
    ("optimizer.decay", "linear", ["constant, cosine"]),
    ("sampling.sampler", "euler", ["ddpm", "ddim", "dpm++"]),
    ("sampling.order", 4, ["1, 2, 3"]),
    ("sampling.spacing", "cosine", ["logsnr", "karras"]),
    ("sampling.num_steps", 101, ["<= diffusion.num_timesteps = 100"]),
    ("sampling.num_steps", -1, [">= 0"]),
    ("sampling.guidance_scale", 2.0, ["conditional model"]),
    ("evaluation.eval_every_steps", -1, ["integer >= 0"]),
    ("evaluation.eval_examples", 0, ["integer >= 1"]),
    ("evaluation.quality_every_steps", 1.5, ["integer >= 0"]),
    ("evaluation.bpd_examples", -1, ["integer >= 0"]),
    ("evaluation.sample_metric", "kid", ["auto, digits_fd, fid, none"]),
    ("evaluation.sample_metric", "fid", ["inception_weights", "ref_stats"]),
    ("evaluation.num_samples", 1, ["integer >= 2"]),
    ("evaluation.sampler", "euler", ["ddpm", "dpm++"]),
    ("evaluation.num_steps", 101, ["<= diffusion.num_timesteps = 100"]),
    ("evaluation.num_steps", -1, [">= 0"]),
    ("evaluation.batch_size", 7, ["divisible", "2 devices"]),
    ("evaluation.batch_size", 0, ["integer >= 1"]),
    ("evaluation.inception_weights", "w.npz", ["evaluation.ref_stats", "both or neither"]),
    ("evaluation.ref_stats", "r.npz", ["evaluation.inception_weights", "both or neither"]),
    ("evaluation.ref_stats", "", ["None or a file path"]),
]


@pytest.mark.parametrize("key,value,fragments", SINGLE_PROBLEMS)
def test_each_problem_gives_exactly_its_line(key, value, fragments):
    config = _set(_valid_config(), key, value)
    problems = _problems(config)
    assert len(problems) == 1, problems
    line = problems[0]
    assert f"{key} = {value!r}" in line, line
    assert "\n" not in line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_batch_divisibility_uses_devices_times_processes():
    # 8 = 2 devices x 4 processes: fine; 2 devices x 3 processes = 6 does not divide 8.
    config = _valid_config()
    assert _problems(config, num_devices=2, num_processes=4) == []
    (line,) = _problems(config, num_devices=2, num_processes=3)
    assert "training.batch_size = 8" in line and "3 process(es) = 6" in line


def test_conditional_model_needs_matching_labels():
    config = _set(_set(_valid_config(), "model.num_classes", 10), "data.num_classes", 0)
    (line,) = _problems(config)
    assert "model.num_classes = 10" in line and "data.num_classes = 0" in line
    config.data.num_classes = 10
    assert _problems(config) == []


def test_evaluation_batch_matters_only_when_evaluation_is_on():
    config = _set(_valid_config(), "evaluation.batch_size", 7)
    assert len(_problems(config)) == 1
    config.evaluation.eval_every_steps, config.evaluation.quality_every_steps = 0, 0
    assert _problems(config) == []


def test_digits_fd_needs_a_grey_labelled_dataset():
    config = _valid_config()
    config.data.name, config.data.channels, config.data.num_classes = "cifar10", 3, 0
    assert _problems(config) == []  # "auto": no sample metric without the Inception files
    config.evaluation.sample_metric = "digits_fd"
    (line,) = _problems(config)
    assert "evaluation.sample_metric = 'digits_fd'" in line and "'cifar10'" in line
    config.evaluation.sample_metric = "fid"
    config.evaluation.inception_weights, config.evaluation.ref_stats = "w.npz", "r.npz"
    assert _problems(config) == []


def test_cosine_decay_needs_steps_after_warmup():
    config = _set(_valid_config(), "optimizer.decay", "cosine")
    config.optimizer.warmup_steps = 100
    config.training.num_train_steps = 100
    (line,) = _problems(config)
    assert "optimizer.decay = 'cosine'" in line and "warmup_steps = 100" in line, line
    config.training.num_train_steps = 101
    assert _problems(config) == []


def test_learned_variance_needs_a_loss_that_trains_it():
    config = _set(
        _set(_valid_config(), "diffusion.var_type", "learned_range"),
        "diffusion.loss_type",
        "simple",
    )
    (line,) = _problems(config)
    assert "'simple'" in line and "'learned_range'" in line and "'hybrid'" in line
    for loss_type in ("hybrid", "kl"):
        config.diffusion.loss_type = loss_type
        assert _problems(config) == []
    config.diffusion.var_type, config.diffusion.loss_type = "fixed_large", "simple"
    assert _problems(config) == []


def test_bad_betas_from_schedule_are_reported(monkeypatch):
    # The shipped schedules are capped to (0, 0.999], so inject one that is not: the rule must
    # check the values get_betas returns at this T, not trust the schedule's name.
    bad = np.linspace(-0.1, 0.5, 100)
    monkeypatch.setattr(config_validation.schedules, "get_betas", lambda name, t: bad)
    (line,) = _problems(_valid_config())
    assert "diffusion.schedule = 'linear'" in line and "num_timesteps = 100" in line
    assert "betas[0] = " in line and "(0, 1]" in line


def test_missing_key_is_reported():
    config = _valid_config()
    del config.training["nan_policy"]
    (line,) = _problems(config)
    assert line.startswith("training.nan_policy is missing") and "stop, skip" in line


def test_several_problems_give_several_lines():
    config = _valid_config()
    config.diffusion.num_timesteps = 0
    config.training.batch_size = 7
    config.model.ch = 48
    config.training.ema_decay = 1.5
    config.sampling.sampler = "euler"
    with pytest.raises(ConfigError) as info:
        validate_config(config, num_devices=2, num_processes=1)
    err = info.value
    assert isinstance(err, ValueError)
    keys = ["diffusion.num_timesteps", "training.batch_size", "model.ch", "training.ema_decay"]
    keys.append("sampling.sampler")
    assert len(err.problems) == len(keys), err.problems
    for key in keys:
        assert sum(line.startswith(key) for line in err.problems) == 1, (key, err.problems)
    # The message carries a header and one line per problem.
    assert str(err).count("\n") == len(keys)


def test_dependent_rules_stay_quiet_when_their_inputs_are_invalid():
    # An invalid T is reported once; the rules that need T (betas, sampling steps) stay silent.
    config = _set(_valid_config(), "diffusion.num_timesteps", -3)
    config.sampling.num_steps = 50
    (line,) = _problems(config)
    assert line.startswith("diffusion.num_timesteps = -3")


def test_bad_process_counts_are_a_programming_error():
    with pytest.raises(ValueError, match="num_devices"):
        validate_config(_valid_config(), num_devices=0, num_processes=1)


def test_exit_on_config_error_prints_lines_and_exits_2():
    config = _set(_set(_valid_config(), "training.batch_size", 7), "model.dtype", "half")
    stream = io.StringIO()
    with pytest.raises(SystemExit) as info:
        with config_validation.exit_on_config_error(stream):
            validate_config(config, num_devices=2, num_processes=1)
    assert info.value.code == 2
    text = stream.getvalue()
    assert text.startswith("error: invalid config (2 problem(s)):")
    assert "Traceback" not in text
    assert len(text.strip().splitlines()) == 3


def test_cli_output_has_no_traceback():
    # What a command line shows: the lines on stderr, status 2, no Python traceback.
    script = textwrap.dedent(
        """
        from diffjax.config.validation import exit_on_config_error, ConfigError
        with exit_on_config_error():
            raise ConfigError(["training.batch_size = 7: must be divisible by 2"])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "training.batch_size = 7" in proc.stderr and "Traceback" not in proc.stderr


def test_override_problems_name_the_unknown_key_and_the_allowed_ones():
    config = _valid_config()
    argv = [
        "train.py",
        "--workdir=/tmp/x",
        "--config.training.batch_size=16",  # fine
        "--config.training.bogus=1",
        "--config.modle.ch=64",
        "--noconfig.data.random_flip",  # a boolean override: fine
    ]
    problems = config_validation.override_problems(config, argv)
    assert len(problems) == 2, problems
    assert problems[0].startswith("--config.training.bogus: config.training has no field 'bogus'")
    assert "nan_policy" in problems[0] and "batch_size" in problems[0]
    assert problems[1].startswith("--config.modle.ch: config has no field 'modle'; allowed: data")


def test_exit_on_unknown_overrides_loads_the_config_file_of_argv(tmp_path):
    from _train_helpers import REPO

    stream = io.StringIO()
    argv = ["train.py", f"--config={REPO / 'configs' / 'digits.py'}", "--config.training.bogus=1"]
    with pytest.raises(SystemExit) as info:
        config_validation.exit_on_unknown_overrides(argv, "unused.py", stream=stream)
    assert info.value.code == 2
    assert "--config.training.bogus: config.training has no field 'bogus'" in stream.getvalue()
    # Known keys only: nothing happens.
    config_validation.exit_on_unknown_overrides(argv[:2] + ["--config.model.ch=64"], "unused.py")


def test_reportable_errors_exit_1_with_one_line():
    class Diverged(config_validation.ReportableError):
        pass

    stream = io.StringIO()
    with pytest.raises(SystemExit) as info:
        with config_validation.exit_on_reportable_error(stream):
            raise Diverged("non-finite loss at step 3; the last good checkpoint is /w/2")
    assert info.value.code == 1
    assert (
        stream.getvalue() == "error: non-finite loss at step 3; the last good checkpoint is /w/2\n"
    )


@pytest.mark.slow
def test_unknown_override_through_train_py_is_one_line(tmp_path):
    from _train_helpers import cli_args, cli_env

    proc = subprocess.run(
        [*cli_args(tmp_path / "run"), "--config.training.bogus=1"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if "bogus" in x]
    assert lines == [
        "  --config.training.bogus: config.training has no field 'bogus'; allowed: "
        + ", ".join(sorted(_valid_config().training.keys()))
    ]
