"""`orbitgen models`: registered generators in the MLflow model registry."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from jobs.cli.common import DEFAULT_WORKDIR, say

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # orbitgen draws its own progress


def _client(uri: str | None):
    """A client of the store the user named, once it is known to be there (reading never creates one)."""
    from mlflow.tracking import MlflowClient

    from jobs.tracking.store_check import require_store

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_WORKDIR).absolute() / 'mlflow.db'}"
    require_store(uri, "--tracking-uri")
    return MlflowClient(uri)


tracking_option = click.option("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, "
                                                     f"else ./{DEFAULT_WORKDIR}/mlflow.db).")


@click.group()
def models() -> None:
    """Registered generators in the MLflow model registry."""


@models.command("list")
@tracking_option
def models_list(tracking_uri) -> None:
    """List registered models with their aliases."""
    from jobs.tracking.registry import list_models

    for m in list_models(_client(tracking_uri)):
        aliases = ", ".join(f"{a}=v{v}" for a, v in m["aliases"].items()) or "no aliases"
        click.echo(f"{m['name']}  latest v{m['latest']}  {aliases}")


@models.command("show")
@click.argument("name")
@click.option("--metric", default="fid", show_default=True, help="The run metric shown beside each version (NAME alone).")
@tracking_option
def models_show(name, metric, tracking_uri) -> None:
    """NAME: every version with its alias, run and METRIC. NAME@ALIAS or NAME/VERSION: where that
    version came from (spec, git, data, augmentations, the model it was built on), its evaluations
    with their protocol, and the data sets generated from it."""
    from jobs.tracking.registry import card_facts, describe_model
    from jobs.tracking.versions import parse_version_ref

    client = _client(tracking_uri)
    model, alias, version = parse_version_ref(name)
    if alias is None and version is None:
        rows = describe_model(model, metric, client)
        before = _previous_champions(client, model)
        for r in rows:
            mark = r["alias"] or ("was champion" if r["version"] in before else "")
            click.echo(f"v{r['version']:<4} {mark:<12} {metric}={r[metric]}  run {r['run_id']}")
        return
    for line in _lineage_lines(card_facts(client, model, alias=alias, version=version)):
        click.echo(line)


def _previous_champions(client, name: str) -> list[str]:
    import json

    from jobs.tracking.protocol import TAG_CHAMPION_HISTORY

    return [str(v) for v in json.loads((client.get_registered_model(name).tags or {}).get(TAG_CHAMPION_HISTORY) or "[]")]


def _lineage_lines(info: dict) -> list[str]:
    """`models show NAME@ALIAS`: one version's lineage, as text: the facts of its model card
    (`registry.card_facts`, also its MLflow description), and what was generated from it."""
    import json

    marks = info["aliases"] + (["was champion"] if info["was_champion"] else [])
    lines = [f"{info['name']} v{info['version']}" + (f"  [{', '.join(marks)}]" if marks else "")]
    if info["previous_champions"]:
        lines.append(f"  {'champions':<13} before the current one: "
                     + ", ".join(f"v{v}" for v in info["previous_champions"]))
    dirty = {True: " (dirty work tree)", False: " (clean)", None: ""}[info["git_dirty"]]
    lines += [f"  {'run':<13} {info['run_id']}",
              f"  {'spec sha':<13} {info['spec_sha']}",
              f"  {'git sha':<13} {info['git_sha']}{dirty}",
              f"  {'spec':<13} {info['spec_name'] or '?'}: runs:/{info['run_id']}/spec.yaml",
              f"  {'data':<13} fingerprint {info['data_fingerprint']}" + (f" ({info['data_url']})" if info["data_url"] else ""),
              f"  {'augment':<13} " + (", ".join(info["augmentations"]) or "no MineAug augmentations")
              + (f" (search run {info['search_run']})" if info["search_run"] else "")
              + (f"; ADA {json.dumps(info['augment']['ada'])}" if info["augment"].get("ada") else ""),
              f"  {'sample grid':<13} {info['sample_grid'] or 'none logged'}",
              f"  {'run page':<13} {info['run_link'] or 'no run'}"]
    for key, ref in info["built_on"].items():
        meant = f" = {ref['name']} v{ref['version']}" if ref.get("version") else ""
        lines.append(f"  {'built on':<13} model.{key}: {ref['ref']}{meant}" + (f" (run {ref['run_id']})" if ref.get("run_id") else ""))
    for e in info["evaluations"]:
        p = e["protocol"]
        extractors = ", ".join(f"{n} {h}" for n, h in sorted(p.extractors.items())) or "none"
        lines.append(f"  {'evaluation':<13} protocol {e['protocol_key']}: data {p.data_fingerprint[:12]} split {p.split}, "
                     f"{p.num_samples} samples, seed base {p.seed_base}, real seed {p.real_seed}, extractors {extractors}")
        lines.append(f"  {'':<13}   " + "  ".join(f"{m}={v:.6g}" for m, v in sorted(e["scores"].items()))
                     + f"  (run {e['run']})")
    if not info["evaluations"]:
        lines.append(f"  {'evaluation':<13} none recorded under a protocol (`orbitgen eval` records one)")
    lines.append(f"  {'run metrics':<13} " + ("  ".join(f"{m}={v:.6g}" for m, v in info["run_metrics"].items()) or "none"))
    for g in info["generated"]:
        lines.append(f"  {'generated':<13} {g['url']}: {g['n']} image{'s' * (g['n'] != 1)}, seeds {g['seeds'][0]}..{g['seeds'][1]}")
    if not info["generated"]:
        lines.append(f"  {'generated':<13} none (`orbitgen models generate` makes a set)")
    lines.append(f"  {'reproduce':<13} " + (" && ".join(info["reproduce"]) or "no run recorded"))
    lines.append("  spec.yaml:" if info["spec"] else "  spec.yaml: not found with the model or its run")
    lines += [f"    {line}" for line in (info["spec"] or "").splitlines()]
    return lines


@models.command("generate")
@click.argument("model")
@click.option("--n", "n", type=click.IntRange(min=1), help="Images to draw (conditional models: the first N inputs; default all).")
@click.option("--out", required=True, help="Where the shard set goes: a folder or fsspec URL (file://, s3://).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Ray workers, a shard each at a time, each with an equal share of the cluster's CPUs.")
@click.option("--inputs", help="Conditional models: the shard set whose cond (and mask) samples are the inputs.")
@click.option("--seed-base", type=click.IntRange(min=0), default=0, show_default=True,
              help="Image i is drawn from seed SEED_BASE + i (conditional: input i).")
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True, help="Samples per shard.")
@click.option("--overwrite", is_flag=True, help="Replace a shard set already at --out (the old set stays until the new "
                                                "one is complete; after a kill in between, the next generate at "
                                                "--out restores it).")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="G",
              help="GPUs each worker asks for (1, or 0.5 to share one); 0 draws on the CPU, a thread per CPU of the "
                   "worker's share. Refused at once on a cluster that never has them.")
@click.option("--batch", type=click.IntRange(min=1), metavar="B",
              help="Images per sampler call, each still drawn from its own seed (default 64 on a GPU, 16 on the CPU).")
@tracking_option
def models_generate(model, n, out, workers, inputs, seed_base, shard_size, overwrite, gpus_per_worker, batch,
                    tracking_uri) -> None:
    """Draw a WebDataset shard set from MODEL: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID
    or a snapshot file (generator.pt).

    Writes shard-NNNNNN.tar, dataset.json (the card, with the model, version, run and seed range
    under `generated`) and manifest.parquet (last) to --out; `orbitgen data verify` and a spec's
    data.train accept it. The same command gives the same shards and manifest, whatever --workers.
    Conditional models pair each output image with its input (cond.png, mask.png). A registered
    version lists the sets made from it in its tag orbitgen.generated (see `orbitgen models show`).
    """
    import tempfile

    from data_shards.storage import to_url
    from jobs.generate import check_out, generate, recover_interrupted_swap, resolve_model

    recover_interrupted_swap(to_url(out).rstrip("/"), say)   # an old set a killed --overwrite left aside
    check_out(to_url(out), overwrite)   # before any download
    client = _client(tracking_uri) if model.startswith(("models:/", "runs:/")) else None
    with tempfile.TemporaryDirectory(prefix="orbitgen-model-") as tmp:
        source = resolve_model(model, Path(tmp), client)
        r = generate(source, n, out, workers=workers, inputs=inputs, seed_base=seed_base, shard_size=shard_size,
                     overwrite=overwrite, client=client, say=say, gpus_per_worker=gpus_per_worker, batch=batch)
    seeds = r.lineage["seeds"]
    click.echo(f"{r.card.count} image{'s' * (r.card.count != 1)} in {r.card.shards} shard{'s' * (r.card.shards != 1)} → {r.url} (fingerprint {r.card.fingerprint[:12]}; "
               f"seeds {seeds[0]}..{seeds[1]}; {r.workers} worker{'s' * (r.workers != 1)}, {r.card.count / r.seconds:.1f} images/s)")
    if source.version is not None:
        click.echo(f"recorded on {source.name} v{source.version} (tag orbitgen.generated)")


# `models promote` exit codes, for CI (also in its --help and the README).
EXIT_NOT_BETTER, EXIT_INCOMPARABLE, EXIT_LOCK_BUSY = 3, 4, 5
PROMOTE_EXITS = """Exit codes: 0 the candidate is champion (promoted now, or already was); 3 not promoted: it does
not beat the champion by the margin (it is marked challenger); 4 not promoted: the two share no
evaluation protocol with METRIC (nothing written; the output names the `orbitgen eval` command that
fixes it, or use --reevaluate); 5 not promoted: another promotion held the registry lock for the
whole wait (ORBITGEN_PROMOTION_WAIT_S, 300 s): try again. Any other code is an error (2: bad
input, such as an unknown model, version, alias or metric)."""


@models.command("promote", epilog=PROMOTE_EXITS)
@click.argument("name")
@click.option("--metric", default="fid", show_default=True, help="Evaluation metric that decides.")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True)
@click.option("--version", help="Candidate version, a number or an alias (default: the best version by METRIC "
                                "under the protocol most versions were evaluated with).")
@click.option("--min-improvement", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Relative margin: 0.02 moves champion only when the candidate's METRIC is at least 2% of the "
                   "champion's better (min: (champion-candidate)/|champion| >= 0.02); 0 asks for any improvement.")
@click.option("--reevaluate", is_flag=True, help="When the two versions share no evaluation protocol, evaluate the "
                                                 "champion under the candidate's protocol first (orbitgen eval).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object (promoted, outcome, "
              "reason, candidate, champion_before, champion_after, metric, mode, candidate_score, champion_score, "
              "improvement, protocol, compared: every shared metric) instead of text; the exit code is the same.")
@tracking_option
def models_promote(name, metric, mode, version, min_improvement, reevaluate, as_json, tracking_uri) -> None:
    """Move alias `champion` of NAME to the candidate, only if it beats the current champion under
    an evaluation protocol both were evaluated with; print and log (on the candidate's run) the comparison."""
    import json

    from jobs.tracking import registry
    from jobs.tracking.runs import version_link

    client = _client(tracking_uri)
    p = registry.promote(name, metric=metric, mode=mode, candidate=version, client=client,
                         min_improvement=min_improvement, refuse_incomparable=True,
                         reevaluate=_evaluator(name, client.tracking_uri) if reevaluate else None)
    if as_json:
        click.echo(json.dumps(p.to_dict(), sort_keys=True))
    else:
        if p.table:
            click.echo(p.table)
        click.echo(p.reason)
        if p.artifact:
            click.echo(f"comparison logged on v{p.candidate}'s run as {p.artifact}")
        if p.champion_after is not None:
            click.echo(f"champion v{p.champion_after}: {version_link(client.tracking_uri, name, p.champion_after)}")
    code = {registry.NOT_BETTER: EXIT_NOT_BETTER, registry.INCOMPARABLE: EXIT_INCOMPARABLE,
            registry.LOCK_BUSY: EXIT_LOCK_BUSY}.get(p.outcome, 0)
    if code:
        sys.exit(code)


def _evaluator(name: str, tracking_uri: str):
    """`promote`'s reevaluate(version, like): `orbitgen eval` of NAME's version under protocol `like`,
    recorded on the version's tags."""
    from jobs.eval.model import evaluate_model

    def evaluate(version, like) -> None:
        say(f"evaluating {name} v{version}" + (f" under protocol {like.key()}" if like else ""))
        evaluate_model(f"models:/{name}/{version}", tracking_uri=tracking_uri, like=like)

    return evaluate


@models.command("rollback", epilog="Exit codes: 0 rolled back; 2 bad input (unknown model, no previous champion); "
                                   "5 another promotion held the registry lock for the whole wait: try again.")
@click.argument("name")
@tracking_option
def models_rollback(name, tracking_uri) -> None:
    """Put alias `champion` of NAME back on the previous champion (the champion history on NAME)."""
    from jobs.tracking.registry import rollback
    from jobs.tracking.registry_lock import LockBusy

    try:
        click.echo(rollback(name, _client(tracking_uri)))
    except LockBusy as e:
        click.echo(f"error: {e}; try again", err=True)
        sys.exit(EXIT_LOCK_BUSY)
