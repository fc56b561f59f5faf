r"""MNIST 28x28: a mid-sized DDPM for a single GPU or a small TPU slice.

Prepare the data once (needs TensorFlow and network, see diffjax.data.pipeline), then train::

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

from diffjax.config.defaults import get_base_config


def get_config() -> ml_collections.ConfigDict:
    """The MNIST config: overrides of diffjax.config.defaults."""
    config = get_base_config()
    config.data.channels = 1
    config.data.image_size = 28
    config.data.name = "mnist"
    config.data.num_classes = 10
    config.data.random_flip = False
    config.model.attn_resolutions = (14,)
    config.model.ch = 64
    config.model.ch_mult = (1, 2, 2)
    config.training.checkpoint_every_steps = 5000
    config.training.ema_decay = 0.9995
    config.training.num_train_steps = 50_000
    config.training.sample_every_steps = 5000
    config.optimizer.warmup_steps = 1000
    config.sampling.num_steps = 100
    config.sampling.sampler = "ddim"
    return config
