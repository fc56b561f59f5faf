r"""CIFAR-10 32x32, the DDPM paper recipe (Ho et al. 2020, Sec. 4 and appendix B).

Prepare the data once (needs TensorFlow and network, see diffjax.input_pipeline), then train::

    tfds build cifar10 --file_format=array_record --data_dir=gs://BUCKET/tfds
    python train.py --config=configs/cifar10.py --workdir=gs://BUCKET/workdirs/cifar10 \
        --config.data.data_dir=gs://BUCKET/tfds

Recipe: T = 1000 linear betas 1e-4..0.02, eps prediction with L_simple, fixed variance
sigma_t^2 = beta_t ("fixed_large"); the 35.7M-parameter U-Net (35,746,307 parameters: ch 128,
ch_mult (1, 2, 2, 2), 2 res blocks per level, self-attention at 16x16, dropout 0.1); Adam at
2e-4 with 5,000 linear warmup steps, gradient clipping at global norm 1.0, batch 128, EMA decay
0.9999, random horizontal flips, 800k steps. Samples: 1000-step ancestral sampling.

Expected result (paper, Table 1): FID 3.17 and Inception score 9.46 on 50k samples from the EMA
parameters at 800k steps. The paper trained at 21 steps/s on a TPU v3-8 (10.6 hours).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """The CIFAR-10 config (schema: diffjax CONTRACT)."""
    config = ml_collections.ConfigDict()

    config.data = data = ml_collections.ConfigDict()
    data.name = "cifar10"
    data.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    data.image_size = 32
    data.channels = 3
    data.random_flip = True
    data.train_split = "train"
    data.eval_split = "test"
    data.num_classes = 10

    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.dtype = "float32"  # "bfloat16": compute only, parameters stay float32
    model.num_classes = 0

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
    training.class_dropout = 0.1
    training.nan_policy = "stop"
    training.max_consecutive_skips = 10

    config.optimizer = optimizer = ml_collections.ConfigDict()
    optimizer.learning_rate = 2e-4
    optimizer.warmup_steps = 5000
    optimizer.grad_clip = 1.0
    optimizer.beta1 = 0.9
    optimizer.beta2 = 0.999
    optimizer.eps = 1e-8

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.num_samples = 64
    sampling.sampler = "ddpm"
    sampling.num_steps = 0  # all T steps
    sampling.eta = 0.0
    sampling.clip_denoised = True
    sampling.guidance_scale = 0.0
    return config
