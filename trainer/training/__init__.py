"""Training: the launch sequence (claim, configure, build, fit: ``train``), the loop, the run kinds, the model
and data factory, EMA, validation, sample grids and trackers."""
