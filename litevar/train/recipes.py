"""The recipe of the shipped default model (Fashion-MNIST, 32x32, the released 256px token pyramid).

`make default-model` runs exactly these settings; changing them changes the run (run.json refuses to mix).
"""
from __future__ import annotations

from ..models.configs import PYRAMID_256, MVARConfig, VARConfig, VQVAEConfig
from .loop import TrainConfig

# 32x32 images (28x28 zero-padded): one 2x downsampling gives the 16x16 last scale of the released pyramid
DEFAULT_VAE = VQVAEConfig(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                          share_quant_resi=4, quant_resi=0.5, using_sa=True, using_mid_sa=True,
                          patch_nums=PYRAMID_256)
DEFAULT_VAE_TRAIN = TrainConfig(steps=1200, batch_size=32, lr=1e-3, warmup_steps=100, weight_decay=0.0,
                                beta1=0.9, beta2=0.95, seed=0)

DEFAULT_VAR = VARConfig(depth=4, num_classes=10, patch_nums=PYRAMID_256, vocab_size=DEFAULT_VAE.vocab_size,
                        z_channels=DEFAULT_VAE.z_channels)
# the M-VAR of the same size, trained with the same recipe and budget (DEFAULT_VAR_TRAIN)
DEFAULT_MVAR = MVARConfig(depth=4, num_classes=10, patch_nums=PYRAMID_256, vocab_size=DEFAULT_VAE.vocab_size,
                          z_channels=DEFAULT_VAE.z_channels)
DEFAULT_VAR_TRAIN = TrainConfig(steps=700, batch_size=32, lr=8e-4, warmup_steps=150, weight_decay=0.05,
                                beta1=0.9, beta2=0.95, seed=0)
