"""Image files, loading a run for inference, and the ``python -m diffjax.sample`` command line."""

import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from diffjax.cli.sample import main
from diffjax.data import images

# --- images -----------------------------------------------------------------------------------


def test_to_uint8_maps_the_data_range_onto_pixels():
    x = np.array([-1.5, -1.0, -1.0 + 2 / 255, 0.0, 1.0, 2.0, np.nan])
    # x = 2 p / 255 - 1 inverted and rounded; outside [-1, 1] clipped; NaN black.
    np.testing.assert_array_equal(images.to_uint8(x), [0, 0, 1, 128, 255, 255, 0])
    assert images.to_uint8(x).dtype == np.uint8
    p = np.arange(256)
    np.testing.assert_array_equal(images.to_uint8(2 * p / 255 - 1), p)  # exact round trip


def test_make_grid_places_images_row_by_row():
    imgs = np.arange(1, 6, dtype=np.uint8)[:, None, None, None] * np.ones((5, 2, 3, 1), np.uint8)
    grid = images.make_grid(imgs, ncols=3, padding=1, pad_value=0)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)  # rows (H + p) + p, cols (W + p) + p
    for k in range(5):
        r, c = divmod(k, 3)
        block = grid[1 + 3 * r : 3 + 3 * r, 1 + 4 * c : 4 + 4 * c, 0]
        np.testing.assert_array_equal(block, k + 1)
    # Padding and the empty sixth cell hold pad_value; every image pixel appears exactly once.
    assert (grid > 0).sum() == 5 * 2 * 3
    assert images.make_grid(imgs).shape == (2 * 4 + 2, 3 * 5 + 2, 1)  # ceil(sqrt(5)) = 3 cols


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 2)), np.zeros((0, 2, 2, 1))])
def test_make_grid_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="allowed: \\[N >= 1, H, W, C\\]"):
        images.make_grid(bad)


def test_save_image_grid_grayscale_upscaled_and_rgb(tmp_path):
    digits = np.linspace(-1, 1, 4 * 8 * 8).reshape(4, 8, 8, 1)
    path = tmp_path / "sub" / "digits.png"
    images.save_image_grid(digits, path, padding=2)
    with Image.open(path) as im:
        assert im.mode == "L"
        scale = images.display_scale(8)
        assert scale == 4  # 8x8 digits are shown at 32x32
        assert im.size == (2 * (8 * scale + 2) + 2,) * 2
        first = np.asarray(im)[2 : 2 + 8 * scale, 2 : 2 + 8 * scale]
    # Nearest neighbour: each pixel of the first image is a scale x scale block.
    expected = np.kron(images.to_uint8(digits[0, ..., 0]), np.ones((scale, scale), np.uint8))
    np.testing.assert_array_equal(first, expected)

    rgb = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    images.save_image_grid(rgb, tmp_path / "rgb.png", ncols=3, padding=0)
    with Image.open(tmp_path / "rgb.png") as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), np.concatenate(list(rgb), axis=1))
    with pytest.raises(ValueError, match="2 channels"):
        images.save_image_grid(np.zeros((1, 4, 4, 2)), tmp_path / "x.png")


# --- a tiny run -------------------------------------------------------------------------------


def _tiny_config(num_classes=0):
    return ml_collections.ConfigDict(
        dict(
            data=dict(name="digits", data_dir=None, image_size=8, channels=1, random_flip=False,
                      train_split="train", eval_split="test", num_classes=num_classes),
            model=dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                       resamp_with_conv=True, dtype="float32", num_classes=num_classes),
            diffusion=dict(schedule="linear", num_timesteps=20, mean_type="eps",
                           var_type="fixed_small", loss_type="simple"),
            training=dict(num_train_steps=10, batch_size=4, seed=0, checkpoint_every_steps=10,
                          sample_every_steps=10, log_every_steps=1, keep_checkpoints=1,
                          ema_decay=0.999, class_dropout=0.1, nan_policy="stop",
                          max_consecutive_skips=3),
            optimizer=dict(learning_rate=1e-3, warmup_steps=0, grad_clip=1.0, beta1=0.9,
                           beta2=0.999, eps=1e-8),
            sampling=dict(num_samples=4, sampler="ddpm", num_steps=0, eta=0.0,
                          clip_denoised=True, guidance_scale=0.0),
        )
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """An inference-only run of a tiny random conditional U-Net, saved at step 7."""
    from diffjax.models import create_model, init_params
    from diffjax.training import checkpointing

    workdir = tmp_path_factory.mktemp("run")
    config = _tiny_config(num_classes=3)
    model = create_model(config)
    params = init_params(model, jax.random.key(0), 8, 1)
    # Perturb the zero-initialised output conv: the model must not output exactly 0.
    params["conv_out"]["kernel"] = 0.1 * jax.random.normal(
        jax.random.key(1), params["conv_out"]["kernel"].shape
    )
    checkpointing.save_inference_run(str(workdir), config, params, params, 7)
    return workdir, config, params


