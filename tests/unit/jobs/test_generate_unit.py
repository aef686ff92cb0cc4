"""`models generate` without Ray: where each sample goes, which inputs a shard reads, and the
refusals that come before any work (the end-to-end runs are in tests/integration/test_generate.py)."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from data_shards.builtin import ensure_builtin
from data_shards.errors import UserError
from jobs.generate import check_inputs, check_out, input_pieces, resolve_model, shard_ranges
from models.registry import make_family


def test_shards_are_fixed_by_n_and_shard_size_alone():
    assert shard_ranges(40, 16) == [(0, 16), (16, 32), (32, 40)]
    assert shard_ranges(16, 16) == [(0, 16)]


def test_a_shard_of_conditional_outputs_reads_exactly_its_inputs():
    urls, counts = ["a", "b", "c"], [5, 5, 2]
    assert input_pieces(counts, urls, 4, 9) == [("a", 4, 5), ("b", 0, 4)]
    assert input_pieces(counts, urls, 8, 12) == [("b", 3, 5), ("c", 0, 2)]
    assert input_pieces(counts, urls, 0, 5) == [("a", 0, 5)]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {"craters": ensure_builtin("builtin:craters?count=4&seed=0", str(root), 16, 1),
            "maps": ensure_builtin("builtin:maps?count=4&seed=0", str(root), 16, 3),
            "maps32": ensure_builtin("builtin:maps?count=4&seed=0", str(root / "32"), 32, 3)}


def pix2pix():
    return make_family("pix2pix", {"ngf": 8, "ndf": 8, "d_layers": 2}, resolution=16, channels=3, lr=2e-4)


def dcgan():
    return make_family("dcgan", {"nz": 8, "ngf": 8, "ndf": 8}, resolution=16, channels=1, lr=2e-4)


@pytest.mark.parametrize("family, inputs, n, names", [
    (dcgan, None, None, ["--n", "unconditional"]),
    (dcgan, "craters", 4, ["--inputs", "unconditional"]),
    (pix2pix, None, 4, ["--inputs", "conditional", "cond"]),
    (pix2pix, "craters", None, ["no cond", "image, json"]),
    (pix2pix, "maps32", None, ["32²", "takes 3-channel 16²"]),
    (pix2pix, "maps", 5, ["--n 5", "4 samples"]),
])
def test_inputs_that_do_not_fit_the_model_are_refused(sets, family, inputs, n, names):
    with pytest.raises(UserError) as e:
        check_inputs(family(), sets[inputs] if inputs else None, n)
    assert all(name in str(e.value) for name in names), str(e.value)


def test_inputs_that_fit_give_the_count(sets):
    assert check_inputs(pix2pix(), sets["maps"], None)[0] == 4
    assert check_inputs(pix2pix(), sets["maps"], 3)[0] == 3
    assert check_inputs(dcgan(), None, 7) == (7, None)


def test_an_out_holding_a_set_is_refused_unless_overwrite(sets, tmp_path):
    with pytest.raises(UserError, match="already holds a shard set"):
        check_out(sets["craters"], overwrite=False)
    check_out(sets["craters"], overwrite=True)
    check_out(str(tmp_path / "new"), overwrite=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    check_out(str(tmp_path / "other"), overwrite=False)   # a folder with other files is not a set


def test_unknown_models_are_named_with_what_exists(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e")).info.run_id
    client.create_registered_model("gen")
    client.create_model_version("gen", f"runs:/{run}/generator", run)
    client.set_registered_model_alias("gen", "champion", "1")
    for ref, names in (("models:/nope@champion", ["'nope'", "registered: gen"]),
                       ("models:/gen/7", ["version 7", "versions: 1", "aliases: champion"]),
                       ("models:/gen@best", ["alias 'best'", "aliases: champion"]),
                       ("models:/gen", ["models:/NAME@ALIAS"]),
                       ("runs:/0123456789abcdef0123456789abcdef", ["runs:/0123456789abcdef0123456789abcdef"]),
                       ("models:/gen@champion", ["models:/gen@champion"]),   # no generator logged in the run
                       (str(tmp_path / "g.pt"), ["g.pt"])):
        with pytest.raises(UserError) as e:
            resolve_model(ref, tmp_path / "dl", client)
        assert all(n in str(e.value) for n in names), (ref, str(e.value))
