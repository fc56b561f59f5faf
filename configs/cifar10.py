r"""CIFAR-10 32x32, the DDPM paper recipe (Ho et al. 2020, Sec. 4 and appendix B).

Prepare the data once (needs TensorFlow and network, see diffjax.data.pipeline), then train::

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

from diffjax.config.defaults import get_base_config


def get_config() -> ml_collections.ConfigDict:
    """The CIFAR-10 config: overrides of diffjax.config.defaults."""
    config = get_base_config()
    config.data.num_classes = 10
    return config
