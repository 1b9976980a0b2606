"""Experiment tracking: every run journalled in its folder, then sent to one sink (MLflow by default, TensorBoard)."""
