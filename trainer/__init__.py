"""DiffiT trainer: config, runs, checkpoints and the training loop."""
