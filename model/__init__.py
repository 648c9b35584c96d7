"""DiffiT denoiser and the EDM loss/sampler."""

from model.diffit import DiffiT, count_parameters
from model.edm import EDMSchedule, SamplingStopped, edm_loss, edm_sample

__all__ = ["DiffiT", "EDMSchedule", "SamplingStopped", "count_parameters", "edm_loss", "edm_sample"]
