"""``python -m diffjax.evaluate``: flags, errors, and an end-to-end run on a tiny random run.

Also the digits classifier behind ``digits_fd``, checked on the real data.
"""

import json

import jax
import ml_collections
import numpy as np
import pytest

from diffjax.cli.evaluate import main
from diffjax.data.digits import NUM_TRAIN, digits_uint8
from diffjax.evaluation import digits_classifier as dc
from diffjax.evaluation import fid


def _tiny_config(data_dir: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            data=dict(name="digits", data_dir=data_dir, image_size=8, channels=1,
                      random_flip=False, train_split="train", eval_split="test", num_classes=10),
            model=dict(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                       resamp_with_conv=True, dtype="float32", num_classes=10),
            diffusion=dict(schedule="linear", num_timesteps=12, mean_type="eps",
                           var_type="fixed_small", loss_type="simple"),
            training=dict(num_train_steps=10, batch_size=4, seed=0, checkpoint_every_steps=10,
                          sample_every_steps=10, log_every_steps=1, keep_checkpoints=1,
                          ema_decay=0.999, class_dropout=0.1, nan_policy="stop",
                          max_consecutive_skips=3),
            optimizer=dict(learning_rate=1e-3, warmup_steps=0, grad_clip=1.0, beta1=0.9,
                           beta2=0.999, eps=1e-8),
            sampling=dict(num_samples=4, sampler="ddim", num_steps=3, eta=0.0,
                          clip_denoised=True, guidance_scale=0.0),
        )
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """An inference-only run of a tiny random class-conditional U-Net, saved at step 5."""
    from diffjax.models import create_model, init_params
    from diffjax.training import checkpointing

    workdir = tmp_path_factory.mktemp("run")
    config = _tiny_config(str(tmp_path_factory.mktemp("tfds")))
    params = init_params(create_model(config), jax.random.key(0), 8, 1)
    # The output conv starts at zero; a random one makes the model's predictions non-trivial.
    params["conv_out"]["kernel"] = 0.1 * jax.random.normal(
        jax.random.key(1), params["conv_out"]["kernel"].shape
    )
    checkpointing.save_inference_run(str(workdir), config, params, params, 5)
    return workdir


def _one_line_error(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("diffjax.evaluate: error: ") and match in lines[0], lines[0]


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--metrics=bpd,kid"], "--metrics=bpd,kid: allowed: a comma-separated subset of bpd,"),
        (["--metrics="], "--metrics=: allowed"),
        (["--sampler=euler"], "--sampler=euler: allowed: ddpm, ddim"),
        (["--num_samples=1"], "--num_samples=1: allowed: an integer >= 2"),
        (["--batch_size=0"], "--batch_size=0"),
        (["--preprocessing=clean"], "--preprocessing=clean: allowed: tf1, pytorch_fid"),
        (["--clip_denoised=maybe"], "--clip_denoised=maybe: allowed: true or false"),
        (["--condition=y"], "--condition=y: allowed: label, null"),
        (["--out=x.txt"], "--out=x.txt"),
        (["--bogus=1"], "unrecognized arguments: --bogus=1"),
    ],
)
def test_bad_flags_one_line_exit_2(tmp_path, capsys, flags, match):
    _one_line_error(capsys, [f"--workdir={tmp_path}", *flags], match)


def test_missing_run_or_weights_one_line_exit_2(tmp_path, capsys):
    _one_line_error(capsys, [f"--workdir={tmp_path / 'nope'}"], "does not exist")
    _one_line_error(capsys, [f"--workdir={tmp_path}"], "has no config.json")
    (tmp_path / "config.json").write_text(_tiny_config(str(tmp_path)).to_json())
    _one_line_error(capsys, [f"--workdir={tmp_path}"], "has no checkpoint")
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    _one_line_error(capsys, [f"--workdir={tmp_path}", "--metrics=fid"], "need --inception_weights")
    missing = tmp_path / "w.npz"
    _one_line_error(
        capsys,
        [f"--workdir={tmp_path}", "--metrics=is", f"--inception_weights={missing}"],
        f"--inception_weights={missing}: no such file",
    )


