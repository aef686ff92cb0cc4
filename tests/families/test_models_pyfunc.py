"""Every family's registered model (the pyfunc `log_generator` logs) samples through
`mlflow.pyfunc`: seeds for unconditional models, PNG inputs (and masks) for conditional ones,
the same images as the family's own `sample`. A local sqlite store; no servers, no Ray."""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from family_checks import smooth_batch
from jobs.tracking.registry import log_generator
from models.registry import get_family_cls
from models.images import nchw_to_nhwc_numpy, to_float, to_uint8
from models.png import decode_pngs, encode_png
from models.snapshot import save_snapshot

RES = 16
TINY = {
    "dcgan": {"ngf": 8, "ndf": 8, "nz": 8},
    "pix2pix": {"ngf": 8, "ndf": 8, "d_layers": 2},
    "cgan_unet": {"ngf": 8, "ndf": 8, "d_layers": 2},
    "cgan_attention_unet": {"ngf": 8, "ndf": 8, "d_layers": 2},
    "sat2ground": {"ngf": 8, "ndf": 8, "nz": 8},
}


@pytest.fixture
def tracking(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("pyfunc")
    yield tmp_path
    mlflow.set_tracking_uri(None)


def make_snapshot(path, name: str, channels: int, **extra):
    cls = get_family_cls(name)
    fam = cls(cls.config_cls(**TINY[name], **extra), resolution=RES, channels=channels, lr=2e-4)
    torch.manual_seed(0)
    net = fam.build()[fam.sampler_role]
    save_snapshot(path, fam, net)
    return fam, net


def register(snapshot, tmp_path, model_name: str):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("name: test\n")
    with mlflow.start_run():
        version = log_generator(snapshot, spec_file, model_name)
    assert version == "1"
    return mlflow.pyfunc.load_model(f"models:/{model_name}/1")


def pngs(images_uint8: torch.Tensor) -> list[bytes]:
    return [encode_png(a) for a in nchw_to_nhwc_numpy(images_uint8)]


@pytest.mark.parametrize("name,channels", [("pix2pix", 3), ("cgan_unet", 1), ("cgan_attention_unet", 3)])
def test_conditional_models_take_png_inputs(tracking, name, channels):
    fam, net = make_snapshot(tracking / "generator.pt", name, channels)
    model = register(tracking / "generator.pt", tracking, f"m-{name}")
    cond = to_uint8(smooth_batch(3, channels, RES, seed=1))
    mask = to_uint8((smooth_batch(3, 1, RES, seed=2) > 0).float() * 2 - 1)
    frame = pd.DataFrame({"cond": pngs(cond)})
    if "mask" in fam.data_keys:
        frame["mask"] = pngs(mask)
    out = model.predict(frame)
    assert out.shape == (3, RES, RES, channels) and out.dtype == np.uint8
    inputs = {"cond": to_float(cond)} | ({"mask": to_float(mask)} if "mask" in fam.data_keys else {})
    assert np.array_equal(out, nchw_to_nhwc_numpy(to_uint8(fam.sample(net, 3, **inputs))))
    assert not np.array_equal(out[0], out[1])
    with pytest.raises(Exception, match="cond"):
        model.predict(pd.DataFrame({"seed": [0]}))
    # The signature names the input columns; the logged example is made of PNG bytes.
    inputs_schema = model.metadata.get_input_schema().input_names()
    assert inputs_schema == (["cond", "mask"] if "mask" in fam.data_keys else ["cond"])


def test_unconditional_models_take_seeds(tracking):
    fam, net = make_snapshot(tracking / "generator.pt", "sat2ground", 3)   # stage 1
    model = register(tracking / "generator.pt", tracking, "m-stage1")
    out = model.predict(pd.DataFrame({"seed": [4, 5, 4]}))
    assert out.shape == (3, RES, RES, 3) and np.array_equal(out[0], out[2]) and not np.array_equal(out[0], out[1])
    assert np.array_equal(out[:1], nchw_to_nhwc_numpy(to_uint8(fam.sample(net, 1, seed=4))))


def test_stage2_model_maps_satellite_tiles(tracking):
    make_snapshot(tracking / "stage1.pt", "sat2ground", 3)
    fam, net = make_snapshot(tracking / "generator.pt", "sat2ground", 3, stage=2,
                             generator_from=str(tracking / "stage1.pt"))
    (tracking / "stage1.pt").unlink()   # the registered model must not need it
    model = register(tracking / "generator.pt", tracking, "m-stage2")
    sat = to_uint8(smooth_batch(2, 3, RES, seed=3))
    out = model.predict(pd.DataFrame({"cond": pngs(sat)}))
    assert np.array_equal(out, nchw_to_nhwc_numpy(to_uint8(fam.sample(net, 2, cond=to_float(sat)))))


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
