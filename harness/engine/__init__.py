"""Training and evaluation: the loop and its one step, the evaluation loop, losses, metrics, checkpoints, processes."""