def test_digits_classifier_accuracy_and_feature_distance(tiny_run):
    images, labels = digits_uint8()
    images = images[..., None]  # [N, 8, 8, 1]
    train = (images[:NUM_TRAIN], labels[:NUM_TRAIN])
    test = (images[NUM_TRAIN:], labels[NUM_TRAIN:])
    # Where the command line caches it for this run: the end-to-end test below then reuses it
    # (same data, hence same fingerprint) instead of training again.
    cache = tiny_run / "eval" / "classifier_digits_test.npz"
    cache.parent.mkdir(parents=True, exist_ok=True)
    params, accuracy, cached = dc.get_classifier(train, test, cache_path=cache)
    # sklearn's digits are easy for an MLP (~96% here); 90% catches a broken training loop.
    assert accuracy > 0.9 and not cached
    again, accuracy2, cached2 = dc.get_classifier(train, test, cache_path=cache)
    assert cached2 and accuracy2 == accuracy

    def stats(x):
        return fid.compute_statistics(dc.classifier_outputs(again, x)[0])

    noise = np.random.default_rng(0).integers(0, 256, size=test[0].shape, dtype=np.uint8)
    real_vs_real = fid.frechet_distance_stats(stats(test[0]), stats(train[0]))
    real_vs_noise = fid.frechet_distance_stats(stats(test[0]), stats(noise))
    # Observed ~9 vs ~120: held-out real digits sit far closer to the train digits than noise.
    assert real_vs_real < 0.25 * real_vs_noise
    # Another training set (fingerprint) does not reuse the cache.
    other = tiny_run / "eval" / "other.npz"
    dc.save_classifier(other, again, "another fingerprint", accuracy)
    assert dc.load_classifier(other, dc.training_fingerprint(*train, dc.ClassifierConfig())) is None


@pytest.mark.slow  # compiles a U-Net scan (bpd), a sampler and, in a second call, Inception
def test_end_to_end_on_a_tiny_run(tiny_run, tmp_path, capsys):
    # Batches of 2 everywhere: one compile each of the bpd scan, the sampler and Inception
    # (whose batch-2 program test_inception.py also uses).
    base = [f"--workdir={tiny_run}", "--sampler=ddim", "--steps=3", "--seed=1", "--batch_size=2"]
    assert main([*base, "--metrics=bpd,digits_fd", "--max_examples=16", "--num_samples=16"]) == 0
    assert "step 5: bpd " in capsys.readouterr().out
    record = json.loads((tiny_run / "eval" / "step_5.json").read_text())
    assert record["step"] == 5 and "jax" in record["versions"]
    b = record["metrics"]["bpd"]
    assert b["num_examples"] == 16 and b["split"] == "test" and b["condition"] == "label"
    assert len(b["terms_bpd"]) == 12 and len(b["mse_x0"]) == 12 and len(b["mse_eps"]) == 12
    # The reported total is the prior plus the sum of the per-step averages (Ho et al. eq. 5).
    assert b["total_bpd"] == pytest.approx(b["prior_bpd"] + sum(b["terms_bpd"]), rel=1e-6)
    assert b["decoder_bpd"] == pytest.approx(b["terms_bpd"][0])
    assert 0 < b["total_bpd"] < 100 and b["clip_denoised"] is True
    d = record["metrics"]["digits_fd"]
    assert d["num_samples"] == 16 and d["reference"] == {"split": "test", "num": 16}
    assert d["digits_fd"] > 0 and 1.0 <= d["digits_is"] <= 10.0
    assert d["classifier"]["test_accuracy"] > 0.9
    assert 0 < d["real_train_fd"] < d["digits_fd"]  # real digits beat a 5-step model's samples
    assert d["sampling"]["sampler"] == "ddim" and d["sampling"]["steps"] == 3
    assert d["sampling"]["params"] == "ema" and d["sampling"]["seed"] == 1

    # FID and IS with random Inception weights: the plumbing, merged into the same record.
    from test_inception import _random_state_dict

    from diffjax.evaluation import inception

    weights = tmp_path / "inception.npz"
    variables = inception.torch_state_dict_to_variables(_random_state_dict())
    inception.save_inception_variables(weights, variables)
    ref = tmp_path / "ref.npz"
    argv = [*base, "--metrics=fid,is", "--num_samples=2", "--max_examples=2",
            f"--inception_weights={weights}", f"--ref_stats={ref}", "--is_splits=2",
            "--preprocessing=pytorch_fid"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((tiny_run / "eval" / "step_5.json").read_text())
    assert set(record["metrics"]) == {"bpd", "digits_fd", "fid", "is"}
    f, s = record["metrics"]["fid"], record["metrics"]["is"]
    assert f["fid"] > 0 and f["num_samples"] == 2 and f["reference"]["num"] == 2
    assert f["reference"]["reused"] is False and f["preprocessing"] == "pytorch_fid"
    assert 1.0 <= s["inception_score"] <= 1008 and s["splits"] == 2
    saved = fid.load_statistics(ref)
    assert saved.mu.shape == (2048,) and saved.meta["split"] == "train"
    # Statistics made with other preprocessing are refused before any sampling.
    capsys.readouterr()
    _one_line_error(capsys, [*argv[:-1], "--preprocessing=tf1"], "made with preprocessing")
