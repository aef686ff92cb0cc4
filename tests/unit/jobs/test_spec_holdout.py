"""`data.holdout`: null by default (specs without it keep their meaning), a fraction or a count;
anything else stops the spec naming the field; the conditional ready specs hold samples out."""
from __future__ import annotations

import pytest

from jobs.spec import SPECS_DIR, SpecError, load_spec, parse_spec

GOOD = (SPECS_DIR / "quickstart.yaml").read_text()


def test_holdout_is_off_unless_asked():
    assert "holdout" not in GOOD and parse_spec(GOOD).data.holdout is None


@pytest.mark.parametrize("value, parsed", [("0.1", 0.1), ("25", 25), ("null", None)])
def test_a_fraction_or_a_count(value, parsed):
    holdout = parse_spec(GOOD, [f"data.holdout={value}"]).data.holdout
    assert holdout == parsed and type(holdout) is type(parsed)


@pytest.mark.parametrize("value, hint", [
    ("0", "a count must be >= 2"), ("1", "a count must be >= 2"), ("-5", "a count must be >= 2"), ("0.0", "strictly between 0 and 1"),
    ("1.0", "strictly between 0 and 1"), ("2.5", "strictly between 0 and 1"), ("true", "not bool"),
    ("ten", "not str"), ("[1]", "not list")])
def test_bad_holdout_names_the_field_and_what_is_allowed(value, hint):
    with pytest.raises(SpecError) as err:
        parse_spec(GOOD, [f"data.holdout={value}"])
    assert "data.holdout" in str(err.value) and hint in str(err.value)


def test_a_count_must_leave_a_built_in_set_something_to_train_on():
    with pytest.raises(SpecError, match=r"data.holdout \(512\) must be smaller than the 512 samples"):
        parse_spec(GOOD, ["data.holdout=512"])   # quickstart trains on builtin:craters?count=512
    assert parse_spec(GOOD, ["data.holdout=511"]).data.holdout == 511


def test_the_conditional_ready_specs_hold_samples_out():
    for path in sorted(SPECS_DIR.glob("*.yaml")):
        spec = load_spec(path)
        if spec.make_family().conditional:
            assert spec.data.holdout is not None, path.name


def test_the_tiny_runs_data_leaves_both_sides_of_each_ready_split_enough(tmp_path):
    from data_shards.builtin import ensure_builtin
    from data_shards.split import holdout_split
    from tiny_specs import RUN, tiny_data

    for path in sorted(SPECS_DIR.glob("*.yaml")):
        spec = load_spec(path)
        if spec.data.holdout is not None:
            url = ensure_builtin(tiny_data(spec), str(tmp_path), 16, spec.data.channels)
            training, _ = holdout_split(url, spec.data.holdout).sizes   # raises when evaluation gets < 2
            assert training >= RUN["train.batch"], path.name
