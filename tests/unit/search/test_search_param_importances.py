"""Optuna parameter importances of stage 2's study (issue 23, item 5): only over finished, finite
trials, none below the minimum, written as param_importances.csv and one line; HTML plots only
where plotly is importable (it is not here), skipped without an error."""
from __future__ import annotations

import csv
import os
import io
import math

import optuna
import pytest

from search import study_plots
from search.param_importances import (COLUMNS, MIN_FINISHED, finished_trials, importances_csv, importances_line,
                                      param_importances, too_few_line)

STUDY = "stage2-proposals"
X = optuna.distributions.FloatDistribution(0.0, 1.0)
Y = optuna.distributions.CategoricalDistribution(["a", "b"])


def stored_study(tmp_path, points, name=STUDY) -> str:
    """A sqlite study of COMPLETE trials with params x (float), y (categorical) and the given values."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name=name, storage=url, direction="minimize")
    for x, y, value in points:
        study.add_trial(optuna.trial.create_trial(params={"x": x, "y": y}, distributions={"x": X, "y": Y},
                                                  value=value))
    return url


def test_no_study_or_too_few_finished_trials_give_none(tmp_path):
    assert param_importances(None, STUDY) is None
    url = stored_study(tmp_path, [(0.1 * i, "a", float(i)) for i in range(MIN_FINISHED - 1)]
                       + [(0.9, "b", math.inf)] * 3)   # stopped proposals (+inf) do not count
    assert len(finished_trials(url, STUDY)) == MIN_FINISHED - 1
    assert param_importances(url, STUDY) is None
    assert param_importances(url, "no-such-study") is None


def test_importances_follow_the_parameter_that_drives_the_objective(tmp_path):
    # The value is x alone (y alternates independently): x must come out the more important.
    points = [(i / 11, "ab"[i % 2], i / 11) for i in range(12)] + [(0.5, "a", math.inf)]
    url = stored_study(tmp_path, points)
    importances, finished = param_importances(url, STUDY)
    assert finished == 12
    assert set(importances) == {"x", "y"} and importances["x"] > importances["y"]
    assert sum(importances.values()) == pytest.approx(1.0)
    # The same numbers as Optuna's own call on a study of the finite trials only.
    study = optuna.create_study(direction="minimize")
    study.add_trials([t for t in optuna.load_study(study_name=STUDY, storage=url).trials if math.isfinite(t.value)])
    assert importances == pytest.approx(dict(optuna.importance.get_param_importances(study)))


def test_csv_and_line():
    text = importances_csv({"x": 0.75, "y": 0.25}, 12)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0]) == COLUMNS
    assert [(r["param"], float(r["importance"]), int(r["finished_trials"])) for r in rows] == [("x", 0.75, 12),
                                                                                            ("y", 0.25, 12)]
    line = importances_line({"y": 0.25, "x": 0.75}, 12)
    assert "\n" not in line and line.endswith("over 12 finished proposals: x 0.750, y 0.250")
    assert too_few_line(2) == ("stage 2: no Optuna parameter importances: 2 finished proposal(s), fewer than "
                               f"{MIN_FINISHED}")


def test_html_plots_are_skipped_without_plotly(tmp_path, monkeypatch):
    url = stored_study(tmp_path, [(i / 5, "ab"[i % 2], float(i)) for i in range(6)])
    monkeypatch.setattr(study_plots.importlib.util, "find_spec",
                        lambda name, *a: None if name == "plotly" else __import__("importlib").util.find_spec(name))
    assert study_plots.study_htmls(url, STUDY, str(tmp_path)) == []
    assert not list(tmp_path.glob("*.html"))


def test_html_plots_are_written_with_plotly(tmp_path):
    url = stored_study(tmp_path, [(i / 5, "ab"[i % 2], float(i)) for i in range(6)])
    written = study_plots.study_htmls(url, STUDY, str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == sorted(study_plots.HTML_PLOTS)
    for path in written:
        text = open(path, encoding="utf-8").read()
        assert "plotly" in text.lower() and "<html" in text.lower() and "https://cdn" not in text[:2000]
