"""DiffiT denoiser, the EDM loss/sampler, and EDM's non-leaking augmentation."""

from model.augment import AUGMENT_DIM, AugmentWeights, augment
from model.diffit import DiffiT, count_parameters
from model.edm import EDMSchedule, SamplingStopped, edm_loss, edm_sample

__all__ = ["AUGMENT_DIM", "AugmentWeights", "DiffiT", "EDMSchedule", "SamplingStopped", "augment", "count_parameters",
           "edm_loss", "edm_sample"]  # fmt: skip
