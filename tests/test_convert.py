"""Tests of diffusers -> diffjax conversion against diffusers' own forward pass.

The reference is diffusers' ``UNet2DModel`` run in float64 (PyTorch, NCHW) with random weights:
an implementation independent of diffjax. Every parameter, GroupNorm scales and biases included,
is re-drawn so that no layer is the identity or zero and every tensor affects the output.
"""

import copy
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffjax.config.validation import validate_config  # noqa: E402
from diffjax.convert import weights as convert  # noqa: E402
from diffjax.core import schedules  # noqa: E402
from diffjax.models import create_model  # noqa: E402
from diffjax.run import load_run  # noqa: E402

# config.json of google/ddpm-cifar10-32 as published (written by diffusers 0.0.4: no
# attention_head_dim, which then means one head).
CIFAR10_UNET = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
CIFAR10_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_large",
}
# The google/ddpm-{celebahq,church,bedroom,cat}-256 structure (ch_mult (1, 1, 2, 2, 4, 4), 2
# resblocks per level, attention at level 4 where the channels double, i.e. down block 4 and up
# block 1), shrunk to ch 32 and 32x32 images: attention is at 2x2 instead of 16x16.
SMALL_256 = {
    **{k: v for k, v in CIFAR10_UNET.items() if not k.startswith("_")},
    "attention_head_dim": None,
    "block_out_channels": [32, 32, 64, 64, 128, 128],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    "sample_size": 32,
}
# Two levels, attention and a channel change (a conv_shortcut) at level 1: for error paths.
TINY = {
    **SMALL_256,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "sample_size": 8,
}
LEGACY_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
# float32 rounding (2^-24) accumulated over ~100 sequential layers with sums of up to 2304
# terms: on these inputs diffusers' own float32 forward is up to 5e-6 (relative to the output's
# scale) off its float64 forward, diffjax up to 1e-5. A wrong GroupNorm eps is off by 1e-2, a
# wrong layout, order or constant by far more.
RTOL = 5e-5


def _diffusers_unet(config, seed=0):
    """A UNet2DModel with every parameter re-drawn: weights N(0, 1/fan_in), norm scales
    1 + N(0, 0.2^2), biases N(0, 0.2^2)."""
    model = diffusers.UNet2DModel(**config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * z)
            else:
                p.copy_(z / math.sqrt(p[0].numel()))
    return model


def _reference(model64, x_nhwc, t):
    """diffusers' float64 forward, NHWC in and out."""
    x = torch.from_numpy(np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2))
    with torch.no_grad():
        out = model64(x, torch.from_numpy(np.asarray(t, np.int64))).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _inputs(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)  # [B, H, W, C]
    # Sample 1 is small: a wrong GroupNorm eps (1e-5 instead of 1e-6) then moves the output by
    # ~1e-2 of its scale; at unit scale only by ~1e-5, within float32 noise.
    x[1] *= 1e-2
    return x


def _assert_close(out, ref):
    for b in range(ref.shape[0]):  # per sample: they have different scales
        err = np.abs(np.asarray(out[b], np.float64) - ref[b]).max()
        assert err <= RTOL * np.abs(ref[b]).max(), (b, err, np.abs(ref[b]).max())


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.mark.slow
def test_cifar10_checkpoint_matches_diffusers_forward(tmp_path):
    # The google/ddpm-cifar10-32 folder layout: pipeline index, model and scheduler at the root,
    # the published 0.0.4 config.json and the legacy attention tensor names.
    src = tmp_path / "ddpm-cifar10-32"
    model = _diffusers_unet({**CIFAR10_UNET, "attention_head_dim": None})
    model.save_pretrained(src)
    weights = src / convert.WEIGHTS_NAME
    tensors = safetensors.numpy.load_file(weights)
    legacy = {}
    for key, value in tensors.items():
        for new, old in LEGACY_ATTN.items():
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy)
    safetensors.numpy.save_file(legacy, weights)
    _write_json(src / "config.json", CIFAR10_UNET)
    _write_json(src / "scheduler_config.json", CIFAR10_SCHEDULER)
    pipeline = {"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"]}
    _write_json(src / "model_index.json", {**pipeline, "unet": ["diffusers", "UNet2DModel"]})

    config, params = convert.read_diffusers(src)

    # The paper's CIFAR-10 model and sampler (Ho et al. 2020 appendix B; official fixedlarge).
    assert config.data.name == "cifar10" and config.data.image_size == 32
    m = config.model
    assert (m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions) == (128, (1, 2, 2, 2), 2, (16,))
    d = config.diffusion
    assert (d.schedule, d.num_timesteps, d.mean_type, d.var_type) == (
        "linear",
        1000,
        "eps",
        "fixed_large",
    )
    assert config.sampling.clip_denoised is True
    validate_config(config, num_devices=1, num_processes=1)
    assert sum(v.size for v in jax.tree.leaves(params)) == 35_746_307

    x = _inputs((2, 32, 32, 3), seed=0)
    t = np.array([0, 999], np.int32)
    net = create_model(config)
    out = jax.jit(lambda p, x, t: net.apply({"params": p}, x, t, train=False))(params, x, t)
    _assert_close(out, _reference(model.double(), x, t))


