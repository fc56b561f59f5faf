"""Samplers against float64 step-by-step references of their equations, and their properties.

The references below are written independently of diffjax.core.sampling and
diffjax.core.diffusion: plain numpy float64 loops over the paper formulas, with coefficients
recomputed from the betas. They
draw the same noise as the samplers by the documented key scheme (init_key, step_key =
split(rng); x_T from init_key; the noise of step i from fold_in(step_key, i)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _respace_reference import respace_f64

from diffjax.core import sampling, schedules
from diffjax.core.sampling import (
    ddim_sample,
    make_model_fn,
    respace_schedule,
    sample,
    sample_pmapped,
    space_timesteps,
)
from diffjax.models.unet import UNet

# A short schedule whose x_T is well mixed (abar_T = 0.02) with betas small enough that float32
# error is not amplified much: prod 1/sqrt(alpha_t) over all steps is about 7.
T = 40
BETAS = np.linspace(1e-3, 0.2, T)
SCHEDULE = schedules.Schedule.from_betas(BETAS)
SHAPE = (2, 4, 4, 1)
RNG = jax.random.key(7)
# float32 sampler vs float64 reference: a few float32 roundings (6e-8 relative) per step on values
# of size ~3, amplified at most ~7x by the 1/sqrt(alpha_t) factors over 40 steps: < 1e-5; 5e-5
# leaves margin for the transcendental functions of the analytic model (float32 ulp-level).
ATOL = 5e-5


# --- analytic models (the same formula in jnp for the samplers and in numpy for references) ---


def _out_np(x, t):
    """A smooth nonlinear "network" that depends on the ORIGINAL timestep t."""
    return 0.8 * np.tanh(x) + 0.3 * np.sin(0.37 * t)[:, None, None, None]


def _model(x, t):
    return 0.8 * jnp.tanh(x) + 0.3 * jnp.sin(0.37 * t.astype(jnp.float32))[:, None, None, None]


def _var_np(x, t):
    return np.tanh(x + 0.05 * t[:, None, None, None])  # learned-range interpolation in [-1, 1]


def _model_learned(x, t):
    var = jnp.tanh(x + 0.05 * t.astype(jnp.float32)[:, None, None, None])
    return jnp.concatenate([_model(x, t), var], axis=-1)


def _keys(rng):
    init_key, step_key = jax.random.split(rng)
    return init_key, step_key


def _normal(key, shape):
    return np.asarray(jax.random.normal(key, shape, jnp.float32), np.float64)


# --- float64 references ---------------------------------------------------------------------


def _ddpm_reference(betas, tmap, rng, shape, *, clip, var_type="fixed_small"):
    """Ho et al. 2020 Algorithm 2 over `betas` (already respaced), the model fed tmap[i]."""
    init_key, step_key = _keys(rng)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    x = _normal(init_key, shape)
    traj_x, traj_x0 = [], []
    for i in reversed(range(len(betas))):
        t = np.full(shape[0], tmap[i], np.float64)
        eps = _out_np(x, t)
        x0 = (x - np.sqrt(1 - abar[i]) * eps) / np.sqrt(abar[i])
        if clip:
            x0 = np.clip(x0, -1, 1)
            # Posterior mean at the clipped x0 (Ho et al. eq. 7).
            c1 = np.sqrt(abar_prev[i]) * betas[i] / (1 - abar[i])
            c2 = np.sqrt(alphas[i]) * (1 - abar_prev[i]) / (1 - abar[i])
            mean = c1 * x0 + c2 * x
        else:
            # Algorithm 2 line 4 (eq. 11).
            mean = (x - betas[i] / np.sqrt(1 - abar[i]) * eps) / np.sqrt(alphas[i])
        traj_x.append(x)
        traj_x0.append(x0)
        if i == 0:
            x = mean  # no noise at the last step
            break
        beta_tilde = (1 - abar_prev[i]) / (1 - abar[i]) * betas[i]
        if var_type == "fixed_small":
            var = beta_tilde
        elif var_type == "fixed_large":
            var = betas[i]
        else:  # Nichol & Dhariwal 2021 eq. 15
            v = (_var_np(x, t) + 1) / 2
            var = np.exp(v * np.log(betas[i]) + (1 - v) * np.log(beta_tilde))
        x = mean + np.sqrt(var) * _normal(jax.random.fold_in(step_key, i), shape)
    return x, np.stack(traj_x), np.stack(traj_x0)


def _ddim_reference(betas, tmap, rng, shape, *, eta, clip):
    """Song et al. 2021 eq. 12 with sigma from eq. 16, over respaced `betas`."""
    init_key, step_key = _keys(rng)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    x = _normal(init_key, shape)
    for i in reversed(range(len(betas))):
        eps = _out_np(x, np.full(shape[0], tmap[i], np.float64))
        x0 = (x - np.sqrt(1 - abar[i]) * eps) / np.sqrt(abar[i])
        if clip:
            x0 = np.clip(x0, -1, 1)
            eps = (x - np.sqrt(abar[i]) * x0) / np.sqrt(1 - abar[i])
        sigma = eta * np.sqrt((1 - abar_prev[i]) / (1 - abar[i]) * (1 - abar[i] / abar_prev[i]))
        z = _normal(jax.random.fold_in(step_key, i), shape)
        x = np.sqrt(abar_prev[i]) * x0 + np.sqrt(1 - abar_prev[i] - sigma**2) * eps + sigma * z
    return x


# --- timesteps and respacing ------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(1000, 50), (1000, 1000), (10, 3), (7, 1), (5, 2), (999, 37)])
def test_space_timesteps_even_and_includes_ends(n, k):
    steps = space_timesteps(n, k)
    assert steps.dtype == np.int32 and steps.shape == (k,)
    assert steps[-1] == n - 1
    if k > 1:
        assert steps[0] == 0
        gaps = np.diff(steps)
        # Rounded (T-1)/(K-1) spacing: all gaps >= 1 and within 1 of each other.
        assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1
        np.testing.assert_allclose(steps, np.arange(k) * (n - 1) / (k - 1), atol=0.5)
    if k == n:
        np.testing.assert_array_equal(steps, np.arange(n))


@pytest.mark.parametrize("k", [0, 11, 2.5, True])
def test_space_timesteps_rejects_bad_counts(k):
    with pytest.raises(ValueError, match=rf"num_steps = {k!r}; allowed: an integer in \[1, 10\]"):
        space_timesteps(10, k)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize(
    "steps", [space_timesteps(1000, 50), np.array([0, 1, 2, 500, 999]), np.array([3, 10, 500])]
)
def test_respace_schedule_matches_float64_respace(name, steps):
    betas = schedules.get_betas(name, 1000)
    ref = schedules.Schedule.from_betas(respace_f64(betas, steps)[0])
    # Traced schedule: the path taken inside a jitted sampler.
    got, tmap = jax.jit(lambda s: respace_schedule(s, steps))(schedules.make_schedule(name, 1000))
    np.testing.assert_array_equal(tmap, steps)
    for field in ref.__dataclass_fields__:
        # Each coefficient is a few float32 operations on float32 inputs (relative error a few
        # 1e-7); the new betas sum at most 1000 log1p terms (about 1e-6 relative).
        np.testing.assert_allclose(
            getattr(got, field), getattr(ref, field), rtol=1e-5, atol=1e-7, err_msg=field
        )


@pytest.mark.parametrize("bad", [[], [3, 3], [5, 2], [-1, 4], [0, T], [[0, 1]], [0.5, 2]])
def test_respace_schedule_rejects_bad_timesteps(bad):
    with pytest.raises(ValueError, match="timesteps"):
        respace_schedule(SCHEDULE, bad)


# --- ancestral sampling ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "clip,var_type,timesteps",
    [
        (False, "fixed_small", None),
        (True, "fixed_large", None),
        (True, "learned_range", None),
        (True, "fixed_small", (0, 2, 5, 11, 20, 39)),
    ],
)
def test_sample_matches_algorithm2_reference(clip, var_type, timesteps):
    model = _model_learned if var_type == "learned_range" else _model
    got = sample(
        model, SCHEDULE, RNG, SHAPE, var_type=var_type, clip_denoised=clip, timesteps=timesteps
    )
    if timesteps is None:
        betas, tmap = BETAS, np.arange(T)
    else:
        betas, tmap = respace_f64(BETAS, timesteps)
    ref, _, _ = _ddpm_reference(betas, tmap, RNG, SHAPE, clip=clip, var_type=var_type)
    assert got.shape == SHAPE and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    if clip:  # the clipping must have mattered, or the test would not check it
        unclipped, _, _ = _ddpm_reference(betas, tmap, RNG, SHAPE, clip=False, var_type=var_type)
        assert np.abs(unclipped - ref).max() > 0.05


def test_sample_on_all_timesteps_reproduces_sample():
    full = sample(_model, SCHEDULE, RNG, SHAPE)
    spaced = sample(_model, SCHEDULE, RNG, SHAPE, timesteps=range(T))
    # Respaced coefficients are recomputed in float32 (a few ulps from the stored ones).
    np.testing.assert_allclose(spaced, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stride", [1, 4])
def test_sample_trajectory_matches_reference(stride):
    steps = (0, 1, 3, 6, 10, 15, 21, 28, 39)  # K = 9: stride 4 keeps i = 8, 4, 0
    x, traj = sample(
        _model, SCHEDULE, RNG, SHAPE, timesteps=steps, return_trajectory=True,
        trajectory_stride=stride,
    )  # fmt: skip
    betas, tmap = respace_f64(BETAS, steps)
    ref, ref_x, ref_x0 = _ddpm_reference(betas, tmap, RNG, SHAPE, clip=True)
    kept = [i for i in reversed(range(len(steps))) if i % stride == 0]  # spaced indices
    rows = [len(steps) - 1 - i for i in kept]  # rows of the reference (descending i)
    np.testing.assert_array_equal(traj.t, np.asarray(steps)[kept])
    assert traj.x_t.shape == traj.pred_x0.shape == (len(kept), *SHAPE)
    np.testing.assert_allclose(traj.x_t, ref_x[rows], atol=ATOL, rtol=0)
    np.testing.assert_allclose(traj.pred_x0, ref_x0[rows], atol=ATOL, rtol=0)
    np.testing.assert_allclose(x, ref, atol=ATOL, rtol=0)


def test_sample_works_under_jit_with_traced_schedule():
    steps = (0, 4, 9, 30, 39)
    fn = jax.jit(lambda s, r: sample(_model, s, r, SHAPE, timesteps=steps, var_type="fixed_large"))
    got = fn(SCHEDULE, RNG)
    betas, tmap = respace_f64(BETAS, steps)
    ref, _, _ = _ddpm_reference(betas, tmap, RNG, SHAPE, clip=True, var_type="fixed_large")
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


# --- DDIM -------------------------------------------------------------------------------------

X_STAR = 0.9 * jnp.sin(jnp.arange(16.0)).reshape(1, 4, 4, 1)  # the single data point, in [-1, 1]


def _perfect(schedule, mean_type):
    """The exact denoiser of the data distribution delta(x*), in each parameterization."""

    def model_fn(x, t):
        a = schedule.sqrt_alphas_cumprod[t][:, None, None, None]
        s = schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
        eps = (x - a * X_STAR) / s
        return {"eps": eps, "x0": jnp.broadcast_to(X_STAR, x.shape), "v": a * eps - s * X_STAR}[
            mean_type
        ]

    return model_fn


@pytest.mark.parametrize(
    "sampler,eta,mean_type",
    [("ddim", 0.0, "eps"), ("ddim", 0.0, "x0"), ("ddim", 0.0, "v"), ("ddim", 1.0, "eps"),
     ("ddim", 1.0, "v"), ("ddpm", None, "eps")],
)  # fmt: skip
def test_perfect_denoiser_recovers_the_data(sampler, eta, mean_type):
    schedule = schedules.make_schedule("linear", 50)
    model_fn = _perfect(schedule, mean_type)
    shape = (3, 4, 4, 1)
    if sampler == "ddim":
        x = ddim_sample(model_fn, schedule, RNG, shape, num_steps=7, eta=eta, mean_type=mean_type)
    else:
        x = sample(model_fn, schedule, RNG, shape, timesteps=space_timesteps(50, 7))
    # The last step returns the x_0 estimate made from x_1 (abar_1 = 0.998): recovering x* from
    # the float32 eps costs ~ulp(x)/sqrt(abar) plus the float32 eps itself, ~1e-6. A model fed
    # the respaced ids instead of the original ones would miss by > 1e-2.
    np.testing.assert_allclose(x, jnp.broadcast_to(X_STAR, shape), atol=1e-5, rtol=0)


@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.5, True), (1.0, False)])
def test_ddim_matches_eq12_reference(eta, clip):
    k = 8
    got = ddim_sample(_model, SCHEDULE, RNG, SHAPE, num_steps=k, eta=eta, clip_denoised=clip)
    betas, tmap = respace_f64(BETAS, space_timesteps(T, k))
    ref = _ddim_reference(betas, tmap, RNG, SHAPE, eta=eta, clip=clip)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_ddim_eta0_is_deterministic_given_x_T():
    x_T = jax.random.normal(jax.random.key(3), SHAPE)
    a = ddim_sample(_model, SCHEDULE, jax.random.key(0), SHAPE, num_steps=6, x_T=x_T)
    b = ddim_sample(_model, SCHEDULE, jax.random.key(1), SHAPE, num_steps=6, x_T=x_T)
    np.testing.assert_array_equal(a, b)
    c = ddim_sample(_model, SCHEDULE, jax.random.key(0), SHAPE, num_steps=6, x_T=x_T, eta=1.0)
    d = ddim_sample(_model, SCHEDULE, jax.random.key(1), SHAPE, num_steps=6, x_T=x_T, eta=1.0)
    assert np.abs(np.asarray(c) - np.asarray(d)).max() > 1e-2  # eta > 0 does use the keys


def test_ddim_eta1_equals_ancestral_fixed_small():
    # Song et al. 2021 Sec. 4.1: with eta = 1 the generative process is the DDPM one with
    # sigma_t^2 = beta tilde_t; the identical key scheme makes the draws identical too.
    k = 10
    a = ddim_sample(_model, SCHEDULE, RNG, SHAPE, num_steps=k, eta=1.0)
    b = sample(_model, SCHEDULE, RNG, SHAPE, timesteps=space_timesteps(T, k))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)  # two float32 routes to the same mean


def test_ddim_uses_only_the_mean_channels_of_a_learned_variance():
    a = ddim_sample(_model, SCHEDULE, RNG, SHAPE, num_steps=5, eta=0.3)
    b = ddim_sample(_model_learned, SCHEDULE, RNG, SHAPE, num_steps=5, eta=0.3,
                    var_type="learned_range")  # fmt: skip
    np.testing.assert_array_equal(a, b)


def test_ddim_trajectory_shapes():
    x, traj = ddim_sample(
        _model, SCHEDULE, RNG, SHAPE, num_steps=7, return_trajectory=True, trajectory_stride=3
    )
    np.testing.assert_array_equal(traj.t, space_timesteps(T, 7)[[6, 3, 0]])
    assert traj.x_t.shape == (3, *SHAPE) and x.shape == SHAPE
    np.testing.assert_allclose(traj.pred_x0[-1], x, atol=1e-6)  # eta 0: last step returns x0^


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: sample(_model, SCHEDULE, RNG, SHAPE, mean_type="score"), "mean_type 'score'"),
        (lambda: sample(_model, SCHEDULE, RNG, SHAPE, var_type="big"), "var_type 'big'"),
        (lambda: sample(_model, SCHEDULE, RNG, SHAPE, trajectory_stride=0), "trajectory_stride"),
        (lambda: sample(_model, SCHEDULE, RNG, (2, 0, 4, 1)), "shape"),
        (lambda: sample(_model, SCHEDULE, RNG, SHAPE, x_T=jnp.zeros((1, 4, 4, 1))), "x_T"),
        (lambda: sample(_model, SCHEDULE, RNG, SHAPE, timesteps=[0, T]), "range"),
        (lambda: ddim_sample(_model, SCHEDULE, RNG, SHAPE, num_steps=T + 1), "num_steps = 41"),
        (lambda: ddim_sample(_model, SCHEDULE, RNG, SHAPE, eta=-1.0), "eta = -1.0"),
        (lambda: sample_pmapped(_model, SCHEDULE, RNG, (3, 4, 4, 1)), "batch size 3"),
        (lambda: sample_pmapped(_model, SCHEDULE, RNG, SHAPE, sampler="euler"), "'euler'"),
    ],
)
def test_bad_arguments_raise_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- classifier-free guidance -----------------------------------------------------------------


class _FakeUNet:
    """Duck-typed U-Net: an analytic output depending on x, t and y, recording batch sizes."""

    def __init__(self, num_classes, learned):
        self.num_classes = num_classes
        self.learned = learned
        self.calls = []

    def apply(self, variables, x, t, y, *, train):
        assert not train
        self.calls.append(x.shape[0])
        return jnp.asarray(_fake_np(variables["params"], x, t, y, self.learned), jnp.float32)


def _fake_np(w, x, t, y, learned):
    xp = jnp if isinstance(x, jax.Array) else np
    t = t.astype(x.dtype)[:, None, None, None]
    y = xp.zeros_like(t) if y is None else y.astype(x.dtype)[:, None, None, None]
    mean = w * xp.tanh(x) + 0.1 * t + 0.7 * xp.cos(y)
    if not learned:
        return mean
    return xp.concatenate([mean, xp.sin(x + y)], axis=-1)


X = jax.random.normal(jax.random.key(11), SHAPE)
TT = jnp.array([3, 17], jnp.int32)
Y = jnp.array([0, 2], jnp.int32)


def test_guidance_zero_is_the_conditional_model_in_one_pass():
    fake = _FakeUNet(num_classes=3, learned=False)
    out = make_model_fn(fake, 1.5, y=Y)(X, TT)
    np.testing.assert_array_equal(out, _fake_np(1.5, X, TT, Y, False))
    assert fake.calls == [SHAPE[0]]  # no unconditional pass


@pytest.mark.parametrize("learned", [False, True])
def test_guidance_is_one_batched_call_of_the_ho_salimans_formula(learned):
    fake = _FakeUNet(num_classes=3, learned=learned)
    w = 2.5
    out = np.asarray(make_model_fn(fake, 1.5, y=Y, guidance_scale=w)(X, TT))
    x, t, y = (np.asarray(a, np.float64) for a in (X, TT, Y))
    cond = _fake_np(1.5, x, t, y, learned)
    uncond = _fake_np(1.5, x, t, np.full(2, 3.0), learned)  # null class id = num_classes
    c = SHAPE[-1]
    # Ho & Salimans 2022 eq. 6 on the mean channels; float32 vs float64: |values| < 10.
    np.testing.assert_allclose(out[..., :c], (1 + w) * cond[..., :c] - w * uncond[..., :c],
                               atol=1e-5)  # fmt: skip
    if learned:  # the variance stays the conditional one
        np.testing.assert_allclose(out[..., c:], cond[..., c:], atol=1e-6)
    assert fake.calls == [2 * SHAPE[0]]


def test_guidance_labels_per_call_override_bound_labels():
    fake = _FakeUNet(num_classes=3, learned=False)
    fn = make_model_fn(fake, 1.0, y=0, guidance_scale=1.0)
    bound = make_model_fn(fake, 1.0, y=Y, guidance_scale=1.0)
    np.testing.assert_array_equal(fn(X, TT, y=Y), bound(X, TT))
    assert not np.array_equal(fn(X, TT), fn(X, TT, y=Y))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_classes=0, y=Y), "unconditional"),
        (dict(num_classes=0, guidance_scale=1.0), "guidance_scale = 1.0"),
        (dict(num_classes=3, guidance_scale=-1.0), "guidance_scale = -1.0"),
    ],
)
def test_make_model_fn_rejects_inconsistent_conditioning(kwargs, match):
    fake = _FakeUNet(num_classes=kwargs.pop("num_classes"), learned=False)
    with pytest.raises(ValueError, match=match):
        make_model_fn(fake, 1.0, **kwargs)


def test_guidance_without_labels_fails_at_call():
    fn = make_model_fn(_FakeUNet(num_classes=3, learned=False), 1.0, guidance_scale=2.0)
    with pytest.raises(ValueError, match="needs class labels"):
        fn(X, TT)


@pytest.mark.slow  # compiles a U-Net
def test_guidance_on_a_tiny_unet():
    # ch_mult (1, 2): at 32 channels GroupNorm(32) has one channel per group and would normalise
    # the per-channel class embedding away; the 64-channel level keeps it.
    model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                 out_channels=2, num_classes=3)  # fmt: skip
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([5, 900], jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, Y, train=False))
    # Random leaves: the zero-initialised output conv would make every output 0. Drawn with
    # numpy: jax draws compile one program per leaf shape.
    gen = np.random.default_rng(2)
    params = jax.tree.map(
        lambda s: jnp.asarray(0.2 * gen.standard_normal(s.shape), jnp.float32), shapes["params"]
    )

    @jax.jit
    def outputs(params):
        apply = lambda y: model.apply({"params": params}, x, t, y, train=False)  # noqa: E731
        unguided = make_model_fn(model, params, y=Y)(x, t)
        guided = make_model_fn(model, params, y=Y, guidance_scale=1.5)(x, t)
        return apply(Y), apply(jnp.full(2, 3)), unguided, guided

    cond, uncond, unguided, guided = outputs(params)
    assert np.abs(np.asarray(cond - uncond)).max() > 1e-2  # labels matter
    np.testing.assert_array_equal(unguided, cond)
    # One batch of 4 vs two batches of 2: the same per-example math, float32 rounding apart.
    np.testing.assert_allclose(guided[..., :1], 2.5 * cond[..., :1] - 1.5 * uncond[..., :1],
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(guided[..., 1:], cond[..., 1:], atol=1e-6)


# --- several devices --------------------------------------------------------------------------


def _model_y(x, t, y):
    return _model(x, t) + 0.2 * y.astype(jnp.float32)[:, None, None, None]


@pytest.mark.parametrize(
    "sampler,kwargs", [("ddpm", dict(timesteps=(0, 5, 17, 39))), ("ddim", dict(num_steps=4))]
)
def test_sample_pmapped_matches_per_device_sampling(sampler, kwargs):
    assert len(jax.local_devices()) == 2  # tests/conftest.py
    shape = (4, 4, 4, 1)
    y = jnp.array([0, 1, 2, 3], jnp.int32)
    got = sample_pmapped(
        _model_y, SCHEDULE, RNG, shape, sampler=sampler, model_kwargs={"y": y}, **kwargs
    )
    assert got.shape == shape
    fn = sampling.SAMPLERS[sampler]
    for d in range(2):
        rows = slice(2 * d, 2 * d + 2)
        ref = fn(_model_y, SCHEDULE, jax.random.fold_in(RNG, d), (2, 4, 4, 1),
                 model_kwargs={"y": y[rows]}, **kwargs)  # fmt: skip
        # Same operations compiled as one program per device or one in all: rounding apart.
        np.testing.assert_allclose(got[rows], ref, atol=1e-6, rtol=0)
    assert np.abs(np.asarray(got[:2] - got[2:])).max() > 1e-2  # devices draw different noise


def test_sample_pmapped_trajectory_gathers_the_batch_axis():
    x, traj = sample_pmapped(
        _model, SCHEDULE, RNG, (4, 4, 4, 1), sampler="ddim", num_steps=5,
        return_trajectory=True, trajectory_stride=2,
    )  # fmt: skip
    assert x.shape == (4, 4, 4, 1)
    assert traj.x_t.shape == traj.pred_x0.shape == (3, 4, 4, 4, 1)
    np.testing.assert_array_equal(traj.t, space_timesteps(T, 5)[[4, 2, 0]])
    ref = ddim_sample(_model, SCHEDULE, jax.random.fold_in(RNG, 1), (2, 4, 4, 1), num_steps=5)
    np.testing.assert_allclose(x[2:], ref, atol=1e-6, rtol=0)
