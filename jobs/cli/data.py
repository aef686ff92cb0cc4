"""`orbitgen data`: build WebDataset shards from a source layout, adopt shards made elsewhere, look
at them, verify them."""
from __future__ import annotations

import click

LAYOUT_HELP = """How SOURCE is laid out:
folder = images at any depth (image);
class-folders = one sub-folder per class (image, cls);
stylegan-zip = a StyleGAN2 dataset_tool zip (image, cls if labelled);
side-by-side = input and target halves of each image (cond, image);
paired-folders = SOURCE/COND_DIR and SOURCE/IMAGE_DIR matched by file stem (cond, image);
timeseries-csv = SOURCE is a CSV: past, mask, future (+ id, past_date, future_date) per row (cond, mask, image, json);
geotiff = a GeoTIFF or a folder of them, cut into tiles (image, json with CRS and transform)."""

# option -> (reader keyword, the layout it belongs to)
LAYOUT_OPTIONS = {"input_side": "side-by-side", "cond_dir": "paired-folders", "image_dir": "paired-folders",
                  "columns": "timeseries-csv", "stride": "geotiff", "max_nodata": "geotiff",
                  "bands": "geotiff"}


ADOPT_TARGETS = """URL is one of:
a brace-expanded shard URL on any fsspec filesystem, e.g. 's3://bucket/x/shard-{000000..000099}.tar' (quote it);
a folder of plain WebDataset tars (every *.tar in it, in name order);
a folder whose dataset.json has "shards_url" (a pattern or folder) and no manifest yet."""


@click.group()
def data() -> None:
    """Build WebDataset shards from a source layout, adopt shards made elsewhere, look at them, verify them."""


def _adopted(dest: str, *, refresh: bool = False) -> str:
    """What `inspect` and `verify` read for DEST: shards made elsewhere get their card first (said
    on stderr); a card written before is used as it is, so a changed shard is reported, not adopted."""
    from data_shards.adopt import resolve
    from data_shards.storage import to_url

    adopted = resolve(to_url(dest), refresh=refresh)
    if adopted is None:
        return to_url(dest)
    if adopted.note:
        click.echo(adopted.note, err=True)
    return adopted.url


@data.command("build")
@click.argument("source")
@click.argument("dest")
@click.option("--layout", type=click.Choice(["folder", "class-folders", "stylegan-zip", "side-by-side", "paired-folders",
                                             "timeseries-csv", "geotiff"]),
              default="folder", show_default=True, help=LAYOUT_HELP)
@click.option("--resolution", type=click.IntRange(min=1), required=True,
              help="Square side: resize the shorter side and centre-crop (geotiff: the tile size, no resize).")
@click.option("--channels", type=click.Choice(["keep", "gray", "rgb", "1", "3"]), default="keep", show_default=True,
              help="keep the source's bands (any count; beyond 4 stored as .npy), or convert to gray / rgb (1 / 3).")
@click.option("--shard-size", default="1000", show_default=True,
              help="Per shard: a sample count (1000) or a size (256MB, 1GiB).")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="An unreadable file, unmatched pair, CSV row pointing nowhere or other channel count: "
                   "fail = stop and name it; skip = leave it out, list it in DEST/skipped.jsonl and the summary.")
@click.option("--input-side", type=click.Choice(["left", "right"]), help="side-by-side: the half that is the input (cond). [left]")
@click.option("--cond-dir", help="paired-folders: sub-folder of the inputs (cond). [cond]")
@click.option("--image-dir", help="paired-folders: sub-folder of the targets (image). [image]")
@click.option("--columns", help="timeseries-csv: CSV column names, e.g. past=before,future=after,mask=change,id=aoi.")
@click.option("--stride", type=int, help="geotiff: pixels between tile origins. [the resolution]")
@click.option("--max-nodata", type=float, help="geotiff: largest nodata fraction a kept tile may have. [0]")
@click.option("--bands", help="geotiff: band numbers to keep, in order, from 1 (GDAL's numbering), e.g. 3,2,1. "
                              "[all but an alpha band]")
def data_build(source, dest, layout, resolution, channels, shard_size, on_error, **layout_options) -> None:
    """Write SOURCE (a path or fsspec URL) as shards to DEST (a folder or fsspec URL: file://, s3://).

    DEST gets shard-NNNNNN.tar, dataset.json (the card), skipped.jsonl when items were skipped,
    and manifest.parquet, written last: a failed build never looks complete.
    """
    from data_shards.build import build
    from data_shards.card import SKIPPED
    from data_shards.storage import join, to_url

    options = {k: v for k, v in layout_options.items() if v is not None}
    wrong = [k for k in options if LAYOUT_OPTIONS[k] != layout]
    if wrong:
        raise click.UsageError(", ".join(f"--{k.replace('_', '-')} is for --layout {LAYOUT_OPTIONS[k]}" for k in wrong))
    # Bad input (no source, wrong layout, unsafe archive, taken dest) is a UserError: exit 2.
    result = build(source, dest, layout=layout, resolution=resolution, channels=channels,
                   shard_size=shard_size, on_error=on_error, **options)
    card = result.card
    click.echo(f"{card.count} sample{'s' * (card.count != 1)} ({', '.join(card.modalities)}; {card.channels} channels, {card.resolution}²) "
               f"in {card.shards} shard{'s' * (card.shards != 1)} → {to_url(dest)} (fingerprint {card.fingerprint[:12]})")
    for note in result.notes:
        click.echo(note)
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} item{'s' * (len(result.skipped) != 1)} (all listed in {join(to_url(dest), SKIPPED)}):")
        for s in result.skipped[:20]:
            click.echo(f"  {s['item']}: {s['reason']}")
        if len(result.skipped) > 20:
            click.echo(f"  ... {len(result.skipped) - 20} more")


