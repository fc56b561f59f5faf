r"""Default config: scikit-learn's 8x8 handwritten digits, offline, a few minutes on a laptop CPU.

Command (no flags needed; this is what ``python train.py`` runs)::

    python train.py
    python train.py --config=configs/digits.py --workdir=workdirs/digits \
        --config.training.num_train_steps=4000 --config.model.num_classes=10

Expected result: on 2 CPU cores 5-7 minutes (compilation included) for 2,000 steps of
batch 64 (about 450 images/s); the loss (eps-MSE, Ho et al. 2020 eq. 14) falls from 1.0 to
about 0.09, and workdirs/digits/samples/step_0002000.png shows 64 samples of the EMA parameters
(1000-step ancestral sampling, Ho et al. 2020 Alg. 2, about 30 s): legible digits 0-9, a few
malformed. ``--config.sampling.sampler=ddim --config.sampling.num_steps=50`` samples in a few
seconds, blurrier.

The data (1,797 images of 8x8, intensities 0..16 rescaled to 0..255; 1,500 for training) ships
with scikit-learn and is written as a TFDS dataset on first use without network access. The
model is a small DDPM U-Net (two levels at 8x8 and 4x4, self-attention at 4x4); the diffusion
itself is the paper's (T = 1000, linear betas, eps prediction, L_simple).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """The digits config (schema: diffjax CONTRACT, sections data/model/diffusion/...)."""
    config = ml_collections.ConfigDict()

    config.data = data = ml_collections.ConfigDict()
    data.name = "digits"
    data.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    data.image_size = 8
    data.channels = 1
    data.random_flip = False  # a mirrored digit is not a digit
    data.train_split = "train"
    data.eval_split = "test"
    data.num_classes = 10

    config.model = model = ml_collections.ConfigDict()
    model.ch = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.dropout = 0.0
    model.resamp_with_conv = True
    model.dtype = "float32"
    model.num_classes = 0  # 10: class-conditional, with classifier-free guidance

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "linear"
    diffusion.num_timesteps = 1000
    diffusion.mean_type = "eps"
    diffusion.var_type = "fixed_large"
    diffusion.loss_type = "simple"

    config.training = training = ml_collections.ConfigDict()
    training.num_train_steps = 2000
    training.batch_size = 64
    training.seed = 0
    training.checkpoint_every_steps = 500
    training.sample_every_steps = 1000
    training.log_every_steps = 50
    training.keep_checkpoints = 2
    training.ema_decay = 0.995
    training.class_dropout = 0.1
    training.nan_policy = "stop"
    training.max_consecutive_skips = 10

    config.optimizer = optimizer = ml_collections.ConfigDict()
    optimizer.learning_rate = 1e-3
    optimizer.warmup_steps = 100
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
