"""`orbitgen data`: build WebDataset shards from a source layout, look at them."""
from __future__ import annotations

from pathlib import Path

import click


@click.group()
def data() -> None:
    """Build WebDataset shards from a source layout and look at them."""


@data.command("build")
@click.argument("source")
@click.argument("dest")
@click.option("--layout", type=click.Choice(["folder"]), default="folder", show_default=True,
              help="How SOURCE is laid out: `folder` = images at any depth.")
@click.option("--resolution", type=int, required=True, help="Square side: resize the shorter side, centre-crop.")
@click.option("--channels", type=click.Choice(["keep", "1", "3"]), default="keep", show_default=True,
              help="Keep the source's channels, or convert to gray (1) / RGB (3).")
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Samples per shard.")
def data_build(source, dest, layout, resolution, channels, shard_size) -> None:
    """Write the images under SOURCE as shards to DEST (a folder or an fsspec URL: file://, s3://).

    DEST gets shard-NNNNNN.tar, dataset.json (the card) and manifest.parquet, written last:
    a failed build never looks complete.
    """
    import itertools

    from data_shards.sources import read_folder
    from data_shards.storage import to_url
    from data_shards.writer import write_shards

    ch = None if channels == "keep" else int(channels)
    samples = read_folder(source, resolution, ch)
    try:
        first = next(samples)
    except StopIteration:
        raise click.ClickException(f"no images under {source}") from None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    try:
        card = write_shards(itertools.chain([first], samples), to_url(dest), layout=layout, resolution=resolution,
                            channels=first.image.shape[-1], source=str(Path(source).absolute()), shard_samples=shard_size)
    except (ValueError, FileExistsError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{card.count} images in {card.shards} shards → {to_url(dest)} (fingerprint {card.fingerprint[:12]})")


@data.command("inspect")
@click.argument("dest")
@click.option("--preview", type=click.Path(dir_okay=False), help="Also write a PNG grid of the first samples here.")
def data_inspect(dest, preview) -> None:
    """Print the card and per-shard counts of the shard set DEST."""
    from data_shards.preview import describe, save_preview
    from data_shards.storage import to_url

    try:
        click.echo(describe(to_url(dest)))
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    if preview:
        click.echo(f"preview → {save_preview(to_url(dest), preview)}")
