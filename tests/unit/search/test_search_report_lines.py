"""What a researcher reads: the console's stage-2 lines and the written spec's header carry the verdict."""
import numpy as np
import pytest
import yaml

from jobs.cli.search import stage2_lines
from jobs.mineaug.run import spec_header
from search.rank_agreement import SizeAgreement
from search.validate import ValidationResult
from search.verdict import Comparison, no_winner_sentence


def test_console_lines_show_each_comparison_each_rung_and_the_verdict():
    sentence = no_winner_sentence(40, 3)
    v = ValidationResult(runs=[], chosen=["A"], source="stage1", reason=sentence, verdict=sentence, winner=None,
                         comparisons=[Comparison("A+B", "best K-set", [0, 1, 2], [0.1, -0.2, 0.3], 0.0667, -0.2, 0.3,
                                                 0.9833, 0.6, False)],
                         correction="Holm step-down over the subsets compared with none (family-wise alpha 0.05)",
                         agreement=[SizeAgreement(1, 4, 0.33, -0.6, 1.0, 0.4, -0.8, 1.0, "size 1: ...")],
                         rungs=[{"rung": 10, "judged": 5, "stopped": 2, "last_cutoff": 12.5}])
    text = "\n".join(stage2_lines(v))
    assert "Holm" in text and "A+B" in text and "[-0.2, 0.3]" in text
    assert "rung at step 10: 5 judged, 2 stopped (last cutoff 12.5)" in text
    assert "Kendall tau 0.33 [-0.60, 1.00]" in text and text.endswith(sentence)


def test_the_written_spec_carries_the_verdict_in_its_header():
    sentence = no_winner_sentence(40, 3)
    header = spec_header("s-1", "abc", sentence)
    assert header.startswith("# Written by `orbitgen search mineaug` (search s-1, MLflow run abc).")
    assert all(line.startswith("#") for line in header.splitlines())
    assert " ".join(line.lstrip("# ").removeprefix("Verdict: ") for line in header.splitlines()[1:]) == sentence
    assert yaml.safe_load(header + "a: 1\n") == {"a": 1}


def test_trained_fid_and_kid_beside_each_comparison_and_in_the_csvs():
    from search.stage2_tracking import stage2_artifacts
    from search.validate import ValidatedRun, trained_summary

    runs = [ValidatedRun("none", (), "expand", "control", s, "finished", fid=f, kid=k)
            for s, f, k in ((0, 2.0, 0.10), (1, 2.2, 0.14))]
    runs += [ValidatedRun("A+B", ("A", "B"), "expand", "control", s, "finished", fid=f, kid=k)
             for s, f, k in ((0, 1.8, 0.08), (1, 1.9, 0.12))]
    runs.append(ValidatedRun("C", ("C",), "expand", "proposal", 0, "stopped"))
    trained = trained_summary(runs)
    assert set(trained) == {"none", "A+B"}                     # a stopped run has no trained score
    assert trained["none"]["kid"] == pytest.approx(0.12) and trained["none"]["kid_std"] == pytest.approx(0.0282842712)
    assert trained["A+B"]["fid_std"] == pytest.approx(np.std([1.8, 1.9], ddof=1))
    v = ValidationResult(runs=runs, chosen=["A"], source="stage1", reason="r", verdict="v", winner=None,
                         comparisons=[Comparison("A+B", "best K-set", [0, 1], [-0.2, -0.3], -0.25, -0.3, -0.2,
                                                 0.95, 0.5, False)], trained=trained)
    text = "\n".join(stage2_lines(v))
    assert "none" in text and "KID 0.12 ± 0.028" in text and "FID 1.85 ± 0.071, KID 0.1 ± 0.028" in text
    files = stage2_artifacts(v)
    header = files["verdict.csv"].splitlines()[0].split(",")
    assert header[-4:] == ["fid", "fid_std", "kid", "kid_std"] and "0.1" in files["verdict.csv"].splitlines()[1]
    assert files["trained.csv"].splitlines()[0] == "key,seeds,fid,fid_std,kid,kid_std"


def test_the_written_spec_names_the_rule_that_chose():
    header = spec_header("s-1", "abc", "", "search.select=singles: the 3 best singles by FID "
                                           "(search.preset=paper: the published rule)")
    assert "# Chosen by: search.select=singles" in header and yaml.safe_load(header + "a: 1\n") == {"a": 1}
