"""What promotion compares: a version's scores with their evaluation protocols, the common
protocol of two versions, the margin, and the comparison table.

A version's scores come from its tags (`orbitgen.eval.<key>.*`, written by training and by
`orbitgen eval`); a version registered before training wrote them has none, and its run's
metrics count instead: under the protocol in the run's tag `orbitgen.eval_protocol`, or, for a
run from before protocols were recorded, under no protocol: such scores are never compared.

The margin (`--min-improvement m`) is relative to the champion's score: the candidate wins when
its improvement `(champion - candidate) / |champion|` (mode min; `(candidate - champion) /
|champion|` for mode max) is above 0 and at least m, within a relative 1e-9 (so FID 4.9 against
5.0 is an improvement of exactly 2%, and m=0.02 promotes it). m=0 asks for any strict improvement.
Against a champion scoring exactly 0 any gain is infinitely large.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from jobs.tracking.protocol import TAG_RUN_PROTOCOL, EvalProtocol, read_version_tags
from models.metrics.suite import all_reported_names

# What a run logs that is an evaluation score (lpips with LPIPS weights, perceptual_randconv without).
EVAL_METRICS = frozenset(all_reported_names())


@dataclass(frozen=True)
class Evaluation:
    protocol: EvalProtocol | None       # None: its run recorded no protocol
    scores: dict[str, float]
    run_id: str

    @property
    def key(self) -> str | None:
        return self.protocol.key() if self.protocol else None


def evaluations(client: MlflowClient, version) -> list[Evaluation]:
    """Every recorded evaluation of a model version: its protocol tags; for a version registered
    before training wrote them (it has none), its run's."""
    out = [Evaluation(p, scores, run) for p, scores, run in read_version_tags(dict(version.tags or {})).values()]
    if out or not version.run_id:
        return out
    try:
        run = client.get_run(version.run_id)
    except MlflowException:     # the run was deleted
        return out
    scores = {m: v for m, v in run.data.metrics.items() if m in EVAL_METRICS and not math.isnan(v)}
    try:
        protocol = EvalProtocol.from_json(run.data.tags[TAG_RUN_PROTOCOL])
    except (KeyError, ValueError):
        protocol = None
    return [Evaluation(protocol, scores, run.info.run_id)] if scores else []


def preferred(evals: list[Evaluation], metric: str) -> Evaluation | None:
    """The evaluation with `metric` under a protocol, the one with the most samples (then by key)."""
    scored = [e for e in evals if e.protocol and metric in e.scores]
    return max(scored, key=lambda e: (e.protocol.num_samples, e.key), default=None)


def common(a: list[Evaluation], b: list[Evaluation], metric: str) -> tuple[Evaluation, Evaluation] | None:
    """The evaluations of two versions under their shared protocol that has `metric` (most samples first)."""
    by_key = {e.key: e for e in b if e.protocol and metric in e.scores}
    shared = [e for e in a if e.key in by_key and metric in e.scores]
    best = max(shared, key=lambda e: (e.protocol.num_samples, e.key), default=None)
    return (best, by_key[best.key]) if best else None


def incomparable(name: str, candidate: str, cand: list[Evaluation], champion: str | None,
                 champ: list[Evaluation], metric: str) -> str:
    """Why two versions have no common protocol with `metric`, and the `orbitgen eval` command that fixes it."""
    mine, theirs = preferred(cand, metric), preferred(champ, metric)
    if mine is None:
        why = f"v{candidate} has no {metric} under a recorded evaluation protocol"
        fix = f"orbitgen eval models:/{name}/{candidate} --metrics {_eval_name(metric)}"
    else:
        p = mine.protocol
        if theirs is None:
            why = f"champion v{champion} has no {metric} under a recorded evaluation protocol"
        else:
            why = (f"v{candidate} and champion v{champion} were evaluated under different protocols "
                   f"({'; '.join(p.differences(theirs.protocol))})")
        fix = f"orbitgen eval models:/{name}/{champion} --metrics {_eval_name(metric)} --num-samples {p.num_samples}"
        if theirs is None or theirs.protocol.data_fingerprint != p.data_fingerprint:
            fix += f" --data <the shards with fingerprint {p.data_fingerprint[:12]}>"
    what = "evaluate it" if champion is None else "compare them under one protocol"
    return f"{why}; {what}: {fix}, or promote with --reevaluate"


def _eval_name(metric: str) -> str:
    """The `--metrics` name that computes `metric` (precision and recall come from `pr`)."""
    return "pr" if metric in ("precision", "recall") else metric


def improvement(candidate: float, champion: float, mode: str) -> float:
    """Relative improvement of the candidate over the champion; above 0 is better."""
    gain = champion - candidate if mode == "min" else candidate - champion
    if champion == 0:
        return math.copysign(math.inf, gain) if gain else 0.0
    return gain / abs(champion)


def beats(candidate: float, champion: float, mode: str, min_improvement: float) -> bool:
    r = improvement(candidate, champion, mode)
    return r > 0 and (r >= min_improvement or math.isclose(r, min_improvement, rel_tol=1e-9))


def compared(cand: Evaluation, champ: Evaluation | None) -> dict[str, dict[str, float]]:
    """Every metric of the candidate (and the champion's, where it has it) under their common
    protocol: {metric: {"candidate": value, "champion": value}} (`models promote --json`)."""
    names = set(cand.scores) & set(champ.scores) if champ else set(cand.scores)
    return {n: {"candidate": cand.scores[n], **({"champion": champ.scores[n]} if champ else {})}
            for n in sorted(names)}


def summary(p: EvalProtocol) -> str:
    extractors = ", ".join(f"{n}@{h[:8]}" for n, h in sorted(p.extractors.items())) or "no extractor"
    return (f"data {p.data_fingerprint[:12]} split {p.split} · {p.num_samples} samples · seed base "
            f"{p.seed_base} · real seed {p.real_seed} · {extractors}")


def table(candidate: str, cand: Evaluation, champion: str, champ: Evaluation, metric: str) -> str:
    """Every metric both have under their common protocol, the deciding one first."""
    names = sorted(set(cand.scores) & set(champ.scores), key=lambda m: (m != metric, m))
    width = max(len(n) for n in names) + 2
    lines = [f"protocol {cand.key}: {summary(cand.protocol)}",
             f"{'metric':<{width}}{'v' + candidate + ' (candidate)':>18}{'v' + champion + ' (champion)':>18}"
             f"{'change':>10}"]
    for n in names:
        a, b = cand.scores[n], champ.scores[n]
        change = f"{(a - b) / abs(b):+.1%}" if b else "n/a"
        lines.append(f"{n + (' *' if n == metric else ''):<{width}}{a:>18.6g}{b:>18.6g}{change:>10}")
    return "\n".join(lines)
