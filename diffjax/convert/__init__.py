"""Conversion of diffusers ``UNet2DModel`` DDPM checkpoints into diffjax runs: the configs
(``configs``) and the weights (``weights``); ``python -m diffjax.convert`` is
``diffjax convert``."""
