"""`orbitgen search mineaug` with bad input: one line naming the field, exit 2, nothing written."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from jobs.cli import main
from jobs.spec import SPECS_DIR

QUICKSTART = str(SPECS_DIR / "quickstart.yaml")


@pytest.mark.parametrize("bad, field", [
    ("search.candidates=[HorizontalFlip,Nope]", "search.candidates"),
    ("search.candidates=[HorizontalFlip,RGBShift]", "search.candidates"),
    ("search.k=30", "search.k"),
    ("search.repeats=0", "search.repeats"),
    ("search.resources_per_trial={TPU: 1}", "search.resources_per_trial"),
    ("search.select=best", "search.select"),
])
def test_bad_search_input_exits_2_and_writes_nothing(bad, field, tmp_path):
    workdir = tmp_path / "work"
    res = CliRunner().invoke(main, ["search", "mineaug", QUICKSTART, "--set", f"workdir={workdir}", "--set", bad])
    assert res.exit_code == 2
    assert field in res.stderr and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) <= 3
    assert not workdir.exists()


def test_conditional_family_is_refused(tmp_path):
    workdir = tmp_path / "work"
    res = CliRunner().invoke(main, ["search", "mineaug", str(SPECS_DIR / "pix2pix_maps.yaml"),
                                    "--set", f"workdir={workdir}"])
    assert res.exit_code == 2 and "family" in res.stderr and "conditional" in res.stderr
    assert not workdir.exists()
