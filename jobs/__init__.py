"""The control plane: job specs, the Ray Train loop, engines, tracking, registry, submission, CLI."""
