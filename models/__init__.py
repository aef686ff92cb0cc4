"""What is trained: networks, losses, metrics, one "family" per system (see `models.family`)."""
