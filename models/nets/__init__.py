"""Architectures only, one file per paper: no losses, no training logic, no family."""
