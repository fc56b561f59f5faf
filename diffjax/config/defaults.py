"""The config schema, with the DDPM paper's CIFAR-10 values as defaults.

Every config (``configs/*.py``, converted runs) starts from :func:`get_base_config` and overrides
what differs, so the schema is written once. Sections and keys:

- ``data``: name, data_dir (None: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), image_size,
  channels, random_flip, train_split, eval_split, num_classes (0 = ignore labels).
- ``model``: ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv, dtype
  ("float32" | "bfloat16": compute only, parameters stay float32), kernels ("tuned" | "plain" |
  "onednn", ``diffjax.kernels``), num_classes (0 =
  unconditional), num_groups (GroupNorm groups; ch and every ch * mult must be multiples).
- ``diffusion``: schedule, num_timesteps, mean_type, var_type, loss_type.
- ``training``: num_train_steps, batch_size (global), seed, checkpoint_every_steps,
  sample_every_steps, log_every_steps, keep_checkpoints, ema_decay, ema_warmup, class_dropout,
  nan_policy,
  max_consecutive_skips, watchdog_factor, watchdog_min_seconds, watchdog_first_seconds.
- ``optimizer``: learning_rate, warmup_steps, decay ("constant" | "cosine"), grad_clip (global
  norm; 0 = no clipping), beta1, beta2, eps.
- ``sampling``: num_samples, sampler ("ddpm" | "ddim" | "dpm++"), num_steps (0 = all T; 20 for
  "dpm++"), eta, clip_denoised, guidance_scale, order and spacing (DPM-Solver++).
- ``evaluation`` (during training, ``diffjax.training.evaluation``): eval_every_steps (the
  fixed-noise eval loss; 0 = off), eval_examples, quality_every_steps (bits/dim and the sample
  metric; 0 = off), bpd_examples (0 = no bits/dim), sample_metric ("auto" | "digits_fd" | "fid"
  | "none"), num_samples, sampler, num_steps, batch_size (global), inception_weights and
  ref_stats (FID/IS; both or neither).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from diffjax.training.watchdog import WatchdogSettings

# Training splits whose decoded images fit in this many MiB are decoded once, at the start
# (data.cache_max_mb; CIFAR-10's 50,000 x 32 x 32 x 3 take 146 MiB). Also the value for run
# directories whose config predates the field.
CACHE_MAX_MB = 512


def get_base_config() -> ml_collections.ConfigDict:
    """All keys of the schema; values are Ho et al. 2020's CIFAR-10 recipe (appendix B)."""
    config = ml_collections.ConfigDict()

    config.data = data = ml_collections.ConfigDict()
    data.name = "cifar10"
    data.data_dir = config_dict.placeholder(str)
    data.image_size = 32
    data.channels = 3
    data.random_flip = True
    data.train_split = "train"
    data.eval_split = "test"
    data.num_classes = 0
    # Decode the training split once into memory when it takes at most this many MiB (0: never).
    data.cache_max_mb = CACHE_MAX_MB

    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.dtype = "float32"
    # How the layers compute (diffjax.kernels): "tuned" kernels, the "plain" lax/jax.nn
    # reference, or "onednn" (tuned, with oneDNN calls on AVX-512 CPUs).
    model.kernels = "tuned"
    model.num_classes = 0
    model.num_groups = 32

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "linear"
    diffusion.num_timesteps = 1000
    diffusion.mean_type = "eps"
    diffusion.var_type = "fixed_large"
    diffusion.loss_type = "simple"

    config.training = training = ml_collections.ConfigDict()
    training.num_train_steps = 800_000
    training.batch_size = 128
    training.seed = 0
    training.checkpoint_every_steps = 10_000
    training.sample_every_steps = 50_000
    training.log_every_steps = 100
    training.keep_checkpoints = 3
    training.ema_decay = 0.9999
    training.ema_warmup = False  # True: decay min(ema_decay, (1 + step) / (10 + step))
    training.class_dropout = 0.1  # used only when model.num_classes > 0
    training.nan_policy = "stop"
    training.max_consecutive_skips = 10
    # A step, sample grid or checkpoint that takes max(factor x its median, min_seconds) ends
    # the run with exit status 124 and the Python stacks (diffjax.training.watchdog); factor 0: off.
    # first_seconds > 0 also bounds each one's first call, which compiles.
    training.watchdog_factor = WatchdogSettings.factor
    training.watchdog_min_seconds = WatchdogSettings.min_seconds
    training.watchdog_first_seconds = WatchdogSettings.first_seconds

    config.optimizer = optimizer = ml_collections.ConfigDict()
    optimizer.learning_rate = 2e-4
    optimizer.warmup_steps = 5000
    optimizer.decay = "constant"  # after warm-up; "cosine": down to 0 at num_train_steps
    optimizer.grad_clip = 1.0
    optimizer.beta1 = 0.9
    optimizer.beta2 = 0.999
    optimizer.eps = 1e-8

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.num_samples = 64
    sampling.sampler = "ddpm"
    sampling.num_steps = 0
    sampling.eta = 0.0
    sampling.clip_denoised = True
    sampling.guidance_scale = 0.0
    sampling.order = 2  # DPM-Solver++ (sampler "dpm++") only
    sampling.spacing = "logsnr"  # DPM-Solver++ only: logsnr, time, karras, uniform

    # Evaluation during training (diffjax.training.evaluation); off by default: at this size a
    # sample metric costs minutes. Keys come from fold_in(key(training.seed), 3), never from the
    # training stream, so a run gives the same parameters with evaluation on or off.
    config.evaluation = evaluation = ml_collections.ConfigDict()
    # Every N steps (and after the last): the loss on the first eval_examples of
    # data.eval_split with the same t and noise each time, for the params and the EMA (0: off).
    evaluation.eval_every_steps = 0
    evaluation.eval_examples = 1024
    # Every N steps (and after the last): bits/dim (full bound over all T) on the first
    # bpd_examples of data.eval_split (0: none), and the sample metric (0: off).
    evaluation.quality_every_steps = 0
    evaluation.bpd_examples = 256
    # "auto": digits_fd on digits/MNIST, else fid (and is) when inception_weights and ref_stats
    # are given, else none.
    evaluation.sample_metric = "auto"
    evaluation.num_samples = 10_000
    evaluation.sampler = "dpm++"
    evaluation.num_steps = 20  # 0 = all T (20 for dpm++)
    evaluation.batch_size = 256  # global examples per compiled call
    evaluation.inception_weights = config_dict.placeholder(str)  # FID Inception .npz
    evaluation.ref_stats = config_dict.placeholder(str)  # reference statistics .npz (read)
    return config
