"""MLflow for a search: one parent run, one child run per trial, created idempotently.

Runs are found again by tags, never by an in-memory map, so a resumed search reuses its parent
(`orbitgen.search_name`) and each trial's child (`orbitgen.search_trial`), and never duplicates
one. MLflow nests a child under its parent by the `mlflow.parentRunId` tag. Only the driver
logs (no MLflow traffic from Ray workers; a local sqlite store stays single-writer).
"""
from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from data_shards.errors import UserError

TAG_PARENT = "mlflow.parentRunId"
TAG_SEARCH = "orbitgen.search_name"
TAG_TRIAL = "orbitgen.search_trial"
TAG_STAGE = "orbitgen.search_stage"
TAG_CHOSEN = "orbitgen.search.chosen"
TAG_SELECT = "orbitgen.search.select"
TAG_KIND = "orbitgen.kind"

RANKING_COLUMNS = ("rank", "augmentation", "fid", "fid_std", "kid", "kid_std", "mse", "kept", "reason", "near_duplicate_of", "tied_with")


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


class SearchTracker:
    def __init__(self, tracking_uri: str, experiment: str, search_name: str, local_artifacts: str | None = None):
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri, self.search_name = tracking_uri, search_name
        exp = self.client.get_experiment_by_name(experiment)
        if exp is not None:
            self.experiment_id = exp.experiment_id
        else:
            # A sqlite store keeps artifacts beside its database (as jobs does), not in ./mlruns of the cwd.
            if tracking_uri.startswith("sqlite:///"):
                local_artifacts = os.path.join(os.path.dirname(tracking_uri[len("sqlite:///"):]) or ".", "mlartifacts")
            location = Path(local_artifacts).resolve().as_uri() if local_artifacts and _is_local_store(tracking_uri) else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        self.parent_id: str | None = None
        self._children: dict[str, str] = {}

    # -- runs ----------------------------------------------------------------------------------
    def _search(self, filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def open_parent(self, run_id: str | None, tags: Mapping[str, str] | None = None) -> str:
        """The parent run: `run_id` when resuming one, else the search's run found by name, else new."""
        if run_id is None:
            found = self._search(f"tags.`{TAG_SEARCH}` = '{self.search_name}' and tags.`{TAG_KIND}` = 'search'")
            run_id = found[0].info.run_id if found else None
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=self.search_name,
                                         tags={TAG_SEARCH: self.search_name, TAG_KIND: "search", **(tags or {})})
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.parent_id = run_id
        for child in self._search(f"tags.`{TAG_PARENT}` = '{run_id}'"):
            key = child.data.tags.get(TAG_TRIAL)
            if key:
                self._children[key] = child.info.run_id
        return run_id

    def child(self, trial: str, stage: int) -> tuple[str, bool]:
        """(run id, created now) of the child run of `trial`, made once per search."""
        if trial in self._children:
            return self._children[trial], False
        run = self.client.create_run(self.experiment_id, run_name=f"{self.search_name}/{trial}",
                                     tags={TAG_PARENT: self.parent_id, TAG_TRIAL: trial, TAG_STAGE: str(stage),
                                           TAG_SEARCH: self.search_name, TAG_KIND: "search-trial"})
        self._children[trial] = run.info.run_id
        return run.info.run_id, True

    def children(self) -> dict[str, str]:
        return dict(self._children)

    def has_metric(self, run_id: str, key: str) -> bool:
        return key in self.client.get_run(run_id).data.metrics

    # -- logging -------------------------------------------------------------------------------
    def log(self, run_id: str, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
            tags: Mapping[str, str] | None = None, step_metrics: Iterable[tuple[str, float, int]] = ()) -> None:
        import time

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items()]
        ms += [Metric(k, float(v), ts, int(s)) for k, v, s in step_metrics]
        ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()
              if k not in self.client.get_run(run_id).data.params]   # params are write-once in MLflow
        self.client.log_batch(run_id, metrics=ms, params=ps, tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def artifact(self, run_id: str, local_path: str, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(run_id, local_path, artifact_dir)

    def text(self, run_id: str, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, name)
            Path(p).write_text(text, encoding="utf-8")
            self.artifact(run_id, p)


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


# -- reading a finished search back (`orbitgen search show RUN_ID`) ----------------------------
def read_ranking(run_id: str, tracking_uri: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    """(ranking rows as written in ranking.csv, the parent run's tags)."""
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(f"no MLflow run {run_id!r} in this store; give the parent run id that "
                        "`orbitgen search mineaug` printed (its `mlflow` line)") from None
    if run.data.tags.get(TAG_KIND) != "search":
        raise UserError(f"run {run_id} is not a MineAug search parent run (tag {TAG_KIND}=search missing)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "ranking.csv", tmp)
        except Exception as exc:
            raise UserError(f"run {run_id} has no ranking.csv (did the search finish?): {exc}") from None
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    return rows, dict(run.data.tags)


def format_ranking(rows: Sequence[Mapping[str, Any]], chosen: Sequence[str] = ()) -> str:
    """A fixed-width table of ranking rows (dicts from RankRow.as_csv or read_ranking); '*' = chosen."""
    def fmt(v, kind):
        if kind == "f":
            return "-" if v in (None, "") or v != v or str(v) == "nan" else f"{float(v):.4g}"
        return str(v)

    cols = [("rank", "rank", "s"), ("augmentation", "augmentation", "s"), ("fid", "fid", "f"),
            ("fid_std", "±", "f"), ("kid", "kid", "f"), ("kid_std", "±", "f"), ("mse", "mse", "f"),
            ("kept", "kept", "s"), ("reason", "note", "s")]
    table = [["", *[h for _, h, _ in cols]]]
    for r in rows:
        kept = str(r["kept"]).lower() in ("true", "1")
        note = r.get("reason") or ""
        if r.get("tied_with"):
            tw = r["tied_with"] if isinstance(r["tied_with"], str) else " ".join(r["tied_with"])
            note = (note + "; " if note else "") + f"tied with {tw.replace(' ', ', ')}"
        # ranking.csv of a search run before KID has no kid columns: shown as "-".
        row = {"kid": None, "kid_std": None, **r, "kept": "yes" if kept else "no", "reason": note}
        table.append(["*" if r["augmentation"] in chosen else "", *[fmt(row[k], t) for k, _, t in cols]])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table)


def show_search(run_id: str, tracking_uri: str) -> str:
    """The ranking table of a finished search and what it chose, as `orbitgen search show` prints it."""
    rows, tags = read_ranking(run_id, tracking_uri)
    chosen = [c for c in tags.get(TAG_CHOSEN, "").split(",") if c]
    lines = [f"search {tags.get(TAG_SEARCH, '?')} (MLflow run {run_id})", format_ranking(rows, chosen),
             f"chosen ({tags.get('orbitgen.search.chosen_rule') or tags.get(TAG_SELECT, '?')}): "
             f"{', '.join(chosen) or '(none)'}"]
    if tags.get("orbitgen.search.features"):
        lines.append(tags["orbitgen.search.features"])
    if tags.get("orbitgen.search.reason"):
        lines.append(f"why: {tags['orbitgen.search.reason']}")
    return "\n".join(lines)
