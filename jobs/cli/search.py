"""`orbitgen search`: MineAug augmentation searches on Ray Tune, their rankings in MLflow."""
from __future__ import annotations

import os

import click

from jobs.runtime import console
from jobs.cli.common import SET_HELP, VERBOSE_HELP, read_spec, say
from jobs.runtime.redact import redact


@click.group()
def search() -> None:
    """MineAug augmentation searches: score every candidate augmentation of the spec's data as
    parallel Ray Tune trials (MLflow child runs of one parent), optionally validate subsets by
    short trainings (Optuna), and write the spec back with the chosen list."""


@search.command("mineaug")
@click.argument("spec_path", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help=SET_HELP + " The search reads its settings from the spec's `search:` section, e.g. "
                              "--set search.k=3 --set search.validate.top_m=5.")
@click.option("--resume", metavar="NAME", help="Continue the interrupted search NAME (printed at its start): "
              "finished trials are not rerun and it logs into the same MLflow parent run.")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Where to write the spec with augment.mineaug set [default: <workdir>/search/<name>/spec.yaml].")
@click.option("--spec-b64", hidden=True, help="The spec inline (used by `jobs submit --search`).")
@click.option("--verbose", "-v", is_flag=True, help=VERBOSE_HELP)
def search_mineaug(spec_path, overrides, resume, out, spec_b64, verbose) -> None:
    """Search the MineAug augmentations for the data of SPEC_PATH.

    Stage 1 applies every candidate (search.candidates) to every image, search.repeats times, and
    scores FID and KID against the originals (in search.features' space: by default the spec's
    eval.fid_extractor) and pixel MSE (search.preset=paper: the published rule, with Inception-v3
    features from eval.inception_weights); drops
    near-identity ones (MSE <= search.mse_min) and near-duplicates; ranks single augmentations
    and every K-set. Stage 2 (search.validate.top_m > 0) trains the spec's family briefly: the
    controls (none, TrivialAugment-style, the K best singles, the best K-set) with
    search.validate.seeds seeds each, and subsets proposed by Optuna; a subset replaces the
    choice of search.select only when it beats no augmentation beyond seed noise (paired bootstrap
    interval, Holm-corrected), and the verdict says so either way.
    Prints the ranking, the chosen list and the MLflow parent run; then run
    `orbitgen train <written spec>`. Bad input stops with exit code 2, naming the field.
    """
    from jobs.mineaug.run import run_search_job

    spec = read_spec(spec_path, overrides, spec_b64)
    console.set_verbose(verbose)
    log_file = console.library_lines_to_file(spec.workdir_path() / "logs")
    done = run_search_job(spec, say=say, resume=resume, out=out)   # bad input: exit 2 (BadInputExits2)
    res = done.result
    click.echo("")
    click.echo(res.table)
    click.echo("")
    click.echo(res.features_note)
    click.echo(f"K best singles  {', '.join(res.singles)}  (mixture FID {res.singles_fid:.4f}{_kid(res.singles_kid)})"
               f"  rule: {res.singles_rule}")
    click.echo(f"best K-set      {', '.join(res.best_set)}  (mixture FID {res.best_set_fid:.4f}{_kid(res.best_set_kid)})"
               f"  rule: {res.best_set_rule}")
    v = res.validation
    if v is not None:
        for line in stage2_lines(v):
            click.echo(line)
    click.echo(f"chosen ({res.chosen_rule})  {', '.join(res.chosen)}")
    click.echo(f"  why        {res.reason}")
    click.echo(f"  mlflow     parent run {res.parent_run_id} (experiment {spec.experiment}) at {redact(done.tracking_uri)}")
    click.echo(f"  search     {res.name} (continue it with --resume {res.name}) · {res.seconds:.0f} s")
    click.echo(f"  next       orbitgen train {done.spec_path}")
    if log_file is not None and log_file.exists():
        click.echo(f"  logs       {log_file}; --verbose shows them here")


def _kid(pair) -> str:
    """", KID k ± s" of a (KID, spread) pair; "" where it was not computed (nan)."""
    kid, std = pair
    return "" if kid != kid else f", KID {kid:.3g} ± {std:.2g}"


def _trained(t) -> str:
    """" FID f ± s, KID k ± s" of a subset's trained scores over its seeds ("" when unknown)."""
    if not t:
        return ""
    out = f" FID {t['fid']:.4g} ± {t['fid_std']:.2g}"
    return out + (f", KID {t['kid']:.3g} ± {t['kid_std']:.2g}" if t.get("kid") is not None else "")


def _num(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def stage2_lines(v) -> list[str]:
    """Stage 2's verdict as the console shows it: each subset against none, what each rung stopped."""
    lines = [f"stage 2 ({v.correction})"]
    trained = getattr(v, "trained", {}) or {}
    if "none" in trained:
        lines.append(f"  {'none':32s} trained{_trained(trained['none'])}  (control: no augmentation)")
    for c in v.comparisons:
        lines.append(f"  {c.key:32s} FID vs none {c.mean:+.4g}  {c.level:.1%} interval [{c.low:.4g}, {c.high:.4g}]  "
                     f"seeds {c.seeds}  {'beats none' if c.beats_none else '-'}  trained{_trained(trained.get(c.key))}"
                     f"  ({c.label})")
    for r in v.rungs:
        cutoff = "-" if r["last_cutoff"] is None else f"{r['last_cutoff']:.4g}"
        lines.append(f"  rung at step {r['rung']}: {r['judged']} judged, {r['stopped']} stopped (last cutoff {cutoff})")
    for a in v.agreement:
        if a.tau is not None:
            lines.append(f"  rank agreement, {a.size}-subsets: Kendall tau {_num(a.tau)} [{_num(a.tau_low)}, "
                         f"{_num(a.tau_high)}], Spearman rho {_num(a.rho)} over {a.subsets}")
    lines.append(f"verdict  {v.verdict}")
    return lines


@search.command("show")
@click.argument("run_id")
@click.option("--tracking-uri", default=lambda: os.environ.get("MLFLOW_TRACKING_URI"),
              show_default="$MLFLOW_TRACKING_URI",
              help="Where the search was tracked (the spec's tracking.uri; for the embedded default "
                   "sqlite:///<workdir>/mlflow.db).")
@click.option("--workdir", default="orbitgen-work", show_default=True,
              help="Used when no tracking URI is given: the local store under it.")
def search_show(run_id, tracking_uri, workdir) -> None:
    """Print the ranking of the finished search whose MLflow parent run is RUN_ID."""
    from pathlib import Path

    from mlflow.exceptions import MlflowException

    from jobs.tracking.store_check import require_store
    from search.tracking import show_search

    uri = tracking_uri or f"sqlite:///{Path(workdir).absolute() / 'mlflow.db'}"
    require_store(uri, "--tracking-uri" if tracking_uri else "--workdir's store")
    try:
        click.echo(show_search(run_id, uri))
    except (LookupError, ValueError, MlflowException) as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(2)