@data.command("inspect")
@click.argument("dest")
@click.option("--preview", type=click.Path(dir_okay=False),
              help="Also write a PNG grid of the first samples here (pairs: cond, mask, image side by side).")
@click.option("--samples", "n", type=click.IntRange(min=1), default=16, show_default=True, help="Samples in the preview grid.")
def data_inspect(dest, preview, n) -> None:
    """Print the card and per-shard counts of the shard set DEST.

    DEST may also be plain WebDataset shards (a brace URL, a folder of tars): their card is
    written on first use, as `orbitgen data adopt` does."""
    from data_shards.preview import describe, save_preview
    from data_shards.storage import to_url

    url = _adopted(dest)
    click.echo(describe(url))
    if preview:
        click.echo(f"preview → {save_preview(url, preview, n=n)}")


@data.command("verify")
@click.argument("dest")
def data_verify(dest) -> None:
    """Re-read every shard of DEST: sha256 and size against the manifest, decode every sample.

    Names each corrupt shard or sample and exits with status 1 if there is any. Shards made
    elsewhere are checked against the card `orbitgen data adopt` wrote (written now if none was).
    """
    from data_shards.verify import verify

    report = verify(_adopted(dest))
    if report.ok:
        click.echo(f"ok: {report.samples} sample{'s' * (report.samples != 1)} in {report.shards} "
                   f"shard{'s' * (report.shards != 1)}; sha256 and decoding checked")
        return
    for p in report.problems:
        click.echo(f"CORRUPT {p}", err=True)
    n = len(report.problems)
    raise click.ClickException(f"{n} problem{'s' * (n != 1)} in {report.shards} shard{'s' * (report.shards != 1)} "
                               f"of {report.url}")


@data.command("adopt", epilog=ADOPT_TARGETS)
@click.argument("url")
@click.option("--card-dir", help="Write the card here instead of beside the shards (for shards you cannot write to).")
@click.option("--resize", "resize_to", type=click.IntRange(min=1),
              help="Promise this square size: images of other sizes are centre-cropped and resized on read "
                   "(what data.resize: resize does). Without it, images must share one square size.")
@click.option("--holdout", type=float, help="Record the split by key hash under this data.holdout (a fraction "
                                            "0<x<1, or a count >= 2) in the card.")
def data_adopt(url, card_dir, resize_to, holdout) -> None:
    """Write an orbitgen card for WebDataset shards made elsewhere, without copying them.

    Every shard is read once: counts, resolution and channels (from image headers), the members
    found (png, jpg, jpeg, webp, tif, npy; cond.*, mask.*; cls; json), the key split, and a
    fingerprint. The card and a manifest go beside the shards (a folder's in the folder, a brace
    URL's in a hidden .orbitgen-adopted-* folder beside them), or into --card-dir. A card already
    there is reused while the shards' names and sizes match it. Then `orbitgen data verify URL`
    checks the shards against it, and data.train (or `orbitgen eval --data`) takes URL or the
    card's folder.
    """
    from data_shards.adopt import adopt
    from data_shards.errors import UserError
    from data_shards.storage import to_url

    if holdout is not None and holdout >= 1:
        if holdout != int(holdout):
            raise UserError(f"--holdout {holdout}: a fraction between 0 and 1, or a whole count >= 2")
        holdout = int(holdout)
    adopted = adopt(to_url(url), resize_to=resize_to, holdout=holdout, card_dir=card_dir)
    card = adopted.card
    if adopted.note:
        click.echo(adopted.note)
    else:
        click.echo(f"{to_url(url)}: a card was already there and matches the shards: {adopted.url}/dataset.json")
    members = "; ".join(f"{m}: {', '.join(names)}" for m, names in (card.members or {}).items())
    click.echo(f"{card.count} sample{'s' * (card.count != 1)} ({', '.join(card.modalities)}; {card.channels} channels, {card.resolution}²"
               f"{', resized on read' if card.resize else ''}) in {card.shards} shard{'s' * (card.shards != 1)} "
               f"(fingerprint {card.fingerprint[:12]}); members {members}")
    if card.split:
        click.echo(f"split by key hash, holdout {card.split['holdout']}: {card.split['training']} training, "
                   f"{card.split['held_out']} held out")
    click.echo(f"next      orbitgen data verify {adopted.url}")
