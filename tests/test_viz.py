"""Figures: pixel sizes, that image cells show the data they were given, the event-file reader.

Image strips place every cell at exact pixel positions (documented in the docstrings), so the
centre pixel of each upscaled source pixel must equal the source value exactly; the TensorBoard
reader is checked against files written by tensorboardX itself, an independent writer.
"""

import struct

import jax
import numpy as np
import pytest
from PIL import Image
from tensorboardX import SummaryWriter

from diffjax import viz
from diffjax.core import schedules
from diffjax.data import images
from diffjax.data.digits import digits_uint8
from diffjax.viz import curves, run_figures

T = 100
SCHEDULE = schedules.make_schedule("linear", T)
DIGITS = digits_uint8()[0][:, :, :, None]  # [N, 8, 8, 1] uint8
MARGIN, GAP, HEADER = 8, 4, 64  # the strip layout documented in diffjax.viz


def open_png(path) -> np.ndarray:
    img = Image.open(path)
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))  # [H, W, 3]


def assert_figure(path, width, height, min_colours=10):
    pixels = open_png(path)
    assert pixels.shape[:2] == (height, width)
    # Not a blank canvas: several distinct colours.
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) >= min_colours


def cell_centres(pixels, top, left, cell_px, size=8):
    """The centre pixel of each of the size x size blocks of an upscaled cell: [size, size]."""
    step = cell_px // size
    cell = pixels[top : top + cell_px, left : left + cell_px, 0]
    return cell[step // 2 :: step, step // 2 :: step]


# --- image strips ------------------------------------------------------------------------------


def test_forward_strip_size_and_first_column_is_the_data(tmp_path):
    ts, cell = [0, 10, 50, T - 1], 48
    path = viz.forward_process_strip(DIGITS[:3], SCHEDULE, ts, tmp_path / "f.png", 0, cell_px=cell)
    k = len(ts) + 1
    assert_figure(path, 2 * MARGIN + k * cell + (k - 1) * GAP, HEADER + 3 * cell + 2 * GAP + MARGIN)
    pixels = open_png(path)
    for r in range(3):
        top = HEADER + r * (cell + GAP)
        np.testing.assert_array_equal(cell_centres(pixels, top, MARGIN, cell), DIGITS[r, :, :, 0])


def test_forward_strip_columns_are_q_sample_with_one_noise_per_row(tmp_path):
    ts, cell = [5, T - 1], 48
    key = jax.random.key(3)
    path = viz.forward_process_strip(
        DIGITS[:2], SCHEDULE, ts, tmp_path / "f.png", key, cell_px=cell
    )
    pixels = open_png(path)
    x0 = DIGITS[:2].astype(np.float32) / 127.5 - 1.0
    noise = np.asarray(jax.random.normal(key, x0.shape))
    for k, t in enumerate(ts):
        # Independent float64 x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.
        abar = np.cumprod(1.0 - schedules.get_betas("linear", T))[t]
        want = images.to_uint8(np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise)
        left = MARGIN + (k + 1) * (cell + GAP)
        for r in range(2):
            got = cell_centres(pixels, HEADER + r * (cell + GAP), left, cell).astype(int)
            # float32 vs float64 can move a value across a rounding boundary: at most 1 level.
            assert np.abs(got - want[r, :, :, 0]).max() <= 1


@pytest.mark.parametrize(
    "ts, match",
    [
        ([], r"ts = \[\]"),
        ([0, T], rf"timestep {T} out of range.*\[0, {T}\)"),
        ([-1], r"timestep -1 out of range"),
        ([0.5], r"ts = \[0.5\]"),
    ],
)
def test_forward_strip_rejects_bad_timesteps(tmp_path, ts, match):
    with pytest.raises(ValueError, match=match):
        viz.forward_process_strip(DIGITS[:1], SCHEDULE, ts, tmp_path / "f.png", 0)


def test_reverse_strip_size_and_cells(tmp_path):
    s, b, cell = 7, 3, 40
    rng = np.random.default_rng(0)
    xt = rng.uniform(-1, 1, (s, b, 8, 8, 1)).astype(np.float32)
    x0 = rng.uniform(-1, 1, (s, b, 8, 8, 1)).astype(np.float32)
    ts = np.arange(s)[::-1] * 10
    path = viz.reverse_process_strip(
        xt, x0, ts, tmp_path / "r.png", max_images=2, max_columns=4, cell_px=cell
    )
    k, rows = 4, 4  # 4 of 7 steps; 2 images x (x_t, x0)
    assert_figure(
        path, 40 + 2 * MARGIN + k * cell + (k - 1) * GAP, HEADER + rows * cell + 3 * GAP + 8
    )
    pixels = open_png(path)
    cols = [0, 2, 4, 6]  # evenly spaced over 7 steps, first and last included
    for j, step in enumerate(cols):
        left = 40 + MARGIN + j * (cell + GAP)
        for i in range(2):
            for row, arr in ((2 * i, xt), (2 * i + 1, x0)):
                got = cell_centres(pixels, HEADER + row * (cell + GAP), left, cell)
                np.testing.assert_array_equal(got, images.to_uint8(arr[step, i, :, :, 0]))


def test_reverse_strip_rejects_mismatched_inputs(tmp_path):
    a = np.zeros((3, 2, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match=r"\(3, 2, 8, 8, 1\).*\(2, 2, 8, 8, 1\)"):
        viz.reverse_process_strip(a, a[:2], [2, 1, 0], tmp_path / "r.png")
    with pytest.raises(ValueError, match="ts has 2 entries.*3"):
        viz.reverse_process_strip(a, a, [1, 0], tmp_path / "r.png")
    with pytest.raises(ValueError, match="max_columns = 0"):
        viz.reverse_process_strip(a, a, [2, 1, 0], tmp_path / "r.png", max_columns=0)


def test_sample_comparison_size(tmp_path):
    samples = {"DDPM, 1.0 s": DIGITS[:6], "DDIM, 0.1 s": DIGITS[6:12]}
    path = viz.sample_comparison(samples, tmp_path / "c.png", panel_px=200, ncols=3)
    grid = images.make_grid(DIGITS[:6], 3, padding=1)  # 2 rows x 3 columns of 8x8
    height = round(200 * grid.shape[0] / grid.shape[1])
    assert_figure(path, 2 * MARGIN + 2 * 200 + GAP, HEADER + height + MARGIN)
    with pytest.raises(ValueError, match="samples is empty"):
        viz.sample_comparison({}, tmp_path / "c.png")


# --- curves ------------------------------------------------------------------------------------


def test_schedule_curves_png_and_svg(tmp_path):
    path = viz.schedule_curves(tmp_path / "s.png", 200, highlight="cosine", size_px=(900, 300))
    assert_figure(path, 900, 300)
    assert (tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(ValueError, match="highlight = 'foo'"):
        viz.schedule_curves(tmp_path / "s.png", highlight="foo")
    with pytest.raises(ValueError, match="unknown schedule 'foo'"):
        viz.schedule_curves(tmp_path / "s.png", names=["foo"])


def test_log_snr_matches_float64_definition():
    betas = schedules.get_betas("cosine", 1000)
    abar, log_snr = curves._log_snr(betas)
    want = np.cumprod(1 - betas)
    np.testing.assert_allclose(abar, want, rtol=1e-12)
    # Away from abar -> 0 the plain formula is accurate to float64 rounding.
    ok = want > 1e-12
    np.testing.assert_allclose(log_snr[ok], np.log(want[ok] / (1 - want[ok])), rtol=1e-9)


def write_events(logdir, tag, pairs, suffix=""):
    # File names hold the time in seconds: a suffix keeps a second writer from replacing a file.
    with SummaryWriter(str(logdir), filename_suffix=suffix) as w:
        for step, value in pairs:
            w.add_scalar(tag, value, step)


def test_read_scalars_matches_what_tensorboardx_wrote(tmp_path):
    write_events(tmp_path, "train/loss", [(0, 1.5), (10, 0.25), (20, 0.125)])
    write_events(tmp_path / "eval", "bpd", [(10, 3.0), (20, 2.5)])
    # A resumed run writes step 20 again in a later file: the later value wins.
    write_events(tmp_path, "train/loss", [(20, 0.5), (30, 0.0625)], suffix=".resumed")
    scalars = viz.read_scalars(tmp_path)
    assert sorted(scalars) == ["eval/bpd", "train/loss"]
    steps, values = scalars["train/loss"]
    np.testing.assert_array_equal(steps, [0, 10, 20, 30])
    np.testing.assert_array_equal(values, [1.5, 0.25, 0.5, 0.0625])  # exact in float32
    np.testing.assert_array_equal(scalars["eval/bpd"][1], [3.0, 2.5])


def test_read_scalars_skips_a_partial_record_and_rejects_corruption(tmp_path):
    write_events(tmp_path, "loss", [(0, 1.0), (1, 0.5)])
    (f,) = tmp_path.glob("events.out.tfevents*")
    data = f.read_bytes()
    f.write_bytes(data + struct.pack("<Q", 100))  # a record still being written
    assert viz.read_scalars(tmp_path)["loss"][0].tolist() == [0, 1]
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # a flipped checksum byte
    with pytest.raises(ValueError, match="corrupt"):
        viz.read_scalars(tmp_path)
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        viz.read_scalars(tmp_path / "empty")


def test_training_curves(tmp_path):
    rng = np.random.default_rng(0)
    write_events(
        tmp_path, "train/loss", [(i, 1 / (i + 1) + 0.05 * rng.random()) for i in range(80)]
    )
    write_events(tmp_path / "eval", "bpd", [(0, 4.0), (40, 2.0), (79, 1.5)])
    path = viz.training_curves(tmp_path, tmp_path / "t.png", size_px=(800, 300))
    assert_figure(path, 800, 300)
    assert (tmp_path / "t.svg").exists()
    write_events(tmp_path / "other", "lr", [(0, 1.0)])
    with pytest.raises(ValueError, match=r"no loss scalar.*\['lr'\]"):
        viz.training_curves(tmp_path / "other", tmp_path / "t.png")
    with pytest.raises(ValueError, match="smoothing = 1.0"):
        viz.training_curves(tmp_path, tmp_path / "t.png", smoothing=1.0)


def test_evaluation_curves(tmp_path):
    # The tags of diffjax.training.evaluation beside the training loss, as a run writes them.
    rng = np.random.default_rng(0)
    write_events(tmp_path, "loss", [(i, 1 / (i + 1) + 0.05 * rng.random()) for i in range(80)])
    write_events(tmp_path, "eval/loss", [(20, 0.3), (40, 0.2), (80, 0.15)], suffix=".a")
    write_events(tmp_path, "eval/ema_loss", [(20, 0.35), (40, 0.2), (80, 0.14)], suffix=".b")
    write_events(tmp_path, "eval/bpd", [(40, 5.0), (80, 4.5)], suffix=".c")
    write_events(tmp_path, "eval/digits_fd", [(40, 30.0), (80, 15.0)], suffix=".d")
    path = viz.evaluation_curves(tmp_path, tmp_path / "e.png", size_px=(1200, 300))
    assert_figure(path, 1200, 300)
    assert (tmp_path / "e.svg").read_text().count("eval/") >= 4  # every curve in a legend
    # Without an eval/ tag there is nothing to draw; the message lists the tags.
    write_events(tmp_path / "plain", "loss", [(0, 1.0), (1, 0.5)])
    with pytest.raises(ValueError, match=r"no eval/ scalar.*\['loss'\]"):
        viz.evaluation_curves(tmp_path / "plain", tmp_path / "e.png")


def test_loss_tags_drop_exact_repeats():
    a = (np.arange(3), np.array([1.0, 0.5, 0.25]))
    b = (np.arange(3), np.array([1.0, 0.5, 0.3]))
    scalars = {"mse": a, "loss": a, "eval/vlb": b, "grad_norm": b, "learning_rate": a}
    assert curves._loss_tags(scalars) == ["loss", "eval/vlb"]


def test_smoothing_is_debiased_ema():
    values = np.array([2.0, 2.0, 2.0, 4.0])
    got = curves._smooth(values, 0.5)
    # A constant series stays constant (the bias correction); then (0.5 * 2 + 0.5 * 4) weighted.
    np.testing.assert_allclose(got[:3], 2.0)
    ema = [0.0]
    for v in values:
        ema.append(0.5 * ema[-1] + 0.5 * v)
    np.testing.assert_allclose(got[3], ema[4] / (1 - 0.5**4))


def test_vlb_terms(tmp_path):
    terms = np.concatenate([[3.0], np.geomspace(0.3, 1e-6, T - 1)])
    path = viz.vlb_terms(
        {"terms_bpd": terms, "prior_bpd": 1e-5}, tmp_path / "v.png", size_px=(700, 300)
    )
    assert_figure(path, 700, 300)
    bad = terms.copy()
    bad[7] = np.nan
    with pytest.raises(ValueError, match=r"per_step_bpd\[7\] = nan"):
        viz.vlb_terms(bad, tmp_path / "v.png")
    with pytest.raises(ValueError, match=r"shape \(0,\)"):
        viz.vlb_terms([], tmp_path / "v.png")
    with pytest.raises(ValueError, match=r"size_px = \(10, 10\)"):
        viz.vlb_terms(terms, tmp_path / "v.png", size_px=(10, 10))


# --- a whole run --------------------------------------------------------------------------------


def test_cli_passes_flags_and_prints_paths(monkeypatch, capsys):
    # write_run_figures itself runs on a trained run in tests/test_walkthrough.py.
    calls = []

    def fake(workdir, **kwargs):
        calls.append((workdir, kwargs))
        return {"forward": f"{workdir}/figures/forward.png"}

    monkeypatch.setattr(run_figures, "write_run_figures", fake)
    assert viz.main(["--workdir=RUN", "--num_images=3", "--num_vlb_examples=0"]) == 0
    assert calls == [
        ("RUN", dict(step=None, num_images=3, num_samples=64, num_vlb_examples=0, seed=0))
    ]
    assert "RUN/figures/forward.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workdir=/nonexistent/run"], "workdir /nonexistent/run does not exist"),
        ([], "the following arguments are required: --workdir"),
        (["--workdir=RUN", "--num_images=two"], "invalid int value: 'two'"),
    ],
)
def test_cli_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        viz.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diffjax.viz: error: ") and message in err


def test_write_run_figures_rejects_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="num_samples = 0"):
        viz.write_run_figures(tmp_path, num_samples=0)
