"""Metrics that judge generated images; they run offline (feature extractors come from local files or a fixed seed)."""