def _ddim_step(model64, x, t, a, a_prev):
    """Song et al. 2021 eq. 12 with eta = 0 and clipped x_0, in float64 (numpy + diffusers).

    :return: (x_{t-1}, the bound on its float32 error implied by RTOL on the network output).
    """
    eps = _reference(model64, x, np.full((x.shape[0],), t))
    x0 = np.clip((x - np.sqrt(1 - a) * eps) / np.sqrt(a), -1.0, 1.0)
    eps_c = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)  # consistent with the clipped x_0
    # An eps error e moves x_0 by e sqrt((1 - a) / a) (clipping only shrinks it), and x_{t-1} by
    # at most that times sqrt(a_prev) plus the eps' change; a factor 2 covers both.
    bound = 2 * RTOL * np.abs(eps).max() * max(np.sqrt((1 - a) / a), 1.0)
    return np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps_c, bound


@pytest.mark.slow
def test_256_layout_converts_to_a_run_that_samples(tmp_path, capsys):
    # A diffusers pipeline folder (model_index.json, unet/, scheduler/), through the CLI.
    src = tmp_path / "ddpm-ema-celebahq-256"
    model = _diffusers_unet(SMALL_256, seed=1)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_small")
    diffusers.DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(src)
    workdir = tmp_path / "run"

    convert.main([f"--from={src}", f"--to={workdir}"])
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already holds a run"):
        convert.convert(src, str(workdir))

    run = load_run(str(workdir))
    assert run.config.data.name == "celeb_a_hq" and run.step == 0
    m = run.config.model
    assert (m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions) == (
        32,
        (1, 1, 2, 2, 4, 4),
        2,
        (2,),
    )
    assert run.config.diffusion.var_type == "fixed_small"
    model64 = model.double()
    x = _inputs((2, 32, 32, 3), seed=2)
    t = np.array([3, 517], np.int32)
    _assert_close(
        jax.jit(run.model_fn())(jnp.asarray(x), jnp.asarray(t)), _reference(model64, x, t)
    )

    # Two deterministic DDIM steps (t = 999, then t = 0) through Run.sample.
    samples, traj = run.sample(
        jax.random.key(0), 2, sampler="ddim", steps=2, eta=0.0, return_trajectory=True
    )
    ts, states = np.asarray(traj.t), np.asarray(traj.x_t, np.float64)  # [S], [S, B, H, W, C]
    assert sorted(ts.tolist()) == [0, 999]
    x_T, x_1 = states[ts.tolist().index(999)], states[ts.tolist().index(0)]
    abar = np.cumprod(1.0 - schedules.get_betas("linear", 1000))
    # Each step from diffjax's own state, so that its error is not compounded by the earlier.
    for x_in, t, a_prev, x_out in ((x_T, 999, abar[0], x_1), (x_1, 0, 1.0, samples)):
        expected, bound = _ddim_step(model64, x_in, t, abar[t], a_prev)
        np.testing.assert_allclose(np.asarray(x_out), expected, atol=bound, rtol=0)
    assert np.abs(np.asarray(samples)).max() <= 1.0  # the last step returns the clipped x_0


def _tiny_tensors():
    return {k: v.numpy() for k, v in _diffusers_unet(TINY).state_dict().items()}


def _tiny_config():
    return convert.make_config(TINY, None, "cifar10")


