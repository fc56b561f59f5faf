r"""MNIST 28x28: a mid-sized DDPM for a single GPU or a small TPU slice.

Prepare the data once (needs TensorFlow and network, see diffjax.input_pipeline), then train::

    tfds build mnist --file_format=array_record --data_dir=~/tensorflow_datasets
    python train.py --config=configs/mnist.py --workdir=workdirs/mnist

Recipe: the paper's diffusion (T = 1000 linear betas, eps prediction, L_simple, sigma_t^2 =
beta_t) with a smaller U-Net (6.5M parameters: ch 64, ch_mult (1, 2, 2) for the 28, 14 and 7
resolutions, 2 res blocks per level, self-attention at 14x14, dropout 0.1); Adam at 2e-4 with
1,000 warmup steps, clipping at 1.0, batch 128, EMA 0.9995, no flips (digits are not
symmetric), 50k steps. Samples: DDIM with 100 steps (Song et al. 2021). Add
``--config.model.num_classes=10 --config.sampling.guidance_scale=1.0`` for a class-conditional
model with classifier-free guidance (samples then show the digits 0-9 in order).

Expected result: clean, legible digits by about 10k steps (loss ~0.03) and FID-level quality
at 50k; a few hours on one modern GPU, much longer on a laptop CPU.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """The MNIST config (schema: diffjax CONTRACT)."""
    config = ml_collections.ConfigDict()

    config.data = data = ml_collections.ConfigDict()
    data.name = "mnist"
    data.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    data.image_size = 28
    data.channels = 1
    data.random_flip = False
    data.train_split = "train"
    data.eval_split = "test"
    data.num_classes = 10

    config.model = model = ml_collections.ConfigDict()
    model.ch = 64
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (14,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.dtype = "float32"
    model.num_classes = 0

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "linear"
    diffusion.num_timesteps = 1000
    diffusion.mean_type = "eps"
    diffusion.var_type = "fixed_large"
    diffusion.loss_type = "simple"

    config.training = training = ml_collections.ConfigDict()
    training.num_train_steps = 50_000
    training.batch_size = 128
    training.seed = 0
    training.checkpoint_every_steps = 5000
    training.sample_every_steps = 5000
    training.log_every_steps = 100
    training.keep_checkpoints = 3
    training.ema_decay = 0.9995
    training.class_dropout = 0.1
    training.nan_policy = "stop"
    training.max_consecutive_skips = 10

    config.optimizer = optimizer = ml_collections.ConfigDict()
    optimizer.learning_rate = 2e-4
    optimizer.warmup_steps = 1000
    optimizer.grad_clip = 1.0
    optimizer.beta1 = 0.9
    optimizer.beta2 = 0.999
    optimizer.eps = 1e-8

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.num_samples = 64
    sampling.sampler = "ddim"
    sampling.num_steps = 100
    sampling.eta = 0.0
    sampling.clip_denoised = True
    sampling.guidance_scale = 0.0
    return config
