"""The registered model's inputs beyond what the contract checks for every family × spec
(test_family_contract.py: seeds, PNG inputs and masks, the same images as `sample`): grey
conditional inputs, and the PNG decoding it relies on. A local sqlite store; no servers, no Ray."""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from family_checks import smooth_batch
from jobs.tracking.registry import log_generator
from jobs.tracking.runs import ensure_experiment
from models.images import nchw_to_nhwc_numpy, to_float, to_uint8
from models.png import decode_pngs, encode_png
from models.registry import make_family
from models.snapshot import save_snapshot
from tiny_specs import tiny_model

RES = 16


@pytest.fixture
def tracking(tmp_path):
    mlflow.set_experiment(experiment_id=ensure_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "pyfunc",
                                                          tmp_path / "artifacts"))
    yield tmp_path
    mlflow.set_tracking_uri(None)


def pngs(images_uint8: torch.Tensor) -> list[bytes]:
    return [encode_png(a) for a in nchw_to_nhwc_numpy(images_uint8)]


def test_grey_conditional_model_takes_grey_pngs(tracking):
    fam = make_family("cgan_unet", tiny_model("cgan_unet"), resolution=RES, channels=1, lr=2e-4)
    torch.manual_seed(0)
    net = fam.build()[fam.sampler_role]
    save_snapshot(tracking / "generator.pt", fam, net)
    (tracking / "spec.yaml").write_text("name: test\n")
    with mlflow.start_run():
        assert log_generator(tracking / "generator.pt", tracking / "spec.yaml", "m-grey") == "1"
    model = mlflow.pyfunc.load_model("models:/m-grey/1")
    cond = to_uint8(smooth_batch(3, 1, RES, seed=1))
    mask = to_uint8((smooth_batch(3, 1, RES, seed=2) > 0).float() * 2 - 1)
    out = model.predict(pd.DataFrame({"cond": pngs(cond), "mask": pngs(mask)}))
    assert out.shape == (3, RES, RES, 1) and out.dtype == np.uint8
    assert np.array_equal(out, nchw_to_nhwc_numpy(to_uint8(fam.sample(net, 3, cond=to_float(cond), mask=to_float(mask)))))


def test_png_decoding_checks_size_and_converts_channels():
    rgb = np.zeros((RES, RES, 3), np.uint8)
    rgb[..., 0] = 255
    grey = decode_pngs([encode_png(rgb)], channels=1, size=RES, what="cond")
    assert grey.shape == (1, 1, RES, RES) and grey.dtype == torch.uint8 and int(grey[0, 0, 0, 0]) == 76   # PIL's luma of red
    assert decode_pngs([encode_png(rgb[..., :1])], channels=3, size=RES, what="cond").shape == (1, 3, RES, RES)
    with pytest.raises(ValueError, match=r"cond\[0\].*16x16"):
        decode_pngs([encode_png(np.zeros((8, 8, 3), np.uint8))], channels=3, size=RES, what="cond")
    with pytest.raises(TypeError, match="PNG bytes"):
        decode_pngs(["not bytes"], channels=3, size=RES, what="cond")
