"""latentdiff: class-conditioned latent diffusion for MNIST digits.

    pipe = LatentDiffusion.from_pretrained("runs/ldm")
    images = pipe.generate(labels=[3, 3, 7], guidance_scale=3.0, steps=20, seed=0)  # (3,1,28,28) in [0,1]

This namespace is the public API. The rest lives in its modules: ``latentdiff.edit`` (editing
digits), ``latentdiff.latents`` (whole splits as latents), ``latentdiff.train`` (the training loops),
``latentdiff.evaluate`` (scoring and sweeps) and ``latentdiff.serve`` (web page and HTTP API).
"""

from .config import (DataConfig, DiffusionConfig, LDMRunConfig, SampleConfig, TrainConfig, UNetConfig, VAEConfig,
                     VAERunConfig, load_config)
from .errors import ConfigError, DataError, LatentDiffError, ModelLoadError, RunDirError, TrainingDiverged
from .pipeline import LatentDiffusion, PipelineConfig, make_grid, to_pil
from .unet import UNet
from .vae import VAE, DiagonalGaussian

__all__ = [
    "LatentDiffusion", "PipelineConfig", "VAE", "DiagonalGaussian", "UNet", "make_grid", "to_pil", "load_config",
    "VAEConfig", "UNetConfig", "DiffusionConfig", "SampleConfig", "TrainConfig", "DataConfig", "VAERunConfig",
    "LDMRunConfig", "LatentDiffError", "ConfigError", "DataError", "ModelLoadError", "RunDirError", "TrainingDiverged",
]
__version__ = "0.1.0"
