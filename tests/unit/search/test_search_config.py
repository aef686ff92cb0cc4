"""The `search:` section: defaults, one-line errors naming the field, candidate resolution."""
import pytest

from models.augment.pool import COLOUR_ONLY, POOL_NAMES
from search.config import SearchConfig, SearchConfigError, load_config, resolve_candidates


def test_defaults_are_the_issue_s():
    cfg = load_config({})
    assert (cfg.k, cfg.candidates, cfg.repeats, cfg.mse_min, cfg.dedupe, cfg.concurrency) == (3, "all", 3, 0.02, True, None)
    assert cfg.resources_per_trial == {"CPU": 1.0, "GPU": 0.0}
    assert cfg.validate_.model_dump() == {"top_m": 0, "trials": 0, "budget_steps": 0, "seeds": 3,
                                          "num_samples": None, "alpha": 0.05}
    assert (cfg.select, cfg.seed, cfg.max_images) == ("sets", 0, None)
    assert cfg.to_dict()["validate"]["seeds"] == 3


def test_a_spec_written_before_seeds_still_parses():
    cfg = load_config({"validate": {"top_m": 4, "trials": 6, "budget_steps": 20}})
    assert (cfg.validate_.seeds, cfg.validate_.num_samples, cfg.validate_.alpha) == (3, None, 0.05)


def test_proxies_have_their_own_sample_count():
    assert load_config({}).validate_.proxy_samples(50_000) == 2048      # never the paper's 50k per proxy FID
    assert load_config({}).validate_.proxy_samples(32) == 32
    assert load_config({"validate": {"num_samples": 500}}).validate_.proxy_samples(50_000) == 500


def test_spec_spelling_round_trips():
    cfg = load_config({"validate": {"top_m": 4, "trials": 6, "budget_steps": 20},
                       "resources_per_trial": {"CPU": 1, "GPU": 0.25}, "candidates": ["Rotate", "Invert"]})
    assert cfg.validate_.top_m == 4 and cfg.resources_per_trial["GPU"] == 0.25
    assert SearchConfig.model_validate(cfg.to_dict()) == cfg


@pytest.mark.parametrize("values, field", [
    ({"kk": 3}, "search.kk: unknown key"),
    ({"k": 0}, "search.k:"),
    ({"repeats": 0}, "search.repeats:"),
    ({"candidates": ["Rotate", "Spin"]}, "search.candidates: unknown augmentation(s) Spin"),
    ({"candidates": "some"}, "search.candidates"),
    ({"select": "best"}, "search.select:"),
    ({"validate": {"top_m": 3}}, "search.validate: with top_m > 0"),
    ({"validate": {"top": 3}}, "search.validate.top: unknown key"),
    ({"validate": {"seeds": 0}}, "search.validate.seeds:"),
    ({"validate": {"alpha": 1.5}}, "search.validate.alpha:"),
    ({"resources_per_trial": {"TPU": 1}}, "search.resources_per_trial: unknown resource(s) TPU"),
    ({"resources_per_trial": {"CPU": 1, "GPU": 1.5}}, "search.resources_per_trial: a GPU share above 1"),
])
def test_errors_name_the_field(values, field):
    with pytest.raises(SearchConfigError) as err:
        load_config(values)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_all_drops_colour_only_for_grey_silently():
    grey = resolve_candidates(load_config({}), 1)
    assert not set(grey) & set(COLOUR_ONLY) and len(grey) == len(POOL_NAMES) - len(COLOUR_ONLY)
    assert resolve_candidates(load_config({}), 3) == list(POOL_NAMES)


def test_colour_candidate_listed_for_grey_is_an_error():
    cfg = load_config({"candidates": ["Rotate", "RGBShift"]})
    assert resolve_candidates(cfg, 3) == ["Rotate", "RGBShift"]
    with pytest.raises(SearchConfigError, match=r"^search\.candidates: RGBShift"):
        resolve_candidates(cfg, 1)


def test_unknown_name_is_caught_even_without_validation():
    cfg = SearchConfig.model_construct(candidates=["Rotate", "Wobble"])
    with pytest.raises(ValueError, match=r"^search\.candidates: unknown augmentation\(s\) Wobble"):
        resolve_candidates(cfg, 1)
