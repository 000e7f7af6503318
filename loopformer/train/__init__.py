"""Training: the train step, optimiser, checkpoints, run directories, logging and the loop."""
