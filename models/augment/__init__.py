"""Augmentations: ADA (`ada`), the MineAug candidate pool (`pool`) and MineAug's train-time expansion (`mineaug`)."""
