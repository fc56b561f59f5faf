r"""CelebA-HQ 256x256, the DDPM paper recipe (Ho et al. 2020, appendix B).

Prepare the data once (TFDS needs the progressive-GAN CelebA-HQ files in a manual dir, and
TensorFlow; see diffjax.data.pipeline), then train on a TPU pod slice::

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

from diffjax.config.defaults import get_base_config


def get_config() -> ml_collections.ConfigDict:
    """The CelebA-HQ 256 config: overrides of diffjax.config.defaults."""
    config = get_base_config()
    config.data.eval_split = "train"  # CelebA-HQ has a single split
    config.data.image_size = 256
    config.data.name = "celeb_a_hq"
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0
    config.training.batch_size = 64
    config.training.checkpoint_every_steps = 5000
    config.training.num_train_steps = 500_000
    config.optimizer.learning_rate = 2e-05
    config.sampling.num_samples = 16
    return config
