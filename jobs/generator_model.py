"""The registered model: an MLflow pyfunc "from code" around an orbitgen inference snapshot.

Unconditional families: predict(pd.DataFrame({"seed": [0, 1, ...]})) returns one image per
row, a uint8 array N×H×W×C; the same seed gives the same image. Loading needs `models/`
(shipped with the model as code) and torch, nothing of Ray or the training code.
"""
from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import torch


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from models.snapshot import load_snapshot

        self.family, self.sampler, self.info = load_snapshot(context.artifacts["snapshot"])

    def predict(self, context, model_input, params=None):
        from models.images import nchw_to_nhwc_numpy, to_uint8

        if self.family.conditional:
            raise NotImplementedError(f"{self.family.name}: conditional sampling arrives with its family")
        if "seed" not in model_input:
            raise ValueError("input needs a column 'seed' (one image per row)")
        seeds = [int(s) for s in model_input["seed"]]
        if not seeds:
            r, c = self.family.resolution, self.family.channels
            return np.zeros((0, r, r, c), np.uint8)
        return nchw_to_nhwc_numpy(torch.cat([to_uint8(self.family.sample(self.sampler, 1, seed=s)) for s in seeds]))


mlflow.models.set_model(GeneratorModel())
