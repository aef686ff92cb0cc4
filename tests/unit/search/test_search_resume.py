"""What a resumed search must share with the stored one: the scored thing (weights, resolution,
held-out split included); a search stored before these were recorded still resumes."""
import pytest

from search.config import SearchConfigError, load_config
from search.run import _check_resume
from search.store import SearchStore


def state(**kw):
    return {"config": load_config({}).to_dict(), "data": "file:///d", "channels": 1, "extractor": "inception",
            "name": "s", "holdout": None, "resolution": 64, "extractor_weights": "/w/inception.pt", **kw}


def test_resume_refuses_a_changed_weights_path_resolution_or_holdout(tmp_path):
    store = SearchStore(str(tmp_path / "s"))
    store.write_json(state(), "search.json")
    assert _check_resume(store, state(), resume=True)["resolution"] == 64
    for change, field in (({"extractor_weights": "/w/other.pt"}, "eval.inception_weights"),
                          ({"resolution": 32}, "data.resolution"), ({"holdout": 0.1}, "data.holdout")):
        with pytest.raises(SearchConfigError, match=rf"^{field}: differs from the stored search"):
            _check_resume(store, state(**change), resume=True)


def test_a_search_stored_before_those_keys_still_resumes(tmp_path):
    store = SearchStore(str(tmp_path / "old"))
    old = state()
    for k in ("holdout", "resolution", "extractor_weights"):
        old.pop(k)
    store.write_json(old, "search.json")
    assert _check_resume(store, state(resolution=128), resume=True) is not None