def test_tiny_checkpoint_fills_every_parameter_once():
    tensors = _tiny_tensors()
    params = convert.convert_unet_params(tensors, _tiny_config())
    # Same numbers, each used once: the multisets of values agree (layouts only permute).
    got = np.sort(np.concatenate([np.ravel(v) for v in jax.tree.leaves(params)]))
    want = np.sort(np.concatenate([np.ravel(v) for v in tensors.values()]))
    np.testing.assert_array_equal(got, want)
    kernel = params["down_1_block_0"]["nin_shortcut"]["kernel"]  # 1x1 conv [O, I, 1, 1]
    w = tensors["down_blocks.1.resnets.0.conv_shortcut.weight"]
    np.testing.assert_array_equal(kernel, w[:, :, 0, 0].T)
    assert "up_0_upsample" not in params and "down_1_downsample" not in params
    np.testing.assert_array_equal(
        params["up_1_upsample"]["conv"]["kernel"],
        tensors["up_blocks.0.upsamplers.0.conv.weight"].transpose(2, 3, 1, 0),
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update({"extra.weight": np.zeros(3, np.float32)}), "extra.weight"),
        (lambda d: d.pop("mid_block.attentions.0.to_k.bias"), "mid_attn/k/bias"),
        (
            lambda d: d.update(
                {"down_blocks.1.resnets.0.conv_shortcut.weight": np.zeros((64, 32, 3, 3))}
            ),
            "conv_shortcut.weight of shape (64, 32, 3, 3)",
        ),
        (
            lambda d: d.update({"down_blocks.1.attentions.0.query.weight": np.ones((64, 64))}),
            "both map to down_1_attn_0/q/kernel",
        ),
    ],
    ids=["unknown", "missing", "shape", "conflicting_alias"],
)
def test_bad_tensors_are_named(edit, message):
    tensors = _tiny_tensors()
    edit(tensors)
    with pytest.raises(ValueError, match=re.escape(message)):
        convert.convert_unet_params(tensors, _tiny_config())


def test_norm_num_groups_becomes_model_num_groups():
    assert convert.model_config_from_unet(CIFAR10_UNET)["model"]["num_groups"] == 32
    cfg = {**CIFAR10_UNET, "norm_num_groups": 16, "attn_norm_num_groups": 16}
    assert convert.model_config_from_unet(cfg)["model"]["num_groups"] == 16


@pytest.mark.parametrize(
    "key, value",
    [
        ("flip_sin_to_cos", True),
        ("freq_shift", 0),
        ("norm_num_groups", 48),  # does not divide 128
        ("attn_norm_num_groups", 16),
        ("norm_eps", 1e-5),
        ("attention_head_dim", 8),
        ("time_embedding_type", "fourier"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("downsample_padding", 1),
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 10),
        ("add_attention", False),
        ("center_input_sample", True),
        ("mid_block_scale_factor", 2.0),
        ("time_embedding_dim", 64),
        ("_class_name", "UNet2DConditionModel"),
        ("block_out_channels", [128, 192, 256, 256]),
    ],
)
def test_unsupported_unet_config_names_key_and_value(key, value):
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
        convert.model_config_from_unet({**CIFAR10_UNET, key: value})


def test_unsupported_blocks_and_missing_keys_are_named():
    blocks = ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    with pytest.raises(ValueError, match=re.escape("down_block_types[1]='CrossAttnDownBlock2D'")):
        convert.model_config_from_unet({**CIFAR10_UNET, "down_block_types": blocks})
    ups = ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]  # attention at 8x8, not 16x16
    with pytest.raises(ValueError, match="up_block_types=.*attention at the levels"):
        convert.model_config_from_unet({**CIFAR10_UNET, "up_block_types": ups})
    # A key left out takes diffusers' default, which for these is not the DDPM value.
    for key, default in (("freq_shift", 0), ("norm_eps", 1e-5), ("downsample_padding", 1)):
        cfg = {k: v for k, v in CIFAR10_UNET.items() if k != key}
        with pytest.raises(ValueError, match=re.escape(f"{key}={default!r}")):
            convert.model_config_from_unet(cfg)
    # One head per attention layer is the channel count itself.
    out = convert.model_config_from_unet({**TINY, "attention_head_dim": None})
    assert out["model"]["attn_resolutions"] == (4,)
    with pytest.raises(ValueError, match="level 1 has 64 channels, i.e. 2 heads"):
        convert.model_config_from_unet({**TINY, "attention_head_dim": 32})


@pytest.mark.parametrize(
    "scheduler, name",
    [
        ({}, "linear"),
        ({"num_train_timesteps": 4000, "beta_start": 2.5e-5, "beta_end": 0.005}, "linear"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "cosine"),
        ({"beta_schedule": "scaled_linear"}, "quadratic"),
        ({"beta_schedule": "sigmoid"}, "sigmoid"),
    ],
)
def test_scheduler_betas_map_to_the_equal_diffjax_schedule(scheduler, name):
    out = convert.diffusion_config_from_scheduler(scheduler)
    assert out["schedule"] == name
    theirs = diffusers.DDPMScheduler(**scheduler).betas.numpy().astype(np.float64)
    # diffusers computes in float32 (linspace steps of ~2e-5 at T=1000, rounded at 2^-24 each).
    np.testing.assert_allclose(
        schedules.get_betas(name, out["num_timesteps"]), theirs, rtol=1e-5, atol=1e-9
    )


