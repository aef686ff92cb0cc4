"""Metrics that judge generated images, behind one interface (`models.metrics.suite.MetricSuite`);
they run offline (feature extractors come from local files or a fixed seed)."""