@pytest.mark.slow  # compiles a U-Net sampler
def test_load_run_and_sample(tiny_run):
    from diffjax import load_run

    workdir, config, params = tiny_run
    run = load_run(workdir)
    assert run.step == 7 and run.config.to_dict() == config.to_dict()
    assert run.schedule.num_timesteps == 20 and run.image_shape == (8, 8, 1)
    np.testing.assert_array_equal(run.params["conv_out"]["kernel"], params["conv_out"]["kernel"])
    x = run.sample(jax.random.key(0), 4, sampler="ddim", steps=3, y=1, guidance_scale=2.0)
    assert x.shape == (4, 8, 8, 1) and np.isfinite(np.asarray(x)).all()
    assert np.abs(np.asarray(x)).max() <= 1.0 + 1e-5  # clipped x_0 at the last step
    # Run.sample is the library samplers on the run's model: the same draw on 2 devices.
    fn = run.model_fn(y=1, guidance_scale=2.0)
    from diffjax.core.sampling import sample_pmapped

    ref = sample_pmapped(fn, run.schedule, jax.random.key(0), (4, 8, 8, 1), sampler="ddim",
                         num_steps=3, eta=0.0)  # fmt: skip
    np.testing.assert_allclose(x, ref, atol=1e-5)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint 8 in .*; steps there: \[7\]"):
        load_run(workdir, step=8)
    with pytest.raises(ValueError, match="steps = 21"):
        run.sample(jax.random.key(0), 4, steps=21)
    # DPM-Solver++ through the same call: the library sampler on the run's model.
    x = run.sample(jax.random.key(0), 4, sampler="dpm++", steps=3, y=1, guidance_scale=2.0)
    ref = sample_pmapped(
        run.model_fn(y=1, guidance_scale=2.0), run.schedule, jax.random.key(0), (4, 8, 8, 1),
        sampler="dpm++", num_steps=3, order=2, spacing="logsnr",
    )  # fmt: skip
    np.testing.assert_allclose(x, ref, atol=1e-5)
    with pytest.raises(ValueError, match="spacing = 'cosine'"):
        run.sample(jax.random.key(0), 4, sampler="dpm++", spacing="cosine")


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "diffjax.sample", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow  # a subprocess that compiles a U-Net sampler
def test_cli_end_to_end(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    out = tmp_path / "grid.png"
    res = _cli(f"--workdir={workdir}", "--num=3", "--sampler=ddim", "--steps=4",
               f"--out={out}", "--batch_size=2", "--guidance_scale=1.0")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "wrote 3 samples of step 7" in res.stdout
    data = np.load(tmp_path / "grid.npz")
    assert data["images"].shape == (3, 8, 8, 1) and data["images"].dtype == np.uint8
    np.testing.assert_array_equal(data["labels"], [0, 1, 2])  # classes cycled
    assert data["images"].std() > 0  # not a constant image
    with Image.open(out) as im:
        assert im.mode == "L" and im.size == (2 * 34 + 2, 2 * 34 + 2)  # 2x2 grid of 32 px + 2


def _one_line_error(stderr, match):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("diffjax.sample: error: ") and match in lines[0], lines[0]


def test_cli_errors_in_one_line_for_missing_or_empty_workdir(tmp_path):
    # Checked before jax is imported: two fast subprocesses.
    res = _cli(f"--workdir={tmp_path / 'nope'}")
    assert res.returncode == 2
    _one_line_error(res.stderr, "does not exist")
    (tmp_path / "config.json").write_text(_tiny_config().to_json())
    res = _cli(f"--workdir={tmp_path}")
    assert res.returncode == 2
    _one_line_error(res.stderr, f"workdir {tmp_path} has no checkpoint")


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--sampler=euler"], "--sampler=euler: allowed: ddpm, ddim, dpm++"),
        (["--order=4"], "--order=4: allowed: 1, 2 or 3"),
        (["--spacing=cosine"], "--spacing=cosine: allowed: logsnr, time, karras, uniform"),
        (["--num=0"], "--num=0: allowed: an integer >= 1"),
        (["--num=-3"], "--num=-3"),
        (["--steps=-1"], "--steps=-1"),
        (["--eta=-0.5"], "--eta=-0.5"),
        (["--out=x.jpg"], "--out=x.jpg: allowed: a path ending in .png"),
        (["--num=many"], "invalid int value: 'many'"),
        (["--bogus=1"], "unrecognized arguments: --bogus=1"),
    ],
)
def test_cli_bad_flags_one_line_exit_2(tmp_path, capsys, flags, match):
    with pytest.raises(SystemExit) as exc:
        main([f"--workdir={tmp_path}", *flags])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, match)


def test_cli_without_workdir_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, "--workdir")


@pytest.mark.slow  # loads a run
@pytest.mark.parametrize(
    "flags,match",
    [
        (["--steps=21"], "steps = 21; allowed: an integer in [1, T = 20], or 0 for all T"),
        (["--class_label=3"], "--class_label=3: allowed: an integer in [0, 2]"),
        (["--step=5"], "steps there: [7]"),
    ],
)
def test_cli_flags_checked_against_the_run(tiny_run, capsys, flags, match):
    workdir, _, _ = tiny_run
    with pytest.raises(SystemExit) as exc:
        main([f"--workdir={workdir}", *flags])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, match)
