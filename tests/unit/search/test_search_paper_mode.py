"""`search.preset: paper` and `search.features`: the published selection (K best singles, MSE gate
0.02, near-duplicates allowed, Inception-v3 2048-d features from a local file), its one-line error
without the file, and labels that name the rule and the feature space."""
import warnings

import numpy as np
import pytest
import torch

from data_shards.synthetic import crater_field
from models.metrics.extractors import make_extractor
from search.config import PAPER_PRESET, SearchConfigError, load_config, stage1_features
from search.frechet import Reference
from search.labels import features_note, singles_rule, stage1_rule
from search.originals import from_tensors
from search.scoring import score_candidate
from search.select import best_singles, rank_candidates

CANDIDATES = ["Rotate", "RandomAffine", "HorizontalFlip", "Invert", "GaussianNoise"]


class _StandInInception(torch.nn.Module):
    """Inception's calling convention and 2048-d output, random fixed weights: the selection's code
    path does not depend on the weights (the real file cannot be downloaded here)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 32, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.relu(self.conv((x - 128.0) / 128.0))
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)   # 32 x 8 x 8 = 2048


@pytest.fixture(scope="module")
def stand_in_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "inception-2015-12-05.pt"
    with warnings.catch_warnings():   # TorchScript is deprecated, but it is the file format NVIDIA ships
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_StandInInception()), str(path))
    return str(path)


def test_the_preset_sets_the_published_rule_and_refuses_a_clash():
    cfg = load_config({"preset": "paper"})
    assert (cfg.select, cfg.dedupe, cfg.mse_min, cfg.k, cfg.features) == ("singles", False, 0.02, 3, "inception")
    assert load_config(cfg.to_dict()) == cfg                       # a written spec reads back the same
    assert load_config({"preset": "paper", "k": 3}).k == 3         # restating a preset value is fine
    with pytest.raises(SearchConfigError) as e:
        load_config({"preset": "paper", "dedupe": True})
    assert str(e.value).startswith("search.preset: ") and "search.dedupe=True" in str(e.value)
    assert "\n" not in str(e.value)
    assert load_config({}).features == "eval" and load_config({}).preset is None   # today's behaviour


def test_inception_features_without_the_weights_file_is_one_clear_line(tmp_path):
    for cfg, weights in ((load_config({"preset": "paper"}), None),
                         (load_config({"features": "inception"}), str(tmp_path / "missing.pt"))):
        with pytest.raises(SearchConfigError) as e:
            stage1_features(cfg, "randconv", weights)
        msg = str(e.value)
        assert msg.startswith("search.features: ") and "eval.inception_weights" in msg and "\n" not in msg
    assert "search.preset paper" in str(pytest.raises(SearchConfigError, stage1_features,
                                                      load_config({"preset": "paper"}), "randconv", None).value)


def test_features_apart_from_eval_s_extractor(stand_in_weights):
    assert stage1_features(load_config({}), "randconv", None) == ("randconv", None)          # "eval": as before
    assert stage1_features(load_config({}), "inception", stand_in_weights) == ("inception", stand_in_weights)
    assert stage1_features(load_config({"features": "randconv"}), "inception", stand_in_weights)[0] == "randconv"
    assert stage1_features(load_config({"features": "inception"}), "randconv", stand_in_weights) == (
        "inception", stand_in_weights)


def test_paper_mode_on_craters_picks_the_k_best_singles_with_rotate_and_randomaffine_together(stand_in_weights):
    torch.set_num_threads(2)
    cfg = load_config({"preset": "paper", "candidates": CANDIDATES, "repeats": 2})
    name, weights = stage1_features(cfg, "randconv", stand_in_weights)
    extractor = make_extractor(name, weights)
    assert extractor.num_features == 2048
    samples = list(crater_field(96, 32, 1, seed=0))
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
    originals = from_tensors(images, [s.key for s in samples], extractor)
    ref = Reference(originals.features)
    scores = {n: score_candidate(n, originals, extractor, cfg.repeats, cfg.seed, ref) for n in CANDIDATES}

    ranking = rank_candidates(scores, cfg.mse_min, cfg.dedupe)
    chosen = best_singles(ranking, cfg.k)
    # Independently: the gate, then FID ascending, then the first K; no near-duplicate rule.
    passing = sorted((n for n in CANDIDATES if scores[n].mse > PAPER_PRESET["mse_min"]), key=lambda n: scores[n].fid)
    assert chosen == passing[:3]
    assert {"Rotate", "RandomAffine"} <= set(chosen)          # the Rosetta-style pair, allowed together
    assert "GaussianNoise" not in passing                      # near-identity: below the 0.02 gate
    # The same scores with this project's default dedupe keep only one of the pair.
    deduped = best_singles(rank_candidates(scores, cfg.mse_min, True), cfg.k)
    assert not {"Rotate", "RandomAffine"} <= set(deduped)


def test_labels_name_the_rule_and_the_feature_space():
    assert "search.preset=paper: the published rule" in stage1_rule(load_config({"preset": "paper"}))
    default = singles_rule(load_config({"select": "singles"}))
    assert "except" in default and "search.dedupe" in default       # dedupe on is not the paper's rule
    assert "not the paper's" in stage1_rule(load_config({}))          # select=sets
    assert "NOT the paper's Inception-v3" in features_note("randconv", "orbitgen-randconv64-v1")
    assert "(the paper's)" in features_note("inception", "inception-v3-2015-12-05")


def test_a_paper_search_without_the_weights_stops_before_anything_is_written(tmp_path):
    from search.run import run_search

    with pytest.raises(SearchConfigError, match=r"^search\.features: search\.preset paper"):
        run_search("builtin:craters?count=16&seed=0", channels=1, config={"preset": "paper", "candidates": CANDIDATES},
                   tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="e", name="s",
                   storage=str(tmp_path / "s"), extractor="randconv", extractor_weights=None, progress=None)
    assert not (tmp_path / "s").exists() and not (tmp_path / "mlflow.db").exists()


def test_stored_scores_keep_their_kids_and_older_ones_load_without(tmp_path):
    import io

    from search.scoring import CandidateScore
    from search.store import SearchStore

    store = SearchStore(str(tmp_path / "s"))
    feats = [np.zeros((4, 2), np.float32)] * 2
    store.save_score(CandidateScore("A", [1.0, 2.0], [0.1, 0.1], feats, 0.5, [0.01, 0.03]))
    assert store.load_score("A").kids == [0.01, 0.03] and store.read_json("stage1", "A.json")["kid"] == 0.02
    buf = io.BytesIO()   # a score stored before KID
    np.savez(buf, fids=np.array([1.0]), mses=np.array([0.1]), features=np.stack(feats[:1]), seconds=np.array(0.5))
    store.write_bytes(buf.getvalue(), "stage1", "B.npz")
    old = store.load_score("B")
    assert old.kids == [] and np.isnan(old.kid)
