"""The registered model: an MLflow pyfunc "from code" around an orbitgen inference snapshot.

Unconditional families: predict(pd.DataFrame({"seed": [0, 1, ...]})) returns one image per
row, a uint8 array N×H×W×C; the same seed gives the same image. Conditional families:
predict(pd.DataFrame({"cond": [png, ...]})) (and a column `mask` for families that use one,
see `input_columns`) returns the output for each input image, uint8 N×H×W×C. Loading needs
`models/` (shipped with the model as code), torch and Pillow, nothing of Ray or the training code.
"""
from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import torch

BATCH = 16   # inputs per forward pass of a conditional model


def input_columns(family) -> tuple[str, ...]:
    """The DataFrame columns the registered model of `family` takes."""
    if not family.conditional:
        return ("seed",)
    return tuple(k for k in ("cond", "mask") if k in family.data_keys)


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from pathlib import Path

        from models.snapshot import load_snapshot

        snapshot = Path(context.artifacts["snapshot"])
        # The packages this model ships (MLflow's code_paths, in <model>/code: models/ and a lab's own
        # family package) are the ones its snapshot may name; nothing else installed is imported.
        code = snapshot.parent.parent / "code"
        shipped = [p.name for p in code.iterdir() if p.is_dir()] if code.is_dir() else []
        self.family, self.sampler, self.info = load_snapshot(snapshot, trusted_packages=shipped)

    def predict(self, context, model_input, params=None):
        from models.images import nchw_to_nhwc_numpy, to_uint8

        fam = self.family
        missing = [c for c in input_columns(fam) if c not in model_input]
        if missing:
            raise ValueError(f"input needs the column(s) {', '.join(missing)} (one image per row); "
                             f"this {fam.name} model takes {', '.join(input_columns(fam))}")
        if len(model_input) == 0:
            return np.zeros((0, fam.resolution, fam.resolution, fam.channels), np.uint8)
        if not fam.conditional:
            images = [fam.sample(self.sampler, 1, seed=int(s)) for s in model_input["seed"]]
        else:
            images = [self._translate(model_input.iloc[i:i + BATCH]) for i in range(0, len(model_input), BATCH)]
        return nchw_to_nhwc_numpy(torch.cat([to_uint8(x) for x in images]))

    def _translate(self, rows) -> torch.Tensor:
        from models.images import to_float
        from models.png import decode_pngs

        fam = self.family
        inputs = {"cond": to_float(decode_pngs(rows["cond"], channels=fam.channels, size=fam.resolution, what="cond"))}
        if "mask" in input_columns(fam):
            inputs["mask"] = to_float(decode_pngs(rows["mask"], channels=1, size=fam.resolution, what="mask"))
        return fam.sample(self.sampler, len(rows), **inputs)


mlflow.models.set_model(GeneratorModel())
