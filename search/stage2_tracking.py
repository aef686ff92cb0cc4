"""Stage 2 in MLflow: one child run per proxy training (subset × seed), and the verdict's tables.

A child run's trial name is `validate:<subset key>@seed<seed>`; it records its seed as a param
and a tag (`orbitgen.search.seed`), its role (control or proposal), its policy and its status.
The parent run gets `verdict.csv` (each subset against none, with its trained FID and KID),
`trained.csv` (every subset's trained FID and KID, mean and spread over seeds, "none" included), `rungs.csv` (what each halving rung
stopped, and its cutoff), `rung_decisions.csv` (every decision) and `rank_agreement.csv`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from search.tracking import SearchTracker, write_csv

if TYPE_CHECKING:
    from search.validate import ValidatedRun, ValidationResult

TAG_SEED = "orbitgen.search.seed"
TAG_VERDICT = "orbitgen.search.verdict"
VERDICT_COLUMNS = ("key", "label", "seeds", "diffs", "mean", "low", "high", "level", "pvalue", "beats_none",
                   "fid", "fid_std", "kid", "kid_std")
TRAINED_COLUMNS = ("key", "seeds", "fid", "fid_std", "kid", "kid_std")
RUNG_COLUMNS = ("rung", "judged", "stopped", "last_cutoff")
DECISION_COLUMNS = ("rung", "step", "trial", "value", "cutoff", "stopped")
AGREEMENT_COLUMNS = ("size", "subsets", "tau", "tau_low", "tau_high", "rho", "rho_low", "rho_high", "warning")


def trial_name(key: str, seed: int) -> str:
    return f"validate:{key}@seed{seed}"


def log_stage2_run(tracker: SearchTracker, run: "ValidatedRun", budget_steps: int) -> None:
    run_id, _ = tracker.child(trial_name(run.key, run.seed), stage=2)
    if not tracker.has_metric(run_id, "status_finished"):   # a resumed search never logs a run twice
        metrics = {"status_finished": float(run.status == "finished")}
        if run.fid is not None:
            metrics["fid"] = run.fid
        if run.proxy_fid is not None:
            metrics["proxy_fid"] = run.proxy_fid
        if run.kid is not None:
            metrics["kid"] = run.kid
        tracker.log(run_id, params={"augmentations": run.key, "seed": run.seed, "policy": run.policy,
                                    "role": run.role, "budget_steps": budget_steps},
                    metrics=metrics, tags={"orbitgen.search.status": run.status, TAG_SEED: str(run.seed),
                                           "orbitgen.search.role": run.role},
                    step_metrics=[("fid_step", f, s) for s, f in zip(run.steps, run.fids) if f == f and abs(f) != float("inf")])
    tracker.finish(run_id, "FAILED" if run.status == "failed" else "FINISHED")


def _join(values) -> str:
    return " ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values)


def stage2_artifacts(v: "ValidationResult") -> dict[str, str]:
    """File name -> CSV text, for the parent run and the search's folder."""
    trained = {k: {**t, "seeds": _join(t["seeds"])} for k, t in v.trained.items()}
    verdict = [{**{k: x for k, x in trained.get(c.key, {}).items() if k != "seeds"}, **c.as_dict(),
                "seeds": _join(c.seeds), "diffs": _join(c.diffs)} for c in v.comparisons]
    return {"verdict.csv": write_csv(verdict, VERDICT_COLUMNS),
            "trained.csv": write_csv([{"key": k, **t} for k, t in trained.items()], TRAINED_COLUMNS),
            "rungs.csv": write_csv(v.rungs, RUNG_COLUMNS),
            "rung_decisions.csv": write_csv(v.rung_decisions, DECISION_COLUMNS),
            "rank_agreement.csv": write_csv([a.as_dict() for a in v.agreement], AGREEMENT_COLUMNS)}


def stage2_metrics(v: "ValidationResult") -> dict[str, float]:
    out: dict[str, float] = {"stage2_winner": float(v.winner is not None),
                             "stage2_stopped": float(sum(r["stopped"] for r in v.rungs))}
    for a in v.agreement:
        if a.tau is not None:
            out[f"kendall_tau_size{a.size}"] = a.tau
        if a.rho is not None:
            out[f"spearman_rho_size{a.size}"] = a.rho
    for c in v.comparisons:
        out[f"fid_vs_none/{c.key.replace('+', '_')}"[:250]] = c.mean   # "+" is no metric-name character
    return out
