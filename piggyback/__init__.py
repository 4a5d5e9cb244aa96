"""Piggyback GAN (Zhai et al., ECCV 2020): lifelong image-to-image translation without forgetting.

Public API of the library; see docs/architecture.md for how the modules fit together. Importing this
package loads PyTorch only (no MLflow, DVC or data code).
"""
from .accounting import growth_table
from .checkpoint import CheckpointError, check_compatible, load_lifelong, load_probes, save_lifelong
from .discriminators import build_discriminator
from .layers import PiggybackConv2d, PiggybackConvTranspose2d
from .lifelong import LifelongModel, materialize
from .networks import GeneratorConfig, build_generator
from .norms import TaskBatchNorm2d
from .reference import import_reference, import_reference_model

__all__ = [
    "PiggybackConv2d", "PiggybackConvTranspose2d", "TaskBatchNorm2d",
    "GeneratorConfig", "build_generator", "build_discriminator",
    "LifelongModel", "materialize", "save_lifelong", "load_lifelong", "load_probes", "check_compatible",
    "CheckpointError", "import_reference", "import_reference_model", "growth_table",
]
