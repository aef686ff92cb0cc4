"""One module per reproduced system; `models.registry` finds every `Family` subclass defined here.

Adding a system: a module here (its family, with published defaults and a `tiny` CPU
configuration), its networks in `models/nets/` when they are new, and a spec in `jobs/specs/`.
"""
