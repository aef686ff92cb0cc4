"""MineAug: scoring augmentations and validating subsets as Ray Tune + Optuna trials.

Never imports `jobs`: a proxy-training function is handed in by the caller (docs/ARCHITECTURE.md).
"""