def test_scheduler_options_map_and_unsupported_ones_are_named():
    cfg = {"variance_type": "fixed_large_log", "prediction_type": "v_prediction"}
    out = convert.diffusion_config_from_scheduler({**cfg, "clip_sample": False})
    assert (out["mean_type"], out["var_type"], out["clip_denoised"]) == ("v", "fixed_large", False)
    out = convert.diffusion_config_from_scheduler(
        {"variance_type": "learned_range", "prediction_type": "sample"}
    )
    assert (out["mean_type"], out["var_type"], out["loss_type"]) == (
        "x0",
        "learned_range",
        "hybrid",
    )
    linear = schedules.get_betas("linear", 1000).tolist()
    assert (
        convert.diffusion_config_from_scheduler({"trained_betas": linear})["schedule"] == "linear"
    )
    bad = [
        ({"beta_end": 0.03}, "equals no diffjax schedule"),
        ({"trained_betas": [0.01] * 1000}, "trained_betas at num_train_timesteps=1000"),
        ({"beta_schedule": "laplace"}, "beta_schedule='laplace'"),
        ({"variance_type": "learned"}, "variance_type='learned'"),
        ({"prediction_type": "flow"}, "prediction_type='flow'"),
        ({"thresholding": True}, "thresholding=True"),
        ({"clip_sample_range": 2.0}, "clip_sample_range=2.0"),
    ]
    for scheduler, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            convert.diffusion_config_from_scheduler(scheduler)
    # A learned variance needs 2C output channels.
    with pytest.raises(ValueError, match=re.escape("out_channels=3")):
        convert.make_config(CIFAR10_UNET, {"variance_type": "learned_range"}, "cifar10")


def test_folder_layouts_and_dataset_names(tmp_path):
    model = _diffusers_unet(TINY)
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    pipe = tmp_path / "models--google--ddpm-cat-256" / "snapshots" / "0123abcd"
    diffusers.DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(pipe)
    flat = tmp_path / "ddpm-ema-church-256"
    model.save_pretrained(flat)
    for src, dataset in ((pipe, "lsun_cat"), (pipe / "unet", "lsun_cat"), (flat, "lsun_church")):
        config, params = convert.read_diffusers(src)
        assert config.data.name == dataset
        # The pipeline's scheduler is found from the root and from unet/; the flat folder has
        # none, so diffusers' DDPMScheduler defaults (the linear schedule) apply.
        assert config.diffusion.schedule == ("linear" if src == flat else "cosine")
        assert config.data.image_size == 8 and "down_1_attn_0" in params
    assert convert.read_diffusers(flat, dataset="mnist")[0].data.name == "mnist"

    unknown = tmp_path / "weights"
    model.save_pretrained(unknown)
    with pytest.raises(ValueError, match="cannot tell the dataset"):
        convert.read_diffusers(unknown)
    bin_only = tmp_path / "ddpm-cifar10-bin"
    model.save_pretrained(bin_only, safe_serialization=False)
    with pytest.raises(ValueError, match=re.escape(f"no {convert.WEIGHTS_NAME}")):
        convert.read_diffusers(bin_only)
    with pytest.raises(ValueError, match="no UNet2DModel config.json"):
        convert.locate(tmp_path)


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    src = tmp_path / "ddpm-cifar10-32"
    _write_json(src / "config.json", {**CIFAR10_UNET, "flip_sin_to_cos": True})
    with pytest.raises(SystemExit) as exit_info:
        convert.main([f"--from={src}", f"--to={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "flip_sin_to_cos=True" in err
    assert not (tmp_path / "run").exists()


def test_ema_folder_must_convert_to_the_same_config(tmp_path):
    a, b = tmp_path / "ddpm-cifar10-a", tmp_path / "ddpm-cifar10-b"
    model = _diffusers_unet(TINY)
    model.save_pretrained(a)
    other = copy.deepcopy(TINY)
    other["layers_per_block"] = 2
    _diffusers_unet(other).save_pretrained(b)
    with pytest.raises(ValueError, match="another config"):
        convert.convert(a, str(tmp_path / "run"), ema_src=b)
