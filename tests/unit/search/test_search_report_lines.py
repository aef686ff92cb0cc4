"""What a researcher reads: the console's stage-2 lines and the written spec's header carry the verdict."""
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
