r"""CelebA-HQ 256x256, the DDPM paper recipe (Ho et al. 2020, appendix B).

Prepare the data once (TFDS needs the progressive-GAN CelebA-HQ files in a manual dir, and
TensorFlow; see diffjax.input_pipeline), then train on a TPU pod slice::

    tfds build celeb_a_hq/256 --file_format=array_record --data_dir=gs://BUCKET/tfds \
        --manual_dir=MANUAL_DIR
    python train.py --config=configs/celeba_hq256.py --workdir=gs://BUCKET/workdirs/celeba_hq256 \
        --config.data.data_dir=gs://BUCKET/tfds

Recipe: T = 1000 linear betas 1e-4..0.02, eps prediction with L_simple, sigma_t^2 = beta_t;
the 256x256 U-Net (113,673,219 parameters: ch 128, ch_mult (1, 1, 2, 2, 4, 4), 2 res blocks per
level, self-attention at 16x16, dropout 0); Adam at 2e-5 (lower than CIFAR-10's 2e-4: larger
rates were unstable at 256x256), 5,000 warmup steps, gradient clipping at 1.0, batch 64, EMA
decay 0.9999, random horizontal flips, 0.5M steps.

Expected result: samples like the paper's Fig. 1/Fig. 14 at 0.5M steps (the paper reports no
CelebA-HQ FID). The paper trained at 2.2 steps/s on a TPU v3-8 (about 63 hours for 0.5M steps).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """The CelebA-HQ 256 config (schema: diffjax CONTRACT)."""
    config = ml_collections.ConfigDict()

    config.data = data = ml_collections.ConfigDict()
    data.name = "celeb_a_hq"
    data.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    data.image_size = 256
    data.channels = 3
    data.random_flip = True
    data.train_split = "train"
    data.eval_split = "train"  # CelebA-HQ has a single split
    data.num_classes = 0

    config.model = model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 1, 2, 2, 4, 4)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.0
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
    training.num_train_steps = 500_000
    training.batch_size = 64
    training.seed = 0
    training.checkpoint_every_steps = 5000
    training.sample_every_steps = 50_000
    training.log_every_steps = 100
    training.keep_checkpoints = 3
    training.ema_decay = 0.9999
    training.class_dropout = 0.1
    training.nan_policy = "stop"
    training.max_consecutive_skips = 10

    config.optimizer = optimizer = ml_collections.ConfigDict()
    optimizer.learning_rate = 2e-5
    optimizer.warmup_steps = 5000
    optimizer.grad_clip = 1.0
    optimizer.beta1 = 0.9
    optimizer.beta2 = 0.999
    optimizer.eps = 1e-8

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.num_samples = 16
    sampling.sampler = "ddpm"
    sampling.num_steps = 0  # all T steps
    sampling.eta = 0.0
    sampling.clip_denoised = True
    sampling.guidance_scale = 0.0
    return config
