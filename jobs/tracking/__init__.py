"""MLflow: runs (`runs`), the model registry (`registry`), references to registered models
(`model_refs`) and the pyfunc that serves a generator (`pyfunc`); which registry goes with a
tracking store (`stores`). Nothing else in orbitgen talks to the registry."""
